"""Task messages in flight: kept fresh while a live worker holds them, back soon when it dies.

Tasks are acknowledged late (``acks_late``): a worker that is killed mid-task leaves its
messages unacknowledged, and the broker hands them out again once they are older than the
*visibility timeout*. With Celery's Redis transport that has two problems:

- kombu looks for such messages only every ~100 s (every tenth of its 10 s polls), on top of
  the timeout, so a killed worker's requests wait minutes;
- the age of a message is the time it was *delivered*, so a short timeout would hand out a long
  image pull or a slow start a second time while its worker is still busy with it.

:class:`InflightKeeper` fixes both. It runs as a thread in every worker process and, every
few seconds:

1. **refreshes** the messages Celery still holds in this worker (:func:`held_by_worker`:
   running, reserved, or waiting in its timer for a retry's countdown or an ETA): their score
   in kombu's ``unacked_index`` becomes "now", so they never look abandoned while the worker
   lives (an acknowledged message is not brought back);
2. **reclaims** messages that nobody refreshed for ``visibility_timeout`` seconds: their worker
   is dead, or no longer has them, so they go back to the queue they came from, where a live
   worker of the same host takes them at once.

Only what Celery *still* holds is refreshed, asked of Celery at every pass. When the broker
connection drops, Celery empties its timer (countdown retries) and its reserved requests and
counts on the broker to hand them out again; kombu's restore of them fails while Redis is away.
Refreshing every message the worker ever received would keep those alive in ``unacked`` and
lose them for good; left alone, they come back after the visibility timeout.

Both steps judge time by Redis's clock (the scripts of :mod:`celery_app.worker.broker`), never
this worker's: a worker whose clock is behind does not see its messages taken by others, and
one whose clock is ahead does not take others' fresh ones.

Worst case: a worker cut off from the broker's Redis for longer than the timeout while it
still works. Its messages are then handed out again and may run twice; every task is
idempotent and the (challenge, team) lock serialises the two runs, so the second finds the
work done. A redelivered task that had already succeeded is not run again
(:meth:`celery_app.tasks.InstancerTask.__call__`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from celery_app.worker.loop import Loop

log = logging.getLogger(__name__)


def _copy(items: Iterable[Any]) -> list[Any]:
    """A list of ``items``, which the worker's main thread may change meanwhile."""
    for _ in range(10):
        with contextlib.suppress(RuntimeError):  # "changed size during iteration": again
            return list(items)
    return list(items)


def held_by_worker(consumer: Any) -> set[str]:
    """The delivery tags of the task messages Celery still holds in this worker.

    Running and reserved requests (Celery's worker state), requests waiting in the consumer's
    timer for their ETA or a retry's countdown, and requests waiting for a rate limit. A
    message Celery let go of without acknowledging it (on a lost broker connection it empties
    its timer and reserved requests) is not in it, so the broker hands it out again.

    Args:
        consumer: the worker's Celery consumer (``worker_ready``'s sender).

    """
    from celery.worker import state  # noqa: PLC0415  # only inside a worker
    from celery.worker.request import Request  # noqa: PLC0415

    requests: list[Any] = [*_copy(state.active_requests), *_copy(state.reserved_requests)]
    timer = getattr(consumer, "timer", None)
    for scheduled in _copy(getattr(timer, "_queue", None) or ()):
        entry = scheduled[-1]  # kombu's timer heap: (eta, priority, entry)
        requests.extend(arg for arg in getattr(entry, "args", None) or ()
                        if isinstance(arg, Request))
    for bucket in _copy((getattr(consumer, "task_buckets", None) or {}).values()):
        if bucket is not None:
            requests.extend(item[0] for item in _copy(bucket.contents))
    tags: set[str] = set()
    for request in requests:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            tags.add(str(tag))
    return tags


class InflightKeeper(Loop):
    """Keeps this worker's task messages fresh and brings dead workers' messages back.

    Args:
        app: the Celery application (its broker connection settings are used).
        visibility_timeout: seconds after which an unrefreshed message is handed out again.
        held: returns the delivery tags this worker still holds (:func:`held_by_worker`);
            none when not given.
        interval: seconds between two passes (a sixth of the timeout by default).

    """

    def __init__(
        self, app: Any, visibility_timeout: float,
        held: Callable[[], Iterable[str]] | None = None, interval: float | None = None,
    ) -> None:
        super().__init__(interval or max(1.0, min(10.0, visibility_timeout / 6)),
                         name="inflight-keeper")
        self.app = app
        self.visibility_timeout = visibility_timeout
        self.held = held or (lambda: ())
        self._conn: Any = None

    # -- one pass ---------------------------------------------------------------------------

    def _channel(self) -> Any:
        if self._conn is None:
            self._conn = self.app.connection_for_write()
            self._conn.ensure_connection(max_retries=1)
        return self._conn.default_channel

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def finish_acks_once(self) -> int:
        """Finish acknowledgements this process made while Redis could not be reached.

        Returns:
            How many were finished.

        """
        finished = int(self._channel().finish_acks())
        if finished:
            log.info("finished %d acknowledgement(s) lost while the broker was away", finished)
        return finished

    def refresh_once(self) -> int:
        """Mark the messages this worker still holds as fresh (by Redis's clock).

        Returns:
            How many messages were refreshed (an acknowledged one is not brought back).

        """
        tags = sorted(set(self.held()))
        if not tags:
            return 0
        return sum(self._channel().refresh(tags))

    def reclaim_once(self) -> int:
        """Put messages nobody refreshed for the visibility timeout back on their queue.

        Returns:
            How many messages this pass put back (another worker may put some back first).

        """
        restored = int(self._channel().qos.restore_visible(start=0, num=None, interval=1))
        if restored:
            log.warning("redelivering %d task message(s) nobody holds (no refresh for %.0f s: "
                        "their worker stopped or let them go)", restored,
                        self.visibility_timeout)
        return restored

    # -- the loop ---------------------------------------------------------------------------

    def run_once(self, now: float) -> None:
        """One pass: finish lost acknowledgements, refresh what we hold, reclaim the rest."""
        # Acknowledgements lost with the broker first (they must never be handed out
        # again), then refresh: a slow pass must not let our messages look abandoned.
        self.finish_acks_once()
        self.refresh_once()
        self.reclaim_once()

    def failed(self, exc: Exception) -> None:
        """Keep going once the broker is back, on a fresh connection."""
        log.warning("in-flight keeper: %s", exc)
        self._drop_connection()

    def stopped(self) -> None:
        """Let go of the connection (messages still held are restored by kombu at shutdown)."""
        self._drop_connection()
