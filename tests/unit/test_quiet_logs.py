"""Routine tasks do not fill the worker's log: Celery's lines for them are dropped."""

from __future__ import annotations

import logging

import pytest

from celery_app.worker.logs import QuietRoutineTasks as _QuietRoutineTasks

TRACE = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"


class _NoRepr:
    def __repr__(self) -> str:
        raise AssertionError("the line was formatted")


def _record(level: int, msg: str, args: object) -> logging.LogRecord:
    return logging.LogRecord("celery.app.trace", level, __file__, 1, msg, (args,), None)


@pytest.mark.parametrize(("name", "kept"), [
    ("celery_app.tasks.get_container_status", False),
    ("celery_app.tasks.reap_expired", False),
    ("celery_app.tasks.refill_pools", False),
    ("celery_app.tasks.start_container", True),
    ("celery_app.tasks.stop_container", True),
])
def test_received_and_succeeded_lines_of_routine_tasks_are_dropped(name: str, kept: bool) -> None:
    """A status read's or a beat pass's INFO line is dropped unformatted; a start's is kept."""
    record = _record(logging.INFO, TRACE, {"name": name, "id": "x", "runtime": 0.001,
                                           "return_value": _NoRepr()})
    assert _QuietRoutineTasks().filter(record) is kept


def test_a_failing_routine_task_is_still_logged() -> None:
    """Celery's ERROR line for a failed status read gets through."""
    record = _record(logging.ERROR, "Task %(name)s[%(id)s] raised", {
        "name": "celery_app.tasks.get_container_status", "id": "x"})
    assert _QuietRoutineTasks().filter(record) is True


def test_the_beats_lines_for_its_passes_are_dropped() -> None:
    """The beat's "Sending due task" lines for the janitor and pool passes are dropped."""
    beat = logging.LogRecord("celery.beat", logging.INFO, __file__, 1,
                             "Scheduler: Sending due task %s (%s)",
                             ("reap-expired", "celery_app.tasks.reap_expired"), None)
    assert _QuietRoutineTasks().filter(beat) is False
