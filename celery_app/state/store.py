"""Redis state: the instance index, locks and rate counters.

Docker labels are the source of truth; what is here is an index for fast reads, plus the
lock and counter service. ``InstanceService.reconcile`` rebuilds it from Docker labels.

The store owns the keyspace: the key names are in :mod:`celery_app.state.keys` (and
ARCHITECTURE.md), and no other module touches Redis through ``.redis``.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, cast

import redis
import redis.exceptions
from redis.exceptions import LockError
from redis.lock import Lock

from celery_app.errors import (
    CapacityExhausted,
    RateLimited,
    TeamQuotaExceeded,
)
from celery_app.state import keys
from celery_app.state.audit import AuditLog
from celery_app.state.pool_keys import PoolKeys
from celery_app.state.redis_errors import (  # re-exported: the Dispatcher imports it from here
    map_redis_errors as map_redis_errors,  # noqa: PLC0414
)
from celery_app.state.solver import SolverResults
from celery_app.vocab.models import Instance
from celery_app.vocab.naming import GLOBAL_TEAM, instance_key
from celery_app.vocab.signals import InstanceBusy, OnOtherHost

log = logging.getLogger(__name__)

# Seconds a (challenge, team) lock lives without renewal: how long a killed worker blocks it.
LOCK_HOLD: Final = 30.0
NETWORK_LOCK_HOLD: Final = 20.0
# Seconds the answer of an applied start, stop or extend is kept (``ctf:done:<task_id>``): as
# long as Celery keeps its result, far beyond any redelivery (the visibility timeout, retries).
DONE_TTL: Final = 86400

# A task's effect and its answer, written together: ``(task id, answer JSON)``.
Done = tuple[str, str]

# Reserve a slot for a new instance atomically: the quota checks and the write are one step,
# so two starts of different challenges of one team cannot both pass a full quota. The global
# and host limits count containers (an instance of k services uses k; KEYS[6] and KEYS[7]
# hold the containers beyond the first of each such instance); the team's counts instances.
_RESERVE = """
local key, team, host = ARGV[1], ARGV[2], ARGV[3]
local per_team, global_max = tonumber(ARGV[4]), tonumber(ARGV[5])
local host_max, expiry, doc = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local size = tonumber(ARGV[9])
local function used(count, extra)
  for _, n in ipairs(redis.call('HVALS', extra)) do count = count + tonumber(n) end
  return count
end
-- the placement of this start (if the dispatcher made one) has arrived: it stops counting
redis.call('ZREM', KEYS[5], key, key .. '#' .. size)
local old = redis.call('GET', KEYS[1])
if old then
  -- one instance, one host: a record of another host is never taken over here
  local owner = cjson.decode(old)['host']
  if owner ~= host then return 'elsewhere:' .. tostring(owner) end
  redis.call('SET', KEYS[1], doc)
  return 'ok'
end
if redis.call('SCARD', KEYS[2]) >= per_team then return 'team' end
local everywhere = used(redis.call('ZCARD', KEYS[3]), KEYS[6])
if everywhere + size > global_max then return 'global:' .. everywhere end
if host_max > 0 then
  local here = used(redis.call('SCARD', KEYS[4]), KEYS[7])
  if here + size > host_max then return 'host:' .. here end
end
redis.call('SET', KEYS[1], doc)
redis.call('SADD', KEYS[2], key)
redis.call('SADD', KEYS[4], key)
redis.call('ZADD', KEYS[3], expiry, key)
if size > 1 then
  redis.call('HSET', KEYS[6], key, size - 1)
  redis.call('HSET', KEYS[7], key, size - 1)
end
return 'ok'
"""


# A team's records and the hosts' heartbeats in one round trip: the busiest read (a platform
# polls every team's instances). KEYS[1] the team's set, KEYS[2] the global instances' set
# (every team sees them, SPEC §13), KEYS[3..] the heartbeats; ARGV[1] the record prefix. A
# missing record or heartbeat comes back as nil.
TEAM_VIEW = """
local members = redis.call('SUNION', KEYS[1], KEYS[2])
local docs = {}
for i, m in ipairs(members) do docs[i] = redis.call('GET', ARGV[1] .. m) end
local beats = {}
for i = 3, #KEYS do beats[i - 2] = redis.call('GET', KEYS[i]) end
return {docs, beats}
"""

# A host's raw heartbeat (JSON, or None where there is none), by host name.
Beats = dict[str, str | None]


def team_view_keys(team_id: str, hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Return the KEYS and ARGV of :data:`TEAM_VIEW` for ``team_id`` and ``hosts``."""
    return ([keys.team(team_id), keys.team(GLOBAL_TEAM), *(keys.hostbeat(h) for h in hosts)],
            [keys.INSTANCE_PREFIX])


