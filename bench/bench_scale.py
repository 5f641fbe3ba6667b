"""Issue 7: status, janitor and memory with 500 real running instances, one run.

1. A real ``celery worker -B --pool threads`` and the API (``python -m celery_app.cli api``,
   its own process) on a private Redis. RSS of both (``/proc/<pid>/status`` VmRSS) at idle,
   after a few warm-up requests.
2. ``--instances`` (500) real instances, ``--per-team`` (2) per team, started through Celery
   (all tasks sent at once, as in an event's first minute).
3. Status, interleaved in rounds: ``GET /api/v1/teams/{t}/instances`` (keep-alive HTTP, a team
   with 2 running instances), ``GET /api/v1/instances`` (all 500), the
   ``get_container_status`` task for the team (checks Docker), and
   ``docker ps --filter label=ctf.team=t`` (the CLI, as an organiser would run it) against the
   same 500 real containers. Targets: API p50 <= 10 ms and >= 10x faster than ``docker ps``.
4. RSS of the worker and the API at 500 instances.
5. Janitor: every instance gets an expiry in the past in one Redis transaction; the worker's
   own beat (every ``CTF_JANITOR_INTERVAL`` = 5 s) reaps them. Time until no container and
   no record is left (target: 500 within 60 s), and until their emptied team networks,
   which the janitor removes after the containers, are gone too. RSS again afterwards.
   With ``--compare-reaping`` instead: the teams in quarters, reaped in the order janitor,
   raw, raw, janitor (ABBA); "raw" forgets the quarter in Redis (untimed) and removes its
   containers with the Docker SDK, CTF_JANITOR_CONCURRENCY threads, then its teams' networks
   (the janitor's order): the engine's own pace for the same containers and networks.

6. With ``--cycles K``: K start-all/reap-all cycles in all, the RSS after each reap.

Usage: .venv/bin/python bench/bench_scale.py [--instances 500] [--per-team 2]
       [--status-rounds 30] [--compare-reaping | --cycles K] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
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
    summary_ms,
)
from bench_burst import burst_celery, extra_catalog, plan_of
from bench_janitor import dockerd_pid, proc_cpu
from bench_latency import ADMIN, api_process, rss_kib

from celery_app.state.store import StateStore
from celery_app.vocab.models import Instance, iso, utcnow


def memory(pids: dict[str, int]) -> dict[str, float]:
    return {f"{name}_mib": round(rss_kib(pid) / 1024, 1) for name, pid in pids.items()}


def ours(bench: Bench) -> int:
    """How many of the instancer's containers of this run exist."""
    return len(bench.docker.api.containers(
        all=True, filters={"label": [f"ctf.test={RUN_ID}", "ctf.managed=true"]}))


def timed(fn: Any) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def measure_status(bench: Bench, http: httpx.Client, team: str, rounds: int,
                   per_round: int) -> dict[str, Any]:
    client = celery_client(bench)
    times: dict[str, list[float]] = {"api_team": [], "api_all": [], "task_team": [],
                                     "docker_ps": []}
    sizes: dict[str, int] = {}

    def api_team() -> None:
        r = http.get(f"/api/v1/teams/{team}/instances")
        r.raise_for_status()
        sizes["api_team"] = len(r.json()["instances"])

    def api_all() -> None:
        r = http.get("/api/v1/instances")
        r.raise_for_status()
        sizes["api_all"] = len(r.json()["instances"])

    def task_team() -> None:
        out = client.send_task("celery_app.tasks.get_container_status",
                               kwargs={"team_id": team}).get(timeout=60)
        sizes["task_team"] = len(out["instances"])

    def docker_ps() -> None:
        out = subprocess.run(["docker", "ps", "--filter", f"label=ctf.team={team}"],
                             check=True, capture_output=True, text=True).stdout
        sizes["docker_ps"] = len(out.strip().splitlines()) - 1

    try:
        for _ in range(3):  # warm connections and caches, untimed
            api_team()
            api_all()
        for _ in range(rounds):
            for _ in range(per_round):
                times["api_team"].append(timed(api_team))
            times["api_all"].append(timed(api_all))
            times["task_team"].append(timed(task_team))
            times["docker_ps"].append(timed(docker_ps))
    finally:
        close_celery_client(client)
    result: dict[str, Any] = {k: summary_ms(v) for k, v in times.items()}
    for k, n in sizes.items():
        result[k]["instances_returned"] = n
    api_p50 = statistics.median(times["api_team"])
    result["docker_ps_over_api_team"] = round(statistics.median(times["docker_ps"]) / api_p50, 1)
    result["api_team"]["p99_ms"] = round(pct(times["api_team"], 0.99) * 1000, 1)
    return result


