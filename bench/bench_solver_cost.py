"""Issue 26: what solver health checks cost the start path and the host, side by side.

Two workers of this tree on one engine, each with a Redis, a team subnet pool and an egress
firewall table of its own (two halves of the bench's 10.215.0.0/16):

S  the bench catalog (``web``, ``keep``) plus ``--challenges`` (10) challenges with a solver
   checked every ``--interval`` (60) seconds: each keeps a canary instance (the stand-in
   image serving a page with its flag) and runs a solver container (static busybox fetching
   the page with ``nc``) against it, as ``tests/test_solver.py`` sets them up;
N  the bench catalog alone: no solvers.

1. Both start ``keep`` for their team (the team network stays); S's canaries are made and
   proven once (every challenge ``ok``) before anything is timed.
2. Side by side, round by round (order alternated): one start of ``web`` through each worker,
   ``send_task("celery_app.tasks.start_container").get()`` until running (bench_start's A),
   its stop untimed. While N's start is measured, S's whole worker is frozen (``SIGSTOP`` to
   its process group, ``SIGCONT`` after), so no canary pass and no solver run overlaps the
   no-solver side; both sides wait ``SETTLE`` seconds before their start, so an engine call
   S made just before it froze is done. The solver runs due while S is frozen run as soon as
   it thaws, inside S's half of the time: S's starts see about twice the real density of
   solver runs (a conservative figure).
3. Capacity: ``--window`` seconds with S running and N idle, then the same with S frozen;
   the CPU of S's worker (its process group), dockerd and containerd, the whole machine's
   busy time (``/proc/stat``: other users of the machine included), the solver runs done
   (their count and seconds from S's run histogram), and each solver container's and
   canary's memory and CPU from their cgroups (v1, cgroupfs; a poller watches
   ``/sys/fs/cgroup/memory/docker`` every 20 ms and keeps the last reading of each
   container before it goes).

Usage: .venv/bin/python bench/bench_solver_cost.py [-n 100] [--warmup 3] [--challenges 10]
       [--interval 60] [--window 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import redis
from _common import (
    BUSYBOX,
    LABEL,
    RUN_ID,
    bench_run,
    bench_worker,
    celery_client,
    close_celery_client,
    emit,
    machine,
    side_bench,
    side_labels,
    summary_ms,
    wait_for,
)
from bench_janitor import dockerd_pid, proc_cpu
from bench_start import start_via_celery, stop_via_celery

from celery_app.engine.firewall import table_name
from celery_app.state.solver import SolverResults
from ctf_testkit import support

TEAM_S = "benchsolvers"
TEAM_N = "benchnosolvers"
# Two halves of the bench's pool: two firewall tables, so neither worker's keeper rewrites
# the other's team bridges out of its sets.
POOL_S = "10.215.128.0/17"
POOL_N = "10.215.0.0/17"
# Seconds both sides wait before their timed start (see the module docstring).
SETTLE = 0.3
TASK_TIMEOUT = 60
CLK_TCK = os.sysconf("SC_CLK_TCK")
CG_MEMORY = Path("/sys/fs/cgroup/memory/docker")
CG_CPU = Path("/sys/fs/cgroup/cpuacct/docker")

SOLVER_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
ENTRYPOINT ["/bin/busybox", "sh", "-c"]
"""
# The challenge (tests/test_solver.py's): a page holding the instance's flag (read-only root).
SERVE = ("/bin/busybox mkdir -p /tmp/www && echo \"the flag is $CTF_FLAG\" > /tmp/www/index.html"
         " && exec /bin/busybox httpd -f -p 8080 -h /tmp/www")
# The solver: fetch the page; it prints the flag.
FETCH = ("echo \"solving $CTF_TARGET_URL\" && printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
         "/bin/busybox nc -w 5 \"$CTF_TARGET_HOST\" \"$CTF_TARGET_PORT\"")


