r"""The worker's broker transport: a task message is always in a Redis list or recorded as taken.

Kombu's Redis transport takes a message with ``BRPOP`` and only in a later round trip
(``QoS.append``: ``ZADD unacked_index`` + ``HSET unacked``) records it as unacknowledged. A worker
killed between the two (which includes the time the ``BRPOP`` reply sits unread in its socket
while the worker is busy) loses the message for good: it is in no list and in no ``unacked``
entry, so the in-flight keeper (:mod:`celery_app.worker.inflight`) cannot bring it back.

:class:`Transport` keeps kombu's publishing, acknowledging and restoring as they are (a plain
Celery client's ``LPUSH`` to ``celery`` is what it consumes) and replaces only how a message is
taken, in two steps:

1. **Wait without taking.** One connection per list the worker consumes (each queue times
   kombu's priority steps: ``celery``, ``celery\x06\x163``, …, ``ctf.host.<name>``, …) blocks in
   ``BLMOVE <list> <list> RIGHT RIGHT <timeout>``. It returns as soon as that list holds a
   message and leaves the list as it was (its last element is moved onto its own end), so a
   waiting or killed worker holds nothing. Every waiting worker of a list wakes, as with
   ``BRPOP`` only one gets the message.
2. **Take and record in one step.** A Lua script (:data:`TAKE`) pops the first message of the
   first non-empty list in kombu's order (priority, then the fair queue rotation) and in the
   same atomic step records it in ``unacked`` (``[<message, byte-exact>, exchange, routing
   key]``) and ``unacked_index`` (scored now by Redis's ``TIME``), as ``QoS.append`` would. The
   script says whether it recorded the message; kombu's own append, called as the message is
   delivered, is skipped only for a message it did record.

So at every instant a message is in its queue or in kombu's ``unacked`` hash: a worker killed
after step 2 (its reply unread, or the task not yet begun) leaves an entry nobody refreshes,
which any live worker's in-flight keeper puts back on its queue after the visibility timeout.
Waiting costs one connection per consumed list; per message it is as many round trips as
kombu's (wake-up + take, where kombu has ``BRPOP`` + append), and there is no poll period.

Every score in ``unacked_index`` is written and judged by Redis's clock, never a worker's: the
take step, the in-flight keeper's refresh (:meth:`Channel.refresh`) and the search for stale
messages and their restore (:meth:`QoS.restore_visible`, which also replaces kombu's own
periodic pass), so a worker whose clock is off neither loses its messages to others nor takes
theirs. A restore checks, in the same atomic step that pushes the message back, that it is still
stale and unchanged: a message refreshed or acknowledged meanwhile stays where it is.

Only the consuming side is ours; :func:`transport_for` names the class for a broker URL
(``celery_config.broker_transport``), keeping the URL, its password and its TLS options.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from queue import Empty
from ssl import CERT_NONE
from typing import Any, NamedTuple

import redis as redis_py
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger(__name__)

#: Redis's own clock (epoch seconds, microseconds kept), so that every worker scores and judges
#: ``unacked_index`` by one clock: a worker whose clock is off neither has its messages taken
#: from it nor takes others' (scores are epoch seconds, as kombu's ``QoS.append`` writes them).
#: Scripts that call TIME before writing need effects replication (always on since Redis 5).
NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function score(s)
  return string.format('%.6f', s)
end
"""

#: KEYS: ``unacked``, ``unacked_index``, then the lists in the order to try;
#: ARGV: per list ``1`` to record what is taken from it (a consumer that acknowledges) or ``0``
#: (a ``no_ack`` consumer). Returns ``{list, message, recorded}`` or nil, ``recorded`` being 1
#: when the script wrote the ``unacked`` entry (scored by Redis's TIME). A message without a
#: delivery tag (not kombu's) is returned unrecorded, as ``BRPOP`` would have returned it.
TAKE = NOW + """
local function enc(v)
  if v == nil then return 'null' end
  return cjson.encode(v)
end
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local recorded = 0
    if ARGV[i - 2] == '1' then
      local ok, msg = pcall(cjson.decode, item)
      if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
        local props = msg['properties']
        local tag = props['delivery_tag']
        if type(tag) == 'string' and tag ~= '' then
          local info = props['delivery_info']
          if type(info) ~= 'table' then info = {} end
          redis.call('HSET', KEYS[1], tag,
                     '[' .. item .. ',' .. enc(info['exchange']) .. ',' ..
                     enc(info['routing_key']) .. ']')
          redis.call('ZADD', KEYS[2], score(now()), tag)
          recorded = 1
        end
      end
    end
    return {KEYS[i], item, recorded}
  end
end
return false
"""

