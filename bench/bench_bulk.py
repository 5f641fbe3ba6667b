"""Issue 27, bulk work at the engine's pace: a cold herd and a mass expiry, each beside the raw SDK.

herd    ``--teams`` new teams (100) start the non-pooled challenge ``c0`` at once by name: one
        plain Celery client thread per team sends ``start_container`` and waits for
        ``running``, to one real worker (``celery worker -B --pool threads``) at the
        deployment's default concurrency (``CTF_WORKER_CONCURRENCY``, 16). Against it the raw
        SDK does the same work with ``--parallel`` (16) threads: the team's bridge network with
        a /28 of ours (10.216.0.0/16), ``containers.run`` with the same limits and port
        publishing, ``reload()``, the service's readiness probe (``bench_burst.RawBurst``).
        Each side: the makespan (the last one running), every start's time-to-running from
        the herd's start, and the time one start took in its thread (the worker's
        "succeeded in" log lines; the raw thread's own clock). Rounds alternate the order;
        between phases everything is removed, untimed.
expiry  ``--instances`` (500) instances are set up in this process: ``--pooled`` (100) of them
        claimed from a warm pool (each on its own ``ctfpool-`` network, issue 27), the rest
        cold, two per team (each team one network). Then either the janitor expires them all:
        every record's ``expires_at`` moved into the past, ``Janitor.run_once()`` called as
        the beat would (``CTF_JANITOR_CONCURRENCY``, 8 by default) until no container, record
        or network of theirs is left; or the raw SDK removes the same objects (the records
        dropped first, untimed): ``remove_container(force=True)`` by ``--raw-threads``
        (the janitor's concurrency) threads, each network removed as soon as its last
        container is gone, by ``--raw-lanes`` threads of their own (the janitor's
        ``NETWORK_LANES``, 2; 0: by the containers' pool, behind every container).
        Everything is set up again between the two sides (the same plan); rounds alternate
        the order.

Usage: .venv/bin/python bench/bench_bulk.py herd [--teams 100] [--rounds 2] [--json FILE]
       .venv/bin/python bench/bench_bulk.py expiry [--instances 500] [--pooled 100]
           [--rounds 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import statistics
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import docker.errors
from _common import (
    RUN_ID,
    Bench,
    bench_run,
    bench_worker,
    celery_client,
    cleanup_docker,
    close_celery_client,
    emit,
    machine,
    pct,
    side_bench,
    side_labels,
    wait_for,
)
from bench_burst import RawBurst, extra_catalog, stop_celery
from bench_janitor import dockerd_pid, proc_cpu

from celery_app.loops.janitor import NETWORK_LANES
from celery_app.vocab.models import InstanceKey, iso, utcnow

START = "celery_app.tasks.start_container"
TIMEOUT = 300


def stats(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p95 / max of durations in seconds, in seconds."""
    if not values:
        return {}
    return {"n": len(values), "p50_s": round(statistics.median(values), 2),
            "p90_s": round(pct(values, 0.9), 2), "p95_s": round(pct(values, 0.95), 2),
            "max_s": round(max(values), 2)}


# -- herd -------------------------------------------------------------------------------------


def herd_celery(bench: Bench, teams: list[str], logfile: Path) -> dict[str, Any]:
    """Every team sends start_container by name at once; time-to-running of each."""
    mark = logfile.stat().st_size if logfile.exists() else 0
    client = celery_client(bench)
    failures: list[str] = []
    try:
        gate = threading.Barrier(len(teams) + 1)
        began = 0.0

        def one(team: str) -> float | None:
            gate.wait()
            try:
                inst = client.send_task(START, args=["c0", team]).get(timeout=TIMEOUT)
            except Exception as exc:  # noqa: BLE001  # counted and shown
                failures.append(f"{team}: {type(exc).__name__}: {exc}")
                return None
            if inst.get("status") != "running":
                failures.append(f"{team}: {inst.get('status')}")
                return None
            return time.perf_counter() - began

        with ThreadPoolExecutor(len(teams)) as pool:
            futures = [pool.submit(one, t) for t in teams]
            time.sleep(0.2)  # every thread at the gate
            began = time.perf_counter()
            gate.wait()
            took = [t for f in futures if (t := f.result()) is not None]
        makespan = time.perf_counter() - began
    finally:
        close_celery_client(client)
    text = logfile.read_bytes()[mark:].decode(errors="replace")
    in_thread = [float(s) for s in re.findall(
        r"start_container\[[^\]]+\] succeeded in ([0-9.]+)s", text)]
    return {"seconds": round(makespan, 2), "to_running": stats(took),
            "in_thread": stats(in_thread), "failures": failures[:5],
            "failures_n": len(failures)}