def solver_catalog(count: int, solver_image: str, interval: float) -> str:
    """The catalog lines of ``count`` challenges with a solver (``{image}``: the stand-in)."""
    entry = {"image": "{image}", "port": 8080, "flag_env": "CTF_FLAG",
             "command": ["sh", "-c", SERVE], "memory": "64m", "cpus": 0.5, "pids": 64,
             "start_timeout": 30,
             "solver": {"image": solver_image, "command": [FETCH], "interval": interval}}
    # JSON is YAML: one line per challenge, indented under ``challenges:``.
    return "".join(f"  chk{i}: {json.dumps(entry)}\n" for i in range(count))


def group_cpu(pgid: int) -> float:
    """CPU seconds of every live process in a process group (a worker and its beat)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (``/proc/stat``: all but idle, iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def pid_of(name: str) -> int | None:
    """The pid of a daemon by name (``pidof``), or ``None``."""
    out = subprocess.run(["pidof", "-s", name], capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) if out.stdout.strip() else None


def read_int(path: Path) -> int | None:
    """An integer cgroup file, or ``None`` once the cgroup is gone."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class CgroupWatch:
    """Watches the engine's container cgroups (v1) and keeps each one's last readings.

    For each container id seen: its ``ctf.role`` label (looked up once, when first seen), its
    peak memory (``memory.max_usage_in_bytes``) and CPU (``cpuacct.usage``) as last read
    before the container went.
    """

    def __init__(self, poll: float = 0.02) -> None:
        self.poll = poll
        self.seen: dict[str, dict[str, int]] = {}
        self.roles: dict[str, str] = {}
        self._docker = docker.from_env(timeout=30)  # this thread's own client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cgroup-watch", daemon=True)

    def __enter__(self) -> CgroupWatch:
        if not CG_MEMORY.is_dir():
            raise RuntimeError(f"{CG_MEMORY} is missing: the watch needs cgroup v1 (cgroupfs)")
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._docker.close()

    def of_role(self, role: str) -> list[dict[str, int]]:
        """The readings of the containers of this run whose ``ctf.role`` was ``role``."""
        return [v for cid, v in self.seen.items() if self.roles.get(cid) == role]

    def _role(self, cid: str) -> str:
        """A container's ``ctf.role`` when it is this run's, else ``""`` (``?``: gone)."""
        try:
            labels = self._docker.api.inspect_container(cid)["Config"]["Labels"] or {}
        except docker.errors.NotFound:
            return "?"
        if labels.get("ctf.test") != LABEL["ctf.test"]:
            return ""
        return str(labels.get("ctf.role", ""))

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                for entry in os.scandir(CG_MEMORY):
                    if not entry.is_dir():
                        continue
                    peak = read_int(Path(entry.path) / "memory.max_usage_in_bytes")
                    cpu = read_int(CG_CPU / entry.name / "cpuacct.usage")
                    if peak is None or cpu is None:
                        continue
                    if entry.name not in self.roles:
                        self.roles[entry.name] = self._role(entry.name)
                    known = self.seen.setdefault(entry.name, {"peak": 0, "cpu_ns": 0})
                    known["peak"] = max(known["peak"], peak)
                    known["cpu_ns"] = max(known["cpu_ns"], cpu)
            self._stop.wait(self.poll)