#: KEYS: ``unacked_index``; ARGV: delivery tags. Scores each tag still in the index "now" by
#: Redis's clock (an acknowledged message is not brought back) and returns, per tag, 1 when it
#: was there or 0 when it is gone.
REFRESH = NOW + """
local at = score(now())
local out = {}
for i = 1, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', at, ARGV[i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

#: KEYS: ``unacked_index``; ARGV: the visibility timeout (s), then at most how many (0: all).
#: Returns the tags nobody refreshed for that long, by Redis's clock, oldest first.
STALE = NOW + """
local ceiling = score(now() - tonumber(ARGV[1]))
if tonumber(ARGV[2]) > 0 then
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ceiling, 'LIMIT', 0, tonumber(ARGV[2]))
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ceiling)
"""

#: KEYS: ``unacked``, ``unacked_index``, then the lists to put the message back on;
#: ARGV: tag, visibility timeout, the ``unacked`` entry read before (``''``: none), then one
#: message per list. In one step, and only if the tag is still stale by Redis's clock and its
#: entry unchanged: drop the entry and push the message back. Returns 1 when it did.
RESTORE = NOW + """
local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not s then return 0 end
if tonumber(s) > now() - tonumber(ARGV[2]) then return 0 end
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if (entry or '') ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do
  redis.call('RPUSH', KEYS[i], ARGV[i + 1])
end
return 1
"""

#: Poll type of a waiting connection, followed by its (unprefixed) list.
WAIT = "WAIT:"


class _Waiter:
    """One list's waiting connection (what kombu's poller registers: ``.connection``)."""

    def __init__(self, key: str, pool: Any) -> None:
        self.key = key
        self.connection_pool = pool
        self.connection: Any = None
        self.pending = False  # a BLMOVE was sent and its reply not read yet
        self.retired = False  # its list is no longer consumed: drop it at its reply

    @property
    def poll_type(self) -> str:
        return WAIT + self.key


class Taken(NamedTuple):
    """One message taken by :meth:`Channel.take_message`."""

    queue: str
    message: str
    recorded: bool  # the take step wrote its ``unacked`` entry (the script says so)


class _Pushes:
    """Stands in for the pipeline kombu's ``_do_restore_message`` pushes a message onto."""

    def __init__(self) -> None:
        self.pushed: list[tuple[str, Any]] = []

    def rpush(self, key: str, value: Any) -> None:
        self.pushed.append((key, value))

    lpush = rpush  # not used by a restore of ours (never leftmost)


class _UnfinishedAcks:
    """Delivery tags this process acknowledged while the broker's Redis could not be reached.

    The worker was done with those messages (a result stored, or a retry already published),
    but their ``unacked`` entries stayed behind: handed out again after the visibility timeout,
    they would run a second time. The in-flight keeper finishes these acknowledgements once
    Redis answers again (:meth:`Channel.finish_acks`), long before that.
    """

    def __init__(self) -> None:
        self._tags: set[str] = set()
        self._lock = threading.Lock()

    def add(self, tag: str) -> None:
        with self._lock:
            self._tags.add(tag)

    def take(self) -> list[str]:
        with self._lock:
            tags, self._tags = sorted(self._tags), set()
        return tags


