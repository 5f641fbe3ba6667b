"""Issue 14: a start that claims a warm pool container vs a cold start of the same image.

The stand-in takes 5 s to boot (``sleep 5; exec httpd``), like a small Juice Shop. One worker
(default settings: pool pass every 5 s, egress firewall on), two challenges of that image:
``pooled`` (``pool: 40``) and ``cold`` (``pool: 0``). Interleaved in one run:

A  claim: ``send_task("celery_app.tasks.start_container", ["pooled", team]).get()`` while the
   pool has a ready container; the team's network exists (challenge ``keep`` of the team
   is up), as in bench_start.py. The worker's own claim step (Docker connect + rename) is
   read from its claim-latency histogram too.
B  cold: the same for ``cold``: the image's 5 s boot, plus the instancer.
C  raw: ``docker.containers.run`` of the same image on the team's network with the same
   limits, then the service's readiness probe (as bench_start.py's raw side).

Then a burst: 40 new teams start ``pooled`` at once with 40 ready (team networks made on the
way, as at an event's opening), and, for comparison, 40 more new teams start ``cold`` at once.

``--first`` (issue 27) measures only a team's first pooled claim: ``-n`` new teams (no team
network, nothing of theirs on the engine) each start ``pooled`` by name, one after another,
from a pool of ``-n`` ready containers of an image that answers at once (so the fill is quick);
the p50/p90 of the whole task, and the worker's own claim step.

``--herd`` (issue 27): ``-n`` new teams start ``pooled`` by name at once from a pool of ``-n``
ready; p50/p90/p95 of the whole task, and where each task's time went (``breakdown``: sent ->
received by the worker -> result stored -> seen by the client, from the client's clock and the
worker's log lines; how long the worker held 0..8 of the tasks at once).

Usage: .venv/bin/python bench/bench_pool.py [-n 20] [--first | --herd] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import redis
from _common import (
    LABEL,
    SRC,
    Bench,
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

from celery_app.core.readiness import wait_ready
from celery_app.vocab.naming import network_name

SUBNETS = "10.241.0.0/16"  # this benchmark's own team subnets (issue 14)
POOL_SIZE = 40
BOOT = ('["sh", "-c", "/bin/busybox sleep 5 && exec /bin/busybox httpd -f '
        '-p 8080 -h /www"]')
ENTRY = """  {name}:
    image: {{image}}
    port: 8080
    ttl: 1200
    memory: 64m
    cpus: 0.5
    pids: 64
    command: {command}
    start_timeout: 60
    pool: {pool}
"""
EXTRA = (ENTRY.format(name="pooled", command=BOOT, pool=POOL_SIZE)
         + ENTRY.format(name="cold", command=BOOT, pool=0))
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
TIMEOUT = 120


def start(client: Any, challenge: str, team: str) -> float:
    """Send start_container by name and wait for the running instance; return seconds."""
    began = time.perf_counter()
    inst = client.send_task(START, args=[challenge, team]).get(timeout=TIMEOUT)
    took = time.perf_counter() - began
    if inst.get("status") != "running":
        raise RuntimeError(f"{challenge}/{team}: {inst}")
    return took


def start_raw(bench: Bench, team: str, index: int) -> tuple[float, str]:
    """containers.run of the same image and limits + the service's probe; (seconds, id)."""
    began = time.perf_counter()
    container = bench.docker.containers.run(
        bench.image, ["sh", "-c", "/bin/busybox sleep 5 && exec /bin/busybox httpd -f -p 8080 "
                      "-h /www"], detach=True, name=f"ctf-bench-raw-{index}-{LABEL['ctf.test']}",
        network=network_name(team), ports={"8080/tcp": ("127.0.0.1", None)}, labels=LABEL,
        cap_drop=["ALL"], security_opt=["no-new-privileges:true"], mem_limit=64 * 1024**2,
        memswap_limit=64 * 1024**2, nano_cpus=500_000_000, pids_limit=64, read_only=True,
    )
    container.reload()
    ip = next(n["IPAddress"] for n in container.attrs["NetworkSettings"]["Networks"].values())
    if not wait_ready(ip, 8080, "http", "/", 60):
        raise RuntimeError("the raw container never answered")
    return time.perf_counter() - began, container.id


def ready(state: redis.Redis) -> int:
    return int(state.scard("ctf:pool:ready:local:pooled"))


