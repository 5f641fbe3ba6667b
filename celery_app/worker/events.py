"""The index follows the engine: each worker reads its Docker host's container events.

The engine reports every change of our containers as it happens (``docker events``). A worker
follows its own engine's stream (containers with the deployment's scope labels) and keeps the
Redis index true within a second, so status reads never need to ask Docker:

- ``die``, ``oom`` or ``health_status: unhealthy``: a ``running`` instance becomes ``failed``,
  with its exit code, an OOM flag and its last output lines
  (:meth:`~celery_app.core.service.InstanceService.mark_failed`);
- ``destroy`` (``docker rm -f`` behind our back): the instance vanishes from the index and its
  team network goes when it was the last (:meth:`~.InstanceService.forget_removed`);
- ``start`` of a container with our labels that the index does not know: adopted, as
  reconcile would (:meth:`~.InstanceService.adopt`).

Our own starts and stops produce the same events: an instance a start holds is left to it (its
event is looked at again a moment later, once the start is over), and one a stop is removing
is ``stopping``, so its ``die`` changes nothing.

When the stream breaks (engine restart, network loss, or the engine stops answering pings),
the follower reconnects with backoff and then reconciles, which covers the gap. While it is
not connected, or is behind by more than ``MAX_LAG`` seconds, :meth:`EventFollower.live` is
false and status reads check against Docker as before. The janitor stays as the safety net.

Three daemon threads, each a :class:`~celery_app.worker.loop.Loop`: the reader (one stream
per pass, reconnecting with backoff), the handler (one event at a time, in order) and the
watchdog (pings the engine; closes a stream whose engine went quiet).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery_app.core.service import InstanceService
from celery_app.engine.driver import ContainerEvent, EventStream
from celery_app.errors import CTFError
from celery_app.vocab.naming import (
    LABEL_CHALLENGE,
    LABEL_SERVICE,
    LABEL_TEAM,
    check_team_id,
    container_name,
    service_container_name,
)
from celery_app.worker.loop import Loop

log = logging.getLogger(__name__)

# The index may lag the engine by this much (s) and still answer status reads on its own.
MAX_LAG = 1.0
# Reconnection delays (s): doubling from the first to the last.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 2.0
# How often (s) the watchdog pings the engine, and how often a held instance is looked at again.
PING_INTERVAL = 0.5
RETRY_INTERVAL = 0.25
# How long (s) the news about an instance a start holds is kept for a second look.
RETRY_FOR = 300.0

_FAILED = ("die", "oom", "health_status")


@dataclass
class _Pending:
    event: ContainerEvent
    received: float
    until: float = 0.0  # for a retried event: give up after this moment


class EventFollower:
    """Keeps one host's part of the Redis index true from its engine's events.

    Args:
        service: the host's instance service (its driver, store and scope labels).
    """

    def __init__(
        self, service: InstanceService, on_change: Callable[[], None] | None = None
    ) -> None:
        self.service = service
        # Told when the stream opens or breaks: the host's heartbeat says at once whether
        # its engine answers, instead of at its next beat (up to a third of the TTL later).
        self.on_change = on_change or (lambda: None)
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._retry: dict[str, _Pending] = {}
        self._connected = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: EventStream | None = None
        self._busy_since: float | None = None  # receipt time of the event being handled
        self._parts: list[Loop] = []
        self.connects = 0  # how many times the stream was opened (tests, metrics)

    # -- what status reads ask --------------------------------------------------------------

    def live(self) -> bool:
        """Whether the index is known to be at most ``MAX_LAG`` seconds behind the engine."""
        if not self._connected.is_set():
            return False
        now = time.monotonic()
        busy = self._busy_since
        if busy is not None and now - busy > MAX_LAG:
            return False
        with self._queue.mutex:
            oldest = self._queue.queue[0].received if self._queue.queue else None
        return oldest is None or now - oldest <= MAX_LAG

    # -- the threads ------------------------------------------------------------------------

    def start(self) -> None:
        """Start following the engine (reader, handler and watchdog threads)."""
        host = self.service.host
        self._parts = [
            # The reader reconnects after a delay doubling from BACKOFF_FIRST to BACKOFF_MAX.
            _Backoff(self._read, BACKOFF_FIRST, f"events-reader-{host}"),
            # No wait between the handler's passes: each waits for its event.
            _Part(self._handle_next, 0.0, f"events-handler-{host}"),
            _Part(self._watch, PING_INTERVAL, f"events-watchdog-{host}", at_once=False),
        ]
        for part in self._parts:
            part.start()

    def stop(self) -> None:
        """Stop following; the threads end within a second or two."""
        for part in self._parts:
            part.request_stop()
        self._connected.clear()
        self._close_stream()
        for part in self._parts:
            part.join(5)

    def _close_stream(self) -> None:
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _read(self, reader: Loop) -> None:
        """Open the stream, reconcile to cover what happened before, then read its events.

        One stream per pass of the reader; when it breaks, the next pass reconnects after
        ``reader.interval`` (back to :data:`BACKOFF_FIRST` once connected).
        """
        svc = self.service
        try:
            stream = svc.driver.events(svc.scope_labels)
            with self._stream_lock:
                self._stream = stream
            self.connects += 1
            # Opened first, reconciled second: nothing that happens from now on is missed,
            # and what happened while we were away is read from Docker's labels.
            summary = svc.reconcile()
            self._connected.set()
            self.on_change()
            log.info("events: following host %s (connection %d); reconciled %s", svc.host,
                     self.connects, summary.as_dict())
            reader.interval = BACKOFF_FIRST
            for event in stream:
                self._queue.put(_Pending(event, time.monotonic()))
                if reader.stopping:
                    break
        except CTFError as exc:
            log.warning("events: host %s: %s", svc.host, exc)
        except Exception:  # the follower must outlive any surprise; the janitor backs it up
            log.exception("events: host %s: unexpected error", svc.host)
        self._connected.clear()
        self._close_stream()
        if reader.stopping:
            return
        self.on_change()
        log.warning("events: stream of host %s broken; reconnecting in %.2f s",
                    svc.host, reader.interval)

    def _watch(self, _watchdog: Loop) -> None:
        """Close the stream when the engine stops answering (a silent network loss)."""
        if self._connected.is_set() and not self.service.driver.ping():
            log.warning("events: host %s does not answer pings; dropping its stream",
                        self.service.host)
            self._connected.clear()
            self._close_stream()

    def _handle_next(self, _handler: Loop) -> None:
        """Handle the next event (waiting up to RETRY_INTERVAL for one), then due retries."""
        try:
            item = self._queue.get(timeout=RETRY_INTERVAL)
        except queue.Empty:
            item = None
        try:
            if item is not None:
                self._busy_since = item.received
                self._handle(item)
            self._retry_due()
        except Exception:  # one bad event must not stop the others; reconcile backs it
            log.exception("events: host %s: cannot handle an event", self.service.host)
        finally:
            self._busy_since = None

    def _retry_due(self) -> None:
        """Look again at the news about instances a start was holding."""
        now = time.monotonic()
        for key, item in list(self._retry.items()):
            if now >= item.until:
                del self._retry[key]
                continue
            if self._queue.qsize():
                return  # fresh news first
            del self._retry[key]
            self._handle(item)

    # -- one event ----------------------------------------------------------------------------

    def _handle(self, item: _Pending) -> None:
        event = item.event
        target = self._instance_of(event)
        if target is None:
            return
        challenge, team = target
        svc = self.service
        outcome = "unchanged"
        try:
            if event.action in _FAILED:
                if event.action == "health_status" and event.health != "unhealthy":
                    return
                outcome = svc.mark_failed(challenge, team, event.id)
            elif event.action == "destroy":
                outcome = svc.forget_removed(challenge, team, event.id)
            elif event.action == "start":
                if svc.store.get(challenge, team) is None:
                    adopted = svc.adopt(challenge, team)
                    outcome = "adopted" if adopted.adopted else "unchanged"
            else:
                return
        except CTFError as exc:
            # Redis or Docker trouble: look again shortly; reconcile and the janitor back us up.
            log.warning("events: %s of %s: %s", event.action, event.name, exc)
            outcome = "busy"
        if outcome == "busy":
            until = item.until or time.monotonic() + RETRY_FOR
            self._retry[f"{event.id}:{event.action}"] = _Pending(event, item.received, until)
        elif outcome != "unchanged":
            log.info("events: host=%s container=%s %s: %s", svc.host, event.name,
                     event.action, outcome)

    def _instance_of(self, event: ContainerEvent) -> tuple[str, str] | None:
        """``(challenge, team)`` of an instance container; ``None`` for anything else."""
        challenge = event.labels.get(LABEL_CHALLENGE, "")
        team = event.labels.get(LABEL_TEAM, "")
        with contextlib.suppress(CTFError):
            ch = self.service.catalog.get(challenge)
            check_team_id(team, reserved_ok=True)
            if event.name == container_name(ch.id, team):
                return ch.id, team
            # Another service of a Compose instance (SPEC §12): its death fails the group.
            service = event.labels.get(LABEL_SERVICE, "")
            if ch.is_group and service and event.action in _FAILED \
                    and event.name == service_container_name(ch.id, team, service):
                return ch.id, team
        return None


class _Part(Loop):
    """One of the follower's threads: its pass is one of the follower's steps."""

    def __init__(self, step: Callable[[Loop], None], interval: float, name: str,
                 at_once: bool = True) -> None:
        super().__init__(interval, name=name, at_once=at_once)
        self.step = step

    def run_once(self, now: float) -> None:
        """Run the step (it gets this part: its ``stopping`` and ``interval``)."""
        self.step(self)


class _Backoff(_Part):
    """The reader's part: the wait between passes doubles up to :data:`BACKOFF_MAX`."""

    def pause(self) -> None:
        """Wait the reconnection delay, and double it for the next time."""
        super().pause()
        self.interval = min(BACKOFF_MAX, self.interval * 2)


_follower: EventFollower | None = None
_follower_lock = threading.Lock()


def start_following(
    service: InstanceService, on_change: Callable[[], None] | None = None
) -> EventFollower:
    """Start this process's follower of ``service``'s engine (once; the same one after).

    ``on_change`` is called whenever the stream opens or breaks.
    """
    global _follower  # noqa: PLW0603  # one per worker process
    with _follower_lock:
        if _follower is None:
            _follower = EventFollower(service, on_change)
            _follower.start()
        return _follower


def stop_following() -> None:
    """Stop this process's follower, if it runs."""
    global _follower
    with _follower_lock:
        follower, _follower = _follower, None
    if follower is not None:
        follower.stop()


def index_is_live(host: str) -> bool:
    """Whether this process follows ``host``'s events and the index is up to date with them.

    When not (no follower here, stream broken, behind by more than ``MAX_LAG`` s), status
    reads check the instances against Docker.
    """
    follower = _follower
    return follower is not None and follower.service.host == host and follower.live()
