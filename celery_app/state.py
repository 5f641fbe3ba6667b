"""Redis state: the instance index, locks and rate counters.

Docker labels are the source of truth; what is here is an index for fast reads, plus the
lock and counter service. ``InstanceService.reconcile`` rebuilds it from Docker labels.

Keys (prefix ``ctf:``)::

    ctf:inst:<challenge>/<team>   JSON of the instance
    ctf:expiry                    zset  <challenge>/<team> -> expires_at (epoch s): every instance
    ctf:team:<team>               set   <challenge>/<team>
    ctf:host:<host>               set   <challenge>/<team>
    ctf:lock:<challenge>/<team>   redis-py Lock around start/stop/extend of one instance
    ctf:netlock:<team>            redis-py Lock around a team's network and container creation
    ctf:rate:<team>               zset of start/stop actions in the sliding window
    ctf:intent:<challenge>/<team> "<seq>:<start|stop>" of the latest start/stop request
    ctf:placing:<host>            zset of starts placed on <host> not yet reserved there
"""

from __future__ import annotations

import builtins
import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, Final, cast

import redis
import redis.exceptions
from redis.lock import Lock

from celery_app.errors import (
    CapacityExhausted,
    OnOtherHost,
    RateLimited,
    RedisUnavailable,
    TeamQuotaExceeded,
)
from celery_app.models import Instance
from celery_app.naming import instance_key

P: Final = "ctf:"
NETWORK_LOCK_HOLD: Final = 20.0

# Reserve a slot for a new instance atomically: the quota checks and the write are one step,
# so two starts of different challenges of one team cannot both pass a full quota.
_RESERVE = """
local key, team, host = ARGV[1], ARGV[2], ARGV[3]
local per_team, global_max = tonumber(ARGV[4]), tonumber(ARGV[5])
local host_max, expiry, doc = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
-- the placement of this start (if the dispatcher made one) has arrived: it stops counting
redis.call('ZREM', KEYS[5], key)
local old = redis.call('GET', KEYS[1])
if old then
  -- one instance, one host: a record of another host is never taken over here
  local owner = cjson.decode(old)['host']
  if owner ~= host then return 'elsewhere:' .. tostring(owner) end
  redis.call('SET', KEYS[1], doc)
  return 'ok'
end
if redis.call('SCARD', KEYS[2]) >= per_team then return 'team' end
if redis.call('ZCARD', KEYS[3]) >= global_max then return 'global' end
if host_max > 0 and redis.call('SCARD', KEYS[4]) >= host_max then return 'host' end
redis.call('SET', KEYS[1], doc)
redis.call('SADD', KEYS[2], key)
redis.call('SADD', KEYS[4], key)
redis.call('ZADD', KEYS[3], expiry, key)
return 'ok'
"""


@contextlib.contextmanager
def map_redis_errors(what: str) -> Iterator[None]:
    """Translate redis-py connection failures into :class:`RedisUnavailable` (retryable)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise RedisUnavailable(f"{what}: cannot reach Redis ({exc}); is redis-server running?") \
            from exc
    except redis.exceptions.BusyLoadingError as exc:
        raise RedisUnavailable(f"{what}: Redis is loading its data; retry shortly") from exc


# Sliding-window rate limit: drop entries older than the window, count, admit or say how
# long until the oldest entry leaves the window.
_RATE = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return '0'
"""


# One global counter orders every request; the instance keeps only its latest.
_INTENT = """
local seq = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], seq .. ':' .. ARGV[1], 'EX', 86400)
return seq
"""


def placing_key(host: str) -> str:
    """The zset of placements on ``host`` whose start has not reached its worker yet."""
    return f"{P}placing:{host}"


def _key(inst_key: str) -> str:
    return f"{P}inst:{inst_key}"


