"""The worker's machinery (celery_app.worker.machinery): what a worker process starts and stops."""

from __future__ import annotations

import json
import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from celery_app.core.service import InstanceService
from celery_app.state.store import StateStore
from celery_app.worker.events import index_is_live
from celery_app.worker.machinery import WorkerMachinery
from ctf_testkit.fake_driver import FakeDriver
from ctf_testkit.support import wait_for

OURS = ("heartbeat-", "events-", "inflight-keeper", "egress-keeper")


class _App:
    """The parts of a Celery app the in-flight keeper uses; no broker answers in this suite."""

    conf = SimpleNamespace(broker_transport_options={"visibility_timeout": 30})

    def connection_for_write(self) -> Any:
        raise ConnectionError("no broker in the unit suite")


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(OURS)]


def test_start_runs_the_loops_and_stop_ends_them_and_withdraws_the_beat(
        svc: InstanceService, store: StateStore, driver: FakeDriver) -> None:
    """start() beats and follows the engine; stop() ends every thread and withdraws the beat."""
    ctx = SimpleNamespace(settings=svc.settings, driver=driver, store=store, service=svc,
                          egress=None)
    machinery = WorkerMachinery(_App(), lambda: ctx, SimpleNamespace(hostname="w1@unit"))
    machinery.start()
    try:
        beat = wait_for(lambda: store.heartbeat(svc.host), timeout=5, message="a heartbeat")
        assert json.loads(beat)["worker"] == "w1@unit"
        wait_for(lambda: index_is_live(svc.host), timeout=5, message="the event follower")
        assert any(name.startswith("inflight-keeper") for name in _threads())
    finally:
        machinery.stop()
    assert store.heartbeat(svc.host) is None
    assert not index_is_live(svc.host)
    assert _threads() == []


def test_a_step_that_fails_is_logged_and_the_others_still_start(
        caplog: pytest.LogCaptureFixture) -> None:
    """Without a context the context's loops are logged as not started; the keeper still runs."""

    def no_context() -> Any:
        raise RuntimeError("the catalog has a mistake")

    machinery = WorkerMachinery(_App(), no_context)
    with caplog.at_level(logging.ERROR, logger="celery_app.worker.machinery"):
        machinery.start()
    try:
        messages = [r.getMessage() for r in caplog.records
                    if r.name == "celery_app.worker.machinery"]
        assert messages == [
            "cannot start the host heartbeat; this host will look down",
            "cannot follow the engine's events; status reads will ask Docker",
            "reconcile at worker start failed; the janitor will retry",
            "cannot start the egress firewall keeper; starts check it themselves",
            "cannot start the canary loop; the solvers do not run",
        ]
        assert _threads() == ["inflight-keeper"]
    finally:
        machinery.stop()
    assert _threads() == []
