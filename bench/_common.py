"""Shared pieces of the benchmarks: a private Redis, the stand-in image, a real worker, cleanup.

Everything a benchmark creates in Docker carries ``ctf.test=bench-<pid>`` and is removed in a
``finally`` (the instancer puts the same label on its own containers and networks through
``extra_labels`` / ``CTF_EXTRA_LABELS``). Team networks come from 10.215.0.0/16, away from the
tests (10.214/16) and a real deployment (10.213/16) on the same engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from celery_app.settings import Settings
from celery_app.worker.context import Context, build_context
from ctf_testkit import support
from ctf_testkit.docker_sweep import sweep
from ctf_testkit.env import RunConfig
from ctf_testkit.support import HTTP_DOCKERFILE, RedisServer, free_port  # noqa: F401  # re-exported
from ctf_testkit.worker import Worker

ROOT = Path(__file__).resolve().parent.parent

# Run the worker from another checkout (with PYTHONPATH pointing there too) to measure a change
# to celery_app/ without touching this tree.
SRC = Path(os.environ.get("CTF_BENCH_SRC", ROOT))
RUN_ID = f"bench-{os.getpid()}"
LABEL = {"ctf.test": RUN_ID}
POOL = "10.215.0.0/16"
BUSYBOX = Path("/bin/busybox")
IMAGE_TAG = f"ctf-bench/http:{RUN_ID}"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdefghij"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until truthy (the tests' poller); raise after ``timeout`` seconds."""
    return support.wait_for(condition, timeout, message=what)


# -- statistics --------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Return the ``q`` quantile (0..1) of ``values``, nearest-rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary_ms(values: list[float]) -> dict[str, float]:
    """Median, p90, min and max of durations in seconds, as milliseconds."""
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1000, 1),
        "p90_ms": round(pct(values, 0.9) * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


# -- Redis -------------------------------------------------------------------------------------


# -- Docker ------------------------------------------------------------------------------------


def build_image(client: docker.DockerClient) -> str:
    """Build the bench's stand-in image (the tests' builder, the bench's label); return its tag."""
    if not BUSYBOX.exists():
        sys.exit("/bin/busybox is missing: apt-get install busybox-static")
    return support.build_image(client, IMAGE_TAG, HTTP_DOCKERFILE,
                               {"busybox": BUSYBOX, "index.html": b"hello from ctf bench\n"},
                               LABEL)


def cleanup_docker(client: docker.DockerClient, *, images: bool = True) -> dict[str, int]:
    """Remove every container, network (and image) labelled with this run's label."""
    return sweep(client, LABEL, images=images)


# -- catalog, settings, environment ------------------------------------------------------------


CATALOG = """challenges:
  web:
    name: Bench web challenge
    image: {image}
    port: 8080
    protocol: http
    health_path: /
    ttl: {ttl}
    max_lifetime: {max_lifetime}
    memory: 64m
    cpus: 0.5
    pids: 64
    start_timeout: 30
  keep:
    name: Bench keeper (holds the team network)
    image: {image}
    port: 8080
    ttl: {ttl}
    max_lifetime: {max_lifetime}
    memory: 64m
    cpus: 0.5
    pids: 64
    start_timeout: 30
{extra}"""


@dataclass
class Bench:
    """One benchmark run's private Redis, image, catalog and data folder."""

    workdir: Path
    redis: RedisServer
    docker: docker.DockerClient
    image: str
    catalog_file: Path

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def run(self) -> RunConfig:
        """This run's instancer, in process and in its workers alike (see ctf_testkit.env)."""
        return RunConfig(self.redis.url, self.catalog_file, self.data_dir, LABEL, POOL,
                         {"rate_limit_count": 1_000_000, "orphan_grace": 30.0})

    def settings(self, **overrides: Any) -> Settings:
        """Settings for an in-process service of this run (overrides win)."""
        return self.run.settings(**overrides)

    def context(self, **overrides: Any) -> Context:
        """A worker-like context (service, janitor, driver, store) in this process."""
        return build_context(self.settings(**overrides))

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a worker of this run (``extra``: variables that win)."""
        return {**self.run.env(admin_token=ADMIN_TOKEN), **extra}


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def bench_run(
    ttl: int = 600, max_lifetime: int = 1800, extra_catalog: str = ""
) -> Iterator[Bench]:
    """Start a private Redis, build the image and write the catalog; remove it all after.

    ``extra_catalog`` is appended to the catalog's challenges; ``{image}`` in it becomes the
    stand-in image.

    SIGTERM is turned into ``KeyboardInterrupt`` so the cleanup runs on it too.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    client = docker.from_env(timeout=120)
    client.ping()
    workdir = Path(tempfile.mkdtemp(prefix=f"ctf-{RUN_ID}-"))
    server = RedisServer(workdir)
    try:
        server.start()
        image = build_image(client)
        catalog = workdir / "challenges.yaml"
        catalog.write_text(CATALOG.format(image=image, ttl=ttl, max_lifetime=max_lifetime,
                                          extra=extra_catalog.replace("{image}", image)))
        (workdir / "data").mkdir()
        yield Bench(workdir, server, client, image, catalog)
    finally:
        removed = cleanup_docker(client)
        print(f"# cleanup {RUN_ID}: removed {removed}", file=sys.stderr)
        # The egress firewall (on by default) installed a table for POOL: leave none behind.
        subprocess.run(["nft", "delete", "table", "inet", "ctf_egress_" + POOL.replace(".", "_")
                        .replace("/", "_")], capture_output=True, check=False)
        # Celery results unsubscribe when collected: now, while their Redis still runs, not
        # at exit against a stopped one (which left a finished run hanging for hours).
        gc.collect()
        server.stop()
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)


def side_labels(side: str) -> str:
    """``CTF_EXTRA_LABELS`` of one of two workers run side by side (see :func:`side_bench`)."""
    return json.dumps({**LABEL, "ctf.bench.side": side})


@contextlib.contextmanager
def side_bench(bench: Bench, name: str = "alt") -> Iterator[Bench]:
    """The same image and catalog with a Redis and data folder of their own.

    For a second worker that runs another checkout (``Worker(..., src=...)``) side by side
    with the first in one run. Run both workers with ``side_labels(name)`` as their
    ``CTF_EXTRA_LABELS``, so neither janitor takes the other's containers and networks for
    orphans (cleanup still finds everything by ``ctf.test``).
    """
    workdir = bench.workdir / name
    (workdir / "data").mkdir(parents=True)
    server = RedisServer(workdir)
    server.start()
    try:
        yield dataclasses.replace(bench, workdir=workdir, redis=server)
    finally:
        server.stop()


def emit(result: dict[str, Any], path: Path | None) -> None:
    """Print a benchmark's result as JSON, and write it to ``path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.write_text(text + "\n")


# -- a real worker -----------------------------------------------------------------------------


def bench_worker(bench: Bench, concurrency: int = 8, src: Path = SRC, **env: str) -> Worker:
    """A real worker of this run (``src``: the checkout it runs; ``env``: variables that win).

    Start it with ``start()``; ``stop()`` it in a ``finally``.
    """
    return Worker({**bench.env(**env)}, bench.workdir / "worker.log", concurrency=concurrency,
                  src=src, tag=RUN_ID)


def celery_client(bench: Bench) -> Any:
    """A plain Celery client of the bench worker, as a web platform would have.

    Close it with :func:`close_celery_client` while the bench's Redis still runs.
    """
    return support.platform_client(f"{bench.redis.url}/0", f"{bench.redis.url}/1")


close_celery_client = support.close_platform_client


def machine() -> str:
    """One line about this machine for the results."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"
