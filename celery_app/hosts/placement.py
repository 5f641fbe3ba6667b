"""Placement over several Docker hosts (SPEC §10): capacity, and which host gets an instance.

Celery and Redis do the distribution: the :class:`~celery_app.api.client.Dispatcher` picks a
host for a new instance here and sends the start to that host's queue; every later task of the
instance goes to the queue of the host recorded in it. A host without a live worker
(:mod:`celery_app.hosts.liveness`) gets no new instance.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery_app.errors import BackendUnavailable, CapacityExhausted
from celery_app.hosts.hostsfile import Hosts
from celery_app.hosts.liveness import heartbeats, liveness
from celery_app.hosts.routing import host_queue
from celery_app.state.pool_keys import PoolKeys
from celery_app.state.store import StateStore
from celery_app.vocab.models import Instance


@dataclass(frozen=True)
class HostLoad:
    """One host's capacity as the API and the CLI show it."""

    name: str
    public_host: str
    used: int
    max: int
    alive: bool
    last_seen: float | None

    @property
    def room(self) -> int:
        """How many more containers fit on it (an instance of k services takes k)."""
        return max(0, self.max - self.used)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able view."""
        return {"name": self.name, "public_host": self.public_host, "used": self.used,
                "max": self.max, "room": self.room, "alive": self.alive,
                "last_seen": self.last_seen, "queue": host_queue(self.name)}


def host_loads(hosts: Hosts, store: StateStore) -> list[HostLoad]:
    """Return every host's used/max instances and liveness (file order)."""
    beats = heartbeats(store, hosts)
    alive = liveness(beats)
    loads = []
    for name, cfg in hosts.items():
        beat = beats.get(name)
        assert cfg.max_instances is not None
        loads.append(HostLoad(
            name=name, public_host=cfg.public_host, used=store.count(host=name),
            max=cfg.max_instances, alive=alive[name],
            last_seen=beat.get("at") if beat else None,
        ))
    return loads


# A placement counts against its host until its start reserves the instance there (the
# reservation removes it; then it is counted as used) or, if that never happens, this long.
PLACING_WINDOW = 30.0



def pick_host(hosts: Hosts, store: StateStore, instance: str | None = None,
              containers: int = 1) -> str:
    """Return the live host with the most room for a new instance (ties: at random).

    Room counts containers, as the reservation does: a host has room for the instance when
    ``containers`` (its count: one per service of a Compose file) more fit under its
    ``max_instances``.

    A host with a ready warm-pool container of the instance's challenge (issue 14) is
    preferred to one with more room and none.

    The choice is recorded as a placement on its way, so a burst of starts spreads out
    instead of all seeing the same counts.

    Args:
        hosts: the configured hosts.
        store: the Redis state store.
        instance: ``<challenge>/<team>`` of the new instance (one placement per instance).
        containers: how many containers the new instance is (its challenge's).

    Raises:
        BackendUnavailable: no host is usable at all (workers gone or engines down).
        CapacityExhausted: the live hosts are full.

    """
    loads = host_loads(hosts, store)
    if not any(h.alive for h in loads):
        raise BackendUnavailable(
            "no Docker host is usable right now: "
            + ", ".join(f"{h.name} (no worker heartbeat or its engine does not answer)"
                        for h in loads)
            + "; try again shortly, or start the workers (./run-celery-worker.sh --host NAME)"
        )
    candidates = [h for h in loads if h.alive and h.room >= containers]
    if not candidates:
        seen = ", ".join(f"{h.name} {h.used}/{h.max}{'' if h.alive else ' (no worker)'}"
                         for h in loads)
        raise CapacityExhausted(
            f"no Docker host with a live worker has room ({seen}); try again when instances "
            "have expired, start the missing workers, or raise max_instances in CTF_HOSTS_FILE"
        )
    # Choose and record the choice in one Redis step: a burst of starts sees each other's
    # placements (not yet counted as instances) and spreads over the hosts.
    random.shuffle(candidates)  # ties go to a random host
    # each host's ready pool containers of the challenge (a host with one is preferred)
    challenge = (instance or "").partition("/")[0]
    chosen = store.place([(h.name, h.max) for h in candidates], instance or uuid.uuid4().hex,
                         time.time(), PLACING_WINDOW,
                         [PoolKeys.ready_key(h.name, challenge) for h in candidates],
                         containers)
    if not chosen:
        raise CapacityExhausted(
            "every Docker host with a live worker is full once the starts already on their way "
            "are counted; try again in a few seconds"
        )
    return chosen


def host_of(hosts: Hosts, store: StateStore, record: Instance | None, instance: str,
            containers: int = 1) -> str:
    """Return the Docker host that must act on an instance (SPEC §10).

    An instance that has a record lives on its recorded host; a new one is placed on the live
    host with the most room (:func:`pick_host`). The dispatcher and every worker decide the
    same way, so a task sent by name to the default queue ends on the same host as one sent
    through the API.

    Args:
        hosts: the configured hosts.
        store: the Redis state store.
        record: the instance's record, or ``None`` when it has none.
        instance: ``<challenge>/<team>``.
        containers: how many containers a new instance of it is (its challenge's).

    Raises:
        BackendUnavailable: a new instance, and no host is usable at all.
        CapacityExhausted: a new instance, and the live hosts are full.

    """
    if record is not None:
        return record.host
    return pick_host(hosts, store, instance, containers)