def claim_step(state: redis.Redis) -> dict[str, Any]:
    """The worker's claim-latency histogram (connect + rename), as /metrics shows it."""
    raw = {k: float(v) for k, v in state.hgetall("ctf:pool:stats:local").items()}
    count = raw.get("claims|pooled", 0.0)
    buckets = sorted((float(k.rsplit("|", 1)[1]), v) for k, v in raw.items()
                     if k.startswith("le|pooled|"))

    def quantile(q: float) -> float:
        return next(b for b, n in buckets if n >= q * count)

    return {"claims": int(count), "mean_ms": round(raw.get("sum|pooled", 0) / count * 1000, 1)
            if count else None, "p50_le_ms": quantile(0.5) * 1000 if count else None,
            "p99_le_ms": quantile(0.99) * 1000 if count else None}


def burst(client: Any, challenge: str, teams: list[str]) -> dict[str, Any]:
    began = time.perf_counter()
    with ThreadPoolExecutor(len(teams)) as pool:
        took = list(pool.map(lambda t: start(client, challenge, t), teams))
    return {"makespan_s": round(time.perf_counter() - began, 2), **summary_ms(took),
            "p50_ms": round(statistics.median(took) * 1000, 1),
            "p99_ms": round(pct(took, 0.99) * 1000, 1)}


FIRST_SUBNETS = "10.207.0.0/16"  # --first's own subnets (issue 27)


def first_claims(n: int, src: Path = SRC) -> dict[str, Any]:
    """A team's first pooled claim, ``n`` times: p50/p90 through a task sent by name.

    ``src``: the checkout the worker runs (``--compare-src``: the code before issue 27).
    """
    quick = ENTRY.format(name="pooled", command='["/bin/busybox", "httpd", "-f", "-p", "8080", '
                         '"-h", "/www"]', pool=n)
    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                              "machine": machine(), "n": n, "mode": "first", "src": str(src)}
    with bench_run(ttl=1200, max_lifetime=3600, extra_catalog=quick) as bench:
        worker = bench_worker(bench, src=src, CTF_TEAM_SUBNET_POOL=FIRST_SUBNETS)
        worker.start()
        client = celery_client(bench)
        state = redis.Redis.from_url(f"{bench.redis.url}/2", decode_responses=True)
        try:
            began = time.perf_counter()
            wait_for(lambda: ready(state) >= n, 300, "the pool to fill")
            result["fill_s"] = round(time.perf_counter() - began, 1)
            took = []
            for i in range(n):
                took.append(start(client, "pooled", f"pf{i}"))
                print(f"first claim {i + 1}/{n}: {took[-1] * 1000:.0f} ms", file=sys.stderr)
            result["first_claim"] = summary_ms(took)
            result["claim_step_in_worker"] = claim_step(state)
            result["samples_ms"] = [round(v * 1000, 1) for v in took]
            # the trade-off: each pooled instance's stop removes its own network
            stops = []
            for i in range(n):
                began = time.perf_counter()
                client.send_task(STOP, args=["pooled", f"pf{i}"]).get(timeout=TIMEOUT)
                stops.append(time.perf_counter() - began)
            result["stop_with_its_network"] = summary_ms(stops)
            # what one network costs the engine here (raw SDK, same labels, our subnets)
            made, removed = [], []
            for i in range(min(n, 10)):
                began = time.perf_counter()
                net = bench.docker.networks.create(
                    f"ctf-bench-net-{i}-{LABEL['ctf.test']}", driver="bridge", labels=LABEL,
                    ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(
                        subnet=f"10.207.{250 - i}.0/28")]))
                made.append(time.perf_counter() - began)
                began = time.perf_counter()
                net.remove()
                removed.append(time.perf_counter() - began)
            result["raw_network_create"] = summary_ms(made)
            result["raw_network_remove"] = summary_ms(removed)
        finally:
            close_celery_client(client)
            worker.stop()
            subprocess.run(["nft", "delete", "table", "inet", "ctf_egress_"
                            + FIRST_SUBNETS.replace(".", "_").replace("/", "_")],
                           capture_output=True, check=False)
    return result


def start_timed(client: Any, challenge: str, team: str) -> tuple[str, float, float]:
    """:func:`start`, returning (task id, sent, seen) as epoch seconds (--herd's breakdown)."""
    sent = time.time()
    res = client.send_task(START, args=[challenge, team])
    inst = res.get(timeout=TIMEOUT)
    seen = time.time()
    if inst.get("status") != "running":
        raise RuntimeError(f"{challenge}/{team}: {inst}")
    return res.id, sent, seen