def solver_runs(results: SolverResults, challenges: list[str]) -> tuple[int, float]:
    """Solver runs done so far over ``challenges``, and their seconds in all."""
    count, total = 0, 0.0
    for ch in challenges:
        buckets, seconds = results.histogram(ch)
        count += int(buckets[-1][1])
        total += seconds
    return count, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100, help="measured starts of each side")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first")
    parser.add_argument("--challenges", type=int, default=10, help="challenges with a solver")
    parser.add_argument("--interval", type=float, default=60, help="each solver's interval (s)")
    parser.add_argument("--window", type=float, default=60,
                        help="seconds of each capacity window (0: none)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    if not BUSYBOX.exists():
        sys.exit("/bin/busybox is missing: apt-get install busybox-static")
    checked = [f"chk{i}" for i in range(args.challenges)]
    solver_tag = f"ctf-bench/solver:{RUN_ID}"

    with bench_run() as bench, contextlib.ExitStack() as stack:
        for pool in (POOL_S, POOL_N):  # the two workers' firewall tables: none left behind
            stack.callback(subprocess.run, ["nft", "delete", "table", "inet",
                                            table_name(ipaddress.IPv4Network(pool))],
                           capture_output=True, check=False)
        support.build_image(bench.docker, solver_tag, SOLVER_DOCKERFILE, {"busybox": BUSYBOX},
                            LABEL)
        worker_n = bench_worker(bench, CTF_EXTRA_LABELS=side_labels("nosolvers"),
                                CTF_TEAM_SUBNET_POOL=POOL_N)
        worker_n.start()
        stack.callback(worker_n.stop)
        client_n = celery_client(bench)
        stack.callback(close_celery_client, client_n)

        side = stack.enter_context(side_bench(bench, "solvers"))
        catalog_s = side.workdir / "challenges.yaml"
        catalog_s.write_text(bench.catalog_file.read_text()
                             + solver_catalog(args.challenges, solver_tag, args.interval)
                             .replace("{image}", bench.image))
        side = dataclasses.replace(side, catalog_file=catalog_s)
        worker_s = bench_worker(side, CTF_EXTRA_LABELS=side_labels("solvers"),
                                CTF_TEAM_SUBNET_POOL=POOL_S)
        worker_s.start()
        assert worker_s.proc is not None
        pgid = worker_s.proc.pid  # its own session: the worker and its beat

        def freeze() -> None:
            os.killpg(pgid, signal.SIGSTOP)

        def thaw() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)

        stack.callback(worker_s.stop)
        stack.callback(thaw)  # never stopped while frozen (runs before stop)
        client_s = celery_client(side)
        stack.callback(close_celery_client, client_s)
        state_s = redis.Redis.from_url(side.run.values()["redis_url"], decode_responses=True)
        stack.callback(state_s.close)
        results = SolverResults(state_s)

        for client, team in ((client_n, TEAM_N), (client_s, TEAM_S)):
            client.send_task("celery_app.tasks.start_container",
                             args=["keep", team]).get(timeout=TASK_TIMEOUT)
        began = time.monotonic()
        states: dict[str, str] = {}

        def all_proven() -> bool:
            for ch in checked:
                found = results.get(ch)
                if found.get("state") == "broken":  # the setup is wrong: say so at once
                    raise RuntimeError(f"the solver of {ch} failed: {found.get('output')}")
                states[ch] = found.get("state", "unknown")
            return all(s == "ok" for s in states.values())

        wait_for(all_proven, 60 + 30 * args.challenges, "every canary made and proven once")
        first_pass = time.monotonic() - began
        print(f"# {args.challenges} canaries made and proven in {first_pass:.1f} s",
              file=sys.stderr)

        # -- 2. side by side --------------------------------------------------------------
        samples: dict[str, list[float]] = {"solvers": [], "no_solvers": []}
        runs_before = solver_runs(results, checked)
        t_side = time.monotonic()
        for rnd in range(args.warmup + args.n):
            order = ["solvers", "no_solvers"] if rnd % 2 == 0 else ["no_solvers", "solvers"]
            for kind in order:
                if kind == "no_solvers":
                    freeze()
                    try:
                        time.sleep(SETTLE)
                        took = start_via_celery(client_n, TEAM_N)
                        stop_via_celery(client_n, TEAM_N)
                    finally:
                        thaw()
                else:
                    time.sleep(SETTLE)
                    took = start_via_celery(client_s, TEAM_S)
                    stop_via_celery(client_s, TEAM_S)
                if rnd >= args.warmup:
                    samples[kind].append(took)
            if rnd >= args.warmup:
                print(f"round {rnd + 1}/{args.warmup + args.n}: "
                      f"solvers={samples['solvers'][-1] * 1000:.0f}ms "
                      f"no_solvers={samples['no_solvers'][-1] * 1000:.0f}ms", file=sys.stderr)
        side_seconds = time.monotonic() - t_side
        runs_after = solver_runs(results, checked)

        # -- 3. capacity ------------------------------------------------------------------
        capacity: dict[str, Any] = {}
        if args.window > 0:
            canaries = {c.id: c.name for c in bench.docker.containers.list(
                filters={"label": [f"ctf.test={LABEL['ctf.test']}", "ctf.team=canary"]})}
            daemons = {"dockerd": dockerd_pid(), "containerd": pid_of("containerd")}
            with CgroupWatch() as watch:
                for phase in ("active", "frozen"):
                    if phase == "frozen":
                        freeze()
                    try:
                        cpu0 = {k: proc_cpu(p) for k, p in daemons.items()}
                        w0, busy0, runs0 = group_cpu(pgid), machine_busy(), \
                            solver_runs(results, checked)
                        canary0 = {cid: read_int(CG_CPU / cid / "cpuacct.usage") or 0
                                   for cid in canaries}
                        time.sleep(args.window)
                        cpu1 = {k: proc_cpu(p) for k, p in daemons.items()}
                        w1, busy1, runs1 = group_cpu(pgid), machine_busy(), \
                            solver_runs(results, checked)
                        canary1 = {cid: read_int(CG_CPU / cid / "cpuacct.usage") or 0
                                   for cid in canaries}
                    finally:
                        if phase == "frozen":
                            thaw()
                    capacity[phase] = {
                        "seconds": args.window,
                        "solver_runs": runs1[0] - runs0[0],
                        "solver_run_seconds": round(runs1[1] - runs0[1], 2),
                        "worker_cpu_s": round(w1 - w0, 2),
                        **{f"{k}_cpu_s": round(cpu1[k] - cpu0[k], 2) for k in daemons},
                        "canaries_cpu_s": round(sum(canary1[c] - canary0[c]
                                                    for c in canaries) / 1e9, 3),
                        "machine_busy_s": round(busy1 - busy0, 2),
                    }
                canary_mem = [read_int(CG_MEMORY / cid / "memory.usage_in_bytes") or 0
                              for cid in canaries]
            solvers = watch.of_role("solver")
            capacity["canaries"] = {
                "count": len(canaries),
                "memory_usage_mib_each_median": round(statistics.median(canary_mem) / 2**20, 2)
                if canary_mem else None,
                "memory_peak_mib_each_max": round(max(
                    (watch.seen.get(cid, {}).get("peak", 0) for cid in canaries), default=0)
                    / 2**20, 2),
            }
            capacity["solver_containers"] = {
                "seen": len(solvers),
                "gone_before_looked_up": len(watch.of_role("?")),
                "memory_peak_mib_median": round(statistics.median(
                    v["peak"] for v in solvers) / 2**20, 2) if solvers else None,
                "cpu_ms_median": round(statistics.median(
                    v["cpu_ns"] for v in solvers) / 1e6, 1) if solvers else None,
            }
            active, frozen = capacity["active"], capacity["frozen"]
            if active["solver_runs"]:
                per = active["solver_runs"]
                capacity["per_solver_run"] = {
                    "seconds_mean": round(active["solver_run_seconds"] / per, 3),
                    **{k: round((active[k] - frozen[k]) / per, 3)
                       for k in ("worker_cpu_s", "dockerd_cpu_s", "containerd_cpu_s",
                                 "machine_busy_s")},
                }
        for client, team in ((client_n, TEAM_N), (client_s, TEAM_S)):
            client.send_task("celery_app.tasks.stop_container",
                             args=["keep", team]).get(timeout=TASK_TIMEOUT)
        final_states = {ch: results.get(ch).get("state", "unknown") for ch in checked}

    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
        "n": args.n,
        "challenges_with_solver": args.challenges,
        "interval_s": args.interval,
        "first_pass_s": round(first_pass, 1),
        "solvers": summary_ms(samples["solvers"]),
        "no_solvers": summary_ms(samples["no_solvers"]),
        "ratio_p50": round(statistics.median(samples["solvers"])
                           / statistics.median(samples["no_solvers"]), 3),
        "ratio_p90": round(summary_ms(samples["solvers"])["p90_ms"]
                           / summary_ms(samples["no_solvers"])["p90_ms"], 3),
        "side_by_side_s": round(side_seconds, 1),
        "solver_runs_during_side_by_side": runs_after[0] - runs_before[0],
        "solver_states_at_end": final_states,
        "capacity": capacity,
        "samples_ms": {k: [round(v * 1000, 1) for v in vals] for k, vals in samples.items()},
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
