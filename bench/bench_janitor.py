"""Issue 3: the janitor's reaping speed and its idle cost, on real containers, in-process.

1. ``--live`` real instances (default 500) are started through ``InstanceService.start`` in this
   process (a thread pool, for speed), ``CTF_MAX_INSTANCES_PER_TEAM`` of them per team (3 by
   default, so 500 instances are 167 teams and 167 team networks), and the index is marked
   reconciled, as a worker does at start.
2. Idle cost: ``--passes`` passes of ``Janitor.run_once()`` with nothing expired; for each,
   wall time, this process's CPU (``time.process_time``) and the CPU dockerd and redis-server
   spent meanwhile (from /proc). The median is reported. One ``reconcile()`` (what a worker
   does at start, and the first pass after Redis lost its index) is timed as well.
3. Reaping: ``--expire`` instances (default 200, whole teams first, so their networks go too)
   get an ``expires_at`` in the past (``StateStore.put``); ``run_once()`` is called, as the
   beat would, until none of them is left in Redis or Docker. The others stay up meanwhile,
   as in a real event. Target: 200 within 60 s. Reported: when the expired instances were
   gone (a pass removes them first) and when the pass had removed their networks too.

Everything is labelled ``ctf.test=bench-<pid>`` and removed at the end.

Usage: .venv/bin/python bench/bench_janitor.py [--live 500] [--expire 200] [--passes 7]
"""

from __future__ import annotations

import argparse
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

from _common import bench_run, emit, machine

from celery_app.vocab.models import iso, utcnow
from celery_app.vocab.naming import container_name

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def dockerd_pid() -> int | None:
    try:
        out = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True, check=False)
        return int(out.stdout.split()[0])
    except (IndexError, ValueError, OSError):
        return None


def extra_catalog(per_team: int) -> str:
    """Challenges ``j0``… so one team can run ``per_team`` instances."""
    return "".join(
        f"""  j{i}:
    image: {{image}}
    port: 8080
    ttl: 600
    memory: 64m
    cpus: 0.5
    pids: 64
    start_timeout: 30
""" for i in range(per_team)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", type=int, default=500, help="instances to start")
    parser.add_argument("--expire", type=int, default=200, help="how many of them expire")
    parser.add_argument("--passes", type=int, default=7, help="idle passes to time")
    parser.add_argument("--per-team", type=int, default=3, help="instances per team")
    parser.add_argument("--threads", type=int, default=8, help="parallel starts while setting up")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.expire > args.live:
        parser.error("--expire cannot exceed --live")

    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "live": args.live, "expire": args.expire, "per_team": args.per_team,
    }
    with bench_run(extra_catalog=extra_catalog(args.per_team)) as bench:
        ctx = bench.context(max_instances_per_team=args.per_team,
                            max_instances=max(1000, args.live * 2), lock_wait=60.0)
        svc, janitor, store = ctx.service, ctx.janitor, ctx.store
        teams = math.ceil(args.live / args.per_team)
        plan = [(f"j{i % args.per_team}", f"jt{i // args.per_team:04d}")
                for i in range(args.live)]
        try:
            # 1. the instances
            began = time.monotonic()
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(lambda p: svc.start(*p), plan))
            setup = time.monotonic() - began
            svc.mark_reconciled()
            running = sum(1 for i in store.list() if i.status == "running")
            print(f"started {running} instances of {teams} teams in {setup:.1f} s",
                  file=sys.stderr)
            result["setup"] = {"instances": running, "teams": teams,
                               "seconds": round(setup, 1),
                               "per_second": round(running / setup, 1)}

            # 2. idle cost
            dpid, rpid = dockerd_pid(), bench.redis.proc.pid if bench.redis.proc else None
            janitor.run_once()  # warm: connections, imports
            passes = []
            for _ in range(args.passes):
                d0, r0 = proc_cpu(dpid), proc_cpu(rpid)
                c0, w0 = time.process_time(), time.perf_counter()
                summary = janitor.run_once()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                passes.append({"wall": wall, "cpu": cpu, "dockerd_cpu": proc_cpu(dpid) - d0,
                               "redis_cpu": proc_cpu(rpid) - r0})
                if summary.removed or summary.errors:
                    raise RuntimeError(f"an idle pass changed something: {summary.as_dict()}")
                time.sleep(0.2)
            result["idle_pass"] = {
                key + "_ms": round(statistics.median(p[key] for p in passes) * 1000, 1)
                for key in ("wall", "cpu", "dockerd_cpu", "redis_cpu")
            }
            result["idle_pass"]["passes"] = args.passes
            result["idle_pass"]["samples_wall_ms"] = [round(p["wall"] * 1000, 1) for p in passes]
            result["idle_pass"]["samples_cpu_ms"] = [round(p["cpu"] * 1000, 1) for p in passes]
            c0, w0 = time.process_time(), time.perf_counter()
            rec = svc.reconcile()
            result["reconcile"] = {"wall_ms": round((time.perf_counter() - w0) * 1000, 1),
                                   "cpu_ms": round((time.process_time() - c0) * 1000, 1),
                                   "containers": rec.containers}
            print(f"idle: {result['idle_pass']}", file=sys.stderr)

            # 3. expire some at once, reap
            victims = plan[:args.expire]
            past = iso(utcnow() - timedelta(seconds=5))
            for ch, team in victims:
                inst = store.get(ch, team)
                assert inst is not None
                store.put(inst.model_copy(update={"expires_at": past}))
            names = {container_name(ch, team) for ch, team in victims}
            began = time.perf_counter()
            c0 = time.process_time()
            pass_log = []
            instances_gone = None
            while True:
                pass_began = time.perf_counter() - began
                summary = janitor.run_once()
                pass_log.append({"expired": len(summary.expired),
                                 "networks": len(summary.orphan_networks),
                                 "errors": len(summary.errors),
                                 "seconds": round(summary.seconds, 2),
                                 "reap_seconds": round(summary.reap_seconds, 2)})
                if summary.expired:
                    # A pass removes expired containers first, then the emptied networks.
                    instances_gone = pass_began + summary.reap_seconds
                left_redis = sum(1 for ch, team in victims if store.get(ch, team) is not None)
                left_docker = sum(
                    1 for c in ctx.driver.list_containers(svc.scope_labels) if c.name in names
                )
                if left_redis == 0 and left_docker == 0:
                    break
                if time.perf_counter() - began > 600:
                    raise RuntimeError(f"not done after 600 s: {left_redis} records, "
                                       f"{left_docker} containers left")
            total = time.perf_counter() - began
            still = sum(1 for i in store.list() if i.status == "running")
            gone = total if instances_gone is None else instances_gone
            result["reap"] = {
                "expired": args.expire, "instances_gone_s": round(gone, 1),
                "containers_per_second": round(args.expire / gone, 1),
                "networks_gone_s": round(total, 1),
                "cpu_seconds": round(time.process_time() - c0, 1),
                "passes": pass_log, "target_seconds": 60, "others_still_running": still,
            }
            print(f"reap: {result['reap']}", file=sys.stderr)
        finally:
            ctx.driver.close()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