def queue_one_view(pipe: Any, challenge: str, team_id: str, hosts: Sequence[str]) -> None:
    """Queue a one-instance view on a pipeline (redis-py's or ``redis.asyncio``'s).

    Its replies are the record, then each host's heartbeat.
    """
    pipe.get(_key(instance_key(challenge, team_id)))
    for host in hosts:
        pipe.get(keys.hostbeat(host))


def hostbeat_keys(hosts: Iterable[str]) -> list[str]:
    """Return the heartbeat keys of ``hosts``."""
    return [keys.hostbeat(h) for h in hosts]


def decode_view(
    docs: Iterable[str | None], hosts: Sequence[str], raw_beats: Sequence[str | None]
) -> tuple[list[Instance], Beats, list[str]]:
    """Decode a view's replies: the instances (by key), the heartbeats, and hosts still unread.

    The last are hosts the instances name that ``hosts`` did not (no longer configured).
    """
    found = sorted((Instance.model_validate_json(d) for d in docs if d), key=lambda i: i.key)
    beats: Beats = dict(zip(hosts, raw_beats, strict=True))
    return found, beats, sorted({i.host for i in found} - beats.keys())


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


# Replace KEYS[1] by ARGV[2] (or delete it when ARGV[2] is empty) only if it still holds
# ARGV[1] ('' = absent): a compare-and-set, so of two racing senders exactly one sends.
_SWAP = """
local cur = redis.call('GET', KEYS[1])
if cur == false then cur = '' end
if cur ~= ARGV[1] then return cur end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3])) end
return false
"""

