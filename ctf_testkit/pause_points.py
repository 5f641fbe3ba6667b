"""A worker app for fault tests: each chosen task stops dead at a chosen point of its run.

A test runs a :class:`ctf_testkit.worker.Worker` with ``app=PAUSE_APP`` and, in its
environment, ``CTFTEST_PAUSE=<task short name>:<point>`` and ``CTFTEST_PAUSE_DIR=<folder>``.
Every such task that reaches the point writes ``<folder>/<task id>`` and hangs there (its
thread only), so the test can kill the worker's process group (``Worker.kill``) at that very
moment; a worker started again without ``CTFTEST_PAUSE`` runs as users run it. Points:

- ``begun``: the message taken and the task begun, nothing done (Celery's ``task_prerun``);
- ``applied``: the task's work done (its effect written), its answer not stored (the result
  backend's ``mark_as_done``): the window a redelivery must not apply twice;
- ``answered``: the answer stored, the message not acknowledged (``task_success``).

Nothing here is imported by the product: only the test's worker loads it, with ``-A``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from celery import current_task
from celery.backends.base import Backend
from celery.signals import task_prerun, task_success

from celery_app.celery_app import app

PAUSE_APP = "ctf_testkit.pause_points:app"
POINTS = ("begun", "applied", "answered")
__all__ = ["PAUSE_APP", "POINTS", "app"]

_task, _, _point = os.environ.get("CTFTEST_PAUSE", "").partition(":")
_where = Path(os.environ.get("CTFTEST_PAUSE_DIR", "."))


def _pause(point: str, name: str | None, task_id: str | None) -> None:
    """Hang this thread for good if ``point`` of task ``name`` is the chosen one."""
    if point != _point or not name or name.rsplit(".", 1)[-1] != _task or not task_id:
        return
    (_where / task_id).write_text(point)
    threading.Event().wait()  # until the test kills the process group


def _begun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    _pause("begun", getattr(sender, "name", None), task_id)


def _answered(sender: Any = None, **_: Any) -> None:
    request = getattr(sender, "request", None)
    _pause("answered", getattr(sender, "name", None), getattr(request, "id", None))


_mark_as_done = Backend.mark_as_done


def _applied(self: Backend, task_id: str, result: Any, request: Any = None,
             *args: Any, **kwargs: Any) -> Any:
    _pause("applied", getattr(request, "task", None) or getattr(current_task, "name", None),
           task_id)
    return _mark_as_done(self, task_id, result, request, *args, **kwargs)


if _point:
    if _point not in POINTS:
        raise ValueError(f"CTFTEST_PAUSE: unknown point {_point!r}; one of {', '.join(POINTS)}")
    Backend.mark_as_done = _applied
    task_prerun.connect(_begun)
    task_success.connect(_answered)
