"""The Celery application, importable as ``celery_app.celery_app:app``.

A thin entry point: the settings are ``celery_config``'s, and what a worker process runs
beside its tasks (its loops, its quiet log) is the worker wing's (:mod:`celery_app.worker`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Celery

from celery_app.worker.logs import quiet_routine_tasks
from celery_app.worker.machinery import wire

if TYPE_CHECKING:
    from celery_app.worker.context import Context

app = Celery("ctf_instancer", include=["celery_app.tasks"])
app.config_from_object("celery_app.celery_config")


def _context() -> Context:
    """Return the process's context, built once the worker is ready (never at import)."""
    from celery_app.worker.context import get_context  # noqa: PLC0415  # only inside the worker

    return get_context()


quiet_routine_tasks()
wire(app, _context)
