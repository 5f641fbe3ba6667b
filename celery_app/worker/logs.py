"""The worker's log: Celery's lines about routine tasks are dropped."""

from __future__ import annotations

import logging
from collections.abc import Mapping

# Tasks whose every call would otherwise be two INFO lines: the beat's passes (every few
# seconds) and status reads (a platform polls every team's instances every few seconds).
ROUTINE = ("celery_app.tasks.reap_expired", "celery_app.tasks.refill_pools",
           "celery_app.tasks.get_container_status")


class QuietRoutineTasks(logging.Filter):
    """Drop Celery's received/succeeded lines of routine tasks (:data:`ROUTINE`).

    They say nothing: a janitor or pool pass that did something logs its own summary, and a
    status read is logged at DEBUG. A failing call is logged by Celery at ERROR, which this
    lets through. Celery passes the task's name in the record's arguments, so the line (with
    the whole result in it) is not even formatted.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is kept: a warning or worse, or a line of a non-routine task."""
        if record.levelno >= logging.WARNING:
            return True
        args = record.args
        if isinstance(args, Mapping):
            return args.get("name") not in ROUTINE
        message = record.getMessage()  # the beat's "Sending due task …" lines
        return not any(name in message for name in ROUTINE)


def quiet_routine_tasks() -> None:
    """Put :class:`QuietRoutineTasks` on the loggers of Celery's task lines and its beat."""
    for name in ("celery.worker.strategy", "celery.app.trace", "celery.beat"):
        logging.getLogger(name).addFilter(QuietRoutineTasks())
