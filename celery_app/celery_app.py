"""The Celery application, importable as ``celery_app.celery_app:app``."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready

app = Celery("ctf_instancer", include=["celery_app.tasks"])
app.config_from_object("celery_app.celery_config")

log = logging.getLogger(__name__)


@worker_ready.connect
def _reconcile_on_start(sender: Any = None, **_kwargs: Any) -> None:
    """Rebuild the Redis index from Docker labels as soon as a worker is up."""
    from celery_app.context import get_context  # noqa: PLC0415  # only inside the worker

    try:
        summary = get_context().service.reconcile()
        log.info("worker ready; reconciled %s", summary.as_dict())
    except Exception:
        log.exception("reconcile at worker start failed; the janitor will retry")
