"""Issue 15: the index that follows Docker's events, at N instances on one host (one run).

1. A real ``celery worker -B --pool threads`` (following its engine's events) and the API in
   its own process, on a private Redis; RSS of worker, API and Redis at idle.
2. The start burst: ``-n`` instances (``--per-team`` per team), every start sent at once by a
   plain Celery client, until each came back ``running``.
3. Status latency, interleaved round by round on the same running instances, p50 and p99:
   the ``get_container_status`` task by name for one instance and for one team (the web
   application's calls), ``GET /api/v1/teams/{t}/instances/{c}`` and
   ``GET /api/v1/teams/{t}/instances`` (keep-alive HTTP, through httpx and through the
   standard library's ``http.client``, whose own cost per request is smaller), and the floors:
   Celery's round trip of a built-in task that does nothing (``celery.accumulate``) and the
   API's cached ``/healthz``; against the raw thing: the SDK's ``containers(filters=label)``
   for the team and ``docker ps --filter label=ctf.team=t``.
4. The index against ``docker ps``: every instance the API lists (``GET /api/v1/instances``)
   compared with ``docker ps -a`` of the run's containers, name by name and state by state,
   and the time of each.
5. Events: ``--kills`` containers killed one at a time (SDK ``kill``), the time until the
   task path, then the API, shows each ``failed``; then 10 % of the rest killed at once and
   the time until all of them are ``failed`` in the index.
6. Expiry of all at once (bench_scale.reap_all): from the moment every instance expires until
   every container and network is gone. Redis key count and RSS per instance.

Usage: .venv/bin/python bench/bench_events.py [-n 200] [--per-team 2] [--rounds 100]
       [--kills 10] [--skip-expiry] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client as http_client
import json
import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from _common import (
    RUN_ID,
    Bench,
    bench_run,
    bench_worker,
    celery_client,
    close_celery_client,
    emit,
    machine,
    pct,
)
from bench_burst import burst_celery, extra_catalog, plan_of
from bench_janitor import dockerd_pid, proc_cpu
from bench_latency import ADMIN, api_process
from bench_scale import memory, ours, reap_all

from celery_app.hosts.present import present
from celery_app.state.store import StateStore

STATUS = "celery_app.tasks.get_container_status"


def ms(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of durations in seconds, as milliseconds."""
    return {"n": len(values), "p50_ms": round(pct(values, 0.5) * 1000, 2),
            "p99_ms": round(pct(values, 0.99) * 1000, 2),
            "max_ms": round(max(values) * 1000, 2)}


def settle(pids: list[int | None], quiet: float = 0.15, longest: float = 120.0) -> dict[str, Any]:
    """Wait until the engine and the worker are quiet (after a burst) before timing reads.

    Right after 1,000 starts the engine is still busy for a while (its own bookkeeping, the
    events), which is the burst's cost, not the reads'. Quiet: each process used less than
    ``quiet`` of a core over the last 2 s. Gives up after ``longest`` seconds and says so.
    """
    began = time.monotonic()
    while True:
        before = [proc_cpu(pid) for pid in pids]
        time.sleep(2)
        busy = max((proc_cpu(pid) - b) / 2 for pid, b in zip(pids, before, strict=True))
        waited = time.monotonic() - began
        if busy < quiet or waited > longest:
            return {"waited_s": round(waited, 1), "busiest_core_share": round(busy, 3),
                    "load_avg": os.getloadavg()}


