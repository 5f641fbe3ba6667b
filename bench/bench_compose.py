"""Issue 24: start of the three-service Compose instance, ours vs raw SDK vs docker-compose.

The shipped example ``examples/shop`` (web shop, its database with a healthcheck, an admin bot
that needs the web), its three images built from its folder with this run's label, measured
interleaved in one run (A B C, B C A, …; every other round reversed):

A  ours: a plain Celery client's ``send_task("celery_app.tasks.start_container",
   ["shop", team]).get()`` through a real worker, from submission until the instance comes
   back ``running`` (time-to-running as a user sees it). Stopped (``stop_container``)
   afterwards, untimed.
B  raw: the Docker SDK in this process doing the same work: create the instance's network
   (a /28 from this run's pool, labelled), create + start ``db`` with the file's healthcheck,
   wait until Docker reports it healthy (the engine's event stream: no poll at all), create +
   start ``web`` (port published on 127.0.0.1, alias ``web``) and ``bot``, then probe the web
   endpoint with the service's own probe (:func:`celery_app.core.readiness.wait_ready` against
   the container's address) until it answers. The same limits and hardening as ours (caps
   dropped, no-new-privileges, read-only root, memory, CPU, pids, log rotation, the team's
   flag in ``db``). Removed afterwards, untimed.
C  docker-compose: Debian's ``docker-compose`` 1.29 (installed with apt-get when missing)
   ``up -d`` of the same file, ``CTF_FLAG``/``CTF_TEAM`` interpolated through the
   environment, then the same probe of the web container until it answers;
   ``docker-compose down`` afterwards, untimed. Only two things are added to the file: the run
   label on every service and on the default network (so the cleanup finds them), and the
   default network's subnet from this run's pool. A peer figure: Compose applies only the
   file's own limits.

A' (``--compare-src DIR``) A again, through a second worker that runs another checkout (the code
   before a change: ``git archive <rev> | tar -x -C DIR``), with a Redis and team of its own,
   so old and new are measured side by side in one run on the same engine.

Everything carries ``ctf.test=bench-<pid>`` and is removed in a ``finally``; every network
comes from 10.250.0.0/16 (the instancer's from 10.250.0.0/17, raw and Compose a fixed /28 each
above it).

Usage: .venv/bin/python bench/bench_compose.py [-n 15] [--warmup 1] [--compare-src DIR]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _common
import docker
import docker.types
import yaml
from _common import (
    LABEL,
    ROOT,
    RUN_ID,
    Bench,
    bench_run,
    bench_worker,
    celery_client,
    close_celery_client,
    emit,
    machine,
    pct,
    side_bench,
    side_labels,
    summary_ms,
)

from celery_app.core.flags import team_flag
from celery_app.core.readiness import wait_ready
from ctf_testkit import support

# This bench's networks (issue 24's helper pool): the instancer's, then raw's and Compose's.
_common.POOL = "10.250.0.0/17"
RAW_SUBNET = "10.250.255.0/28"
COMPOSE_SUBNET = "10.250.255.16/28"

SHOP = ROOT / "examples" / "shop"
SERVICES = ("web", "db", "bot")
TEAM = "cbench"
ALT_TEAM = "cbenchalt"  # the compared checkout's team: its own instance network
CHALLENGE = "shop"
TASK_TIMEOUT = 120
PROBE_TIMEOUT = 60
PROJECT = f"ctfcbench{os.getpid()}"  # docker-compose's project name
CATALOG_ENTRY = """
  shop:
    name: Shop with a database (bench)
    compose: shop/compose.yaml
    ttl: 600
    memory: 64m
    start_timeout: 60
