"""The index's two hot reads on the API's event loop, each one Redis round trip.

A platform polls its teams' instances every few seconds, so ``GET …/instances/{c}`` and
``GET …/instances`` are the API's busiest routes. Answered through :class:`StateStore` they
cost a hop into the thread pool and back, plus two or three Redis round trips (the record,
then the hosts' heartbeats). On a host loaded with 1,000 containers, every wake-up of a
thread or of Redis waits for a core (PERFORMANCE.md §8). This is :meth:`StateStore.view` on
``redis.asyncio``: the records and the heartbeats come back together, and nothing leaves the
event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff

from celery_app.state import keys
from celery_app.state.redis_errors import map_redis_errors
from celery_app.state.store import (
    TEAM_VIEW,
    Beats,
    decode_view,
    hostbeat_keys,
    queue_one_view,
    team_view_keys,
)
from celery_app.vocab.models import Instance


class AsyncIndex:
    """:meth:`StateStore.view` with ``redis.asyncio``.

    Args:
        url: the state Redis (``Settings.state_redis_url``).

    Connections belong to the event loop that opened them: call :meth:`open` on it (the
    API's lifespan does) and :meth:`close` there too.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: redis.asyncio.Redis | None = None
        self._team_view: Any = None

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` ran (without it the API reads through the store)."""
        return self._client is not None

    async def open(self) -> None:
        """Connect, with the request paths' short timeouts and few retries."""
        self._client = redis.asyncio.Redis.from_url(
            self.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2,
            health_check_interval=30,
            retry=redis.asyncio.retry.Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
        self._team_view = self._client.register_script(TEAM_VIEW)

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            raise RuntimeError("AsyncIndex.open() was not awaited")
        return self._client

    async def view(
        self, team_id: str, challenge: str | None, hosts: Sequence[str]
    ) -> tuple[list[Instance], Beats]:
        """:meth:`StateStore.view` on the event loop: same arguments, answer and errors.

        Raises:
            RedisUnavailable: Redis cannot be reached.

        """
        client, names = self._redis(), list(hosts)
        with map_redis_errors("read instances"):
            if challenge is None:
                keys_, args = team_view_keys(team_id, names)
                docs, raw = await self._team_view(keys=keys_, args=args)
            else:
                pipe = client.pipeline(transaction=False)
                queue_one_view(pipe, challenge, team_id, names)
                replies = await pipe.execute()
                docs, raw = replies[:1], replies[1:]
            found, beats, unread = decode_view(docs, names, raw)
            if unread:  # a host no longer configured: rare
                beats |= dict(zip(unread, await client.mget(hostbeat_keys(unread)),
                                  strict=True))
        return found, beats

    async def access_generation(self, team_id: str) -> int:
        """:meth:`StateStore.access_generation` on the event loop.

        Raises:
            RedisUnavailable: Redis cannot be reached.

        """
        with map_redis_errors("read access generation"):
            raw = await self._redis().get(keys.access(team_id))
        return int(raw or 0)


__all__ = ["AsyncIndex"]
