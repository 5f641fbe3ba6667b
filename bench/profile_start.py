"""Where the time of one start goes: ``InstanceService.start`` in-process, step by step.

Wraps (in this process only, nothing in celery_app/ is changed) every Docker driver and Redis
store call, the readiness wait and each probe, then starts and stops ``web`` for a team whose
network already exists, ``-n`` times. Prints the median milliseconds spent per step and the
number of calls per start, plus how long a tight 2 ms poll would have needed to see the port
answer (the readiness back-off's overshoot).

Usage: .venv/bin/python bench/profile_start.py [-n 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from _common import bench_run

import celery_app.core.readiness as readiness
import celery_app.core.specs as specs_mod
from celery_app.engine.docker_driver import DockerDriver
from celery_app.state.store import StateStore

TEAM = "profteam"
_local = threading.local()
spent: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)


def timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # only the outermost wrapped call counts (run_container calls get_container, …)
        if getattr(_local, "depth", 0):
            return fn(*args, **kwargs)
        _local.depth = 1
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - began
            calls[name] += 1
            _local.depth = 0
    return wrapper


def instrument() -> None:
    for cls, prefix in ((DockerDriver, "docker."), (StateStore, "redis.")):
        for attr, value in list(vars(cls).items()):
            if callable(value) and not attr.startswith("_"):
                setattr(cls, attr, timed(prefix + attr, value))
    for lock_name in ("instance_lock", "network_lock"):
        original = getattr(StateStore, lock_name)

        def make(orig: Any, label: str) -> Any:
            def lock(self: StateStore, *args: Any, **kwargs: Any) -> Any:
                lk = orig(self, *args, **kwargs)
                lk.acquire = timed(f"{label}.acquire", lk.acquire)
                lk.release = timed(f"{label}.release", lk.release)
                return lk
            return lock
        setattr(StateStore, lock_name, make(original, lock_name))
    # specs imported them by name: patch its names, which the start path calls
    specs_mod.wait_until = timed("wait_until", readiness.wait_until)  # type: ignore[attr-defined]
    specs_mod.probe_once = _count_probe(readiness.probe_once)  # type: ignore[attr-defined]


def _count_probe(fn: Any) -> Any:
    def probe(*args: Any, **kwargs: Any) -> bool:
        calls["probe_once"] += 1
        began = time.perf_counter()
        ok = bool(fn(*args, **kwargs))
        spent["probe_once"] += time.perf_counter() - began
        return ok
    return probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    instrument()
    per_start: dict[str, list[float]] = defaultdict(list)
    per_calls: dict[str, list[int]] = defaultdict(list)
    totals: list[float] = []
    tight: list[float] = []
    with bench_run() as bench:
        ctx = bench.context()
        svc = ctx.service
        try:
            svc.start(svc.catalog.key("keep", TEAM))  # the team network exists from here on
            for rnd in range(args.n + 1):
                spent.clear()
                calls.clear()
                began = time.perf_counter()
                inst = svc.start(svc.catalog.key("web", TEAM))
                total = time.perf_counter() - began
                if rnd:  # the first one warms caches
                    totals.append(total)
                    for key, value in spent.items():
                        per_start[key].append(value)
                    for key, value in calls.items():
                        per_calls[key].append(value)
                assert inst.status == "running"
                svc.stop(svc.catalog.key("web", TEAM))
                # the same container start, seen by a 2 ms poll instead of the back-off
                info = _raw_start(ctx, bench.image)
                t0 = time.perf_counter()
                while not readiness.probe_once(info[1], 8080, "http", "/", 1.0):
                    time.sleep(0.002)
                if rnd:
                    tight.append(info[0] + time.perf_counter() - t0)
                ctx.driver.client.api.remove_container(  # type: ignore[attr-defined]
                    info[2], force=True)
            svc.stop(svc.catalog.key("keep", TEAM))
        finally:
            ctx.driver.close()
    med_total = statistics.median(totals)
    rows = sorted(per_start, key=lambda k: -statistics.median(per_start[k]))
    report = {
        "start_median_ms": round(med_total * 1000, 1),
        "steps_median_ms": {k: round(statistics.median(per_start[k]) * 1000, 1) for k in rows},
        "calls_per_start": {k: statistics.median(per_calls[k]) for k in rows},
        "create_to_answer_with_2ms_poll_median_ms": round(statistics.median(tight) * 1000, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


def _raw_start(ctx: Any, image: str) -> tuple[float, str, str]:
    """Create+start a container like run_container; return (seconds, ip, id)."""
    api = ctx.driver.client.api
    began = time.perf_counter()
    created = api.create_container(
        image, ports=[(8080, "tcp")], labels=dict(ctx.settings.extra_labels),
        host_config=api.create_host_config(port_bindings={"8080/tcp": ("127.0.0.1", "")},
                                           network_mode=f"ctf-team-{TEAM}"),
    )
    api.start(created["Id"])
    attrs = api.inspect_container(created["Id"])
    ip = next(n["IPAddress"] for n in attrs["NetworkSettings"]["Networks"].values())
    return time.perf_counter() - began, ip, created["Id"]


if __name__ == "__main__":
    sys.exit(main())