UNFINISHED_ACKS = _UnfinishedAcks()


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """Kombu's QoS, minus the second write of a message the take step already recorded.

    Its ``restore_visible`` (kombu's periodic pass, and the in-flight keeper's) judges
    staleness by Redis's clock, not this process's. An acknowledgement that cannot reach Redis
    is remembered (:data:`UNFINISHED_ACKS`) for the keeper to finish.
    """

    def ack(self, delivery_tag: Any) -> None:
        """Acknowledge; remember the tag if Redis cannot be reached (then re-raise)."""
        try:
            super().ack(delivery_tag)
        except self.channel.connection_errors:
            UNFINISHED_ACKS.add(str(delivery_tag))
            raise

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        """Reject; a drop (no requeue) that cannot reach Redis is finished later, as an ack."""
        try:
            super().reject(delivery_tag, requeue=requeue)
        except self.channel.connection_errors:
            if not requeue:
                UNFINISHED_ACKS.add(str(delivery_tag))
            raise

    def append(self, message: Any, delivery_tag: Any) -> None:
        """Remember a delivered message; record it in Redis unless the take step did."""
        taken = getattr(self.channel, "_recorded", None)
        if taken is not None and delivery_tag in taken:
            taken.discard(delivery_tag)
            kombu_redis.virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int | None = 10, interval: int = 10) -> int:
        """Put back messages nobody refreshed for the visibility timeout (Redis's clock).

        Args:
            start: unused (kombu's signature).
            num: at most this many per pass (None: all).
            interval: act on one call in ``interval`` (kombu's pacing of its own pass).

        Returns:
            How many messages this call put back.

        """
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % interval:
            return 0
        channel: Channel = self.channel
        return sum(channel.restore_if_stale(tag) for tag in channel.stale(num or 0))


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """Kombu's Redis channel whose consumer waits without popping and takes atomically."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._waiters: dict[str, _Waiter] = {}
        self._recorded: set[str] = set()
        self._no_ack_queues: set[str] = set()
        self._wait_pool: Any = None
        super().__init__(*args, **kwargs)
        if not self.ack_emulation:  # pragma: no cover  # kombu's own QoS: nothing to record
            raise ValueError("celery_app.worker.broker needs ack_emulation (the default)")
        # Unprefixed client on the channel's pool: the scripts get fully prefixed keys.
        raw = self._raw = redis_py.Redis(connection_pool=self.pool)
        self._take_script = raw.register_script(TAKE)
        self._refresh_script = raw.register_script(REFRESH)
        self._stale_script = raw.register_script(STALE)
        self._restore_script = raw.register_script(RESTORE)

    # -- consuming ----------------------------------------------------------------------------

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        """Consume ``queue``; remember whether its messages are acknowledged."""
        no_ack = kwargs.get("no_ack", args[0] if args else False)
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def _lists(self, queues: Any) -> list[str]:
        """The lists of ``queues``, in the order kombu's BRPOP would name them."""
        return list(dict.fromkeys(
            self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues))

    def take_message(self, queues: list[str] | None = None) -> Taken | None:
        """Pop one message from the consumed lists, recording it as unacknowledged.

        Args:
            queues: the queues to take from, in this order (the consumed ones, in kombu's fair
                rotation, by default).

        Returns:
            The message, its queue and whether the take step recorded it (the script's own
            answer), or None when every list is empty.

        """
        if queues is None:
            queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        lists = self._lists(queues)
        prefix = self._prefix
        record = ["0" if self._list_queue(key) in self._no_ack_queues else "1" for key in lists]
        reply = self._take_script(
            keys=[prefix + self.unacked_key, prefix + self.unacked_index_key,
                  *(prefix + key for key in lists)],
            args=record)
        if not reply:
            return None
        key, item = bytes_to_str(reply[0])[len(prefix):], bytes_to_str(reply[1])
        return Taken(self._list_queue(key), item, int(reply[2]) == 1)

    def take(self, queues: list[str] | None = None) -> tuple[str, str] | None:
        """:meth:`take_message`, as ``(queue, raw message)``."""
        taken = self.take_message(queues)
        return None if taken is None else (taken.queue, taken.message)

    @property
    def _prefix(self) -> str:
        return str(self.global_keyprefix or "")

    # -- keeping in-flight messages (celery_app.worker.inflight) ------------------------------

    def refresh(self, tags: list[str]) -> list[bool]:
        """Score ``tags`` "now" by Redis's clock; say for each whether it is still unacked.

        Args:
            tags: delivery tags this worker still holds.

        Returns:
            Per tag, True when it was in ``unacked_index`` (and is now fresh).

        """
        if not tags:
            return []
        found = self._refresh_script(keys=[self._prefix + self.unacked_index_key], args=tags)
        return [int(flag) == 1 for flag in found]

    def finish_acks(self) -> int:
        """Drop the ``unacked`` entries of acknowledgements that could not reach Redis.

        Returns:
            How many were finished (kept for the next call if Redis still cannot be reached).

        """
        tags = UNFINISHED_ACKS.take()
        if not tags:
            return 0
        prefix = self._prefix
        try:
            pipe = self._raw.pipeline()
            pipe.zrem(prefix + self.unacked_index_key, *tags)
            pipe.hdel(prefix + self.unacked_key, *tags)
            pipe.execute()
        except BaseException:
            for tag in tags:
                UNFINISHED_ACKS.add(tag)
            raise
        return len(tags)

    def stale(self, num: int = 0) -> list[str]:
        """Tags nobody refreshed for the visibility timeout, by Redis's clock (oldest first).

        Args:
            num: at most this many (0: all).

        """
        tags = self._stale_script(keys=[self._prefix + self.unacked_index_key],
                                  args=[self.visibility_timeout, int(num)])
        return [bytes_to_str(tag) for tag in tags]

    def restore_if_stale(self, tag: str) -> bool:
        """Put one message back on its queue(s), if it is still stale by Redis's clock.

        The message is routed as kombu's own restore routes it (``_do_restore_message``: its
        exchange's bindings, its priority, marked redelivered), and pushed back in the same
        atomic step that checks it is still stale and unchanged and drops its ``unacked``
        entry: a message refreshed or acknowledged meanwhile is left alone, and two workers
        restoring at once put it back once.

        Returns:
            True when this call put it back.

        """
        prefix = self._prefix
        raw = self._raw.hget(prefix + self.unacked_key, tag)
        pushes = _Pushes()
        if raw is not None:
            message, exchange, routing_key = loads(bytes_to_str(raw))
            self._do_restore_message(message, exchange, routing_key, pushes)
        done = self._restore_script(
            keys=[prefix + self.unacked_key, prefix + self.unacked_index_key,
                  *(prefix + key for key, _ in pushes.pushed)],
            args=[tag, self.visibility_timeout, raw if raw is not None else b"",
                  *(value for _, value in pushes.pushed)])
        return int(done) == 1

    def _list_queue(self, key: str) -> str:
        return key.rsplit(self.sep, 1)[0]

    def _deliver_taken(self) -> bool:
        """Take one message and hand it to kombu's consumer callback."""
        taken = self.take_message()
        if taken is None:
            return False
        queue, item, recorded = taken
        payload = loads(item)
        if recorded:  # the script wrote kombu's entry: QoS.append must not write it again
            self._recorded.add(str(payload["properties"]["delivery_tag"]))
        self._queue_cycle.rotate(queue)
        self.connection._deliver(payload, queue)
        return True

    # -- waiting ------------------------------------------------------------------------------

    @property
    def wait_pool(self) -> Any:
        """The waiting connections' pool: one connection per consumed list, no fixed cap."""
        if self._wait_pool is None:
            params = self._connparams(asynchronous=True)
            params["max_connections"] = None
            self._wait_pool = redis_py.ConnectionPool(**params)
        return self._wait_pool

    def arm(self, poller: kombu_redis.MultiChannelPoller) -> None:
        """Have a BLMOVE waiting on every consumed list (kombu's ``_register_BRPOP``)."""
        wanted = self._lists(self.active_queues)
        for key, waiter in list(self._waiters.items()):
            if key not in wanted:
                waiter.retired = True
                if not waiter.pending:
                    self._drop_waiter(waiter, poller)
        prefix = self.global_keyprefix or ""
        for key in wanted:
            found = self._waiters.get(key)
            if found is None:
                waiter = self._waiters[key] = _Waiter(key, self.wait_pool)
                self.handlers[waiter.poll_type] = functools.partial(self.on_wait_reply, waiter)
            else:
                waiter = found
                waiter.retired = False  # consumed again before its last reply came
            if not poller._client_registered(self, waiter, waiter.poll_type):
                waiter.pending = False
                poller._register(self, waiter, waiter.poll_type)
            if not waiter.pending:
                waiter.connection.send_command(
                    "BLMOVE", prefix + key, prefix + key, "RIGHT", "RIGHT",
                    self.brpop_timeout or 0)
                waiter.pending = True

    def on_wait_reply(self, waiter: _Waiter, consume: bool = True) -> bool:
        """Read a waiting connection's reply; take a message if the list had one.

        Args:
            waiter: the connection that is readable.
            consume: False when kombu's QoS is full: read the reply (it popped nothing), take
                nothing; the next poll waits again.

        Returns:
            True when a message was delivered.

        Raises:
            Empty: nothing was delivered (timeout, or another worker took it first).

        """
        try:
            try:
                reply = waiter.connection.read_response()
            except self.connection_errors:
                waiter.connection.disconnect()
                raise
        finally:
            waiter.pending = False
        if waiter.retired:
            self._drop_waiter(waiter, self.connection.cycle)
        if reply is None or not consume or not self._deliver_taken():
            raise Empty()
        return True

    def _drop_waiter(self, waiter: _Waiter, poller: Any) -> None:
        self._waiters.pop(waiter.key, None)
        self.handlers.pop(waiter.poll_type, None)
        sock = poller._chan_to_sock.pop((self, waiter, waiter.poll_type), None)
        if sock is not None:
            poller._fd_to_chan.pop(sock.fileno(), None)
            with contextlib.suppress(KeyError, ValueError, OSError):
                poller.poller.unregister(sock)
        connection, waiter.connection = waiter.connection, None
        if connection is not None:
            waiter.connection_pool.release(connection)

    def _poll_error(self, type: str, **options: Any) -> Any:  # noqa: A002  # kombu's name
        if type.startswith(WAIT):
            waiter = self._waiters.get(type[len(WAIT):])
            if waiter is not None and waiter.connection is not None:
                waiter.pending = False
                return waiter.connection.read_response()
            return None
        return super()._poll_error(type, **options)

    def _on_connection_disconnect(self, connection: Any) -> None:
        for waiter in self._waiters.values():
            if waiter.connection is connection:
                waiter.pending = False
        super()._on_connection_disconnect(connection)

    # -- closing ------------------------------------------------------------------------------

    def _disconnect_pools(self) -> None:
        pool, self._wait_pool = self._wait_pool, None
        if pool is not None:
            pool.disconnect()
        super()._disconnect_pools()

    def _close_clients(self) -> None:
        for waiter in list(self._waiters.values()):
            connection, waiter.connection = waiter.connection, None
            if connection is not None:
                with contextlib.suppress(Exception):  # closing anyway
                    connection.disconnect()
        self._waiters.clear()
        super()._close_clients()