def expire_all(store: StateStore) -> int:
    """Give every instance an expiry 5 s in the past, in one MULTI/EXEC."""
    instances = store.list()
    _expire_now(store, instances)
    return len(instances)


def expire(store: StateStore, keys: list[tuple[str, str]]) -> None:
    """Give these instances an expiry 5 s in the past, in one MULTI/EXEC."""
    found = [store.get(ch, team) for ch, team in keys]
    assert all(found)
    _expire_now(store, [i for i in found if i is not None])


def _expire_now(store: StateStore, instances: list[Instance]) -> None:
    past = utcnow() - timedelta(seconds=5)
    pipe = store.redis.pipeline(transaction=True)
    for inst in instances:
        pipe.set(f"ctf:inst:{inst.key}",
                 inst.model_copy(update={"expires_at": iso(past)}).model_dump_json())
        pipe.zadd("ctf:expiry", {inst.key: past.timestamp()})
    pipe.execute()


def team_left(bench: Bench, teams: set[str]) -> tuple[int, int]:
    """Containers and networks of these teams still present."""
    flt = {"label": [f"ctf.test={RUN_ID}", "ctf.managed=true"]}
    cs = sum(1 for c in bench.docker.api.containers(all=True, filters=flt)
             if c["Labels"].get("ctf.team") in teams)
    ns = sum(1 for n in bench.docker.api.networks(filters=flt)
             if (n.get("Labels") or {}).get("ctf.team") in teams)
    return cs, ns


def reap_by_janitor(bench: Bench, store: StateStore,
                    keys: list[tuple[str, str]]) -> tuple[float, float]:
    """Expire ``keys``; wait until the worker's beat removed them, then their networks.

    Returns:
        Seconds until no container and no record of ``keys`` was left, and until their
        teams' networks were gone too.
    """
    teams = {team for _, team in keys}
    expire(store, keys)
    began = time.perf_counter()
    instances_gone = None
    while True:
        containers, networks = team_left(bench, teams)
        if instances_gone is None and containers == 0 and not any(store.get(*k) for k in keys):
            instances_gone = time.perf_counter() - began
        if instances_gone is not None and networks == 0:
            return instances_gone, time.perf_counter() - began
        if time.perf_counter() - began > 600:
            raise RuntimeError("janitor quarter not done after 600 s")
        time.sleep(0.25)


def remove_network_if_there(api: Any, name: str) -> None:
    """Remove a network; one that is already gone counts as removed."""
    with contextlib.suppress(docker.errors.NotFound):
        api.remove_network(name)


def reap_raw(bench: Bench, store: StateStore, keys: list[tuple[str, str]],
             parallel: int) -> tuple[float, float]:
    """Forget ``keys`` in Redis (untimed), then remove their containers with ``parallel``
    threads and then their teams' networks: the engine's own pace, in the janitor's order.

    Returns:
        Seconds until the containers were gone, and until the networks were gone too.
    """
    for ch, team in keys:
        store.delete(ch, team)
    api = bench.docker.api
    began = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda k: api.remove_container(f"ctf-{k[0]}-{k[1]}", force=True, v=True),
                      keys))
        containers_gone = time.perf_counter() - began
        # The worker's janitor may take an emptied network first (it is an orphan to it).
        list(pool.map(lambda team: remove_network_if_there(api, f"ctf-team-{team}"),
                      sorted({team for _, team in keys})))
    return containers_gone, time.perf_counter() - began


