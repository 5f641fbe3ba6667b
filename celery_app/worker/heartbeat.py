"""The host's heartbeat: while this worker runs, its Docker host is served (SPEC §10).

Every worker keeps its host's heartbeat key alive in the state Redis (TTL
``CTF_HEARTBEAT_TTL``, refreshed every third of it). A host whose key has expired has no
worker: new instances go elsewhere (:mod:`celery_app.hosts.placement`) and its instances are
shown as unreachable (:mod:`celery_app.hosts.present`) until the worker is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable

from celery_app.state.store import StateStore
from celery_app.worker.loop import Loop

log = logging.getLogger(__name__)


class Heartbeat(Loop):
    """Keeps the host's heartbeat alive while this worker runs (a daemon thread).

    A thread rather than a periodic task: a queue full of slow starts must not make a busy
    host look dead.
    """

    def __init__(
        self, store: StateStore, host: str, ttl: float, worker: str = "",
        engine_up: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(ttl / 3, name=f"heartbeat-{host}")
        self.store = store
        self.host = host
        self.ttl = ttl
        # A worker whose Docker engine does not answer cannot serve its host: while it
        # cannot, its beat says so, so starts go elsewhere and its instances are not
        # reported running.
        self.engine_up = engine_up
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"

    def poke(self) -> None:
        """Beat again now, not at the next third of the TTL (the engine came or went)."""
        self.wake()

    def beat(self, engine: bool = True) -> None:
        """Publish one heartbeat, saying whether this host's Docker engine answers."""
        value = json.dumps({"worker": self.worker, "at": time.time(), "engine": engine})
        self.store.beat(self.host, value, self.ttl)

    def run_once(self, now: float) -> None:
        """Ask the engine, then beat (saying whether it answers)."""
        engine = self.engine_up is None or self.engine_up()
        if not engine:
            log.warning("host %s: the Docker engine does not answer", self.host)
        self.beat(engine)

    def failed(self, exc: Exception) -> None:
        """Keep beating once Redis is back."""
        log.warning("heartbeat of host %s failed: %s", self.host, exc)

    def stopped(self) -> None:
        """Withdraw the heartbeat, so starts go elsewhere while this worker is away."""
        self._withdraw()

    def _withdraw(self) -> None:
        """Remove the heartbeat at once (when it is still ours)."""
        with contextlib.suppress(Exception):
            raw = self.store.heartbeat(self.host)
            if raw and json.loads(raw).get("worker") == self.worker:
                self.store.drop_heartbeat(self.host)