class _Poller(kombu_redis.MultiChannelPoller):  # type: ignore[misc]
    """Kombu's poller, with our channels' waiting connections in place of one BRPOP."""

    def _register_BRPOP(self, channel: Any) -> None:  # noqa: N802  # kombu's name
        if isinstance(channel, Channel):
            channel.arm(self)
        else:  # pragma: no cover  # only our channels are added to our poller
            super()._register_BRPOP(channel)

    def on_readable(self, fileno: int) -> Any:
        if fileno not in self._fd_to_chan:  # a dropped waiter's socket, idle in its pool
            return None
        chan, poll_type = self._fd_to_chan[fileno]
        if isinstance(chan, Channel) and poll_type.startswith(WAIT):
            waiter = chan._waiters.get(poll_type[len(WAIT):])
            if waiter is None:  # pragma: no cover  # dropped while the poll reported it
                return None
            # Always read a waiting reply (it popped nothing): a reply left unread would keep
            # its socket readable and spin the loop while kombu's QoS is full.
            return chan.on_wait_reply(waiter, consume=chan.qos.can_consume())
        return super().on_readable(fileno)


class _HubWake:
    """Wakes a worker's event loop when a callback is queued on it from another thread.

    With ``--pool threads`` Celery acknowledges a finished task by queueing the ack on the
    event loop (``hub.call_soon``, from the task's thread), and nothing woke the loop from its
    poll: the ack, and so the next message, waited for the loop's next timer, up to 1 s
    (celery/celery#6941). A burst larger than the worker's threads was taken one prefetch
    window a second (issue 27: 100 starts at once on 8 threads, 8 every ~0.9 s, the worker
    idle 6.9 s of 8.2). Each ``call_soon`` now also writes a byte to a pipe the loop reads.
    """

    def __init__(self, hub: Any) -> None:
        self.read, self.write = os.pipe()
        os.set_blocking(self.read, False)
        os.set_blocking(self.write, False)
        self._call_soon = hub.call_soon
        hub.call_soon = self.call_soon

    def call_soon(self, callback: Any, *args: Any) -> Any:
        """The hub's ``call_soon``, then wake its poll (from any thread)."""
        queued = self._call_soon(callback, *args)
        # a full pipe already holds a wake-up
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.write, b"\0")
        return queued

    def drain(self) -> None:
        """Empty the pipe; the loop's next turn runs what was queued."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.read, 4096):
                pass


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """Kombu's Redis transport with :class:`Channel` (``redis://``); wakes its loop (_HubWake)."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = _Poller()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Kombu's registration, plus the loop's wake-up pipe (once per loop)."""
        super().register_with_event_loop(connection, loop)
        wake = getattr(loop, "_ctf_wake", None)
        if wake is None:
            wake = loop._ctf_wake = _HubWake(loop)
        loop.add_reader(wake.read, wake.drain)  # again after a reconnect's hub reset


class TLSTransport(Transport):
    """The same over TLS (``rediss://``), with kombu's defaults for a bare ``rediss://`` URL."""

    def __init__(self, client: Any, **kwargs: Any) -> None:
        if not client.ssl:
            # What kombu does for rediss:// without ssl_* options (kombu.connection): TLS,
            # certificate unchecked, with its warning.
            log.warning("Secure redis scheme specified (rediss) with no ssl options, "
                        "defaulting to insecure SSL behaviour.")
            client.ssl = {"ssl_cert_reqs": CERT_NONE}
        super().__init__(client, **kwargs)


def transport_for(url: str) -> str | None:
    """The transport class for a broker URL (``module:Class``), or None to keep Celery's.

    Args:
        url: the broker URL (``redis://…`` or ``rediss://…``; anything else keeps kombu's).

    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return {"redis": f"{__name__}:Transport", "rediss": f"{__name__}:TLSTransport"}.get(scheme)
