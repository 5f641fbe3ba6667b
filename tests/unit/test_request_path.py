"""Each decision once along the request path: the rate count is a flag the request carries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Task

from celery_app.core.service import InstanceService
from celery_app.errors import RateLimited


def test_a_request_counted_already_is_not_counted_again(
    make_service: Callable[..., InstanceService],
) -> None:
    """count_rate=False (the dispatcher counted it) costs nothing; the default counts."""
    svc = make_service(rate_limit_count=2, rate_limit_window=60)
    key = svc.catalog.key("web", "flagged")
    for _ in range(3):  # three start/stop pairs, each counted before it was queued
        svc.start(key, count_rate=False)
        svc.stop(key, count_rate=False)
    svc.start(key)  # counted here: the first of two in the window
    svc.stop(key)  # the second
    with pytest.raises(RateLimited):
        svc.start(key)


def test_a_start_of_a_running_instance_is_not_counted(svc: InstanceService) -> None:
    """Only a start that makes a new instance counts (one that runs is answered as it is)."""
    key = svc.catalog.key("web", "idem")
    first = svc.start(key)
    for _ in range(svc.settings.rate_limit_count + 1):
        assert svc.start(key).container_id == first.container_id


@pytest.mark.parametrize("sent", [{}, {"intent": 7, "hops": 1}])
def test_a_retried_copy_of_a_start_or_stop_says_it_was_counted(
    monkeypatch: pytest.MonkeyPatch, sent: dict[str, Any],
) -> None:
    """A retry sends the request on marked counted=True; an extend's retry carries no flag."""
    from celery_app import tasks  # noqa: PLC0415  # builds the Celery app (no connection)

    seen: list[dict[str, Any]] = []

    def fake_retry(self: Task, args: Any = None, kwargs: Any = None, *_a: Any,
                   **_k: Any) -> None:
        seen.append(dict(kwargs or {}))

    monkeypatch.setattr(Task, "retry", fake_retry)
    for task in (tasks.start_container, tasks.stop_container, tasks.restart_container,
                 tasks.extend_container):
        task.push_request(args=["web", "t1"], kwargs=dict(sent), retries=0)
        try:
            task.retry(countdown=1)
        finally:
            task.pop_request()
    assert seen == [{**sent, "counted": True}, {**sent, "counted": True},
                    {**sent, "counted": True}, {}]
