"""The loop base: one pass every few seconds in a daemon thread, until stopped.

Every background loop of a worker (the host's heartbeat, the egress firewall keeper, the
in-flight keeper, the parts of the event follower) is a :class:`Loop`: it says what one pass
does (:meth:`Loop.run_once`) and how long to wait between passes; the base owns the thread,
the stop and the rule that a failing pass is logged and the loop goes on (a loop that died on
one Redis blink would leave its worker without a heartbeat or a firewall until restarted).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class Loop:
    """Runs :meth:`run_once` every ``interval`` seconds in a daemon thread until :meth:`stop`.

    Args:
        interval: seconds between the end of one pass and the start of the next (read before
            each wait, so a loop may change it, for a backoff).
        name: the thread's name (it shows in thread dumps and py-spy).
        at_once: run the first pass as soon as the thread starts; when false, wait one
            interval first.

    """

    def __init__(self, interval: float, name: str, at_once: bool = True) -> None:
        self.interval = interval
        self.name = name
        self.at_once = at_once
        self._stop = threading.Event()
        # Set by stop() and wake(): ends the current wait at once.
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a loop says -------------------------------------------------------------------

    def run_once(self, now: float) -> None:
        """Do one pass (``now``: the epoch time it began)."""
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        """Log a pass that raised; the loop goes on after its usual wait."""
        log.error("%s: a pass failed; the next one is in %g s", self.name, self.interval,
                  exc_info=exc)

    def stopped(self) -> None:
        """Called once by :meth:`stop` after the thread ended (or did not end in time)."""

    # -- the thread -------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (a long pass may look, and end early)."""
        return self._stop.is_set()

    def start(self) -> None:
        """Start the daemon thread."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """End the current wait: the next pass runs now, not at the end of the interval."""
        self._wake.set()

    def request_stop(self) -> None:
        """Ask the loop to stop after its current pass, without waiting for it."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` seconds for the thread to end (when it was started)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop: end the wait, let the current pass finish (up to ``timeout`` s), then tidy up."""
        self.request_stop()
        self.join(timeout)
        self.stopped()

    def pause(self) -> None:
        """Wait until the next pass: ``interval`` seconds, or less on :meth:`wake`/:meth:`stop`."""
        self._wake.wait(self.interval)
        self._wake.clear()

    def _run(self) -> None:
        if not self.at_once:
            self.pause()
        while not self._stop.is_set():
            try:
                self.run_once(time.time())
            except Exception as exc:  # noqa: BLE001  # a loop outlives a failed pass
                self.failed(exc)
            self.pause()
