"""Issue 7: a burst of 100 teams x 2 challenges at once, Celery vs a raw Docker thread pool.

celery  200 ``start_container`` tasks sent at once (team-major order) by a plain Celery client
        to a real ``celery worker -B --pool threads --concurrency P``; the time until every
        result came back ``running`` (a start that fails counts as a failure, not as done).
raw     a ``ThreadPoolExecutor(P)`` doing the same 200 starts with the Docker SDK: the team's
        bridge network created by the team's first start (a per-team lock, like the service's
        network lock; subnets from 10.216.0.0/16), ``containers.run`` with the same limits and
        port publishing, ``reload()``, then the service's readiness probe on the container IP.
ceiling the engine's own ceiling: ``--ceiling-n`` raw create + start on the default bridge, with
        the same limits and port publishing, no network creation, no probe, at
        ``--ceiling-parallel`` threads: containers per second.

Same parallelism P for celery and raw (``--parallel``, default 16 = CTF_WORKER_CONCURRENCY's
default). ``--compare-src DIR`` adds celery_alt: a second worker running DIR's celery_app/
(its own Redis), to measure a proposed change side by side. Rounds alternate the order (round
1: raw, celery, alt; round 2: alt, celery, raw; then rotated); between phases every container
and network of the phase is removed (stop tasks for the instancer's, then ``cleanup_docker``'s
thread pool), untimed. The CPU used by the worker, dockerd and this process during each phase
is read from /proc.

Usage: .venv/bin/python bench/bench_burst.py [--teams 100] [--per-team 2] [--parallel 16]
       [--rounds 2] [--ceiling-n 200] [--ceiling-parallel 32] [--compare-src DIR]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
from _common import (
    LABEL,
    RUN_ID,
    Bench,
    bench_run,
    bench_worker,
    celery_client,
    cleanup_docker,
    close_celery_client,
    emit,
    machine,
    side_bench,
    side_labels,
    summary_ms,
)
from bench_janitor import dockerd_pid, proc_cpu

from celery_app.core.readiness import wait_ready

RAW_POOL = "10.216.0.0/16"
TIMEOUT = 300
LIMITS: dict[str, Any] = {
    # what the service puts on every instance (catalog: 64m, 0.5 cpu, 64 pids)
    "cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"],
    "mem_limit": 64 * 1024**2, "memswap_limit": 64 * 1024**2, "nano_cpus": 500_000_000,
    "pids_limit": 64,
}


def extra_catalog(per_team: int) -> str:
    return "".join(f"""  c{i}:
    image: {{image}}
    port: 8080
    protocol: http
    health_path: /
    ttl: 1800
    memory: 64m
    cpus: 0.5
    pids: 64
    start_timeout: 120
