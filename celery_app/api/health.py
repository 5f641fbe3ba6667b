"""``/healthz``'s measurement: Redis, Docker and live workers, cached for a couple of seconds."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from celery_app.api.client import Dispatcher
from celery_app.engine.docker_driver import DockerDriver
from celery_app.errors import CTFError
from celery_app.settings import Settings

log = logging.getLogger(__name__)

HEALTH_TTL = 2.0


class Health:
    """Redis, Docker and live workers, cached for a couple of seconds.

    Asking the workers costs a broadcast and half a second of waiting for replies, so a busy
    load balancer hitting ``/healthz`` must not trigger one per request, nor wait for one:
    once there is an answer, a stale one is served while a background thread refreshes it.
    """

    def __init__(self, settings: Settings, dispatcher: Dispatcher, ttl: float = HEALTH_TTL) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.ttl = ttl
        self._lock = threading.Lock()
        self._first = threading.Lock()
        self._refreshing = False
        self._at = 0.0
        self._cached: tuple[dict[str, Any], bool] | None = None
        self._driver: DockerDriver | None = None
        if settings.hosts_file is None and (
            settings.docker_host or Path("/var/run/docker.sock").exists()
        ):
            self._driver = DockerDriver(settings.docker_host, timeout=2)

    def _workers(self) -> int:
        try:
            replies = self.dispatcher.celery.control.ping(timeout=0.5)
        except Exception as exc:  # noqa: BLE001  # any broker failure means: no worker seen
            log.warning("healthz: cannot ping workers: %s", exc)
            return 0
        return len(replies or [])

    def _measure(self) -> tuple[dict[str, Any], bool]:
        redis_ok = self.dispatcher.store.ping()
        workers = self._workers() if redis_ok else 0
        docker: bool | str = self._driver.ping() if self._driver is not None else "n/a"
        body: dict[str, Any] = {"redis": redis_ok, "docker": docker, "workers": workers}
        if redis_ok:
            with contextlib.suppress(CTFError):
                loads = self.dispatcher.host_loads()
                body["hosts"] = {"alive": sum(h.alive for h in loads), "total": len(loads)}
        return body, redis_ok and workers > 0 and docker is not False

    def _refresh(self) -> None:
        try:
            measured = self._measure()
            with self._lock:
                self._cached, self._at = measured, time.monotonic()
        finally:
            self._refreshing = False

    def peek(self) -> tuple[dict[str, Any], bool] | None:
        """Return the last answer at once (refreshing it in the background when stale).

        ``None`` only before the first answer exists: call :meth:`snapshot` then.
        """
        with self._lock:
            if self._cached is not None and time.monotonic() - self._at >= self.ttl \
                    and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, name="healthz", daemon=True).start()
            return self._cached

    def snapshot(self) -> tuple[dict[str, Any], bool]:
        """Return ``({"redis", "docker", "workers"}, usable)``, measuring it the first time."""
        cached = self.peek()
        if cached is not None:
            return cached
        with self._first:  # the first callers wait for one measurement, not one each
            if self._cached is None:
                self._refreshing = True
                self._refresh()
        assert self._cached is not None
        return self._cached

    def close(self) -> None:
        """Close the Docker client."""
        if self._driver is not None:
            self._driver.close()
