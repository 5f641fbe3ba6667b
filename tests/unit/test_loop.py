"""The worker's loop base (celery_app.worker.loop): passes, waits, failures and the stop."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from celery_app.worker.loop import Loop
from ctf_testkit.support import wait_for

# Longer than any test here runs: a pass that comes sooner was woken, not timed.
LONG = 60.0


class Counting(Loop):
    """A loop that counts its passes; the first ``fail`` passes raise."""

    def __init__(self, interval: float = LONG, fail: int = 0, at_once: bool = True) -> None:
        super().__init__(interval, name="counting", at_once=at_once)
        self.passes: list[float] = []
        self.fail = fail
        self.stopped_calls = 0

    def run_once(self, now: float) -> None:
        self.passes.append(now)
        if len(self.passes) <= self.fail:
            raise RuntimeError(f"pass {len(self.passes)} breaks")

    def stopped(self) -> None:
        self.stopped_calls += 1


def test_first_pass_runs_at_once_in_a_named_daemon_thread() -> None:
    """start() runs a first pass at once, in a daemon thread of the loop's name."""
    loop = Counting()
    loop.start()
    try:
        wait_for(lambda: loop.passes, timeout=5, message="the first pass")
        thread = next(t for t in threading.enumerate() if t.name == "counting")
        assert thread.daemon
    finally:
        loop.stop()


def test_stop_is_prompt_in_the_middle_of_a_long_wait() -> None:
    """stop() ends a loop waiting a minute within a second, and calls stopped() once."""
    loop = Counting()
    loop.start()
    wait_for(lambda: loop.passes, timeout=5, message="the first pass")
    began = time.monotonic()
    loop.stop()
    assert time.monotonic() - began < 1.0
    assert not any(t.name == "counting" for t in threading.enumerate())
    assert loop.stopped_calls == 1
    assert len(loop.passes) == 1


def test_a_failing_pass_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """An exception in run_once is logged with its traceback, and the next passes still run."""
    loop = Counting(interval=0.01, fail=2)
    with caplog.at_level(logging.ERROR, logger="celery_app.worker.loop"):
        loop.start()
        try:
            wait_for(lambda: len(loop.passes) >= 4, timeout=5, message="passes after failures")
        finally:
            loop.stop()
    failures = [r for r in caplog.records if r.name == "celery_app.worker.loop"]
    assert len(failures) == 2
    assert all("counting: a pass failed" in r.getMessage() for r in failures)
    assert all(r.exc_info is not None for r in failures)


def test_wake_runs_the_next_pass_now() -> None:
    """wake() ends the wait: the next pass comes long before the interval is over."""
    loop = Counting()
    loop.start()
    try:
        wait_for(lambda: loop.passes, timeout=5, message="the first pass")
        loop.wake()
        wait_for(lambda: len(loop.passes) == 2, timeout=5, message="the woken pass")
    finally:
        loop.stop()


def test_a_loop_not_at_once_waits_one_interval_first() -> None:
    """With at_once=False the first pass comes after one interval, not at start."""
    loop = Counting(interval=0.3, at_once=False)
    began = time.time()  # the clock run_once's ``now`` is read from
    loop.start()
    try:
        wait_for(lambda: loop.passes, timeout=5, message="the first pass")
        assert loop.passes[0] - began >= 0.3
    finally:
        loop.stop()


def test_stop_before_start_only_tidies_up() -> None:
    """stop() on a loop never started returns at once and still calls stopped()."""
    loop = Counting()
    loop.stop()
    assert loop.stopped_calls == 1
    assert loop.passes == []