def herd_raw(bench: Bench, teams: list[str], parallel: int) -> dict[str, Any]:
    """The same work with the SDK and ``parallel`` threads."""
    raw = RawBurst(bench, len(teams), parallel)
    took: list[float] = []
    in_thread: list[float] = []
    failures: list[str] = []
    began = time.perf_counter()

    def one(team: str) -> None:
        try:
            in_thread.append(raw.start("c0", team))
            took.append(time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001  # counted and shown
            failures.append(f"{team}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, teams))
    makespan = time.perf_counter() - began
    raw.docker.close()
    return {"seconds": round(makespan, 2), "to_running": stats(took),
            "in_thread": stats(in_thread), "failures": failures[:5],
            "failures_n": len(failures)}


TRACE_DIR = Path(__file__).resolve().parent / "apitrace"


def traced(path: Path, since: int = 0) -> dict[str, Any]:
    """Per Docker API call shape in a trace file (from line ``since``): count, p50, sum."""
    calls: dict[str, list[float]] = {}
    lines = path.read_text().splitlines()[since:] if path.exists() else []
    for line in lines:
        fields = line.split("\t")
        if len(fields) != 4:
            continue  # a line being written
        method, what, status, took = fields
        calls.setdefault(f"{method} {what} {status}", []).append(float(took))
    return {k: {"n": len(v), "p50_ms": round(statistics.median(v) * 1000, 1),
                "p90_ms": round(pct(v, 0.9) * 1000, 1), "sum_s": round(sum(v), 2)}
            for k, v in sorted(calls.items(), key=lambda kv: -sum(kv[1]))}


def lines_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def herd(args: argparse.Namespace) -> dict[str, Any]:
    concurrency = int(os.environ.get("CTF_WORKER_CONCURRENCY", "16"))
    teams = [f"bt{i:03d}" for i in range(args.teams)]
    result: dict[str, Any] = {
        "mode": "herd", "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "load_avg_before": os.getloadavg(), "teams": args.teams,
        "worker_concurrency": concurrency, "raw_threads": args.parallel, "rounds": [],
        "target_ratio": 1.10,
    }
    env = {"CTF_MAX_INSTANCES": "1000", "CTF_RATE_LIMIT_COUNT": "1000000",
           "CTF_LOCK_WAIT": "240"}
    with bench_run(ttl=1800, extra_catalog=extra_catalog(1)) as bench, \
            contextlib.ExitStack() as stack:
        wtrace, rtrace = bench.workdir / "trace-worker.tsv", bench.workdir / "trace-raw.tsv"
        if args.trace:
            env = {**env, "PYTHONPATH": str(TRACE_DIR), "CTF_BENCH_APITRACE": str(wtrace)}
            # by its path: the name sitecustomize may be the system's in this process
            spec = importlib.util.spec_from_file_location("ctf_apitrace",
                                                          TRACE_DIR / "sitecustomize.py")
            assert spec is not None and spec.loader is not None
            apitrace = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(apitrace)
            apitrace.install()
        main_env = {**env, "CTF_EXTRA_LABELS": side_labels("main")} if args.compare_src else env
        worker = bench_worker(bench, concurrency=concurrency, **main_env)
        workers = {"celery": (bench, worker, wtrace)}
        if args.compare_src:
            alt = stack.enter_context(side_bench(bench))
            atrace = bench.workdir / "trace-alt.tsv"
            alt_env = {**env, "CTF_EXTRA_LABELS": side_labels("alt")}
            if args.trace:
                alt_env["CTF_BENCH_APITRACE"] = str(atrace)
            workers["celery_alt"] = (alt, bench_worker(alt, concurrency=concurrency,
                                                       src=args.compare_src, **alt_env), atrace)
            result["compare_src"] = str(args.compare_src)
        kinds = ["raw", *workers]
        dpid = dockerd_pid()
        try:
            for _, w, _ in workers.values():
                w.start()
            for rnd in range(args.rounds):
                order = kinds if rnd % 2 == 0 else kinds[::-1]
                figures: dict[str, Any] = {"order": order}
                for kind in order:
                    proc = workers[kind][1].proc if kind in workers else None
                    wpid = proc.pid if proc is not None else None
                    w0, d0 = proc_cpu(wpid), proc_cpu(dpid)
                    trace = workers[kind][2] if kind in workers else rtrace
                    since = lines_in(trace)
                    if kind in workers:
                        side, w, _ = workers[kind]
                        out = herd_celery(side, teams, w.logfile)
                    else:
                        if args.trace:
                            apitrace.switch(str(rtrace))
                        out = herd_raw(bench, teams, args.parallel)
                        if args.trace:
                            apitrace.switch(None)
                    if args.trace:
                        out["docker_calls"] = traced(trace, since)
                    out["worker_cpu_s"] = round(proc_cpu(wpid) - w0, 1)
                    out["dockerd_cpu_s"] = round(proc_cpu(dpid) - d0, 1)
                    figures[kind] = out
                    print(f"round {rnd + 1} {kind}: {out}", file=sys.stderr)
                    if kind in workers:
                        stop_celery(workers[kind][0], [("c0", t) for t in teams])
                    cleanup_docker(bench.docker, images=False)
                for kind in workers:
                    figures[f"ratio_{kind}"] = round(figures[kind]["seconds"]
                                                     / figures["raw"]["seconds"], 3)
                result["rounds"].append(figures)
        finally:
            for _, w, _ in workers.values():
                w.stop()
    for kind in workers:
        result[f"median_ratio_{kind}"] = round(statistics.median(
            r[f"ratio_{kind}"] for r in result["rounds"]), 3)
    result["load_avg_after"] = os.getloadavg()
    return result


# -- expiry -----------------------------------------------------------------------------------


POOLED = """  pooled:
    image: {{image}}
    port: 8080
    protocol: http
    health_path: /
    ttl: 1800
    memory: 64m
    cpus: 0.5
    pids: 64
    start_timeout: 60
    pool: {n}
"""


def setup(bench: Bench, ctx: Any, instances: int, pooled: int, threads: int) -> dict[str, Any]:
    """``pooled`` claimed pool containers and ``instances - pooled`` cold ones (2 per team)."""
    svc = ctx.service
    began = time.perf_counter()
    if pooled:
        ch = ctx.catalog.get("pooled")
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _i: svc.pool._boot(ch), range(pooled)))
        wait_for(lambda: svc.pool.run_once() is not None
                 and svc.store.pools.ready_count(svc.host, "pooled") >= pooled,
                 300, "the pool to be ready")
    cold = instances - pooled
    plan = [(f"c{i % 2}", f"et{i // 2:04d}") for i in range(cold)]
    plan += [("pooled", f"et{i:04d}") for i in range(pooled)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: svc.start(InstanceKey(*p), count_rate=False), plan))
    svc.mark_reconciled()
    running = sum(1 for i in svc.store.list() if i.status == "running")
    nets = len(bench.docker.api.networks(filters={"label": f"ctf.test={RUN_ID}"}))
    took = time.perf_counter() - began
    print(f"set up {running} instances ({pooled} pooled), {nets} networks in {took:.1f} s",
          file=sys.stderr)
    if running != instances:
        raise RuntimeError(f"{running} of {instances} running after the set-up")
    return {"instances": running, "networks": nets, "seconds": round(took, 1)}


