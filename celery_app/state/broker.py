r"""The worker's broker transport: a task message is always in a Redis list or recorded as taken.

Kombu's Redis transport takes a message with ``BRPOP`` and only in a later round trip
(``QoS.append``: ``ZADD unacked_index`` + ``HSET unacked``) records it as unacknowledged. A worker
killed between the two (which includes the time the ``BRPOP`` reply sits unread in its socket
while the worker is busy) loses the message for good: it is in no list and in no ``unacked``
entry, so the in-flight keeper (:mod:`celery_app.loops.inflight`) cannot bring it back.

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
   key]``) and ``unacked_index`` (scored now), exactly as ``QoS.append`` would. Kombu's own
   append, called as the message is delivered, is skipped for it (the entry is already there).

So at every instant a message is in its queue or in kombu's ``unacked`` hash: a worker killed
after step 2 (its reply unread, or the task not yet begun) leaves an entry nobody refreshes,
which any live worker's in-flight keeper puts back on its queue after the visibility timeout.
Waiting costs one connection per consumed list; per message it is as many round trips as
kombu's (wake-up + take, where kombu has ``BRPOP`` + append), and there is no poll period.

Only the consuming side is ours; :func:`transport_for` names the class for a broker URL
(``celery_config.broker_transport``), keeping the URL, its password and its TLS options.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from queue import Empty
from ssl import CERT_NONE
from time import time
from typing import Any

import redis as redis_py
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger(__name__)

#: KEYS: ``unacked``, ``unacked_index``, then the lists in the order to try;
#: ARGV: now (epoch s, as kombu's QoS.append scores), then per list ``1`` to record what is
#: taken from it (a consumer that acknowledges) or ``0`` (a ``no_ack`` consumer).
#: Returns ``{list, message}`` or nil. A message without a delivery tag (not kombu's) is
#: returned unrecorded, as ``BRPOP`` would have returned it.
TAKE = """
local function enc(v)
  if v == nil then return 'null' end
  return cjson.encode(v)
end
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    if ARGV[i - 1] == '1' then
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
          redis.call('ZADD', KEYS[2], ARGV[1], tag)
        end
      end
    end
    return {KEYS[i], item}
  end
end
return false
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


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """Kombu's QoS, minus the second write of a message the take step already recorded."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        """Remember a delivered message; record it in Redis unless the take step did."""
        taken = getattr(self.channel, "_recorded", None)
        if taken is not None and delivery_tag in taken:
            taken.discard(delivery_tag)
            kombu_redis.virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)


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
            raise ValueError("celery_app.state.broker needs ack_emulation (the default)")
        # Unprefixed client on the channel's pool: the script gets fully prefixed keys.
        self._take_script = redis_py.Redis(connection_pool=self.pool).register_script(TAKE)

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

    def take(self, queues: list[str] | None = None) -> tuple[str, str] | None:
        """Pop one message from the consumed lists, recording it as unacknowledged.

        Args:
            queues: the queues to take from, in this order (the consumed ones, in kombu's fair
                rotation, by default).

        Returns:
            ``(queue, raw message)`` or None when every list is empty.

        """
        if queues is None:
            queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        lists = self._lists(queues)
        prefix = self.global_keyprefix or ""
        record = ["0" if self._list_queue(key) in self._no_ack_queues else "1" for key in lists]
        reply = self._take_script(
            keys=[prefix + self.unacked_key, prefix + self.unacked_index_key,
                  *(prefix + key for key in lists)],
            args=[time(), *record])
        if not reply:
            return None
        key, item = bytes_to_str(reply[0])[len(prefix):], bytes_to_str(reply[1])
        return self._list_queue(key), item

    def _list_queue(self, key: str) -> str:
        return key.rsplit(self.sep, 1)[0]

    def _deliver_taken(self) -> bool:
        """Take one message and hand it to kombu's consumer callback."""
        taken = self.take()
        if taken is None:
            return False
        queue, item = taken
        payload = loads(item)
        if queue not in self._no_ack_queues:
            tag = (payload.get("properties") or {}).get("delivery_tag")
            if tag:
                self._recorded.add(tag)
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


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """Kombu's Redis transport with :class:`Channel` (``redis://``)."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = _Poller()


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
