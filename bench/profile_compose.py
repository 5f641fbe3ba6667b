"""Where the time of one Compose start goes: ``InstanceService.start`` of the shop, in-process.

Wraps (in this process only) every Docker driver call, Redis store call, egress call, lock and
probe with a timer (the waits between looks are the gaps between them), starts and stops the
shop ``-n`` times, and prints the median time per kind of call and the timeline of the median
start: when each call began and how long it took.

Usage: .venv/bin/python bench/profile_compose.py [-n 10]
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

import bench_compose  # noqa: F401  # sets this bench's subnet pool first
from _common import bench_run
from bench_compose import CATALOG_ENTRY, CHALLENGE, TEAM, shop_file, shop_images

import celery_app.core.readiness as readiness
import celery_app.core.specs as specs_mod
from celery_app.engine.docker_driver import DockerDriver
from celery_app.engine.firewall import EgressGuard
from celery_app.state.store import StateStore

_local = threading.local()
events: list[tuple[str, float, float]] = []
T0 = [0.0]


def timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "depth", 0):
            return fn(*args, **kwargs)
        _local.depth = 1
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            events.append((name, began - T0[0], time.perf_counter() - began))
            _local.depth = 0
    return wrapper


def instrument() -> None:
    for cls, prefix in ((DockerDriver, "docker."), (StateStore, "redis."),
                        (EgressGuard, "egress.")):
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
    specs_mod.probe_once = timed("probe_once", readiness.probe_once)  # type: ignore[attr-defined]
    specs_mod.wait_until = timed("wait_until", readiness.wait_until)  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    instrument()
    totals: list[float] = []
    per_kind: dict[str, list[float]] = defaultdict(list)
    timelines: list[list[tuple[str, float, float]]] = []
    with bench_run(extra_catalog=CATALOG_ENTRY) as bench:
        images = shop_images(bench.docker)
        (bench.workdir / "shop").mkdir()
        (bench.workdir / "shop" / "compose.yaml").write_text(shop_file(images))
        ctx = bench.context()
        svc = ctx.service
        key = svc.catalog.key(CHALLENGE, TEAM)
        try:
            for rnd in range(args.n + 1):
                events.clear()
                T0[0] = time.perf_counter()
                inst = svc.start(key)
                total = time.perf_counter() - T0[0]
                assert inst.status == "running"
                if rnd:
                    totals.append(total)
                    kinds: dict[str, float] = defaultdict(float)
                    for name, _at, took in events:
                        kinds[name] += took
                    for name, took in kinds.items():
                        per_kind[name].append(took)
                    timelines.append(list(events))
                svc.stop(key)
        finally:
            ctx.driver.close()
    # The timeline of the start closest to the median.
    med = statistics.median(totals)
    typical = timelines[min(range(len(totals)), key=lambda i: abs(totals[i] - med))]
    report = {
        "start_median_ms": round(med * 1000, 1),
        "per_kind_median_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in
                               sorted(per_kind.items(), key=lambda kv: -statistics.median(kv[1]))},
        "typical_timeline_ms": [f"{at * 1000:7.1f} +{took * 1000:6.1f} {name}"
                                for name, at, took in typical],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