class StateStore:
    """The instance index and lock service in Redis.

    Args:
        client: a redis-py client (``decode_responses=True``).

    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._reserve = client.register_script(_RESERVE)
        self._rate = client.register_script(_RATE)
        self._intent = client.register_script(_INTENT)

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        """Connect to Redis at ``url``."""
        return cls(
            redis.Redis.from_url(
                url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                health_check_interval=30,
            )
        )

    def ping(self) -> bool:
        """Return whether Redis answers."""
        try:
            return bool(self.redis.ping())
        except redis.exceptions.RedisError:
            return False

    # -- locks ------------------------------------------------------------------------------

    def instance_lock(self, challenge: str, team_id: str, timeout: float) -> Lock:
        """A lock on one (challenge, team); it expires after ``timeout`` if its holder dies."""
        return cast(Lock, self.redis.lock(f"{P}lock:{instance_key(challenge, team_id)}",
                                          timeout=timeout))

    def network_lock(self, team_id: str) -> Lock:
        """A short lock on a team's network (creation and removal).

        It is held for one network and container creation (a second or two), and expires
        after ``NETWORK_LOCK_HOLD`` seconds if its holder dies, so a killed worker's lock
        delays the team's next start by at most that long.
        """
        return cast(Lock, self.redis.lock(f"{P}netlock:{team_id}", timeout=NETWORK_LOCK_HOLD))

    # -- instances --------------------------------------------------------------------------

    def get(self, challenge: str, team_id: str) -> Instance | None:
        """Return the recorded instance, or ``None``."""
        with map_redis_errors("read instance"):
            raw = self.redis.get(_key(instance_key(challenge, team_id)))
        return Instance.model_validate_json(raw) if raw else None

    def reserve(
        self, inst: Instance, per_team: int, global_max: int, host_max: int = 0
    ) -> None:
        """Record a new instance if the quotas allow it (or update one already recorded).

        Raises:
            TeamQuotaExceeded: the team is at ``per_team`` instances.
            CapacityExhausted: the service (or the host) is at its maximum.

        """
        with map_redis_errors("reserve instance"):
            result = self._reserve(
                keys=[_key(inst.key), f"{P}team:{inst.team_id}", f"{P}expiry",
                      f"{P}host:{inst.host}", placing_key(inst.host)],
                args=[inst.key, inst.team_id, inst.host, per_team, global_max, host_max,
                      inst.expires.timestamp(), inst.model_dump_json()],
            )
        if str(result).startswith("elsewhere:"):
            owner = str(result).partition(":")[2]
            raise OnOtherHost(
                f"instance {inst.container_name} is recorded on host {owner}, not {inst.host}; "
                "that host's worker acts on it", host=owner,
            )
        if result == "team":
            raise TeamQuotaExceeded(
                f"team {inst.team_id} already runs {per_team} instance(s), the per-team maximum "
                "(CTF_MAX_INSTANCES_PER_TEAM); stop one before starting another"
            )
        if result == "global":
            raise CapacityExhausted(
                f"the service runs {global_max} instances, its maximum (CTF_MAX_INSTANCES); "
                "try again when some have expired, or raise the limit"
            )
        if result == "host":
            raise CapacityExhausted(
                f"host {inst.host} runs {host_max} instances, its max_instances; use another host"
            )

    def put(self, inst: Instance) -> None:
        """Write (or overwrite) an instance and its index entries."""
        with map_redis_errors("write instance"):
            pipe = self.redis.pipeline()
            pipe.set(_key(inst.key), inst.model_dump_json())
            pipe.sadd(f"{P}team:{inst.team_id}", inst.key)
            pipe.sadd(f"{P}host:{inst.host}", inst.key)
            pipe.zadd(f"{P}expiry", {inst.key: inst.expires.timestamp()})
            pipe.execute()

    def delete(self, challenge: str, team_id: str, host: str | None = None) -> None:
        """Forget an instance (no error when it was not recorded)."""
        key = instance_key(challenge, team_id)
        with map_redis_errors("delete instance"):
            if host is None:
                raw = self.redis.get(_key(key))
                host = Instance.model_validate_json(raw).host if raw else "local"
            pipe = self.redis.pipeline()
            pipe.delete(_key(key))
            pipe.srem(f"{P}team:{team_id}", key)
            pipe.srem(f"{P}host:{host}", key)
            pipe.zrem(f"{P}expiry", key)
            pipe.execute()

    def _load(self, keys: Iterable[str]) -> builtins.list[Instance]:
        keys = sorted(keys)
        if not keys:
            return []
        with map_redis_errors("read instances"):
            docs = self.redis.mget([_key(k) for k in keys])
        return [Instance.model_validate_json(d) for d in docs if d]

    def list(
        self, team_id: str | None = None, challenge: str | None = None, host: str | None = None
    ) -> builtins.list[Instance]:
        """Return the recorded instances, filtered by what is given."""
        with map_redis_errors("list instances"):
            if team_id is not None:
                keys = cast(set[str], self.redis.smembers(f"{P}team:{team_id}"))
            elif host is not None:
                keys = cast(set[str], self.redis.smembers(f"{P}host:{host}"))
            else:
                keys = set(cast(builtins.list[str], self.redis.zrange(f"{P}expiry", 0, -1)))
        found = self._load(keys)
        return [
            i for i in found
            if (challenge is None or i.challenge == challenge) and (host is None or i.host == host)
        ]

    def count(self, host: str | None = None) -> int:
        """Return how many instances are recorded (on ``host`` when given)."""
        with map_redis_errors("count instances"):
            if host is None:
                return int(self.redis.zcard(f"{P}expiry"))
            return int(self.redis.scard(f"{P}host:{host}"))

    def expired(self, now: float) -> builtins.list[str]:
        """Return the keys of instances whose expiry is at or before ``now`` (epoch s)."""
        with map_redis_errors("read expiry index"):
            return cast(builtins.list[str], self.redis.zrangebyscore(f"{P}expiry", "-inf", now))

    # -- intents: the latest start/stop request of an instance wins --------------------------

    def register_intent(self, challenge: str, team_id: str, op: str) -> int:
        """Record a start/stop request of an instance; return its sequence number."""
        key = f"{P}intent:{instance_key(challenge, team_id)}"
        with map_redis_errors("register intent"):
            return int(self._intent(keys=[key, f"{P}intentseq"], args=[op]))

    def superseded(self, challenge: str, team_id: str, seq: int, op: str) -> bool:
        """Whether a request newer than ``seq`` asked for the opposite of ``op``."""
        with map_redis_errors("read intent"):
            raw = self.redis.get(f"{P}intent:{instance_key(challenge, team_id)}")
        if not raw:
            return False
        latest, _, latest_op = str(raw).partition(":")
        return int(latest) > seq and latest_op != op

    # -- rate limit -------------------------------------------------------------------------

    def hit_rate(self, team_id: str, limit: int, window: int) -> None:
        """Count one start/stop of ``team_id`` in a sliding window of ``window`` seconds.

        A sliding window (not a fixed one) so a loop cannot get twice the limit by
        straddling a window's edge; refused attempts are not counted.

        Raises:
            RateLimited: the team already made ``limit`` actions in the last ``window`` s.

        """
        now = time.time()
        with map_redis_errors("rate limit"):
            wait = float(self._rate(keys=[f"{P}rate:{team_id}"],
                                    args=[now, window, limit, f"{now}:{os.urandom(4).hex()}"]))
        if wait > 0:
            raise RateLimited(
                f"team {team_id} made {limit} start/stop requests in the last {window} s; "
                f"wait {int(wait) + 1} s and try again"
            )

    # -- misc -------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Return a small summary for health checks."""
        with map_redis_errors("info"):
            return {"instances": self.count()}
