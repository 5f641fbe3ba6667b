"""The warm pools' Redis keys and their atomic steps (issue 14): the only code that spells them.

Part of the state: :class:`~celery_app.state.store.StateStore` builds it (``store.pools``); the pool
rules (:mod:`celery_app.core.pool`), placement, the API and metrics go through it. The store
imports this module, never the reverse: both take ``map_redis_errors`` from
:mod:`celery_app.state.redis_errors`, below them.

Redis keys (rebuildable from Docker by the next pass, except the flag bindings, which
reconcile rebuilds from living claimed containers and AOF keeps)::

    ctf:pool:ready:<host>:<challenge>  set   parked, ready slots (a claim SPOPs one)
    ctf:pool:taken:<slot>              epoch a claim or a removal owns the slot (1 day)
    ctf:pool:members                   hash  <host>/<slot> -> challenge: unclaimed containers
                                             (they count toward CTF_MAX_INSTANCES and the
                                             host's max_instances)
    ctf:pool:held:<challenge>/<team>   set   slots the team has held (the flag check)
    ctf:pool:stats:<host>              hash  claims / misses / claim-latency buckets
    ctf:pool:drain:<challenge>         epoch unclaimed containers made before it are removed
    ctf:pool:sizes                     hash  challenge -> pool size set by ``ctfctl pool warm``
                                             (it replaces the catalog's ``pool:``; kept until
                                             reset: an organiser's choice, not rebuildable)
    ctf:pool:pass:<host>               lock  one pool pass at a time per host
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Final, cast

from celery_app.errors import CTFError
from celery_app.state.keys import POOL_PREFIX as P
from celery_app.state.redis_errors import map_redis_errors
from celery_app.vocab.naming import instance_key

# Buckets of the claim-latency histogram (seconds).
LATENCY_BUCKETS: Final = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

if TYPE_CHECKING:
    import redis
    from redis.lock import Lock

    from celery_app.state.audit import FlagOwner

# Take a ready slot: out of the ready set and the members in one step, owned by the claim.
_TAKE = """
local slot = redis.call('SPOP', KEYS[1])
if not slot then return false end
redis.call('SET', ARGV[1] .. slot, ARGV[2], 'EX', 86400)
redis.call('HDEL', KEYS[2], ARGV[3] .. '/' .. slot)
return slot
"""
# Own a slot for removal, unless a claim owns it already.
_WITHDRAW = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', 86400) then return 0 end
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
"""
# Offer a parked slot to claims, unless something owns it already.
_OFFER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""