def measure_status(bench: Bench, http: httpx.Client, client: Any, rounds: int,
                   targets: list[tuple[str, str]]) -> dict[str, Any]:
    """Interleaved status reads of ``targets`` (challenge, team), one of each per round."""
    api = bench.docker.api
    times: dict[str, list[float]] = {k: [] for k in (
        "task_one", "task_team", "task_noop", "api_one", "api_team", "api_one_stdlib",
        "api_team_stdlib", "api_healthz", "sdk_team", "docker_ps_team", "inproc_index",
        "inproc_verified")}
    ctx = bench.context()
    # The same routes through the standard library's keep-alive client: httpx's own CPU per
    # request (~0.4 ms here) is the client's, not the API's.
    assert http.base_url.port is not None
    lean = http_client.HTTPConnection(http.base_url.host, http.base_url.port, timeout=60)
    auth = {"Authorization": str(http.headers["Authorization"])}

    def lean_get(path: str) -> Any:
        lean.request("GET", path, headers=auth)
        reply = lean.getresponse()
        body = reply.read()
        assert reply.status == 200, body
        return json.loads(body)

    def task_one(ch: str, team: str) -> None:
        out = client.send_task(STATUS, kwargs={"team_id": team, "challenge": ch}).get(timeout=30)
        assert out["instances"][0]["status"] == "running", out

    def task_team(_ch: str, team: str) -> None:
        assert client.send_task(STATUS, kwargs={"team_id": team}).get(timeout=30)["instances"]

    def api_one(ch: str, team: str) -> None:
        r = http.get(f"/api/v1/teams/{team}/instances/{ch}")
        r.raise_for_status()
        assert r.json()["status"] == "running"

    def api_team(_ch: str, team: str) -> None:
        r = http.get(f"/api/v1/teams/{team}/instances")
        r.raise_for_status()
        assert r.json()["instances"]

    def task_noop(_ch: str, _team: str) -> None:
        # Celery's own round trip on the same worker: a built-in task that does nothing.
        assert client.send_task("celery.accumulate", args=[1]).get(timeout=30) == [1]

    def api_one_stdlib(ch: str, team: str) -> None:
        assert lean_get(f"/api/v1/teams/{team}/instances/{ch}")["status"] == "running"

    def api_team_stdlib(_ch: str, team: str) -> None:
        assert lean_get(f"/api/v1/teams/{team}/instances")["instances"]

    def sdk_team(_ch: str, team: str) -> None:
        assert api.containers(all=True, filters={"label": [f"ctf.team={team}",
                                                           f"ctf.test={RUN_ID}"]})

    def docker_ps_team(_ch: str, team: str) -> None:
        subprocess.run(["docker", "ps", "-a", "--filter", f"label=ctf.team={team}"],
                       check=True, capture_output=True)

    def api_healthz(_ch: str, _team: str) -> None:
        http.get("/healthz").raise_for_status()  # the HTTP stack's floor (cached snapshot)

    def inproc_index(ch: str, team: str) -> None:
        # What the task does now, without Celery: the index only.
        present(ctx.service.status(team, ch), ctx.store, ctx.hosts)

    def inproc_verified(ch: str, team: str) -> None:
        # What it did before (and does while the follower is not connected): ask Docker too.
        present(ctx.service.status(team, ch, verify=True), ctx.store, ctx.hosts)

    fns = {"task_one": task_one, "task_team": task_team, "task_noop": task_noop,
           "api_one": api_one, "api_team": api_team, "api_one_stdlib": api_one_stdlib,
           "api_team_stdlib": api_team_stdlib, "api_healthz": api_healthz, "sdk_team": sdk_team,
           "docker_ps_team": docker_ps_team, "inproc_index": inproc_index,
           "inproc_verified": inproc_verified}
    for ch, team in targets[:5]:  # warm connections, untimed
        for fn in fns.values():
            fn(ch, team)
    for i in range(rounds):
        ch, team = targets[i % len(targets)]
        order = list(fns.items())
        if i % 2:
            order.reverse()  # neither side always goes first
        for name, fn in order:
            began = time.perf_counter()
            fn(ch, team)
            times[name].append(time.perf_counter() - began)
    result: dict[str, Any] = {k: ms(v) for k, v in times.items()}
    p50 = {k: pct(v, 0.5) for k, v in times.items()}
    result["sdk_over_task_team"] = round(p50["sdk_team"] / p50["task_team"], 2)
    result["docker_ps_over_api_team"] = round(p50["docker_ps_team"] / p50["api_team"], 1)
    result["verified_over_index_inproc"] = round(p50["inproc_verified"] / p50["inproc_index"], 1)
    lean.close()
    ctx.driver.close()
    ctx.store.redis.close()
    return result


def compare_index(bench: Bench, http: httpx.Client) -> dict[str, Any]:
    """Every listed instance against ``docker ps -a`` of the run, name by name."""
    began = time.perf_counter()
    r = http.get("/api/v1/instances")
    r.raise_for_status()
    api_s = time.perf_counter() - began
    listed = {i["container_name"]: i["status"] for i in r.json()["instances"]}
    began = time.perf_counter()
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=ctf.test={RUN_ID}", "--filter",
         "label=ctf.managed=true", "--format", "{{.Names}} {{.State}}"],
        check=True, capture_output=True, text=True).stdout
    ps_s = time.perf_counter() - began
    engine = dict(line.split(" ", 1) for line in out.strip().splitlines())
    want = {name: ("running" if state == "running" else "failed")
            for name, state in engine.items()}
    wrong = sorted(n for n in set(want) | set(listed) if want.get(n) != listed.get(n))
    return {"listed": len(listed), "containers": len(engine), "mismatches": len(wrong),
            "mismatched": wrong[:10], "api_all_ms": round(api_s * 1000, 1),
            "docker_ps_all_ms": round(ps_s * 1000, 1)}


