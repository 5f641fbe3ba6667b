"""Redis trouble as the error tree says it: :func:`map_redis_errors`.

Below the store and its parts (:mod:`celery_app.state.store`, :mod:`celery_app.state.pool_keys`),
so both use it and neither imports the other for it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis.exceptions

from celery_app.errors import RedisUnavailable

log = logging.getLogger(__name__)


@contextlib.contextmanager
def map_redis_errors(what: str) -> Iterator[None]:
    """Translate redis-py connection failures into :class:`RedisUnavailable` (retryable).

    The error's detail reaches teams (the API's 503, a task's error): it names no address.
    redis-py's own message (with the host and port) goes to this process's log instead.
    """
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        log.warning("%s: cannot reach Redis: %s", what, exc)
        raise RedisUnavailable(f"{what}: cannot reach Redis (the state store); is "
                               "redis-server running? This process's log has the address") \
            from exc
    except redis.exceptions.BusyLoadingError as exc:
        raise RedisUnavailable(f"{what}: Redis is loading its data; retry shortly") from exc
