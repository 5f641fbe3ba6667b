"""Celery queue names: one queue per Docker host (SPEC §10), plus the default queue."""

from __future__ import annotations

DEFAULT_QUEUE = "celery"


def host_queue(host: str) -> str:
    """Return the queue consumed only by the worker of Docker host ``host``."""
    return f"ctf.host.{host}"


def queues_for(host: str) -> list[str]:
    """Return the queues the worker of ``host`` consumes."""
    return [DEFAULT_QUEUE, host_queue(host)]
