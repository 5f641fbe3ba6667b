"""The egress firewall keepers' heartbeats in Redis (celery_app.engine.firewall).

A worker whose Docker engine runs on another machine cannot see that machine's nftables;
``ctfctl firewall keep`` there writes, after each good pass, a heartbeat keyed by the
engine's own ID and the pool, which expires on its own. The worker starts instances only
while it is there.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

import redis

from celery_app.errors import RedisUnavailable
from celery_app.state import keys

# A keeper's heartbeat stands this long (at least: the keeper uses three of its intervals);
# a worker driving a remote engine refuses starts once it is gone.
BEACON_TTL = 30.0


class KeeperBeacon:
    """The heartbeat a firewall keeper writes into Redis, for workers that drive its engine.

    One key per (engine ID, pool) (:func:`keys.egresskeeper`), that expires
    after ``ttl`` seconds: a worker whose engine is on another machine starts instances only
    while that machine's keeper has reported (its engine's ID proves it runs beside that very
    engine, not beside another one).

    Args:
        url: the Redis URL (``CTF_REDIS_URL``, as the workers').
        ttl: how long one heartbeat stands (the freshness bound).
    """

    def __init__(self, url: str, ttl: float = BEACON_TTL) -> None:
        self.ttl = ttl
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                           socket_connect_timeout=5)

    def beat(self, engine_id: str, pool: ipaddress.IPv4Network, table: str) -> None:
        """Say that the table is in force for ``engine_id``'s containers now.

        Raises:
            RedisUnavailable: Redis cannot be reached.
        """
        value = json.dumps({"table": table, "pool": str(pool), "machine": socket.gethostname(),
                            "ttl": self.ttl})
        try:
            self._redis.set(keys.egresskeeper(engine_id, str(pool)), value,
                            px=int(self.ttl * 1000))
        except redis.RedisError as exc:
            # The URL may hold a password: name the failure only.
            raise RedisUnavailable(
                f"cannot write the egress keeper's heartbeat: {exc.__class__.__name__}") from None

    def read(self, engine_id: str, pool: ipaddress.IPv4Network) -> dict[str, Any] | None:
        """The engine's fresh heartbeat for ``pool``, or ``None``.

        Raises:
            RedisUnavailable: Redis cannot be reached (a retry may find it).
        """
        try:
            raw = self._redis.get(keys.egresskeeper(engine_id, str(pool)))
        except redis.RedisError as exc:
            raise RedisUnavailable(
                f"cannot read the egress keeper's heartbeat: {exc.__class__.__name__}") from None
        return json.loads(raw) if raw else None

    def close(self) -> None:
        """Release the connections."""
        self._redis.close()
