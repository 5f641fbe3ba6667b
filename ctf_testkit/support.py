"""Plain helpers shared by the tests and the benchmarks (no pytest here).

A private redis-server, a free port, polling with a deadline, building a stand-in image from
in-memory files, and a platform-style Celery client. The benchmarks import this module too,
so both measure and test against the same machinery.
"""

from __future__ import annotations

import gc
import io
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import redis

# The stand-in challenge: a FROM-scratch static busybox serving HTTP on 8080.
HTTP_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY index.html /www/index.html
EXPOSE 8080
ENTRYPOINT ["/bin/busybox"]
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """Stop a subprocess: SIGTERM, up to ``grace`` seconds to exit, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port, non-persistent unless asked.

    Args:
        workdir: its folder.
        bind: the address it listens on (another network namespace's workers need one
            they can route to).
        appendonly: keep its data in an append-only file in ``workdir``, so that a restart
            (``stop`` then ``start``) comes back with it, as ``./run-celery-worker.sh`` runs it.
    """

    def __init__(self, workdir: Path, bind: str = "127.0.0.1", appendonly: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.bind = bind
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL (no database)."""
        return f"redis://{self.bind}:{self.port}"

    def start(self) -> None:
        """Start it and wait until it answers."""
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is missing: run ./setup-celery.sh --dev")
        # Off loopback, Redis's protected mode refuses every client without a password: the
        # address given is a private link of the test's own (another namespace's workers).
        protected = "yes" if self.bind == "127.0.0.1" else "no"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", self.bind, "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.workdir),
             "--protected-mode", protected],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host=self.bind, port=self.port)
        try:
            wait_for(lambda: self._ping(client), 10, message="redis-server to answer")
        except BaseException:
            self.stop()  # never left running behind a failed start
            raise
        finally:
            client.close()

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        """Stop it."""
        if self.proc is not None:
            stop_process(self.proc, 10)


def build_image(
    client: docker.DockerClient, tag: str, dockerfile: str, files: dict[str, bytes | Path],
    labels: dict[str, str],
) -> str:
    """Build a labelled image from in-memory files (a ``Path`` value is read); return its tag."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        entries = {"Dockerfile": dockerfile.encode(), **files}
        for name, content in entries.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=tag, labels=labels, rm=True)
    return tag


def platform_client(broker_url: str, backend_url: str) -> Any:
    """A plain Celery app, as a web platform would have, that gives up fast on a lost Redis.

    Celery's default result-backend retry (20 tries a second apart) would make every
    ``AsyncResult`` collected after its Redis stopped (often only at interpreter exit) hang
    for 20 s; the product's own client fails fast the same way.
    """
    from celery import Celery  # noqa: PLC0415  # only the worker tests and benches need it

    client = Celery(broker=broker_url, backend=backend_url)
    client.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_backend_transport_options={"retry_policy": {
            "max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
        }},
    )
    return client


def close_platform_client(client: Any) -> None:
    """Close a :func:`platform_client` while its Redis still runs.

    Results still waiting to be collected unsubscribe from the backend now (their
    ``__del__`` does), rather than at interpreter exit against a stopped Redis.
    """
    gc.collect()
    client.close()