_CELERY_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^]]*\] "
                          r"Task celery_app\.tasks\.start_container\[([0-9a-f-]+)\] "
                          r"(received|succeeded)")
_TRACE = re.compile(r"TRACE\d? id=([0-9a-f-]+) (?:team=\S+ )?(.*)$")


def breakdown(timed: list[tuple[str, float, float]], log: str) -> dict[str, Any]:
    """Where each herd task's time went, from the client's clock and the worker's log.

    Per task: sent (client) -> received (Celery's "received" line: the worker fetched the
    message) -> succeeded (Celery's "succeeded" line, written once the result is stored) ->
    seen (the client's ``get`` returned). With a worker that logs ``TRACE`` lines (a
    temporary instrumentation of the start's steps, see PERFORMANCE.md §12) each step too.
    Celery's lines have millisecond timestamps; this machine's clock is UTC for both.
    """
    marks: dict[str, dict[str, float]] = {tid: {"sent": sent, "seen": seen}
                                          for tid, sent, seen in timed}
    for line in log.splitlines():
        if m := _CELERY_LINE.match(line):
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(
                tzinfo=UTC).timestamp()
            if m.group(2) in marks:
                marks[m.group(2)][m.group(3)] = at
        elif (m := _TRACE.search(line)) and m.group(1) in marks:
            for part in m.group(2).split():
                k, _, v = part.partition("=")
                with contextlib.suppress(ValueError):
                    marks[m.group(1)][k] = float(v)
    order = ["sent", "received", "body", "begin", "pre", "lock", "own", "reserve", "rep1",
             "claim", "record", "rep2", "probe", "ready", "audited", "succeeded", "seen"]
    steps: dict[str, Any] = {}
    for a, b in itertools.pairwise(order):
        gaps = [m[b] - m[a] for m in marks.values() if a in m and b in m]
        if gaps:
            steps[f"{a}->{b}"] = {"p50_ms": round(statistics.median(gaps) * 1000, 1),
                                  "p95_ms": round(pct(gaps, 0.95) * 1000, 1),
                                  "sum_s": round(sum(gaps), 2), "n": len(gaps)}
    spans = [m["succeeded"] - m["received"] for m in marks.values()
             if "received" in m and "succeeded" in m]
    if spans:
        steps["received->succeeded"] = {"p50_ms": round(statistics.median(spans) * 1000, 1),
                                        "p95_ms": round(pct(spans, 0.95) * 1000, 1),
                                        "sum_s": round(sum(spans), 2), "n": len(spans)}
    # seconds during which the worker held k of these tasks (0: none, while some were queued)
    held: dict[int, float] = {}
    edges = sorted([(m["received"], 1) for m in marks.values() if "succeeded" in m]
                   + [(m["succeeded"], -1) for m in marks.values() if "received" in m])
    count, prev = 0, edges[0][0] if edges else 0.0
    for at, step in edges:
        held[count] = held.get(count, 0.0) + at - prev
        prev, count = at, count + step
    t0 = min(m["sent"] for m in marks.values())
    ends = {k: round(max(m[k] for m in marks.values() if k in m) - t0, 2)
            for k in ("sent", "received", "succeeded", "seen")
            if any(k in m for m in marks.values())}
    return {"steps": steps, "last_at_s": ends,
            "worker_holding_s": {k: round(v, 3) for k, v in sorted(held.items())},
            "tasks": [{k: round(v - t0, 4) for k, v in sorted(m.items(), key=lambda i: i[1])}
                      for m in marks.values()]}


