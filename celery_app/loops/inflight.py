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

1. **refreshes** the messages this worker holds (received, running or waiting for a retry's
   countdown): their score in kombu's ``unacked_index`` becomes "now", so they never look
   abandoned while the worker lives (``ZADD XX``: an acknowledged message is not brought back);
2. **reclaims** messages that nobody refreshed for ``visibility_timeout`` seconds: their worker
   is dead, so they go back to the queue they came from (kombu's own ``restore_visible``, under
   kombu's own mutex), where a live worker of the same host takes them at once.

Worst case: a worker cut off from the broker's Redis for longer than the timeout while it
still works. Its messages are then handed out again and may run twice; every task is
idempotent and the (challenge, team) lock serialises the two runs, so the second finds the
work done. A redelivered task that had already succeeded is not run again
(:meth:`celery_app.tasks.InstancerTask.__call__`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class InflightKeeper:
    """Keeps this worker's task messages fresh and brings dead workers' messages back.

    Args:
        app: the Celery application (its broker connection settings are used).
        visibility_timeout: seconds after which an unrefreshed message is handed out again.
        interval: seconds between two passes (a sixth of the timeout by default).

    """

    def __init__(
        self, app: Any, visibility_timeout: float, interval: float | None = None
    ) -> None:
        self.app = app
        self.visibility_timeout = visibility_timeout
        self.interval = interval or max(1.0, min(10.0, visibility_timeout / 6))
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    # -- what this worker holds -------------------------------------------------------------

    def hold(self, delivery_tag: str | None) -> None:
        """Remember a message this worker received (until it is acknowledged)."""
        if delivery_tag:
            with self._held_lock:
                self._held.add(str(delivery_tag))

    def held(self) -> list[str]:
        """Return the delivery tags this worker may still hold."""
        with self._held_lock:
            return sorted(self._held)

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

    def refresh_once(self) -> int:
        """Mark the messages this worker holds as fresh; forget acknowledged ones.

        Returns:
            How many messages were refreshed.

        """
        tags = self.held()
        if not tags:
            return 0
        channel = self._channel()
        client, index = channel.client, channel.unacked_index_key
        now = time.time()
        pipe = client.pipeline()
        for tag in tags:
            pipe.zadd(index, {tag: now}, xx=True)
        pipe.zmscore(index, tags)
        scores = pipe.execute()[-1]
        gone = {tag for tag, score in zip(tags, scores, strict=True) if score is None}
        if gone:
            with self._held_lock:
                self._held -= gone
        return len(tags) - len(gone)

    def reclaim_once(self) -> int:
        """Put messages whose worker stopped refreshing them back on their queue.

        Returns:
            How many messages were overdue (kombu restores them under its mutex; another
            worker may restore some of them first).

        """
        channel = self._channel()
        ceiling = time.time() - self.visibility_timeout
        overdue = int(channel.client.zcount(channel.unacked_index_key, 0, ceiling))
        if overdue:
            # Kombu's own restore: same keys, same mutex as its built-in (slow) pass, and the
            # message goes back to the queue it was taken from (its host's, or the default).
            channel.qos.restore_visible(start=0, num=None, interval=1)
            log.warning("redelivering %d task message(s) of a worker that stopped (no refresh "
                        "for %.0f s)", overdue, self.visibility_timeout)
        return overdue

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # Refresh first: a slow pass must not let our own messages look abandoned.
                self.refresh_once()
                self.reclaim_once()
            except Exception as exc:  # noqa: BLE001  # keep going once the broker is back
                log.warning("in-flight keeper: %s", exc)
                self._drop_connection()
            self._stop.wait(self.interval)

    def start(self) -> None:
        """Run passes every ``interval`` seconds in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="inflight-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the passes (messages still held are restored by kombu at shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._drop_connection()