def compare_reaping(bench: Bench, store: StateStore, plan: list[tuple[str, str]],
                    parallel: int) -> dict[str, Any]:
    """Quarters of the teams, in the order janitor, raw, raw, janitor (ABBA: the engine
    slows down as networks come and go, so neither side gets only the early ones)."""
    teams = sorted({team for _, team in plan})
    quarter = math.ceil(len(teams) / 4)
    out: dict[str, Any] = {"janitor": [], "raw": [], "order": ["janitor", "raw", "raw",
                                                                "janitor"]}
    for i, kind in enumerate(out["order"]):
        chosen = set(teams[i * quarter:(i + 1) * quarter])
        keys = [k for k in plan if k[1] in chosen]
        instances, everything = (reap_by_janitor(bench, store, keys) if kind == "janitor"
                                 else reap_raw(bench, store, keys, parallel))
        out[kind].append({"containers": len(keys), "teams": len(chosen),
                          "instances_gone_s": round(instances, 1),
                          "networks_gone_s": round(everything, 1),
                          "per_second": round(len(keys) / instances, 2)})
        print(f"reap {kind}: {out[kind][-1]}", file=sys.stderr)
    for k in ("janitor", "raw"):
        n = sum(q["containers"] for q in out[k])
        out[f"{k}_per_second"] = round(n / sum(q["instances_gone_s"] for q in out[k]), 2)
        out[f"{k}_all_per_second"] = round(n / sum(q["networks_gone_s"] for q in out[k]), 2)
    out["raw_over_janitor_rate"] = round(out["raw_per_second"] / out["janitor_per_second"], 3)
    return out