def herd(n: int) -> dict[str, Any]:
    """``n`` new teams start ``pooled`` by name at once from a pool of ``n`` ready (issue 27)."""
    quick = ENTRY.format(name="pooled", command='["/bin/busybox", "httpd", "-f", "-p", "8080", '
                         '"-h", "/www"]', pool=n)
    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                              "machine": machine(), "n": n, "mode": "herd"}
    with bench_run(ttl=1200, max_lifetime=3600, extra_catalog=quick) as bench:
        worker = bench_worker(bench, CTF_TEAM_SUBNET_POOL=FIRST_SUBNETS)
        worker.start()
        client = celery_client(bench)
        state = redis.Redis.from_url(f"{bench.redis.url}/2", decode_responses=True)
        try:
            began = time.perf_counter()
            wait_for(lambda: ready(state) >= n, 600, "the pool to fill")
            result["fill_s"] = round(time.perf_counter() - began, 1)
            teams = [f"ph{i}" for i in range(n)]
            mark = (bench.workdir / "worker.log").stat().st_size
            with ThreadPoolExecutor(n) as pool:
                timed = list(pool.map(lambda t: start_timed(client, "pooled", t), teams))
            took = [seen - sent for _, sent, seen in timed]
            result["herd"] = {**summary_ms(took), "p95_ms": round(pct(took, 0.95) * 1000, 1)}
            result["claim_step_in_worker"] = claim_step(state)
            log = (bench.workdir / "worker.log").read_bytes()[mark:].decode(errors="replace")
            result["breakdown"] = breakdown(timed, log)
        finally:
            close_celery_client(client)
            worker.stop()
            subprocess.run(["nft", "delete", "table", "inet", "ctf_egress_"
                            + FIRST_SUBNETS.replace(".", "_").replace("/", "_")],
                           capture_output=True, check=False)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="measured starts of each kind")
    parser.add_argument("--first", action="store_true",
                        help="only a team's first pooled claim (issue 27)")
    parser.add_argument("--herd", action="store_true",
                        help="-n new teams start pooled at once from a pool of -n (issue 27)")
    parser.add_argument("--compare-src", type=Path,
                        help="with --first: the same run with a worker of this checkout after")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.herd:
        emit(herd(args.n), args.json)
        return 0
    if args.first:
        figures = first_claims(args.n)
        if args.compare_src:
            figures = {"this": figures, "compare": first_claims(args.n, args.compare_src)}
        emit(figures, args.json)
        return 0
    result: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                              "machine": machine(), "n": args.n, "pool": POOL_SIZE}
    with bench_run(ttl=1200, max_lifetime=3600, extra_catalog=EXTRA) as bench:
        worker = bench_worker(bench, CTF_TEAM_SUBNET_POOL=SUBNETS)
        worker.start()
        client = celery_client(bench)
        state = redis.Redis.from_url(f"{bench.redis.url}/2", decode_responses=True)
        samples: dict[str, list[float]] = {"claim": [], "cold": [], "raw": []}
        try:
            began = time.perf_counter()
            wait_for(lambda: ready(state) >= POOL_SIZE, 600, "the pool to fill")
            result["fill_s"] = round(time.perf_counter() - began, 1)
            teams = [f"pb{i}" for i in range(args.n)]
            for t in teams:  # each team's network exists: the measured starts reuse it
                start(client, "keep", t)
            for i, team in enumerate(teams):
                order = ["claim", "cold", "raw"] if i % 2 == 0 else ["raw", "cold", "claim"]
                for kind in order:
                    if kind == "claim":
                        if ready(state) == 0:
                            raise RuntimeError("the pool ran dry; lower -n")
                        samples[kind].append(start(client, "pooled", team))
                    elif kind == "cold":
                        samples[kind].append(start(client, "cold", team))
                    else:
                        took, cid = start_raw(bench, team, i)
                        samples[kind].append(took)
                        bench.docker.api.remove_container(cid, force=True, v=True)
                print(f"round {i + 1}/{args.n}: " + " ".join(
                    f"{k}={v[-1] * 1000:.0f}ms" for k, v in samples.items()), file=sys.stderr)
            result["claim"] = {**summary_ms(samples["claim"]),
                               "p99_ms": round(pct(samples["claim"], 0.99) * 1000, 1)}
            result["cold"] = summary_ms(samples["cold"])
            result["raw"] = summary_ms(samples["raw"])
            result["cold_over_claim"] = round(statistics.median(samples["cold"])
                                              / statistics.median(samples["claim"]), 1)
            result["claim_step_in_worker"] = claim_step(state)
            began = time.perf_counter()
            wait_for(lambda: ready(state) >= POOL_SIZE, 600, "the pool to refill")
            result["refill_s"] = round(time.perf_counter() - began, 1)
            result["burst_pooled"] = burst(client, "pooled", [f"bp{i}" for i in
                                                              range(POOL_SIZE)])
            result["burst_cold"] = burst(client, "cold", [f"bc{i}" for i in range(POOL_SIZE)])
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