class PoolKeys:
    """The pools' Redis keys and their atomic steps (the only code that spells them)."""

    def __init__(self, client: redis.Redis) -> None:  # the store builds it: StateStore.pools
        self.redis = client
        self._take = client.register_script(_TAKE)
        self._withdraw = client.register_script(_WITHDRAW)
        self._offer = client.register_script(_OFFER)

    @staticmethod
    def ready_key(host: str, challenge: str) -> str:
        """The set of parked, ready slots of a challenge on a host."""
        return f"{P}ready:{host}:{challenge}"

    @staticmethod
    def taken_key(slot: str) -> str:
        """Set while a claim or a removal owns the slot."""
        return f"{P}taken:{slot}"

    @staticmethod
    def held_key(challenge: str, team: str) -> str:
        """The slots a team has held for a challenge (their flags are that team's)."""
        return f"{P}held:{instance_key(challenge, team)}"

    members_key: Final = f"{P}members"

    @staticmethod
    def stats_key(host: str) -> str:
        """Claims, misses and claim-latency buckets of a host."""
        return f"{P}stats:{host}"

    @staticmethod
    def drain_key(challenge: str) -> str:
        """When the challenge's pools were last drained (epoch s)."""
        return f"{P}drain:{challenge}"

    def take(self, host: str, challenge: str) -> str | None:
        """Take one ready slot for a claim; ``None`` when none is ready."""
        with map_redis_errors("take a pool slot"):
            slot = self._take(keys=[self.ready_key(host, challenge), self.members_key],
                              args=[f"{P}taken:", time.time(), host])
        return str(slot) if slot else None

    def withdraw(self, host: str, challenge: str, slot: str) -> bool:
        """Own a slot to remove its container; ``False`` when a claim owns it."""
        with map_redis_errors("withdraw a pool slot"):
            return bool(self._withdraw(
                keys=[self.taken_key(slot), self.ready_key(host, challenge), self.members_key],
                args=[time.time(), slot, f"{host}/{slot}"]))

    def offer(self, host: str, challenge: str, slot: str) -> bool:
        """Make a parked slot claimable (unless something owns it)."""
        with map_redis_errors("offer a pool slot"):
            return bool(self._offer(keys=[self.taken_key(slot), self.ready_key(host, challenge)],
                                    args=[slot]))

    def taken_at(self, slot: str) -> float | None:
        """When a claim or removal took the slot; ``None`` while nobody owns it."""
        with map_redis_errors("read a pool slot"):
            raw = self.redis.get(self.taken_key(slot))
        return float(raw) if raw else None

    def ready(self, host: str, challenge: str) -> set[str]:
        """The ready slots of a challenge on a host."""
        with map_redis_errors("read a pool"):
            return cast(set[str], self.redis.smembers(self.ready_key(host, challenge)))

    def prune_ready(self, host: str, live: dict[str, str], challenges: list[str]) -> list[str]:
        """Drop from the ready sets of ``challenges`` every slot not in ``live``; return them.

        ``live`` (``slot -> challenge``) is what the pool pass found in Docker: a slot whose
        container was removed while no worker ran (``docker rm``, an engine reset) is no
        longer offered nor counted by ``ctf_pool_ready``. Only the pass offers slots, under
        its lock, so no slot is offered between its read of Docker and this step.
        """
        with map_redis_errors("prune a pool"):
            pipe = self.redis.pipeline(transaction=False)
            for challenge in challenges:
                pipe.smembers(self.ready_key(host, challenge))
            found = cast(list[set[str]], pipe.execute())
            gone = {challenge: [s for s in slots if live.get(s) != challenge]
                    for challenge, slots in zip(challenges, found, strict=True)}
            pipe = self.redis.pipeline(transaction=False)
            for challenge, slots in gone.items():
                if slots:
                    pipe.srem(self.ready_key(host, challenge), *slots)
            pipe.execute()
        return [slot for slots in gone.values() for slot in slots]

    def ready_count(self, host: str, challenge: str) -> int:
        """How many slots of a challenge are ready on a host."""
        with map_redis_errors("read a pool"):
            return int(cast(int, self.redis.scard(self.ready_key(host, challenge))))

    def members(self, host: str | None = None) -> dict[str, str]:
        """``slot -> challenge`` of the unclaimed containers (of ``host``, or ``host/slot``)."""
        with map_redis_errors("read pool members"):
            raw = cast(dict[str, str], self.redis.hgetall(self.members_key))
        if host is None:
            return raw
        prefix = f"{host}/"
        return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}

    def add_member(self, host: str, slot: str, challenge: str) -> None:
        """Count an unclaimed container (from before it exists: capacity is reserved)."""
        with map_redis_errors("count a pool container"):
            self.redis.hset(self.members_key, f"{host}/{slot}", challenge)

    def set_members(self, host: str, live: dict[str, str]) -> None:
        """Make the host's members exactly ``live`` (``slot -> challenge``), from Docker."""
        stale = [f"{host}/{s}" for s in self.members(host) if s not in live]
        with map_redis_errors("count pool containers"):
            pipe = self.redis.pipeline()
            if stale:
                pipe.hdel(self.members_key, *stale)
            for slot, challenge in live.items():
                pipe.hset(self.members_key, f"{host}/{slot}", challenge)
            pipe.execute()

    def bind(self, challenge: str, team: str, slot: str, owner: FlagOwner | None = None) -> None:
        """Record that ``team`` holds ``slot``: its flags are that team's from now on.

        ``owner``: the slot's flag, recorded as the team's in the same round trip (the audit
        trail's flag-sharing check, :mod:`celery_app.state.audit`).
        """
        with map_redis_errors("bind a pool slot"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(self.held_key(challenge, team), slot)
            if owner is not None:
                owner.queue(pipe)
            pipe.execute()

    def held(self, challenge: str, team: str) -> set[str]:
        """The slots ``team`` has held for ``challenge``."""
        with map_redis_errors("read pool bindings"):
            return cast(set[str], self.redis.smembers(self.held_key(challenge, team)))

    def count(self, host: str, challenge: str, what: str, latency: float | None = None) -> None:
        """Count a claim (with its latency) or a miss."""
        with contextlib.suppress(CTFError), map_redis_errors("count a pool claim"):
            pipe = self.redis.pipeline()
            key = self.stats_key(host)
            pipe.hincrby(key, f"{what}|{challenge}", 1)
            if latency is not None:
                for bound in (*LATENCY_BUCKETS, float("inf")):
                    if latency <= bound:
                        pipe.hincrby(key, f"le|{challenge}|{bound}", 1)
                pipe.hincrbyfloat(key, f"sum|{challenge}", latency)
            pipe.execute()

    def stats(self, host: str) -> dict[str, str]:
        """The raw counters of a host."""
        with map_redis_errors("read pool counters"):
            return cast(dict[str, str], self.redis.hgetall(self.stats_key(host)))

    def drain(self, challenge: str) -> float:
        """Ask every host to remove the challenge's unclaimed containers made until now."""
        now = time.time()
        with map_redis_errors("drain a pool"):
            self.redis.set(self.drain_key(challenge), str(now), ex=86400)
        return now

    def drained_at(self, challenge: str) -> float:
        """When the challenge's pools were last drained (0: never)."""
        with map_redis_errors("read a pool drain"):
            raw = self.redis.get(self.drain_key(challenge))
        return float(raw) if raw else 0.0

    sizes_key: Final = f"{P}sizes"

    def set_size(self, challenge: str, size: int | None) -> None:
        """Set the pool size of ``challenge`` on every host (``None``: the catalog's again)."""
        with map_redis_errors("size a pool"):
            if size is None:
                self.redis.hdel(self.sizes_key, challenge)
            else:
                self.redis.hset(self.sizes_key, challenge, str(size))

    def sizes(self) -> dict[str, int]:
        """The pool sizes set by ``ctfctl pool warm`` (``challenge -> size``)."""
        with map_redis_errors("read pool sizes"):
            raw = cast(dict[str, str], self.redis.hgetall(self.sizes_key))
        return {k: int(v) for k, v in raw.items() if v.isdigit()}

    def pass_lock(self, host: str) -> Lock:
        """The lock of one host's pool pass (one at a time per host, 120 s at most)."""
        return self.redis.lock(f"{P}pass:{host}", timeout=120)
