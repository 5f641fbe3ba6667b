"""Issue 2: ``start_container`` through Celery vs a raw Docker SDK start, same image, interleaved.

A  ``send_task("celery_app.tasks.start_container", ["web", team]).get()``: task submitted →
   instance running, through a real ``celery worker -B --pool threads`` subprocess.
B  ``docker.containers.run(...)`` with the same network, port publishing and limits, then
   ``reload()`` for the address and port, then the same readiness probe the service uses
   (:func:`celery_app.core.readiness.wait_ready` against the container's IP, as
   ``InstanceSpecs.probe_target`` does on a local engine).
C  (``--breakdown``) ``InstanceService.start`` in this process: the instancer without Celery,
   to split A - B into "Celery" and "service" parts.
A' (``--compare-src DIR``, repeatable) A again, through a second worker that runs another
   checkout (the code before a change: ``git worktree add /tmp/old <rev>``), with a Redis and
   team of its own, so old and new are measured side by side in one run on the same engine.
A0 (``--audit-off``, issue 25) A again, through a worker of a copy of this tree's
   ``celery_app`` whose audit hooks do nothing (:func:`audit_off_copy`): the start path with
   and without its audit write, side by side.

The team's network already exists: challenge ``keep`` of the team stays up for the whole run,
so the measured start of ``web`` never creates or removes it. Every instance is stopped
(``stop_container`` task) and every raw container removed between iterations, untimed.
The order alternates (A B, B A, …) so neither side always runs on a warmer engine.

Usage: .venv/bin/python bench/bench_start.py [-n 20] [--warmup 2] [--breakdown]
       [--compare-src DIR ...] [--audit-off] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from _common import (
    LABEL,
    ROOT,
    Bench,
    bench_run,
    bench_worker,
    celery_client,
    close_celery_client,
    emit,
    machine,
    side_bench,
    side_labels,
    summary_ms,
)

from celery_app.core.readiness import wait_ready
from celery_app.state import keys
from celery_app.vocab.naming import network_name

TEAM = "benchteam"
ALT_TEAM = "benchteamalt"  # the compared checkout's team: its own network, no name clash
CHALLENGE = "web"
TASK_TIMEOUT = 60


def start_via_celery(client: Any, team: str = TEAM) -> float:
    """A: submit start_container and wait for the running instance; return seconds."""
    began = time.perf_counter()
    inst = client.send_task("celery_app.tasks.start_container",
                            args=[CHALLENGE, team]).get(timeout=TASK_TIMEOUT)
    elapsed = time.perf_counter() - began
    if inst.get("status") != "running":
        raise RuntimeError(f"start_container returned {inst}")
    return elapsed


def stop_via_celery(client: Any, team: str = TEAM) -> None:
    client.send_task("celery_app.tasks.stop_container",
                     args=[CHALLENGE, team]).get(timeout=TASK_TIMEOUT)


def start_raw(bench: Bench, index: int) -> tuple[float, str]:
    """B: containers.run + reload + the service's readiness probe; return (seconds, id)."""
    client = bench.docker
    began = time.perf_counter()
    container = client.containers.run(
        bench.image, detach=True, name=f"ctf-bench-raw-{index}-{LABEL['ctf.test']}",
        network=network_name(TEAM), ports={"8080/tcp": ("127.0.0.1", None)},
        labels=LABEL, hostname=CHALLENGE,
        # the limits the service puts on every instance (catalog: 64m, 0.5 cpu, 64 pids)
        cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
        mem_limit=64 * 1024**2, memswap_limit=64 * 1024**2, nano_cpus=500_000_000,
        pids_limit=64,
    )
    container.reload()
    nets = container.attrs["NetworkSettings"]["Networks"]
    ip = next(n["IPAddress"] for n in nets.values() if n.get("IPAddress"))
    port = container.ports["8080/tcp"][0]["HostPort"]  # what the service records

    def alive() -> bool:
        container.reload()
        return container.status in ("running", "created", "restarting")

    ok = wait_ready(ip, 8080, "http", "/", 30, still_alive=alive)
    elapsed = time.perf_counter() - began
    if not ok or not port:
        raise RuntimeError(f"raw container {container.name} never answered")
    return elapsed, container.id


def start_in_process(svc: Any) -> float:
    """C: the service without Celery."""
    began = time.perf_counter()
    inst = svc.start(svc.catalog.key(CHALLENGE, TEAM))
    elapsed = time.perf_counter() - began
    if inst.status != "running":
        raise RuntimeError(f"in-process start returned {inst}")
    return elapsed


# Appended to the copy's celery_app/core/audit.py by --audit-off: every hook returns at once,
# so the start task neither computes the flag owner's digest nor sends the audit pipeline.
AUDIT_OFF_PATCH = """

# bench/bench_start.py --audit-off: the audit trail's hooks do nothing in this copy.
Auditor.record = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
Auditor.task_outcome = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
"""


def audit_off_copy(dest: Path) -> Path:
    """Copy this tree's ``celery_app`` to ``dest`` with the audit hooks made no-ops; return it."""
    shutil.copytree(ROOT / "celery_app", dest / "celery_app",
                    ignore=shutil.ignore_patterns("__pycache__"))
    audit = dest / "celery_app" / "core" / "audit.py"
    audit.write_text(audit.read_text() + AUDIT_OFF_PATCH)
    return dest


def audit_length(run: Bench) -> int:
    """How many events the audit trail of a run's state Redis holds (0: none written)."""
    client = redis.Redis.from_url(run.run.values()["redis_url"])
    try:
        return int(client.xlen(keys.AUDIT))
    finally:
        client.close()