def ours(bench: Bench) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This run's containers and networks, the pool's holding network aside."""
    api = bench.docker.api
    label = {"label": f"ctf.test={RUN_ID}"}
    nets = [n for n in api.networks(filters=label)
            if n.get("Labels", {}).get("ctf.pool") != "holding"]
    return api.containers(all=True, filters=label), nets


def expire_janitor(bench: Bench, ctx: Any) -> dict[str, Any]:
    """Every record expired at once; janitor passes until nothing of them is left."""
    store, janitor = ctx.store, ctx.janitor
    past = iso(utcnow() - timedelta(seconds=5))
    for inst in store.list():
        store.put(inst.model_copy(update={"expires_at": past}))
    passes = []
    began = time.perf_counter()
    instances_gone = None
    while True:
        at = time.perf_counter() - began
        summary = janitor.run_once()
        passes.append({"expired": len(summary.expired),
                       "networks": len(summary.orphan_networks),
                       "errors": summary.errors[:3], "seconds": round(summary.seconds, 1),
                       "reap_seconds": round(summary.reap_seconds, 1)})
        if summary.expired and instances_gone is None:
            instances_gone = at + summary.reap_seconds
        containers, nets = ours(bench)
        if not containers and not nets and not store.list():
            break
        if time.perf_counter() - began > 900:
            raise RuntimeError(f"not done after 900 s: {len(containers)} containers, "
                               f"{len(nets)} networks left")
    total = time.perf_counter() - began
    return {"instances_gone_s": round(instances_gone or total, 1),
            "all_gone_s": round(total, 1), "passes": passes}


def remove_raw(bench: Bench, ctx: Any, threads: int, lanes: int) -> dict[str, Any]:
    """The same containers and networks removed with the SDK and ``threads`` threads."""
    for inst in ctx.store.list():  # forgotten first (untimed): only Docker's work is timed
        ctx.store.delete(inst.challenge, inst.team_id, inst.host)
    containers, nets = ours(bench)
    left: dict[str, int] = {}
    on: dict[str, list[str]] = {}
    for c in containers:
        names = list((c.get("NetworkSettings") or {}).get("Networks") or {})
        on[c["Id"]] = names
        for n in names:
            left[n] = left.get(n, 0) + 1
    net_names = {n["Name"] for n in nets}
    client = docker.from_env(timeout=120, max_pool_size=max(32, threads))
    api = client.api
    guard = threading.Lock()
    network_jobs: list[Future[Any]] = []
    pool = ThreadPoolExecutor(threads)
    # the janitor's layout: networks on lanes of their own (0: on the containers' pool, queued
    # behind every container removal)
    netpool = ThreadPoolExecutor(lanes) if lanes else pool

    def remove_network(name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_network(name)

    def remove(cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_container(cid, force=True, v=True)
        for n in on[cid]:
            with guard:
                left[n] -= 1
                last = left[n] == 0 and n in net_names
                if last:
                    network_jobs.append(netpool.submit(remove_network, n))

    began = time.perf_counter()
    jobs = [pool.submit(remove, c["Id"]) for c in containers]
    for job in jobs:
        job.result()
    containers_gone = time.perf_counter() - began
    for n in net_names - set(left):  # none expected: every network had a container
        network_jobs.append(netpool.submit(remove_network, n))
    while True:
        with guard:
            pending = list(network_jobs)
        for job in pending:
            job.result()
        with guard:
            if len(network_jobs) == len(pending):
                break
    total = time.perf_counter() - began
    pool.shutdown()
    netpool.shutdown()
    client.close()
    return {"instances_gone_s": round(containers_gone, 1), "all_gone_s": round(total, 1),
            "containers": len(containers), "networks": len(net_names)}


def expiry(args: argparse.Namespace) -> dict[str, Any]:
    concurrency = int(os.environ.get("CTF_JANITOR_CONCURRENCY", "8"))
    raw_threads = args.raw_threads or concurrency
    result: dict[str, Any] = {
        "mode": "expiry", "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "load_avg_before": os.getloadavg(),
        "instances": args.instances, "pooled": args.pooled,
        "janitor_concurrency": concurrency, "raw_threads": raw_threads,
        "raw_network_lanes": args.raw_lanes, "rounds": [],
        "target_ratio": 1.2,
    }
    catalog = extra_catalog(2) + POOLED.format(n=args.pooled)
    with bench_run(ttl=1800, extra_catalog=catalog) as bench:
        ctx = bench.context(max_instances_per_team=3, max_instances=max(1000, 2 * args.instances),
                            lock_wait=60.0, janitor_concurrency=concurrency)
        dpid = dockerd_pid()
        try:
            for rnd in range(args.rounds):
                order = ["janitor", "raw"] if (rnd + args.raw_first) % 2 == 0 \
                    else ["raw", "janitor"]
                figures: dict[str, Any] = {"order": order}
                for kind in order:
                    figures[f"setup_{kind}"] = setup(bench, ctx, args.instances, args.pooled,
                                                     args.threads)
                    d0 = proc_cpu(dpid)
                    c0 = time.process_time()
                    if kind == "janitor":
                        out = expire_janitor(bench, ctx)
                    else:
                        out = remove_raw(bench, ctx, raw_threads, args.raw_lanes)
                    out["dockerd_cpu_s"] = round(proc_cpu(dpid) - d0, 1)
                    out["bench_cpu_s"] = round(time.process_time() - c0, 1)
                    figures[kind] = out
                    print(f"round {rnd + 1} {kind}: "
                          f"{ {k: v for k, v in out.items() if k != 'passes'} }",
                          file=sys.stderr)
                    cleanup_docker(bench.docker, images=False)
                for what in ("instances_gone_s", "all_gone_s"):
                    figures[f"ratio_{what}"] = round(figures["janitor"][what]
                                                     / figures["raw"][what], 3)
                result["rounds"].append(figures)
        finally:
            ctx.driver.close()
    for what in ("instances_gone_s", "all_gone_s"):
        result[f"median_ratio_{what}"] = round(statistics.median(
            r[f"ratio_{what}"] for r in result["rounds"]), 3)
    result["load_avg_after"] = os.getloadavg()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("herd", help="a cold herd of new teams against the raw SDK")
    h.add_argument("--teams", type=int, default=100)
    h.add_argument("--parallel", type=int, default=16, help="the raw side's threads")
    h.add_argument("--rounds", type=int, default=2)
    h.add_argument("--compare-src", type=Path,
                   help="also run a worker of this checkout (celery_alt), its own Redis")
    h.add_argument("--trace", action="store_true",
                   help="time every Docker API call of the worker and of the raw side")
    e = sub.add_parser("expiry", help="a mass expiry against the raw SDK's removal")
    e.add_argument("--instances", type=int, default=500)
    e.add_argument("--pooled", type=int, default=100, help="of them, claimed from a pool")
    e.add_argument("--threads", type=int, default=8, help="parallel starts in the set-up")
    e.add_argument("--raw-threads", type=int, default=0,
                   help="the raw side's threads (default: the janitor's concurrency)")
    e.add_argument("--raw-lanes", type=int, default=NETWORK_LANES,
                   help="the raw side's threads for networks (0: its container pool's)")
    e.add_argument("--rounds", type=int, default=1)
    e.add_argument("--raw-first", action="store_true", help="round 1 starts with the raw side")
    for p in (h, e):
        p.add_argument("--json", type=Path)
    args = parser.parse_args()
    emit(herd(args) if args.mode == "herd" else expiry(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
