"""Issue 7: start latency of the task path and the API path vs raw Docker, interleaved in one run.

A  task: a plain Celery client's ``send_task("celery_app.tasks.start_container").get()``
   (result via the Redis backend's pub/sub), through a real ``celery worker -B --pool threads``.
B  api: ``PUT /api/v1/teams/{t}/instances/web2?wait=30`` over keep-alive HTTP to the API run as
   ``run-celery-worker.sh`` runs it: ``python -m celery_app.cli api`` (uvicorn, create_app) in
   its own process, on a free port of 127.0.0.1.
C  raw: ``docker.containers.run`` of the same image on the same team network with the same
   limits and port publishing, ``reload()``, then the service's readiness probe
   (``bench_start.start_raw``).

With ``--breakdown``, two more, to explain B - A:

D  dispatcher: what the PUT handler does, without HTTP: ``Dispatcher.start`` + ``Dispatcher.wait``
   (Redis polling every 10 ms) in this process.
E  raw-min: what the earlier bench_api.py timed as "raw": default bridge, no limits, probe of
   the published port through docker-proxy.

The team network exists for the whole run (challenge ``keep`` stays up). Every kind uses its own
challenge of the same team and is stopped again, untimed, before the next. The order rotates
every round. Per start the CPU used by the API process, the worker and dockerd is read from
/proc, so "the API's own CPU" is a figure, not a guess.

Usage: .venv/bin/python bench/bench_latency.py [-n 20] [--warmup 2] [--breakdown] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _common import (
    LABEL,
    SRC,
    Bench,
    bench_run,
    bench_worker,
    celery_client,
    close_celery_client,
    emit,
    free_port,
    machine,
    side_bench,
    side_labels,
    summary_ms,
    wait_for,
)
from bench_janitor import dockerd_pid, proc_cpu
from bench_start import TEAM, start_raw

from celery_app.api.client import Dispatcher
from celery_app.core.readiness import wait_ready
from ctf_testkit.support import stop_process

ADMIN = "bench-admin-token-0123456789abcdefghij"
TIMEOUT = 60
EXTRA = "".join(f"""  {cid}:
    image: {{image}}
    port: 8080
    protocol: http
    health_path: /
    ttl: 600
    memory: 64m
    cpus: 0.5
    pids: 64
    start_timeout: 30