def reap_all(bench: Bench, store: StateStore, worker_pid: int) -> dict[str, Any]:
    """Expire every instance at once; wait until the worker's beat removed them all."""
    w0, d0 = proc_cpu(worker_pid), proc_cpu(dockerd_pid())
    expired = expire_all(store)
    began = time.perf_counter()
    trace = []
    while True:
        left_c, left_r = ours(bench), store.count()
        elapsed = time.perf_counter() - began
        trace.append((round(elapsed, 1), left_c, left_r))
        if left_c == 0 and left_r == 0:
            break
        if elapsed > 600:
            raise RuntimeError(f"janitor: {left_c} containers, {left_r} records "
                               "left after 600 s")
        time.sleep(0.5)
    took = time.perf_counter() - began
    flt = {"label": [f"ctf.test={RUN_ID}", "ctf.managed=true"]}
    nets = len(bench.docker.api.networks(filters=flt))
    # The janitor removes the emptied team networks after the containers, a budget per pass.
    while bench.docker.api.networks(filters=flt):
        if time.perf_counter() - began > 900:
            raise RuntimeError("janitor: networks left after 900 s")
        time.sleep(0.5)
    networks_gone = time.perf_counter() - began
    first_gone = next((t for t, c, _ in trace if c < expired), None)
    result = {
        "expired": expired, "seconds": round(took, 1),
        "containers_per_second": round(expired / took, 1),
        "first_removal_after_s": first_gone,
        "networks_left_then": nets, "networks_gone_after_s": round(networks_gone, 1),
        "target_seconds": 60,
        "worker_cpu_s": round(proc_cpu(worker_pid) - w0, 1),
        "dockerd_cpu_s": round(proc_cpu(dockerd_pid()) - d0, 1),
        "trace": trace[::max(1, len(trace) // 20)],
    }
    print(f"janitor: {result}", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--per-team", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="worker threads")
    parser.add_argument("--status-rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=10, help="team requests per round")
    parser.add_argument("--compare-reaping", action="store_true",
                        help="instead of expiring all at once: quarters reaped by the janitor "
                        "and by raw SDK removal (CTF_JANITOR_CONCURRENCY threads), ABBA")
    parser.add_argument("--cycles", type=int, default=1,
                        help="after the first, start and reap all instances this many times "
                        "in all, with the worker's RSS after each reap (does it keep growing?)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    teams = math.ceil(args.instances / args.per_team)
    plan = plan_of(teams, args.per_team)[:args.instances]
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "load_avg_before": os.getloadavg(), "instances": args.instances, "teams": teams,
        "worker_concurrency": args.concurrency,
    }
    env = {"CTF_MAX_INSTANCES_PER_TEAM": str(args.per_team),
           "CTF_MAX_INSTANCES": str(max(1000, 2 * args.instances)),
           "CTF_RATE_LIMIT_COUNT": "1000000"}
    janitor_threads = int(os.environ.get("CTF_JANITOR_CONCURRENCY", "8"))
    env["CTF_JANITOR_CONCURRENCY"] = str(janitor_threads)
    if args.compare_reaping:
        env["CTF_ORPHAN_GRACE"] = "3600"  # the raw quarters' containers are not orphans
    with bench_run(ttl=1800, extra_catalog=extra_catalog(args.per_team)) as bench:
        worker = bench_worker(bench, concurrency=args.concurrency, **env)
        worker.start()
        assert worker.proc is not None and bench.redis.proc is not None
        store = StateStore.from_url(f"{bench.redis.url}/2")
        try:
            with api_process(bench, **env) as (base, api), httpx.Client(
                base_url=base, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"},
            ) as http:
                pids = {"worker": worker.proc.pid, "api": api.pid,
                        "redis": bench.redis.proc.pid}
                for _ in range(20):
                    http.get("/api/v1/instances").raise_for_status()
                    http.get("/api/v1/teams/bt000/instances").raise_for_status()
                time.sleep(6)  # a janitor pass or two at idle
                result["rss_idle"] = memory(pids)
                print(f"idle RSS {result['rss_idle']}", file=sys.stderr)

                # 2. the instances
                w0, d0 = proc_cpu(worker.proc.pid), proc_cpu(dockerd_pid())
                out = burst_celery(bench, plan)
                result["start"] = {
                    "seconds": round(out["seconds"], 1),
                    "per_second": round(args.instances / out["seconds"], 2),
                    "failures_n": len(out["failures"]), "failures": out["failures"][:5],
                    "running_containers": ours(bench),
                    "worker_cpu_s": round(proc_cpu(worker.proc.pid) - w0, 1),
                    "dockerd_cpu_s": round(proc_cpu(dockerd_pid()) - d0, 1),
                }
                print(f"started: {result['start']}", file=sys.stderr)
                result["rss_500_after_start"] = memory(pids)

                # 3. status
                result["status"] = measure_status(bench, http, "bt123", args.status_rounds,
                                                  args.per_round)
                print(f"status: {json.dumps(result['status'])}", file=sys.stderr)

                # 4. memory at 500
                result["rss_500_after_status"] = memory(pids)
                print(f"RSS at {args.instances}: {result['rss_500_after_status']}",
                      file=sys.stderr)

                # 5. janitor
                if args.compare_reaping:
                    result["reap_compare"] = compare_reaping(bench, store, plan,
                                                             janitor_threads)
                    result["reap_compare"]["janitor_concurrency"] = janitor_threads
                else:
                    result["janitor"] = reap_all(bench, store, worker.proc.pid)
                time.sleep(6)
                result["rss_after_reap"] = memory(pids)

                # 6. more start/reap cycles: is what the worker keeps after reaping bounded?
                if args.cycles > 1 and not args.compare_reaping:
                    result["cycles"] = [{"cycle": 1, "rss": result["rss_after_reap"]}]
                    for cycle in range(2, args.cycles + 1):
                        out = burst_celery(bench, plan)
                        reaped = reap_all(bench, store, worker.proc.pid)
                        time.sleep(6)
                        result["cycles"].append({
                            "cycle": cycle, "start_s": round(out["seconds"], 1),
                            "failures_n": len(out["failures"]),
                            "reap_s": reaped["seconds"], "rss": memory(pids),
                        })
                        print(f"cycle: {result['cycles'][-1]}", file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):
                store.redis.close()
            worker.stop()
    result["load_avg_after"] = os.getloadavg()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
