"""Issue 16: what the egress firewall costs a start, side by side with no firewall at all.

A  ``InstanceService.start`` with the default ``CTF_EGRESS_FIREWALL=auto``: the nftables
   table is installed and kept for its pool, each start admits its container (and a new
   team's bridge) into the firewall's sets, each stop releases it.
B  the same start with ``CTF_EGRESS_FIREWALL=off``, on a pool the firewall does not cover.

Two kinds of start, each timed from the call until the instance answers: ``new team`` (the
team network is created, so its bridge is added to the firewall) and ``same team`` (a second
challenge on an existing network, egress internet, so its address is added to the set).
Sides alternate (A B, B A, ...). Then the firewall's own work per start, which the engine's
noise hides in the above, is timed alone: ``admit`` of a container on a new team network (one
``nft`` call), ``admit`` of an internet container (one call), ``admit`` of a none container
on a known network (no call), ``release``. The table is removed at the end.

Usage: .venv/bin/python bench/bench_egress.py [-n 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import bench_run, emit, machine, summary_ms

OFF_POOL = "10.247.0.0/16"
EXTRA = """  open:
    image: {image}
    port: 8080
    egress: internet
    memory: 64m
    start_timeout: 30
"""


def one_round(ctx: Any, team: str) -> tuple[float, float]:
    """Start web for a new team, then open on its network; stop both; return both times."""
    began = time.perf_counter()
    ctx.service.start(ctx.service.catalog.key("web", team))
    new_team = time.perf_counter() - began
    began = time.perf_counter()
    ctx.service.start(ctx.service.catalog.key("open", team))
    same_team = time.perf_counter() - began
    ctx.service.stop(ctx.service.catalog.key("open", team), count_rate=False)
    ctx.service.stop(ctx.service.catalog.key("web", team), count_rate=False)
    return new_team, same_team


def guard_ops(ctx: Any, n: int) -> dict[str, list[float]]:
    """Time the guard's own calls with stand-in containers (real nft, no Docker work)."""
    from celery_app.engine.docker_driver import ContainerInfo, NetworkInfo  # noqa: PLC0415

    guard = ctx.egress
    guard.keep()  # installed first: what a worker has done before its first start
    times: dict[str, list[float]] = {k: [] for k in ("admit new network", "admit internet",
                                                     "admit none", "release internet")}
    for i in range(n):
        net = NetworkInfo(id=f"b{i}", name=f"bench{i}", labels={}, subnets=[],
                          containers=1, bridge=f"ctfbench{i}")
        ip = f"10.215.{200 + i // 250}.{1 + i % 250}"
        open_ = ContainerInfo(id=f"o{i}", name=f"o{i}", state="running", labels={
            "ctf.egress": "internet"}, ports={}, ip=ip)
        none = ContainerInfo(id=f"c{i}", name=f"c{i}", state="running", labels={
            "ctf.egress": "none"}, ports={}, ip=f"10.215.199.{1 + i % 250}")
        steps = (("admit new network", guard.admit, (none, net)),
                 ("admit none", guard.admit, (none, net)),
                 ("admit internet", guard.admit, (open_, net)),
                 ("release internet", guard.release, (open_,)))
        for kind, call, call_args in steps:
            began = time.perf_counter()
            call(*call_args)
            times[kind].append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with bench_run(extra_catalog=EXTRA) as bench:
        on = bench.context(egress_firewall="auto")
        off = bench.context(egress_firewall="off", team_subnet_pool=OFF_POOL)
        times: dict[str, dict[str, list[float]]] = {
            side: {"new team": [], "same team": []} for side in ("firewall", "none")}
        try:
            ops = guard_ops(on, args.n * 5)
            one_round(on, "bench-eg-warm-a")
            one_round(off, "bench-eg-warm-b")
            for i in range(args.n):
                order = [("firewall", on), ("none", off)]
                for side, ctx in order if i % 2 == 0 else order[::-1]:
                    new_team, same_team = one_round(ctx, f"bench-eg-{side[0]}{i}")
                    times[side]["new team"].append(new_team)
                    times[side]["same team"].append(same_team)
        finally:  # bench_run removes the table
            for ctx in (on, off):
                ctx.driver.close()
    result: dict[str, Any] = {"bench": "egress", "n": args.n, "machine": machine()}
    print(f"# {machine()}; n={args.n}; median ms (firewall / none = ratio)")
    for kind in ("new team", "same team"):
        a = statistics.median(times["firewall"][kind]) * 1000
        b = statistics.median(times["none"][kind]) * 1000
        result[kind] = {"firewall": summary_ms(times["firewall"][kind]),
                        "none": summary_ms(times["none"][kind]), "ratio": a / b}
        print(f"{kind:10s} {a:8.1f} / {b:8.1f} = {a / b:.3f}x")
    for kind, values in ops.items():
        result[kind] = summary_ms(values)
        print(f"{kind:18s} median {statistics.median(values) * 1000:6.2f} ms")
    emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
