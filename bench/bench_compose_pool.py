"""Issue 24: a start that claims a pooled Compose group vs one that claims a pooled container.

One worker (default settings: pool pass every 5 s, egress firewall on) and three pooled
challenges: ``gshop``, the shipped three-service example (``examples/shop``: web, db with a
health check, bot; its images built here, its bot's ``${CTF_TEAM}`` written out), and
``single``, the stand-in image (``pool`` of each: enough for the run). Interleaved in one run,
each start sent by name (``send_task("celery_app.tasks.start_container", …).get()``) for a team
that has nothing yet:

G  group: ``gshop`` claimed whole; no network call (the group's network stays its own);
S  single, first: ``single`` claimed by a new team (its team network is made on the way, as
   for a team's first instance at an event's opening);
K  single, network there: ``single`` claimed by a team whose network exists (``keep`` of the
   team is up), as bench_pool.py measures a claim.

The worker's own claim step (Redis take + Docker renames, or connect + rename) is read from
its claim-latency histogram too.

Usage: .venv/bin/python bench/bench_compose_pool.py [-n 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import redis
from _common import (
    BUSYBOX,
    LABEL,
    ROOT,
    RUN_ID,
    bench_run,
    bench_worker,
    celery_client,
    close_celery_client,
    emit,
    machine,
    pct,
    summary_ms,
    wait_for,
)

from ctf_testkit import support

SUBNETS = "10.234.0.0/16"  # this benchmark's own subnets (issue 24)
SHOP = ROOT / "examples" / "shop"
START = "celery_app.tasks.start_container"
TIMEOUT = 120
EXTRA = """  single:
    image: {{image}}
    port: 8080
    ttl: 1200
    memory: 64m
    cpus: 0.5
    pids: 64
    start_timeout: 60
    pool: {single}
  gshop:
    compose: shop/compose.yaml
    ttl: 1200
    memory: 64m
    start_timeout: 60
    pool: {group}
"""


def start(client: Any, challenge: str, team: str) -> float:
    """Send start_container by name and wait for the running instance; return seconds."""
    began = time.perf_counter()
    inst = client.send_task(START, args=[challenge, team]).get(timeout=TIMEOUT)
    took = time.perf_counter() - began
    if inst.get("status") != "running":
        raise RuntimeError(f"{challenge}/{team}: {inst}")
    return took


def ready(state: redis.Redis, challenge: str) -> int:
    return int(state.scard(f"ctf:pool:ready:local:{challenge}"))


def claim_step(state: redis.Redis, challenge: str) -> dict[str, Any]:
    """The worker's claim-latency histogram of ``challenge``, as /metrics shows it."""
    raw = {k: float(v) for k, v in state.hgetall("ctf:pool:stats:local").items()}
    count = raw.get(f"claims|{challenge}", 0.0)
    buckets = sorted((float(k.rsplit("|", 1)[1]), v) for k, v in raw.items()
                     if k.startswith(f"le|{challenge}|"))

    def quantile(q: float) -> float:
        return next(b for b, n in buckets if n >= q * count)

    return {"claims": int(count), "misses": int(raw.get(f"misses|{challenge}", 0)),
            "mean_ms": round(raw.get(f"sum|{challenge}", 0) / count * 1000, 1)
            if count else None, "p50_le_ms": quantile(0.5) * 1000 if count else None,
            "p90_le_ms": quantile(0.9) * 1000 if count else None}


def shop_catalog(workdir: Path) -> None:
    """Build the example's images for this run and write its Compose file beside the catalog."""
    engine = docker.from_env(timeout=120)
    text = (SHOP / "compose.yaml").read_text().replace("TEAM: ${CTF_TEAM}", "TEAM: pooled")
    for service in ("web", "db", "bot"):
        files: dict[str, bytes | Path] = {"busybox": BUSYBOX}
        for path in (SHOP / service).rglob("*"):
            if path.is_file() and path.name != "Dockerfile":
                files[str(path.relative_to(SHOP / service))] = path
        tag = support.build_image(engine, f"ctf-bench/shop-{service}:{RUN_ID}",
                                  (SHOP / service / "Dockerfile").read_text(), files, LABEL)
        text = text.replace(f"ctf-example/shop-{service}:1", tag)
    engine.close()
    (workdir / "shop").mkdir(exist_ok=True)
    (workdir / "shop" / "compose.yaml").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=15, help="measured claims of each kind")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                              "machine": machine(), "n": args.n}
    extra = EXTRA.format(single=2 * args.n + 1, group=args.n + 1)
    with bench_run(ttl=1200, max_lifetime=3600, extra_catalog=extra) as bench:
        shop_catalog(bench.workdir)
        worker = bench_worker(bench, CTF_TEAM_SUBNET_POOL=SUBNETS)
        worker.start()
        client = celery_client(bench)
        state = redis.Redis.from_url(f"{bench.redis.url}/2", decode_responses=True)
        samples: dict[str, list[float]] = {"group": [], "single_first": [], "single_net": []}
        try:
            began = time.perf_counter()
            wait_for(lambda: ready(state, "gshop") > args.n
                     and ready(state, "single") > 2 * args.n, 600, "the pools to fill")
            result["fill_s"] = round(time.perf_counter() - began, 1)
            for i in range(args.n):  # these teams' networks exist: the K claims reuse them
                start(client, "keep", f"kn{i}")
            for i in range(args.n):
                order = (["group", "single_first", "single_net"] if i % 2 == 0
                         else ["single_net", "single_first", "group"])
                for kind in order:
                    challenge, team = {"group": ("gshop", f"gg{i}"),
                                       "single_first": ("single", f"sf{i}"),
                                       "single_net": ("single", f"kn{i}")}[kind]
                    samples[kind].append(start(client, challenge, team))
                print(f"round {i + 1}/{args.n}: " + " ".join(
                    f"{k}={v[-1] * 1000:.0f}ms" for k, v in samples.items()), file=sys.stderr)
            for kind, values in samples.items():
                result[kind] = {**summary_ms(values),
                                "p90_ms": round(pct(values, 0.9) * 1000, 1)}
            med = {k: statistics.median(v) for k, v in samples.items()}
            result["group_over_single_first"] = round(med["group"] / med["single_first"], 2)
            result["group_over_single_net"] = round(med["group"] / med["single_net"], 2)
            result["claim_step_in_worker"] = {"gshop": claim_step(state, "gshop"),
                                              "single": claim_step(state, "single")}
            result["samples_ms"] = {k: [round(v * 1000, 1) for v in vals]
                                    for k, vals in samples.items()}
        finally:
            close_celery_client(client)
            worker.stop()
            subprocess.run(["nft", "delete", "table", "inet", "ctf_egress_"
                            + SUBNETS.replace(".", "_").replace("/", "_")],
                           capture_output=True, check=False)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