def measure_events(bench: Bench, http: httpx.Client, client: Any,
                   plan: list[tuple[str, str]], kills: int) -> dict[str, Any]:
    """Kill containers; how long until the task path and the API show them failed."""
    api = bench.docker.api
    by_task: list[float] = []
    by_api: list[float] = []
    victims = plan[-kills:]
    for ch, team in victims:
        api.kill(f"ctf-{ch}-{team}")
        began = time.perf_counter()
        while client.send_task(STATUS, kwargs={"team_id": team, "challenge": ch}).get(
                timeout=30)["instances"][0]["status"] != "failed":
            if time.perf_counter() - began > 30:
                raise RuntimeError(f"{ch}/{team} not failed after 30 s")
        by_task.append(time.perf_counter() - began)
        while http.get(f"/api/v1/teams/{team}/instances/{ch}").json()["status"] != "failed":
            time.sleep(0.005)
        by_api.append(time.perf_counter() - began)
    rest = plan[:-kills]
    many = rest[-max(1, len(rest) // 10):]
    store = StateStore.from_url(f"{bench.redis.url}/2")
    began = time.perf_counter()
    for ch, team in many:
        api.kill(f"ctf-{ch}-{team}")
    killed_s = time.perf_counter() - began
    while any(i is None or i.status != "failed" for i in (store.get(*k) for k in many)):
        if time.perf_counter() - began > 120:
            raise RuntimeError("the killed burst not all failed after 120 s")
        time.sleep(0.02)
    all_s = time.perf_counter() - began
    store.redis.close()
    return {"one_at_a_time": {"task": ms(by_task), "api": ms(by_api)},
            "burst": {"killed": len(many), "kill_calls_s": round(killed_s, 2),
                      "all_failed_in_index_s": round(all_s, 2)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--instances", type=int, default=200)
    parser.add_argument("--per-team", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="worker threads")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--skip-expiry", action="store_true",
                        help="no step 6 (the run's cleanup still removes everything)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    teams = math.ceil(args.instances / args.per_team)
    plan = plan_of(teams, args.per_team)[:args.instances]
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "load_avg_before": os.getloadavg(), "instances": args.instances, "teams": teams,
    }
    env = {"CTF_MAX_INSTANCES_PER_TEAM": str(args.per_team),
           "CTF_MAX_INSTANCES": str(max(1000, 2 * args.instances)),
           "CTF_RATE_LIMIT_COUNT": "1000000"}
    with bench_run(ttl=1800, extra_catalog=extra_catalog(args.per_team)) as bench:
        # An earlier run still removing its 500 networks would make these teams' starts fail
        # ("a network named ctf-team-bt000 exists … not managed by this instancer").
        left = [n.name for n in bench.docker.networks.list(filters={"name": "ctf-team-"})]
        if left:
            print(f"{len(left)} ctf-team-* networks exist (an earlier run still cleaning "
                  "up?); wait until `docker network ls` shows none", file=sys.stderr)
            return 1
        worker = bench_worker(bench, concurrency=args.concurrency, **env)
        worker.start()
        assert worker.proc is not None and bench.redis.proc is not None
        keys = redis.Redis.from_url(f"{bench.redis.url}/2")
        client = celery_client(bench)
        store = StateStore.from_url(f"{bench.redis.url}/2")
        try:
            with api_process(bench, **env) as (base, api), httpx.Client(
                base_url=base, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"},
            ) as http:
                pids = {"worker": worker.proc.pid, "api": api.pid,
                        "redis": bench.redis.proc.pid}
                time.sleep(3)
                result["rss_idle"] = memory(pids)
                keys_idle = int(keys.dbsize())

                w0, d0 = proc_cpu(worker.proc.pid), proc_cpu(dockerd_pid())
                out = burst_celery(bench, plan)
                result["start_burst"] = {
                    "seconds": round(out["seconds"], 1),
                    "per_second": round(args.instances / out["seconds"], 2),
                    "failures_n": len(out["failures"]), "failures": out["failures"][:5],
                    "running_containers": ours(bench),
                    "worker_cpu_s": round(proc_cpu(worker.proc.pid) - w0, 1),
                    "dockerd_cpu_s": round(proc_cpu(dockerd_pid()) - d0, 1),
                }
                print(f"started: {result['start_burst']}", file=sys.stderr)
                result["rss_running"] = memory(pids)
                result["redis_keys"] = {"idle": keys_idle, "running": int(keys.dbsize())}

                result["settle_before_status"] = settle([worker.proc.pid, dockerd_pid()])
                result["status"] = measure_status(bench, http, client, args.rounds, plan)
                print(f"status: {json.dumps(result['status'])}", file=sys.stderr)
                result["index_vs_docker_ps"] = compare_index(bench, http)
                print(f"index: {result['index_vs_docker_ps']}", file=sys.stderr)

                result["events"] = measure_events(bench, http, client, plan, args.kills)
                print(f"events: {result['events']}", file=sys.stderr)
                result["index_vs_docker_ps_after_kills"] = compare_index(bench, http)

                result["per_instance"] = {
                    f"{name}_kib": round((result["rss_running"][f"{name}_mib"]
                                          - result["rss_idle"][f"{name}_mib"]) * 1024
                                         / args.instances, 1)
                    for name in pids
                } | {"redis_keys": round((result["redis_keys"]["running"] - keys_idle)
                                         / args.instances, 2)}
                if not args.skip_expiry:
                    result["expire_all"] = reap_all(bench, store, worker.proc.pid)
                    result["rss_after_expiry"] = memory(pids)
        finally:
            close_celery_client(client)
            with contextlib.suppress(Exception):
                store.redis.close()
                keys.close()
            worker.stop()
    result["load_avg_after"] = os.getloadavg()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
