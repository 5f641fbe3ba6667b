"""The one way the tests and the benchmarks start, kill and stop a real Celery worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from celery_app.hosts.routing import queues_for
from ctf_testkit.support import wait_for

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """A real ``celery worker -B --pool threads`` subprocess, as run-celery-worker.sh runs it.

    Args:
        env: its environment (added to this process's); ``CTF_HOST`` picks its queues,
            ``CTF_DATA_DIR`` holds its beat schedule.
        logfile: where its output goes (appended: a restarted worker keeps one log).
        concurrency: its threads.
        src: the checkout it runs from (a benchmark may compare another one).
        tag: the start of its node name.
        prefix: a command it runs under (``nsenter --net=…``: a worker on another machine's
            network, next to that machine's engine).
        app: the Celery app it runs (``-A``); a fault test may set another one before a
            start (``ctf_testkit.pause_points.PAUSE_APP``).
    """

    def __init__(self, env: dict[str, str], logfile: Path, *, concurrency: int = 8,
                 src: Path = ROOT, tag: str = "test", prefix: tuple[str, ...] = (),
                 app: str = "celery_app.celery_app:app") -> None:
        self.env = env
        self.host = env.get("CTF_HOST", "local")
        self.logfile = logfile
        self.concurrency = concurrency
        self.src = src
        self.tag = tag
        self.prefix = prefix
        self.app = app
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or start again) and wait until this start's "ready." is in the log."""
        env = {**os.environ, **self.env}
        data = Path(self.env["CTF_DATA_DIR"])
        data.mkdir(parents=True, exist_ok=True)
        mark = self.logfile.stat().st_size if self.logfile.exists() else 0
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "celery", "-A", self.app,
                 "worker",
                 "-B", "--pool", "threads", "--concurrency", str(self.concurrency),
                 "--loglevel", "INFO",
                 "-n", f"{self.tag}-{self.host}-{uuid.uuid4().hex[:4]}@%h",
                 "-Q", ",".join(queues_for(self.host)),
                 "-s", str(data / "beat-schedule")],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.src,
                start_new_session=True,  # its own process group: kill() takes the beat too
            )
        proc = self.proc
        wait_for(lambda: b"ready." in self.logfile.read_bytes()[mark:]
                 or proc.poll() is not None, 60, 0.1, f"the {self.host} worker to be ready")
        if proc.poll() is not None:
            raise RuntimeError("worker exited:\n" + self.log()[-3000:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's whole process group (as a crash or OOM kill would)."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        """Stop it: SIGTERM, then one SIGKILL to the group so nothing of it outlives it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def log(self) -> str:
        """Its output so far."""
        return self.logfile.read_text(errors="replace")