"""
# The catalog's limits for the shop (memory above, the rest Challenge's defaults), for raw.
MEMORY = {"web": 64 * 1024**2, "db": 64 * 1024**2, "bot": 32 * 1024**2}
NANO_CPUS = 1_000_000_000
PIDS = 256
VOLUME_TMPFS = "rw,nosuid,nodev,size=67108864"


# -- set-up ------------------------------------------------------------------------------------


def ensure_docker_compose() -> str:
    """Return the ``docker-compose`` command, installing Debian's package when missing."""
    found = shutil.which("docker-compose")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("docker-compose is missing: sudo apt-get install docker-compose")
    print("# installing docker-compose (apt-get)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "docker-compose"]
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    found = shutil.which("docker-compose")
    if not found:
        sys.exit("apt-get install docker-compose did not give a docker-compose command")
    return found


def shop_images(client: docker.DockerClient) -> dict[str, str]:
    """Build the example's three images from its folder, tagged and labelled for this run."""
    tags = {}
    for service in SERVICES:
        folder = SHOP / service
        files: dict[str, bytes | Path] = {"busybox": _common.BUSYBOX}
        for path in folder.rglob("*"):
            if path.is_file() and path.name != "Dockerfile":
                files[str(path.relative_to(folder))] = path
        tags[service] = support.build_image(
            client, f"ctf-bench/shop-{service}:{RUN_ID}",
            (folder / "Dockerfile").read_text(), files, LABEL)
    return tags


def shop_file(images: dict[str, str]) -> str:
    """The example's compose.yaml as shipped, with this run's image tags."""
    text = (SHOP / "compose.yaml").read_text()
    for service, tag in images.items():
        text = text.replace(f"ctf-example/shop-{service}:1", tag)
    return text


def compose_file(text: str) -> str:
    """The same file for docker-compose: plus the run label and the default network's subnet."""
    data = yaml.safe_load(text)
    for service in data["services"].values():
        service["labels"] = dict(LABEL)
    data["networks"] = {"default": {"labels": dict(LABEL), "ipam": {
        "config": [{"subnet": COMPOSE_SUBNET}]}}}
    return yaml.safe_dump(data, sort_keys=False)


def load_db_healthcheck(text: str) -> dict[str, Any]:
    """The db service's healthcheck from the file, as the SDK takes it (nanoseconds)."""
    check = yaml.safe_load(text)["services"]["db"]["healthcheck"]

    def ns(value: str) -> int:
        return int(float(value.rstrip("s")) * 1e9)

    return {"test": check["test"], "interval": ns(check["interval"]),
            "timeout": ns(check["timeout"]), "retries": int(check["retries"])}


# -- A: ours -----------------------------------------------------------------------------------


def start_ours(client: Any, team: str = TEAM) -> float:
    """A: send start_container by name and wait for the running instance; return seconds."""
    began = time.perf_counter()
    inst = client.send_task("celery_app.tasks.start_container",
                            args=[CHALLENGE, team]).get(timeout=TASK_TIMEOUT)
    elapsed = time.perf_counter() - began
    if inst.get("status") != "running" or len(inst.get("endpoints") or []) != 1:
        raise RuntimeError(f"start_container returned {inst}")
    return elapsed


def stop_ours(client: Any, team: str = TEAM) -> None:
    client.send_task("celery_app.tasks.stop_container",
                     args=[CHALLENGE, team]).get(timeout=TASK_TIMEOUT)


# -- B: raw SDK --------------------------------------------------------------------------------


class Raw:
    """The raw Docker SDK doing the instance's work (B), and its removal."""

    def __init__(self, bench: Bench, images: dict[str, str], healthcheck: dict[str, Any],
                 flag: str) -> None:
        self.api = bench.docker.api
        self.images = images
        self.healthcheck = healthcheck
        self.flag = flag
        self.net = f"ctf-bench-raw-{RUN_ID}"
        self.made: list[str] = []
        # The images' VOLUMEs get a tmpfs on a read-only root, as the driver gives them.
        self.tmpfs = {
            s: dict.fromkeys(self.api.inspect_image(tag)["Config"].get("Volumes") or {},
                             VOLUME_TMPFS) or None
            for s, tag in images.items()}

    def _run(self, service: str, env: dict[str, str] | None = None, port: int | None = None,
             healthcheck: dict[str, Any] | None = None) -> str:
        api = self.api
        host_config = api.create_host_config(
            port_bindings={f"{port}/tcp": ("127.0.0.1", None)} if port else None,
            network_mode=self.net, cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
            mem_limit=MEMORY[service], memswap_limit=MEMORY[service], nano_cpus=NANO_CPUS,
            pids_limit=PIDS, read_only=True, tmpfs=self.tmpfs[service],
            restart_policy={"Name": "no"},
            log_config=docker.types.LogConfig(type="json-file",
                                              config={"max-size": "10m", "max-file": "2"}),
        )
        created = api.create_container(
            image=self.images[service], name=f"ctf-bench-raw-{RUN_ID}.{service}",
            environment=env, labels={**LABEL, "ctf.service": service},
            ports=[(port, "tcp")] if port else None, host_config=host_config,
            hostname=service, detach=True, healthcheck=healthcheck,
            networking_config=api.create_networking_config({
                self.net: api.create_endpoint_config(aliases=[service])}),
        )
        self.made.append(created["Id"])
        return str(created["Id"])

    def start(self) -> float:
        """B: network, db, wait healthy, web, bot, probe web; return seconds."""
        api = self.api
        began = time.perf_counter()
        api.create_network(self.net, driver="bridge", labels=dict(LABEL), check_duplicate=True,
                           ipam=docker.types.IPAMConfig(
                               pool_configs=[docker.types.IPAMPool(subnet=RAW_SUBNET)]))
        db = self._run("db", env={"FLAG": self.flag}, healthcheck=self.healthcheck)
        # Docker's own word on the health check, pushed as it happens (subscribed before the
        # start, so the event cannot be missed); the stream ends by itself at ``until``.
        events = api.events(decode=True, until=int(time.time()) + PROBE_TIMEOUT,
                            filters={"container": db, "event": "health_status"})
        try:
            api.start(db)
            for event in events:
                status = event.get("status", "")
                if status.endswith("unhealthy"):
                    raise RuntimeError("raw db turned unhealthy")
                if status.endswith("healthy"):
                    break
            else:
                raise RuntimeError("raw db was not healthy in time")
        finally:
            events.close()
        web = self._run("web", env={}, port=8080)
        api.start(web)
        bot = self._run("bot", env={"TEAM": TEAM})
        api.start(bot)
        attrs = api.inspect_container(web)
        ip = attrs["NetworkSettings"]["Networks"][self.net]["IPAddress"]

        def alive() -> bool:
            return bool(api.inspect_container(web)["State"]["Running"])

        if not wait_ready(ip, 8080, "http", "/", PROBE_TIMEOUT, still_alive=alive):
            raise RuntimeError("raw web never answered")
        return time.perf_counter() - began

    def remove(self) -> None:
        for cid in reversed(self.made):
            self.api.remove_container(cid, force=True, v=True)
        self.made.clear()
        if self.api.networks(names=[self.net]):
            self.api.remove_network(self.net)


# -- C: docker-compose -------------------------------------------------------------------------


def timed_step(name: str, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)``, printing how long it took when ``CTF_BENCH_VERBOSE`` is set."""
    began = time.perf_counter()
    try:
        return fn(*args)
    finally:
        if os.environ.get("CTF_BENCH_VERBOSE"):
            print(f"  {name}: {time.perf_counter() - began:.2f}s", file=sys.stderr)


class Compose:
    """``docker-compose up -d`` of the file, then the probe (C), and ``down``."""

    def __init__(self, bench: Bench, command: str, path: Path, flag: str) -> None:
        self.api = bench.docker.api
        self.cmd = [command, "-p", PROJECT, "-f", str(path)]
        # Only what the file interpolates: the instancer fills the same two in.
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": os.environ.get("HOME", "/root"), "CTF_FLAG": flag, "CTF_TEAM": TEAM}
        if "DOCKER_HOST" in os.environ:
            self.env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]

    def start(self) -> float:
        """C: ``up -d``, then the web container's probe; return seconds."""
        began = time.perf_counter()
        done = subprocess.run([*self.cmd, "up", "-d"], env=self.env, capture_output=True,
                              text=True, check=False, timeout=PROBE_TIMEOUT * 2)
        if done.returncode != 0:
            raise RuntimeError(f"docker-compose up failed: {done.stderr[-800:]}")
        found = self.api.containers(filters={"label": [
            f"com.docker.compose.project={PROJECT}", "com.docker.compose.service=web"]})
        if not found:
            raise RuntimeError("docker-compose up left no web container")
        web = found[0]["Id"]
        nets = self.api.inspect_container(web)["NetworkSettings"]["Networks"]
        ip = next(n["IPAddress"] for n in nets.values() if n.get("IPAddress"))

        def alive() -> bool:
            return bool(self.api.inspect_container(web)["State"]["Running"])

        if not wait_ready(ip, 8080, "http", "/", PROBE_TIMEOUT, still_alive=alive):
            raise RuntimeError("docker-compose's web never answered")
        return time.perf_counter() - began

    def down(self) -> None:
        subprocess.run([*self.cmd, "down", "-t", "0"], env=self.env, capture_output=True,
                       check=False, timeout=PROBE_TIMEOUT * 2)


# -- the run -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=15, help="measured starts of each kind")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--compare-src", type=Path,
                        help="also start through a worker running this checkout (A')")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    compose_cmd = ensure_docker_compose()
    version = subprocess.run([compose_cmd, "version", "--short"], capture_output=True,
                             text=True, check=False).stdout.strip()

    samples: dict[str, list[float]] = {"ours": [], "raw": [], "compose": [], "ours_alt": []}
    with bench_run(extra_catalog=CATALOG_ENTRY) as bench, contextlib.ExitStack() as stack:
        images = shop_images(bench.docker)
        text = shop_file(images)
        (bench.workdir / "shop").mkdir()
        (bench.workdir / "shop" / "compose.yaml").write_text(text)
        (bench.workdir / "peer").mkdir()
        peer_path = bench.workdir / "peer" / "compose.yaml"
        peer_path.write_text(compose_file(text))
        settings = bench.settings()
        flag = team_flag(settings.flag_secret_value(), CHALLENGE, TEAM, settings.flag_format)
        raw = Raw(bench, images, load_db_healthcheck(text), flag)
        peer = Compose(bench, compose_cmd, peer_path, flag)
        # Side by side, each worker's janitor must leave the other's objects alone.
        main_env = {"CTF_EXTRA_LABELS": side_labels("main")} if args.compare_src else {}
        worker = bench_worker(bench, **main_env)
        worker.start()
        stack.callback(worker.stop)
        client = celery_client(bench)
        stack.callback(close_celery_client, client)
        alt_client = None
        if args.compare_src:
            alt = stack.enter_context(side_bench(bench))
            alt_worker = bench_worker(alt, src=args.compare_src,
                                      CTF_EXTRA_LABELS=side_labels("alt"))
            alt_worker.start()
            stack.callback(alt_worker.stop)
            alt_client = celery_client(alt)
            stack.callback(close_celery_client, alt_client)
        try:
            kinds = ["ours", "raw", "compose"] + (["ours_alt"] if alt_client else [])
            for rnd in range(args.warmup + args.n):
                shift = (rnd // 2) % len(kinds)
                order = kinds[shift:] + kinds[:shift]
                if rnd % 2 == 1:
                    order.reverse()
                took: dict[str, float] = {}
                round_began = time.perf_counter()
                for kind in order:
                    if kind == "ours":
                        took[kind] = start_ours(client)
                        timed_step("stop ours", stop_ours, client)
                    elif kind == "ours_alt":
                        took[kind] = start_ours(alt_client, ALT_TEAM)
                        stop_ours(alt_client, ALT_TEAM)
                    elif kind == "raw":
                        try:
                            took[kind] = raw.start()
                        finally:
                            timed_step("remove raw", raw.remove)
                    else:
                        try:
                            took[kind] = peer.start()
                        finally:
                            timed_step("compose down", peer.down)
                if rnd >= args.warmup:
                    for kind, value in took.items():
                        samples[kind].append(value)
                print(f"round {rnd + 1}/{args.warmup + args.n} ({' '.join(order)}): "
                      + " ".join(f"{k}={took[k] * 1000:.0f}ms" for k in kinds)
                      + f" (round with clean-ups {time.perf_counter() - round_began:.1f}s)",
                      file=sys.stderr)
        finally:
            raw.remove()
            peer.down()

    def med(kind: str) -> float:
        return statistics.median(samples[kind])

    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average": os.getloadavg()[0],
        "docker_compose": version,
        "n": args.n,
        "ours": summary_ms(samples["ours"]),
        "raw": summary_ms(samples["raw"]),
        "compose": summary_ms(samples["compose"]),
        "ratio_ours_raw": round(med("ours") / med("raw"), 3),
        "ratio_ours_raw_p90": round(pct(samples["ours"], 0.9) / pct(samples["raw"], 0.9), 3),
        "ratio_ours_compose": round(med("ours") / med("compose"), 3),
        "target_ratio_ours_raw": 1.10,
    }
    if samples["ours_alt"]:
        result["compare_src"] = str(args.compare_src)
        result["ours_alt"] = summary_ms(samples["ours_alt"])
        result["ratio_ours_alt_raw"] = round(med("ours_alt") / med("raw"), 3)
        # Below 1: this checkout starts the shop faster than the compared one.
        result["ratio_ours_ours_alt"] = round(med("ours") / med("ours_alt"), 3)
    result["samples_ms"] = {k: [round(v * 1000, 1) for v in vals]
                            for k, vals in samples.items() if vals}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