""" for i in range(per_team))


def plan_of(teams: int, per_team: int) -> list[tuple[str, str]]:
    """(challenge, team) pairs, team-major: t000 c0, t000 c1, t001 c0, ..."""
    return [(f"c{c}", f"bt{t:03d}") for t in range(teams) for c in range(per_team)]


def burst_celery(bench: Bench, plan: list[tuple[str, str]]) -> dict[str, Any]:
    client = celery_client(bench)
    try:
        began = time.perf_counter()
        pending = [client.send_task("celery_app.tasks.start_container", args=[ch, team])
                   for ch, team in plan]
        sent = time.perf_counter() - began
        failures: list[str] = []
        for res in pending:
            try:
                inst = res.get(timeout=TIMEOUT)
                if inst.get("status") != "running":
                    failures.append(str(inst))
            except Exception as exc:  # noqa: BLE001  # counted and shown
                failures.append(f"{type(exc).__name__}: {exc}")
        total = time.perf_counter() - began
    finally:
        close_celery_client(client)
    return {"seconds": total, "send_seconds": sent, "failures": failures}


def stop_celery(bench: Bench, plan: list[tuple[str, str]]) -> None:
    client = celery_client(bench)
    try:
        pending = [client.send_task("celery_app.tasks.stop_container", args=[ch, team])
                   for ch, team in plan]
        for res in pending:
            with contextlib.suppress(Exception):
                res.get(timeout=TIMEOUT)
    finally:
        close_celery_client(client)


class RawBurst:
    """The same starts with the Docker SDK and nothing else."""

    def __init__(self, bench: Bench, teams: int, parallel: int) -> None:
        self.bench = bench
        # a connection per thread, as the worker's driver has (max_pool_size=32)
        self.docker = docker.from_env(timeout=120, max_pool_size=max(32, parallel))
        self.subnets = list(ipaddress.IPv4Network(RAW_POOL).subnets(new_prefix=28))[:teams]
        self.locks: dict[str, threading.Lock] = {}
        self.nets: dict[str, str] = {}
        self.guard = threading.Lock()

    def network(self, team: str) -> str:
        with self.guard:
            lock = self.locks.setdefault(team, threading.Lock())
        with lock:
            if team not in self.nets:
                name = f"raw-{team}-{RUN_ID}"
                ipam = docker.types.IPAMConfig(pool_configs=[
                    docker.types.IPAMPool(subnet=str(self.subnets[int(team[2:])]))])
                self.docker.api.create_network(name, driver="bridge", ipam=ipam,
                                                     labels=LABEL, check_duplicate=True)
                self.nets[team] = name
            return self.nets[team]

    def start(self, challenge: str, team: str) -> float:
        began = time.perf_counter()
        c = self.docker.containers.run(
            self.bench.image, detach=True, name=f"raw-{challenge}-{team}-{RUN_ID}",
            network=self.network(team), ports={"8080/tcp": ("127.0.0.1", None)},
            labels={**LABEL, "ctf.bench.team": team}, hostname=challenge, **LIMITS,
        )
        c.reload()
        nets = c.attrs["NetworkSettings"]["Networks"]
        ip = next(n["IPAddress"] for n in nets.values() if n.get("IPAddress"))
        if not wait_ready(ip, 8080, "http", "/", 120):
            raise RuntimeError(f"{c.name} never answered")
        return time.perf_counter() - began

    def run(self, plan: list[tuple[str, str]], parallel: int) -> dict[str, Any]:
        failures: list[str] = []
        each: list[float] = []

        def one(item: tuple[str, str]) -> None:
            try:
                each.append(self.start(*item))
            except Exception as exc:  # noqa: BLE001  # counted and shown
                failures.append(f"{item}: {type(exc).__name__}: {exc}")

        began = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, plan))
        self.docker.close()
        return {"seconds": time.perf_counter() - began, "failures": failures,
                "each": summary_ms(each) if each else {}}


def ceiling(bench: Bench, n: int, parallel: int) -> dict[str, Any]:
    """Raw create + start of ``n`` containers on the default bridge, no probe."""
    client = docker.from_env(timeout=120, max_pool_size=max(32, parallel))
    api = client.api

    def one(i: int) -> None:
        host_config = api.create_host_config(
            port_bindings={"8080/tcp": ("127.0.0.1", "")}, **LIMITS,
        )
        cid = api.create_container(bench.image, name=f"ceil-{i}-{RUN_ID}", labels=LABEL,
                                   ports=[(8080, "tcp")], host_config=host_config,
                                   detach=True)["Id"]
        api.start(cid)

    began = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(n)))
    took = time.perf_counter() - began
    client.close()
    return {"n": n, "parallel": parallel, "seconds": round(took, 1),
            "containers_per_second": round(n / took, 2)}


def remove_all(bench: Bench) -> float:
    """Remove every labelled container and network (in parallel); return seconds."""
    began = time.perf_counter()
    cleanup_docker(bench.docker, images=False)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teams", type=int, default=100)
    parser.add_argument("--per-team", type=int, default=2)
    parser.add_argument("--parallel", type=int,
                        default=int(os.environ.get("CTF_WORKER_CONCURRENCY", "16")),
                        help="worker concurrency and raw thread pool size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ceiling-n", type=int, default=200)
    parser.add_argument("--ceiling-parallel", type=int, default=32)
    parser.add_argument("--compare-src", type=Path,
                        help="also run a second worker from this checkout (celery_alt), "
                        "with its own Redis, interleaved with the others")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    plan = plan_of(args.teams, args.per_team)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "load_avg_before": os.getloadavg(), "starts": len(plan), "parallel": args.parallel,
        "rounds": [], "target_ratio": 1.25,
    }
    env = {"CTF_MAX_INSTANCES_PER_TEAM": str(max(2, args.per_team)),
           "CTF_MAX_INSTANCES": str(max(1000, 2 * len(plan))),
           "CTF_RATE_LIMIT_COUNT": "1000000", "CTF_LOCK_WAIT": "240"}
    kinds = ["raw", "celery"] + (["celery_alt"] if args.compare_src else [])
    with bench_run(ttl=1800, extra_catalog=extra_catalog(args.per_team)) as bench, \
            contextlib.ExitStack() as stack:
        main_env = {**env, "CTF_EXTRA_LABELS": side_labels("main")} if args.compare_src else env
        worker = bench_worker(bench, concurrency=args.parallel, **main_env)
        workers = {"celery": (bench, worker)}
        if args.compare_src:
            alt = stack.enter_context(side_bench(bench))
            workers["celery_alt"] = (alt, bench_worker(alt, concurrency=args.parallel,
                                                 src=args.compare_src,
                                                 **{**env, "CTF_EXTRA_LABELS": side_labels("alt")}))
            result["compare_src"] = str(args.compare_src)
        dpid = dockerd_pid()
        try:
            for _, w in workers.values():
                w.start()
            for rnd in range(args.rounds):
                # raw, celery, alt; alt, celery, raw; then rotated: no side always goes first
                shift = (rnd // 2) % len(kinds)
                order = kinds[shift:] + kinds[:shift]
                if rnd % 2 == 1:
                    order.reverse()
                figures: dict[str, Any] = {"order": order}
                for kind in order:
                    proc = workers[kind][1].proc if kind in workers else None
                    wpid = proc.pid if proc is not None else None
                    w0, d0, b0 = proc_cpu(wpid), proc_cpu(dpid), time.process_time()
                    if kind in workers:
                        out = burst_celery(workers[kind][0], plan)
                    else:
                        out = RawBurst(bench, args.teams, args.parallel).run(plan, args.parallel)
                    out["worker_cpu_s"] = round(proc_cpu(wpid) - w0, 1)
                    out["dockerd_cpu_s"] = round(proc_cpu(dpid) - d0, 1)
                    out["bench_cpu_s"] = round(time.process_time() - b0, 1)
                    out["running"] = len(bench.docker.api.containers(
                        filters={"label": f"ctf.test={RUN_ID}", "status": "running"}))
                    out["per_second"] = round(len(plan) / out["seconds"], 2)
                    out["seconds"] = round(out["seconds"], 1)
                    out["failures_n"] = len(out["failures"])
                    out["failures"] = out["failures"][:5]
                    figures[kind] = out
                    print(f"round {rnd + 1} {kind}: {out}", file=sys.stderr)
                    if kind in workers:
                        stop_celery(workers[kind][0], plan)
                    figures[f"cleanup_{kind}_s"] = round(remove_all(bench), 1)
                for kind in workers:
                    figures[f"ratio_{kind}"] = round(figures[kind]["seconds"]
                                                     / figures["raw"]["seconds"], 3)
                result["rounds"].append(figures)
            result["ceiling"] = ceiling(bench, args.ceiling_n, args.ceiling_parallel)
            print(f"ceiling: {result['ceiling']}", file=sys.stderr)
            result["ceiling"]["cleanup_s"] = round(remove_all(bench), 1)
        finally:
            for _, w in workers.values():
                w.stop()
    for kind in workers:
        ratios = [r[f"ratio_{kind}"] for r in result["rounds"]]
        result[f"median_ratio_{kind}"] = round(statistics.median(ratios), 3)
    result["load_avg_after"] = os.getloadavg()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