# Choose the host with the most room and record the choice, in one step (see
# celery_app.hosts.placement.pick_host). KEYS: each candidate's placing zset; ARGV: now, window, the
# instance, the instance-record and host-set prefixes, then (name, max) per candidate, then
# each candidate's set of ready warm-pool slots of the challenge (issue 14; "" for none), then
# the containers the new instance needs and the prefix of the hosts' extra-container hashes.
# Room counts containers, as the reservation does; a placement on its way counts its own:
# one whose instance is k > 1 containers is the member ``<instance>#<k>``.
_PLACE = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local inst_prefix, host_prefix = ARGV[4], ARGV[5]
local size, extra_prefix = tonumber(ARGV[6 + 3 * #KEYS]), ARGV[7 + 3 * #KEYS]
local member = ARGV[3]
if size > 1 then member = member .. '#' .. size end
local best, best_room, best_key, best_ready = '', 0, nil, false
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local name = ARGV[4 + 2 * i]
  -- one placement per instance: a start of it already on its way keeps its host
  if redis.call('ZSCORE', key, member) then
    redis.call('ZADD', key, now, member)
    return name
  end
  local used = redis.call('SCARD', host_prefix .. name)
  for _, placed in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local inst, weight = string.match(placed, '^(.*)#(%d+)$')
    if not inst then inst, weight = placed, 1 end
    if redis.call('EXISTS', inst_prefix .. inst) == 1 then redis.call('ZREM', key, placed)
    else used = used + tonumber(weight) end
  end
  -- room counted here, in the same step: an instance reserved meanwhile left the placements
  -- and joined the host's instances, and is counted once either way
  for _, n in ipairs(redis.call('HVALS', extra_prefix .. name)) do used = used + tonumber(n) end
  local room = tonumber(ARGV[5 + 2 * i]) - used
  -- warm pools (issue 14): a host with a ready pool container of the challenge comes first
  local ready_key = ARGV[5 + 2 * #KEYS + i]
  local ready = ready_key ~= '' and redis.call('SCARD', ready_key) > 0
  local better = (ready and not best_ready) or (ready == best_ready and room > best_room)
  if room >= size and better then
    best, best_room, best_key, best_ready = name, room, key, ready
  end
end
if best_key then
  redis.call('ZADD', best_key, now, member)
  redis.call('EXPIRE', best_key, math.ceil(window) + 1)
end
return best
"""

# One global counter orders every request; the instance keeps only its latest.
_INTENT = """
local seq = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], seq .. ':' .. ARGV[1], 'EX', 86400)
return seq
"""


def placing_key(host: str) -> str:
    """The zset of placements on ``host`` whose start has not reached its worker yet."""
    return keys.placing(host)


_key = keys.instance


def _mark_done(pipe: Any, done: Done | None) -> None:
    """Queue the write of a task's answer (``ctf:done:<task_id>``) on a MULTI pipeline."""
    if done is not None:
        task_id, answer = done
        pipe.set(keys.done(task_id), answer, ex=DONE_TTL)


@contextlib.contextmanager
def one_at_a_time(lock: Lock, what: str) -> Iterator[bool]:
    """Try ``lock`` once: yield whether it is ours (a pass another holds is skipped).

    Released in ``finally`` when taken; one that expired meanwhile is no error.
    """
    with map_redis_errors(f"{what} lock"):
        taken = bool(lock.acquire(blocking=False))
    try:
        yield taken
    finally:
        if taken:
            with contextlib.suppress(LockError), map_redis_errors(f"{what} unlock"):
                lock.release()


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
        self._swap = client.register_script(_SWAP)
        self._place = client.register_script(_PLACE)
        self._team_view = client.register_script(TEAM_VIEW)
        self._pools: PoolKeys | None = None
        self.audit = AuditLog(client)  # the audit trail and the flags' owners (SPEC §13)

    @property
    def solvers(self) -> SolverResults:
        """The solvers' outcomes (SPEC §14), on this store's client."""
        return SolverResults(self.redis)

    def canary_lock(self, host: str, timeout: float) -> Lock:
        """The lock one canary pass of ``host`` holds (one worker per host runs them)."""
        return cast(Lock, self.redis.lock(keys.canary(host), timeout=timeout))

    @property
    def pools(self) -> PoolKeys:
        """The warm pools' keys and atomic steps (issue 14), on this store's client."""
        if self._pools is None:
            self._pools = PoolKeys(self.redis)
        return self._pools

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        """Connect to Redis at ``url``."""
        return cls(
            redis.Redis.from_url(
                url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                health_check_interval=30,
            )
        )

    def close(self) -> None:
        """Release the connections."""
        self.redis.close()

    def ping(self) -> bool:
        """Return whether Redis answers."""
        try:
            return bool(self.redis.ping())
        except redis.exceptions.RedisError:
            return False

    # -- locks ------------------------------------------------------------------------------

    def instance_lock(self, challenge: str, team_id: str, timeout: float) -> Lock:
        """A lock on one (challenge, team); it expires after ``timeout`` if its holder dies."""
        return cast(Lock, self.redis.lock(keys.lock(instance_key(challenge, team_id)),
                                          timeout=timeout))

    def network_lock(self, team_id: str) -> Lock:
        """A short lock on a team's network (creation and removal).

        It is held for one network and container creation (a second or two), and expires
        after ``NETWORK_LOCK_HOLD`` seconds if its holder dies, so a killed worker's lock
        delays the team's next start by at most that long.
        """
        return cast(Lock, self.redis.lock(keys.netlock(team_id), timeout=NETWORK_LOCK_HOLD))

    @contextlib.contextmanager
    def holding(self, challenge: str, team_id: str, hold: float, wait: float) -> Iterator[Lock]:
        """Hold the (challenge, team) lock; released in ``finally``, expires if we die.

        It expires ``hold`` seconds after it was last renewed, so a worker killed mid-start
        blocks the instance for at most that long; a live holder renews it while it waits.

        Raises:
            InstanceBusy: another operation held it for ``wait`` seconds.
        """
        lock = self.instance_lock(challenge, team_id, timeout=hold)
        with map_redis_errors("lock instance"):
            acquired = lock.acquire(blocking=True, blocking_timeout=wait)
        if not acquired:
            raise InstanceBusy(
                f"another operation on {challenge} for team {team_id} is still running; "
                "try again shortly"
            )
        try:
            yield lock
        finally:
            with contextlib.suppress(LockError), map_redis_errors("unlock instance"):
                lock.release()  # LockError: it expired and may be someone else's now

    @contextlib.contextmanager
    def holding_network(self, team_id: str, wait: float = 60) -> Iterator[None]:
        """Hold the team's network lock (see :meth:`network_lock`); released in ``finally``."""
        lock = self.network_lock(team_id)
        with map_redis_errors("lock network"):
            if not lock.acquire(blocking=True, blocking_timeout=wait):
                raise InstanceBusy(f"the network of team {team_id} is busy; try again shortly")
        try:
            yield
        finally:
            with contextlib.suppress(LockError), map_redis_errors("unlock network"):
                lock.release()

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
                keys=[_key(inst.key), keys.team(inst.team_id), keys.EXPIRY,
                      keys.host(inst.host), placing_key(inst.host), keys.EXTRA,
                      keys.hostextra(inst.host)],
                args=[inst.key, inst.team_id, inst.host, per_team, global_max, host_max,
                      inst.expires.timestamp(), inst.model_dump_json(), inst.containers],
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
        verdict, _, used = str(result).partition(":")
        needs = (f"; this instance is {inst.containers} containers"
                 if inst.containers > 1 else "")
        if verdict == "global":
            raise CapacityExhausted(
                f"the service runs {used} of its {global_max} containers (CTF_MAX_INSTANCES: "
                f"an instance of k services counts k){needs}; try again when some have "
                "expired, or raise the limit"
            )
        if verdict == "host":
            raise CapacityExhausted(
                f"host {inst.host} runs {used} of its {host_max} containers (max_instances: "
                f"an instance of k services counts k){needs}; use another host"
            )

    def put(self, inst: Instance, done: Done | None = None) -> None:
        """Write (or overwrite) an instance and its index entries.

        ``done`` (task id, answer) records, in the same MULTI step, that this write is that
        task's effect (:meth:`applied`).
        """
        with map_redis_errors("write instance"):
            pipe = self.redis.pipeline()
            pipe.set(_key(inst.key), inst.model_dump_json())
            pipe.sadd(keys.team(inst.team_id), inst.key)
            pipe.sadd(keys.host(inst.host), inst.key)
            pipe.zadd(keys.EXPIRY, {inst.key: inst.expires.timestamp()})
            if inst.containers > 1:  # what the limits count (reconcile re-adds it here)
                pipe.hset(keys.EXTRA, inst.key, inst.containers - 1)
                pipe.hset(keys.hostextra(inst.host), inst.key, inst.containers - 1)
            _mark_done(pipe, done)
            pipe.execute()

    def delete(self, challenge: str, team_id: str, host: str | None = None,
               done: Done | None = None) -> None:
        """Forget an instance (no error when it was not recorded); ``done`` as for :meth:`put`."""
        key = instance_key(challenge, team_id)
        with map_redis_errors("delete instance"):
            if host is None:
                raw = self.redis.get(_key(key))
                host = Instance.model_validate_json(raw).host if raw else "local"
            pipe = self.redis.pipeline()
            pipe.delete(_key(key))
            pipe.srem(keys.team(team_id), key)
            pipe.srem(keys.host(host), key)
            pipe.zrem(keys.EXPIRY, key)
            pipe.hdel(keys.EXTRA, key)
            pipe.hdel(keys.hostextra(host), key)
            _mark_done(pipe, done)
            pipe.execute()

    def remember(self, task_id: str, answer: str) -> None:
        """Record a task's answer when it had nothing to apply (see :meth:`applied`)."""
        with map_redis_errors("record task answer"):
            self.redis.set(keys.done(task_id), answer, ex=DONE_TTL)

    def applied(self, task_id: str | None) -> str | None:
        """Return the answer of a task whose effect is applied (``put``/``delete`` ``done``).

        ``None`` when it is not (or ``task_id`` is ``None``: a call outside any task). A
        redelivered start, stop or extend (its worker died after the effect, before Celery
        stored the answer) answers this instead of applying its effect a second time.
        """
        if not task_id:
            return None
        with map_redis_errors("read task answer"):
            raw = self.redis.get(keys.done(task_id))
        return str(raw) if raw else None

    def _load(self, members: Iterable[str]) -> builtins.list[Instance]:
        members = sorted(members)
        if not members:
            return []
        with map_redis_errors("read instances"):
            docs = self.redis.mget([_key(k) for k in members])
        return [Instance.model_validate_json(d) for d in docs if d]

    def list(
        self, team_id: str | None = None, challenge: str | None = None, host: str | None = None
    ) -> builtins.list[Instance]:
        """Return the recorded instances, filtered by what is given."""
        with map_redis_errors("list instances"):
            if team_id is not None:
                members = cast(set[str], self.redis.smembers(keys.team(team_id)))
            elif host is not None:
                members = cast(set[str], self.redis.smembers(keys.host(host)))
            else:
                members = set(cast(builtins.list[str], self.redis.zrange(keys.EXPIRY, 0, -1)))
        found = self._load(members)
        return [
            i for i in found
            if (challenge is None or i.challenge == challenge) and (host is None or i.host == host)
        ]

    def view(
        self, team_id: str, challenge: str | None, hosts: Sequence[str]
    ) -> tuple[builtins.list[Instance], Beats]:
        """Return the team's instances (of ``challenge`` only, when given) and the heartbeats.

        Without ``challenge`` the global instances (SPEC §13) come too: every team sees them.

        One round trip (two when an instance names a host that ``hosts`` does not), where
        :meth:`list` plus :meth:`heartbeats` take three.

        Args:
            team_id: the team.
            challenge: one challenge, or ``None`` for all of the team's.
            hosts: the configured hosts, whose heartbeats come back too.

        Returns:
            The instances sorted by key, and every host's raw heartbeat.

        Raises:
            RedisUnavailable: Redis cannot be reached.

        """
        names = builtins.list(hosts)
        with map_redis_errors("read instances"):
            if challenge is None:
                keys_, args = team_view_keys(team_id, names)
                docs, raw = self._team_view(keys=keys_, args=args)
            else:
                pipe = self.redis.pipeline(transaction=False)
                queue_one_view(pipe, challenge, team_id, names)
                replies = pipe.execute()
                docs, raw = replies[:1], replies[1:]
        found, beats, unread = decode_view(docs, names, raw)
        if unread:
            beats |= dict(zip(unread, self.heartbeats(unread), strict=True))
        return found, beats

    def count(self, host: str | None = None) -> int:
        """Return how many containers the recorded instances use (on ``host`` when given).

        What ``CTF_MAX_INSTANCES`` and a host's ``max_instances`` count: one per instance of
        one image, k per instance of a Compose file of k services.
        """
        with map_redis_errors("count instances"):
            pipe = self.redis.pipeline(transaction=False)
            if host is None:
                pipe.zcard(keys.EXPIRY)
                pipe.hvals(keys.EXTRA)
            else:
                pipe.scard(keys.host(host))
                pipe.hvals(keys.hostextra(host))
            records, extra = pipe.execute()
        return int(records) + sum(int(n) for n in extra)

    def expired(self, now: float) -> builtins.list[str]:
        """Return the keys of instances whose expiry is at or before ``now`` (epoch s)."""
        with map_redis_errors("read expiry index"):
            return cast(builtins.list[str], self.redis.zrangebyscore(keys.EXPIRY, "-inf", now))

    # -- intents: the latest start/stop request of an instance wins --------------------------

    def register_intent(self, challenge: str, team_id: str, op: str) -> int:
        """Record a start/stop request of an instance; return its sequence number."""
        key = keys.intent(instance_key(challenge, team_id))
        with map_redis_errors("register intent"):
            return int(self._intent(keys=[key, keys.INTENT_SEQ], args=[op]))

    def superseded(self, challenge: str, team_id: str, seq: int, op: str) -> bool:
        """Whether a request newer than ``seq`` asked for the opposite of ``op``."""
        with map_redis_errors("read intent"):
            raw = self.redis.get(keys.intent(instance_key(challenge, team_id)))
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
            wait = float(self._rate(keys=[keys.rate(team_id)],
                                    args=[now, window, limit, f"{now}:{os.urandom(4).hex()}"]))
        if wait > 0:
            raise RateLimited(
                f"team {team_id} made {limit} start/stop requests in the last {window} s; "
                f"wait {int(wait) + 1} s and try again"
            )

    # -- placement (used by the hosts module) ---------------------------------------------

    def place(self, candidates: Sequence[tuple[str, int]], member: str, now: float,
              window: float, ready_keys: Sequence[str] | None = None,
              containers: int = 1) -> str:
        """Choose the candidate ``(host, max)`` with the most room and record the choice.

        Room is ``max`` minus the containers of the host's instances and its placements
        younger than ``window`` s (one each), counted in the same step that records the
        choice; a host needs room for ``containers`` (the new instance's). A placement of
        ``member`` already on its way keeps its host. A candidate whose set in
        ``ready_keys`` (one per candidate) holds a ready warm-pool slot comes first.

        Returns:
            The chosen host, or ``""`` when none has room.

        """
        args: builtins.list[Any] = [now, window, member, keys.INSTANCE_PREFIX, keys.HOST_PREFIX]
        for name, most in candidates:
            args += [name, most]
        args += list(ready_keys) if ready_keys else [""] * len(candidates)
        args += [containers, keys.hostextra("")]
        with map_redis_errors("place instance"):
            return str(self._place(keys=[placing_key(name) for name, _ in candidates],
                                   args=args) or "")

    # -- heartbeats (used by the hosts module) --------------------------------------------

    def heartbeats(self, hosts: Sequence[str]) -> builtins.list[str | None]:
        """Return each host's raw heartbeat (``None`` where there is none)."""
        with map_redis_errors("read host heartbeats"):
            return cast(builtins.list[str | None],
                        self.redis.mget(hostbeat_keys(hosts)))

    def beat(self, host: str, value: str, ttl: float) -> None:
        """Publish a host's heartbeat; it lapses after ``ttl`` seconds."""
        with map_redis_errors("publish heartbeat"):
            self.redis.set(keys.hostbeat(host), value, px=int(ttl * 1000))

    def heartbeat(self, host: str) -> str | None:
        """Return a host's raw heartbeat, or ``None``."""
        with map_redis_errors("read heartbeat"):
            raw = self.redis.get(keys.hostbeat(host))
        return str(raw) if raw else None

    def drop_heartbeat(self, host: str) -> None:
        """Withdraw a host's heartbeat."""
        with map_redis_errors("withdraw heartbeat"):
            self.redis.delete(keys.hostbeat(host))

    # -- reconcile's epoch and the janitor ---------------------------------------------------

    def mark_reconciled(self, host: str) -> None:
        """Note that this host's index is complete (reconcile just rebuilt it)."""
        with map_redis_errors("mark reconciled"):
            self.redis.set(keys.epoch(host), str(time.time()))

    def index_is_complete(self, host: str) -> bool:
        """Whether Redis still holds the host's index since its last reconcile."""
        with map_redis_errors("read epoch"):
            return bool(self.redis.exists(keys.epoch(host)))

    def janitor_lock(self, host: str, timeout: float) -> Lock:
        """The lock that lets one janitor pass at a time run on ``host``."""
        return cast(Lock, self.redis.lock(keys.janitor(host), timeout=timeout))

    def count_removals(self, counts: Mapping[str, int]) -> None:
        """Add what a janitor pass removed, by kind, to the counters ``/metrics`` shows."""
        with map_redis_errors("count janitor removals"):
            pipe = self.redis.pipeline()
            for kind, n in counts.items():
                if n:
                    pipe.hincrby(keys.JANITOR_COUNTS, kind, n)
            pipe.execute()

    def removals(self) -> dict[str, str]:
        """Return the janitors' removal counters, by kind."""
        with map_redis_errors("read janitor counters"):
            return dict(self.redis.hgetall(keys.JANITOR_COUNTS) or {})

    # -- access generations: revocation of a team's token, links, cookies and hosts -------

    def access_generation(self, team_id: str) -> int:
        """Return the team's access generation (0 until its first revocation)."""
        with map_redis_errors("read access generation"):
            raw = self.redis.get(keys.access(team_id))
        return int(raw or 0)

    def revoke_access(self, team_id: str) -> int:
        """Raise the team's access generation by one; return the new one.

        Kept for good (no expiry): a generation that fell back to an older value would make
        revoked tokens valid again.
        """
        with map_redis_errors("revoke access"):
            return int(self.redis.incr(keys.access(team_id)))

    # -- tasks: who sent them, and the pending one of each instance (the dispatcher) ------

    def set_task_owner(self, task_id: str, doc: str, ttl: int) -> None:
        """Record who sent a task (``doc``: JSON) for ``ttl`` seconds."""
        with map_redis_errors("record task owner"):
            self.redis.set(keys.task(task_id), doc, ex=ttl)

    def task_owner(self, task_id: str) -> str | None:
        """Return the JSON recorded by :meth:`set_task_owner`, or ``None``."""
        with map_redis_errors("read task owner"):
            raw = self.redis.get(keys.task(task_id))
        return str(raw) if raw else None

    def pending(self, kind: str, challenge: str, team_id: str) -> str:
        """Return the raw pending-task marker of an instance (``""`` when none)."""
        with map_redis_errors("read pending task"):
            return str(self.redis.get(keys.pending(kind, instance_key(challenge, team_id)))
                       or "")

    def swap_pending(self, kind: str, challenge: str, team_id: str, expected: str, new: str,
                     ttl: int) -> bool:
        """Replace the marker by ``new`` (``""``: delete) if it still holds ``expected``."""
        key = keys.pending(kind, instance_key(challenge, team_id))
        with map_redis_errors("record pending task"):
            return self._swap(keys=[key], args=[expected, new, ttl]) is None

    # -- misc -------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Return a small summary for health checks."""
        with map_redis_errors("info"):
            return {"instances": self.count()}