def worker_durations(log: str) -> list[float]:
    """The ``duration_ms`` the worker logged for each successful start of the measured team."""
    pattern = re.compile(
        rf"task=start_container team={TEAM} challenge={CHALLENGE} .*outcome=running "
        r"duration_ms=(\d+)"
    )
    return [int(m.group(1)) / 1000 for m in pattern.finditer(log)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="measured starts of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time InstanceService.start in-process (C)")
    parser.add_argument("--compare-src", type=Path, action="append", default=[],
                        help="also start through a worker running this checkout (A'); "
                             "repeatable")
    parser.add_argument("--audit-off", action="store_true",
                        help="also start through a worker of this tree with the audit "
                             "trail's hooks made no-ops (A0, issue 25)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()

    # The other workers, side by side with this tree's: (kind, checkout, team).
    others: list[tuple[str, Path, str]] = []
    for i, src in enumerate(args.compare_src):
        kind = "celery_alt" if i == 0 else f"celery_alt{i + 1}"
        others.append((kind, src, ALT_TEAM if i == 0 else f"{ALT_TEAM}{i + 1}"))

    with bench_run() as bench, contextlib.ExitStack() as stack:
        if args.audit_off:
            others.append(("celery_noaudit", audit_off_copy(bench.workdir / "noaudit-src"),
                           "benchteamnoaudit"))
        # Side by side, each worker's janitor must leave the other's objects alone.
        worker = (bench_worker(bench, CTF_EXTRA_LABELS=side_labels("main")) if others
                  else bench_worker(bench))
        worker.start()
        stack.callback(worker.stop)
        client = celery_client(bench)
        # kind -> (client, team, run) of every Celery path measured
        paths: dict[str, tuple[Any, str, Bench]] = {"celery": (client, TEAM, bench)}
        for kind, src, team in others:
            side = stack.enter_context(side_bench(bench, kind))
            other = bench_worker(side, src=src, CTF_EXTRA_LABELS=side_labels(kind))
            other.start()
            stack.callback(other.stop)
            other_client = celery_client(side)
            stack.callback(close_celery_client, other_client)
            paths[kind] = (other_client, team, side)
        ctx = bench.context() if args.breakdown else None
        samples: dict[str, list[float]] = {kind: [] for kind in paths}
        samples |= {"raw": [], "inprocess": []}
        raw_ids: list[str] = []
        try:
            # The team network exists for the whole run: another challenge of the team stays up.
            for path_client, team, _run in paths.values():
                path_client.send_task("celery_app.tasks.start_container",
                                      args=["keep", team]).get(timeout=TASK_TIMEOUT)
            kinds = (["celery", "raw"] + [kind for kind, _, _ in others]
                     + (["inprocess"] if ctx else []))
            for rnd in range(args.warmup + args.n):
                # Rotated and reversed: no side always runs first, or on a warmer engine.
                shift = (rnd // 2) % len(kinds)
                order = kinds[shift:] + kinds[:shift]
                if rnd % 2 == 1:
                    order.reverse()
                for kind in order:
                    if kind in paths:
                        path_client, team, _run = paths[kind]
                        took = start_via_celery(path_client, team)
                        stop_via_celery(path_client, team)
                    elif kind == "raw":
                        took, cid = start_raw(bench, rnd)
                        raw_ids.append(cid)
                        bench.docker.api.remove_container(cid, force=True, v=True)
                        raw_ids.remove(cid)
                    else:
                        assert ctx is not None
                        took = start_in_process(ctx.service)
                        ctx.service.stop(ctx.service.catalog.key(CHALLENGE, TEAM))
                    if rnd >= args.warmup:
                        samples[kind].append(took)
                print(f"round {rnd + 1}/{args.warmup + args.n}: "
                      + " ".join(f"{k}={samples[k][-1] * 1000:.0f}ms"
                                 for k in kinds if rnd >= args.warmup),
                      file=sys.stderr)
            for path_client, team, _run in paths.values():
                path_client.send_task("celery_app.tasks.stop_container",
                                      args=["keep", team]).get(timeout=TASK_TIMEOUT)
            # What each worker wrote to its audit trail: the proof that --audit-off was off.
            audit_events = {kind: audit_length(run) for kind, (_c, _t, run) in paths.items()}
        finally:
            for cid in raw_ids:
                bench.docker.api.remove_container(cid, force=True, v=True)
            if ctx is not None:
                ctx.driver.close()
            close_celery_client(client)
        log = worker.log()

    in_worker = worker_durations(log)[args.warmup:]
    raw_median = statistics.median(samples["raw"])
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "n": args.n,
        "celery": summary_ms(samples["celery"]),
        "raw": summary_ms(samples["raw"]),
        "median_ratio": round(statistics.median(samples["celery"]) / raw_median, 3),
        "target_ratio": 1.10,
        "audit_events": audit_events,
    }
    for kind, src, _team in others:
        # Below 1: this checkout starts faster than the other one.
        result[kind] = {"src": str(src), **summary_ms(samples[kind]),
                        "median_ratio_raw": round(statistics.median(samples[kind])
                                                  / raw_median, 3),
                        "this_vs_it": round(statistics.median(samples["celery"])
                                            / statistics.median(samples[kind]), 3),
                        "this_vs_it_p90": round(summary_ms(samples["celery"])["p90_ms"]
                                                / summary_ms(samples[kind])["p90_ms"], 3)}
    if in_worker:
        result["celery_task_body"] = summary_ms(in_worker)
    if samples["inprocess"]:
        result["inprocess"] = summary_ms(samples["inprocess"])
        result["inprocess_ratio"] = round(statistics.median(samples["inprocess"])
                                          / raw_median, 3)
    result["samples_ms"] = {k: [round(v * 1000, 1) for v in vals]
                            for k, vals in samples.items() if vals}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
