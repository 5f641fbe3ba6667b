"""The Celery tasks of SPEC §5. Thin: each one calls the instance service.

Permanent errors (bad input, limits) fail at once; transient ones (Docker or Redis
unreachable, Docker 5xx, a busy lock) are retried with exponential backoff and jitter, a
bounded number of times. Every task is idempotent, so a redelivery after a worker died does
no harm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task

from celery_app.celery_app import app
from celery_app.context import get_context
from celery_app.errors import CTFError, TransientError
from celery_app.hosts import present

log = logging.getLogger("celery_app.tasks")
T = TypeVar("T")

MAX_RETRIES = 5


class InstancerTask(Task):  # type: ignore[misc]
    """Base of every task: late ack, bounded retries of transient errors only."""

    abstract = True
    autoretry_for = (TransientError,)
    max_retries = MAX_RETRIES
    retry_backoff = 1
    retry_backoff_max = 30
    retry_jitter = True
    acks_late = True

    _last_report = 0.0

    def report(self, event: dict[str, Any]) -> None:
        """Publish progress as the task's ``PROGRESS`` state (at most ~4 times a second)."""
        if not self.request.id or self.request.called_directly:
            return
        # Each PROGRESS is a backend SET + PUBLISH on the start's critical path: skip "image"
        # (over at once unless a pull follows) and "running" (the result follows at once).
        if event.get("phase") in ("image", "running"):
            return
        now = time.monotonic()
        if event.get("phase") == "pulling" and now - self._last_report < 0.25:
            return
        self._last_report = now
        self.update_state(state="PROGRESS", meta=event)


def _logged(task: str, challenge: str | None, team_id: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` and log team, challenge, container, outcome and duration."""
    began = time.monotonic()
    container = f"ctf-{challenge}-{team_id}" if challenge and team_id else "-"
    try:
        result = fn()
    except CTFError as exc:
        log.warning(
            "task=%s team=%s challenge=%s container=%s outcome=%s duration_ms=%d detail=%s",
            task, team_id, challenge, container, exc.code, (time.monotonic() - began) * 1000,
            exc.detail,
        )
        raise
    except Exception:
        log.exception(
            "task=%s team=%s challenge=%s container=%s outcome=crash duration_ms=%d",
            task, team_id, challenge, container, (time.monotonic() - began) * 1000,
        )
        raise
    outcome = result.get("status", "ok") if isinstance(result, dict) else "ok"
    log.info(
        "task=%s team=%s challenge=%s container=%s outcome=%s duration_ms=%d",
        task, team_id, challenge, container, outcome, (time.monotonic() - began) * 1000,
    )
    return result


@app.task(name="celery_app.tasks.start_container", bind=True, base=InstancerTask)
def start_container(
    self: InstancerTask, challenge: str, team_id: str, intent: int | None = None
) -> dict[str, Any]:
    """Start the team's instance and return it once ``running`` (idempotent).

    ``intent`` is the request's place in line (the API and ctfctl pass it); a stop of the
    same instance requested later supersedes this start.
    """
    svc = get_context().service
    return _logged(
        "start_container", challenge, team_id,
        lambda: svc.start(challenge, team_id, progress=self.report, intent=intent).public(),
    )


@app.task(name="celery_app.tasks.stop_container", bind=True, base=InstancerTask)
def stop_container(
    self: InstancerTask, challenge: str, team_id: str, intent: int | None = None
) -> dict[str, str]:
    """Stop and remove the team's instance; return ``{"team_id", "challenge", "status"}``."""
    svc = get_context().service
    return _logged("stop_container", challenge, team_id,
                   lambda: svc.stop(challenge, team_id, intent=intent))


@app.task(name="celery_app.tasks.get_container_status", bind=True, base=InstancerTask)
def get_container_status(
    self: InstancerTask, team_id: str | None = None, challenge: str | None = None
) -> dict[str, Any]:
    """Return ``{"instances": [...]}``, checked against Docker, filtered by what is given.

    Instances of other hosts come from the index; those whose host has no live worker are
    not shown as running (``host_up`` false).
    """
    ctx = get_context()
    return _logged(
        "get_container_status", challenge, team_id,
        lambda: {"instances": present(ctx.service.status(team_id, challenge, verify=True),
                                      ctx.store, ctx.hosts)},
    )


@app.task(name="celery_app.tasks.extend_container", bind=True, base=InstancerTask)
def extend_container(self: InstancerTask, challenge: str, team_id: str) -> dict[str, Any]:
    """Push the instance's expiry out by its ttl, up to its maximum lifetime."""
    svc = get_context().service
    return _logged(
        "extend_container", challenge, team_id, lambda: svc.extend(challenge, team_id).public()
    )


@app.task(name="celery_app.tasks.reap_expired", bind=True, base=InstancerTask, max_retries=0)
def reap_expired(self: InstancerTask) -> dict[str, Any]:
    """Run one janitor pass: expired instances, then orphan containers and networks."""
    # Not _logged: this runs every few seconds; the janitor logs passes that did something.
    return get_context().janitor.run_once().as_dict()


@app.task(name="celery_app.tasks.reconcile", bind=True, base=InstancerTask)
def reconcile(self: InstancerTask) -> dict[str, Any]:
    """Rebuild the Redis index from Docker labels; return what changed."""
    svc = get_context().service
    return _logged("reconcile", None, None, lambda: svc.reconcile().as_dict())


@app.task(name="celery_app.tasks.prefetch_images", bind=True, base=InstancerTask)
def prefetch_images(self: InstancerTask) -> dict[str, Any]:
    """Pull every catalog image (following the pull policy) ahead of an event."""
    ctx = get_context()

    def pull_all() -> dict[str, Any]:
        done = []
        for ch in ctx.catalog:
            ctx.service.ensure_image(ch, self.report)
            done.append(ch.image)
        return {"images": done, "status": "ok"}

    return _logged("prefetch_images", None, None, pull_all)