""" for cid in ("web2", "web3"))


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (/proc/<pid>/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def api_process(
    bench: Bench, src: Path = SRC, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run the API as run-celery-worker.sh does (``python -m celery_app.cli api``)."""
    port = free_port()
    logfile = bench.workdir / "api.log"
    with logfile.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery_app.cli", "api", "--bind", f"127.0.0.1:{port}"],
            env={**os.environ, **bench.env(**env)}, stdout=log, stderr=subprocess.STDOUT,
            cwd=src,
        )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("API exited:\n" + logfile.read_text(errors="replace")[-3000:])
        try:
            return httpx.get(f"{base}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "the API to answer")
        yield base, proc
    finally:
        stop_process(proc)


def start_task(client: Any, challenge: str) -> None:
    inst = client.send_task("celery_app.tasks.start_container",
                            args=[challenge, TEAM]).get(timeout=TIMEOUT)
    if inst.get("status") != "running":
        raise RuntimeError(f"start_container returned {inst}")


def stop_task(client: Any, challenge: str) -> None:
    client.send_task("celery_app.tasks.stop_container",
                     args=[challenge, TEAM]).get(timeout=TIMEOUT)


def start_api(http: httpx.Client) -> None:
    r = http.put(f"/api/v1/teams/{TEAM}/instances/web2", params={"wait": 30})
    if r.status_code != 200 or r.json().get("status") != "running":
        raise RuntimeError(f"PUT answered {r.status_code}: {r.text}")


def start_dispatcher(disp: Dispatcher) -> None:
    task_id, _ = disp.start(disp.key("web3", TEAM))
    view = disp.wait(task_id, 30)
    if not view.ready or view.error is not None:
        raise RuntimeError(f"dispatcher start: {view.public()}")


def start_raw_min(bench: Bench, index: int) -> str:
    """E: bench_api.py's old baseline: default bridge, no limits, probe via docker-proxy."""
    c = bench.docker.containers.run(bench.image, detach=True, labels=LABEL,
                                    name=f"ctf-bench-rawmin-{index}-{LABEL['ctf.test']}",
                                    ports={"8080/tcp": ("127.0.0.1", None)})
    c.reload()
    port = int(c.attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"])
    if not wait_ready("127.0.0.1", port, "http", "/", 30):
        raise RuntimeError("raw-min container never answered")
    return str(c.id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    parser.add_argument("--breakdown", action="store_true",
                        help="also D (Dispatcher in-process) and E (bench_api's old raw)")
    parser.add_argument("--concurrency", type=int, default=16, help="worker threads")
    parser.add_argument("--compare-src", type=Path,
                        help="also task_alt and api_alt: a second worker and API running this "
                        "checkout's celery_app/ (own Redis), interleaved with the others")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()

    kinds = ["task", "api", "raw"] + (["dispatcher", "raw_min"] if args.breakdown else [])
    kinds += ["task_alt", "api_alt"] if args.compare_src else []
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    env = {"CTF_MAX_INSTANCES_PER_TEAM": "5"}
    if args.compare_src:  # two workers: neither janitor may take the other's for orphans
        env["CTF_EXTRA_LABELS"] = side_labels("main")
    with bench_run(extra_catalog=EXTRA) as bench, contextlib.ExitStack() as stack:
        worker = bench_worker(bench, concurrency=args.concurrency, **env)
        worker.start()
        client = celery_client(bench)
        disp = Dispatcher(bench.settings(admin_token=ADMIN, max_instances_per_team=5))
        raw_ids: list[str] = []
        alt_worker = None
        try:
            with api_process(bench, **env) as (base, api), httpx.Client(
                base_url=base, timeout=TIMEOUT, headers={"Authorization": f"Bearer {ADMIN}"},
            ) as http:
                assert worker.proc is not None
                pids = {"api": api.pid, "worker": worker.proc.pid, "dockerd": dockerd_pid()}
                start_task(client, "keep")  # the team network stays for the whole run
                if args.compare_src:
                    alt = stack.enter_context(side_bench(bench))
                    alt_env = {**env, "CTF_EXTRA_LABELS": side_labels("alt")}
                    alt_worker = bench_worker(alt, concurrency=args.concurrency,
                                              src=args.compare_src, **alt_env)
                    alt_worker.start()
                    alt_client = celery_client(alt)
                    stack.callback(close_celery_client, alt_client)
                    alt_base, alt_api = stack.enter_context(
                        api_process(alt, src=args.compare_src, **alt_env))
                    alt_http = stack.enter_context(httpx.Client(
                        base_url=alt_base, timeout=TIMEOUT,
                        headers={"Authorization": f"Bearer {ADMIN}"}))
                    assert alt_worker.proc is not None
                    pids.update({"api_alt": alt_api.pid, "worker_alt": alt_worker.proc.pid})

                def raw() -> None:
                    _, cid = start_raw(bench, len(raw_ids))
                    raw_ids.append(cid)

                def raw_min() -> None:
                    raw_ids.append(start_raw_min(bench, len(raw_ids)))

                def undo_raw() -> None:
                    bench.docker.api.remove_container(raw_ids[-1], force=True, v=True)

                def stop_api() -> None:
                    http.delete(f"/api/v1/teams/{TEAM}/instances/web2",
                                params={"wait": 30}).raise_for_status()

                run: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
                    "task": (lambda: start_task(client, "web"), lambda: stop_task(client, "web")),
                    "api": (lambda: start_api(http), stop_api),
                    "raw": (raw, undo_raw),
                    "dispatcher": (lambda: start_dispatcher(disp),
                                   lambda: stop_task(client, "web3")),
                    "raw_min": (raw_min, undo_raw),
                }
                if args.compare_src:
                    run["task_alt"] = (lambda: start_task(alt_client, "web"),
                                       lambda: stop_task(alt_client, "web"))

                    def stop_api_alt() -> None:
                        alt_http.delete(f"/api/v1/teams/{TEAM}/instances/web2",
                                        params={"wait": 30}).raise_for_status()

                    run["api_alt"] = (lambda: start_api(alt_http), stop_api_alt)
                for rnd in range(args.warmup + args.n):
                    shift = rnd % len(kinds)
                    order = kinds[shift:] + kinds[:shift]
                    for kind in order:
                        before = {k: proc_cpu(p) for k, p in pids.items()}
                        b0 = time.process_time()
                        began = time.perf_counter()
                        run[kind][0]()
                        took = time.perf_counter() - began
                        if rnd >= args.warmup:
                            samples[kind].append(took)
                            for k, p in pids.items():
                                cpu[kind].setdefault(k, []).append(proc_cpu(p) - before[k])
                            cpu[kind].setdefault("bench", []).append(time.process_time() - b0)
                        run[kind][1]()
                    if rnd >= args.warmup:
                        print(f"round {rnd + 1}/{args.warmup + args.n}: " + " ".join(
                            f"{k}={samples[k][-1] * 1000:.0f}ms" for k in kinds),
                            file=sys.stderr)
                rss = {"api_kib": rss_kib(api.pid), "worker_kib": rss_kib(worker.proc.pid)}
                stop_task(client, "keep")
        finally:
            for cid in raw_ids:
                with contextlib.suppress(Exception):
                    bench.docker.api.remove_container(cid, force=True, v=True)
            disp.close()
            close_celery_client(client)
            worker.stop()
            if alt_worker is not None:
                alt_worker.stop()

    raw_median = statistics.median(samples["raw"])
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "load_avg": os.getloadavg(), "n": args.n,
        "worker_concurrency": args.concurrency,
        "targets": {"task": 1.10, "api": 1.15},
    }
    for kind in kinds:
        result[kind] = summary_ms(samples[kind])
        result[kind]["ratio_to_raw"] = round(statistics.median(samples[kind]) / raw_median, 3)
        # CPU per start, means in ms (other processes: 10 ms ticks, so a mean, not a median)
        result[kind]["cpu_ms"] = {k: round(statistics.mean(v) * 1000, 1)
                                  for k, v in cpu[kind].items() if v}
    # paired differences (same round): robust against drift on a shared machine
    for kind in kinds:
        if kind != "raw":
            diffs = [a - b for a, b in zip(samples[kind], samples["raw"], strict=True)]
            result[kind]["paired_diff_to_raw_ms"] = round(statistics.median(diffs) * 1000, 1)
    if "dispatcher" in kinds:
        diffs = [a - b for a, b in zip(samples["api"], samples["dispatcher"], strict=True)]
        result["api_minus_dispatcher_ms"] = round(statistics.median(diffs) * 1000, 1)
    result["rss_after_kib"] = rss
    result["samples_ms"] = {k: [round(v * 1000, 1) for v in vals] for k, vals in samples.items()}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
