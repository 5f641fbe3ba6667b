"""Warm pools (issue 14): instances booted ahead of time, then claimed by a team's start.

A challenge with ``pool: N`` keeps, on each host, N containers booted, probed ready and
claimed by nobody. The life of one pool container:

1. **Boot** (:meth:`Pool.run_once`, the ``refill_pools`` task): created like a cold start's
   container (same hardening, same image, ports published as a cold one's), but named
   ``ctfpool-<challenge>-<slot>`` and labelled ``ctf.pool=<slot>`` with *no* ``ctf.team``,
   on a network of its own, ``ctfpool-<challenge>-<slot>`` (a bridge whose subnet comes from
   ``CTF_TEAM_SUBNET_POOL``, labelled with the slot), admitted by the egress firewall with
   the challenge's egress as a cold start's container is (issue 27).
   Its ``flag_env`` (Juice Shop's ``CTF_KEY``) is the *slot's* flag (:func:`slot_flag`).
2. **Ready**: once it answers the cold start's readiness probe (an HTTP GET of the health
   path, or a TCP connect, on its address) its slot joins the ready set. It stays where it
   is: on its own network, reaching nothing of anyone (the firewall) and reached by no team.
3. **Claim** (:meth:`Pool.claim`, from ``InstanceService.start`` step 7, under the instance
   lock): the slot leaves the ready set in one Redis step (two starts never get one
   container), is bound to the team (:meth:`PoolKeys.bind`, for the flag check), and the
   container is renamed ``ctf-<challenge>-<team>``: no network call, its network becomes
   the instance's (one network per pooled instance, as a Compose instance has; SPEC §4,
   §12). From then on it is an instance like any other (the start records, routes and
   probes it as a cold one); its stop removes its network with it. Labels cannot change,
   so the name is what tells Docker's truth after a Redis loss
   (:func:`celery_app.vocab.naming.read_claim`), and its times count from its boot then.

A Compose challenge's slot (SPEC §12, issue 24) is a whole group: every service booted by
:func:`~celery_app.core.group.start_group` in ``depends_on`` order on the slot's own network
``ctfpool-<challenge>-<slot>`` (from ``CTF_TEAM_SUBNET_POOL``, labelled ``ctf.pool=<slot>``),
named ``ctfpool-<challenge>-<slot>`` (the primary endpoint's service) and ``…<slot>.<service>``,
its ``${CTF_FLAG}`` the slot's flag, offered once every endpoint answers. A claim
(:meth:`Pool.claim_group`) binds the slot and renames the services for the team, the primary
last; it makes no network call: the slot's network stays the instance's. A file that uses
``${CTF_TEAM}`` cannot be pooled (the catalog refuses it). The pass judges, removes and gives
way with groups whole.

Redis keys: :mod:`celery_app.state.pool_keys` (part of the state; it lists them).

:class:`Pool` is handed the parts it uses (settings, catalog, driver, store, the host's
:class:`~celery_app.core.specs.InstanceSpecs` and egress guard), never the service: the
service builds it and hands it to ``InstanceSpecs.create`` as its warm pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from celery_app.core.audit import flag_digest
from celery_app.core.catalog import Catalog, Challenge
from celery_app.core.flags import in_app_flag, team_flag
from celery_app.core.group import start_group
from celery_app.core.readiness import probe_once
from celery_app.core.specs import InstanceSpecs
from celery_app.engine.driver import ContainerInfo, Driver, carries
from celery_app.engine.firewall import EgressGuard
from celery_app.errors import CTFError
from celery_app.settings import Settings
from celery_app.state.audit import FlagOwner
from celery_app.state.pool_keys import LATENCY_BUCKETS, PoolKeys
from celery_app.state.store import StateStore, one_at_a_time
from celery_app.vocab.models import Instance
from celery_app.vocab.naming import (
    LABEL_CHALLENGE,
    LABEL_EGRESS,
    LABEL_HOST,
    LABEL_POOL,
    LABEL_SERVICE,
    POOL_NAME_PREFIX,
    container_name,
    holding_network_name,
    pool_container_name,
    pool_network_name,
    read_claim,
)

log = logging.getLogger(__name__)

# Pool containers one host boots at a time: a boot costs CPU that user starts need too.
BOOT_AT_ONCE: Final = 4
# ...and while a user's start is in flight on the host (issue 27): fewer, but not none, so a
# pool drained by a sustained opening refills while the starts go on (with none, a stream
# of cold starts, each seconds long, kept it empty for as long as the stream lasted).
BOOT_BESIDE_STARTS: Final = 2
# Seconds after which a claim (or removal) that owns a slot but never finished is undone.
STALE_CLAIM: Final = 120.0
# Seconds one pooled Compose group may take to boot inside a pass (the pass lock lasts 120 s).
GROUP_BOOT_LIMIT: Final = 90.0
# Seconds a worker keeps the pool sizes set by ``ctfctl pool warm`` before reading them again
# (a start of any challenge asks whether it is pooled: one Redis read a second, not a start).
SIZES_TTL: Final = 1.0
# The largest pool size ``ctfctl pool warm`` sets (per host; capacity limits hold anyway).
MAX_WARM: Final = 1000

def slot_flag(secret: str, challenge: str, slot: str, fmt: str = "CTF{{{digest}}}") -> str:
    """Return the flag a pool container of ``slot`` boots with (before any team holds it).

    It is :func:`celery_app.core.flags.team_flag` of the pseudo-team ``pool:<slot>``: team ids
    cannot contain ``:``, so it is never any team's own flag.
    """
    return team_flag(secret, challenge, f"pool:{slot}", fmt)


def holding_network(host: str, scope: dict[str, str], subnets: str) -> str:
    """The holding network of ``host``: one per subnet pool (and deployment's extra labels).

    Its subnet must come from the current ``CTF_TEAM_SUBNET_POOL`` (the egress firewall's
    range), so a new pool gets a new holding network rather than reusing one outside it.
    """
    key = repr((subnets, sorted(scope.items())))
    return holding_network_name(host, hashlib.sha256(key.encode()).hexdigest()[:8])


def flag_held(
    keys: PoolKeys, secret: str, challenge: str, team: str, submitted: str,
    fmt: str = "CTF{{{digest}}}", name: str | None = None,
) -> bool:
    """Whether ``submitted`` is the flag of a pool container ``team`` has held (constant time).

    Args:
        keys: the pools' Redis keys.
        secret: ``CTF_FLAG_SECRET``.
        challenge: the challenge.
        team: the team that submits.
        submitted: the flag.
        fmt: the flag format.
        name: an in-app challenge's name (Juice Shop): the flag is the app's, under the key
            the pool container booted with.
    """
    wanted = submitted.strip()
    if name is not None:
        wanted = wanted.lower()
    found = False
    for slot in keys.held(challenge, team):
        key = slot_flag(secret, challenge, slot, fmt)
        expected = in_app_flag(key, name) if name is not None else key
        found |= hmac.compare_digest(expected.encode(), wanted.encode())
    return found


@dataclass
class PoolSummary:
    """What one pool pass did on one host."""

    booted: list[str] = field(default_factory=list)
    ready: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: bool = False
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able summary."""
        return {"booted": self.booted, "ready": self.ready, "removed": self.removed,
                "skipped": self.skipped, "errors": self.errors}


class Pool:
    """The warm pools of one host: claims for starts, and the pass that keeps them full.

    Args:
        settings: the service settings (subnets, flags, the global instance limit).
        catalog: the challenges (which are pooled, and how many).
        driver: the host's engine.
        store: the state store (its ``pools`` keys, and the instance counts).
        specs: the host's instance specs (hardening, port rule, image policy, scope labels).
        egress: the host's egress firewall (admit at boot, release at removal).
        host: the host's name.
        host_max: the host's ``max_instances`` (0: no per-host limit).
    """

    def __init__(self, settings: Settings, catalog: Catalog, driver: Driver, store: StateStore,
                 specs: InstanceSpecs, egress: EgressGuard, host: str,
                 host_max: int = 0) -> None:
        self.settings = settings
        self.catalog = catalog
        self.driver = driver
        self.store = store
        self.specs = specs
        self.egress = egress
        self.host = host
        self.host_max = host_max
        self.keys = store.pools
        self.scope_labels = specs.scope_labels
        self.network = holding_network(host, self.scope_labels, settings.team_subnet_pool)
        self._sizes: tuple[float, dict[str, int]] = (float("-inf"), {})

    def size(self, ch: Challenge) -> int:
        """The pool size of ``ch`` on each host: ``ctfctl pool warm``'s, else the catalog's.

        Read from Redis at most once a second per worker (``SIZES_TTL``); a Redis error
        keeps the last sizes read (a start must not fail for the pools' sake).
        """
        at, sizes = self._sizes
        if time.monotonic() - at > SIZES_TTL:
            with contextlib.suppress(CTFError):
                sizes = self.keys.sizes()
                self._sizes = (time.monotonic(), sizes)
        return sizes.get(ch.id, ch.pool)

    def _sized(self, ch: Challenge) -> Challenge:
        """``ch`` with its pool size as :meth:`size` says (what the pass keeps)."""
        size = self.size(ch)
        return ch if size == ch.pool else ch.model_copy(update={"pool": size})

    @property
    def usable(self) -> bool:
        """Pools need the engine's own machine: the readiness probe uses container addresses."""
        return self.driver.is_local

    def has_ready(self, ch: Challenge) -> bool:
        """Whether a start of ``ch`` here would likely claim (a ready container, one Redis call)."""
        return self.size(ch) > 0 and self.usable and self.keys.ready_count(self.host, ch.id) > 0

    def _pool_labels(self, ch: Challenge, slot: str) -> dict[str, str]:
        return {**self.scope_labels, LABEL_HOST: self.host, LABEL_CHALLENGE: ch.id,
                LABEL_POOL: slot, LABEL_EGRESS: ch.egress}

    # -- claim (InstanceService.start, step 7) ----------------------------------------------

    def _owner(self, challenge: str, team: str, slot: str) -> FlagOwner:
        """The slot's flag as ``team``'s, for the audit trail's flag-sharing check (SPEC §13)."""
        flag = slot_flag(self.settings.flag_secret_value(), challenge, slot,
                         self.settings.flag_format)
        return FlagOwner(challenge, flag_digest(flag), team, f"pool:{slot}")

    def claim(self, ch: Challenge, team: str, inst: Instance) -> ContainerInfo | None:
        """Hand a ready pool container to ``team``; ``None`` (a miss) when none is ready.

        The caller holds the (challenge, team) lock and has reserved the instance; it
        records, routes and probes what this returns exactly as it does a cold start's
        container. No network call (issue 27): the container booted on a network of its
        own (``ctfpool-<challenge>-<slot>``), which stays the instance's network, admitted by
        the egress firewall at its boot with the challenge's egress.

        Steps: 1. take a ready slot (one Redis step); 2. check the container is ours, alive,
        unclaimed and on its own network only (one inspect); 3. bind the slot to the team
        (flags); 4. rename it to the instance name (Docker's record of which team holds it).
        A container that fails any step is removed and the next ready one tried.
        """
        if self.size(ch) <= 0 or not self.usable:
            return None
        began = time.perf_counter()
        name = container_name(ch.id, team)
        while True:
            # 1. take
            slot = self.keys.take(self.host, ch.id)
            if slot is None:
                self.keys.count(self.host, ch.id, "misses")
                return None
            # 2. ours, alive, unclaimed, on its own network only
            info = self.driver.get_container(pool_container_name(ch.id, slot))
            if info is None or info.state != "running" \
                    or not carries(info.labels, self._pool_labels(ch, slot)) \
                    or self._networks(info) != {pool_network_name(ch.id, slot)}:
                self._remove(info)
                continue
            try:
                # 3. bind: from here the slot's flags are this team's (and no other's)
                self.keys.bind(ch.id, team, slot, self._owner(ch.id, team, slot))
                # 4. the instance's name: Docker's record of which team holds it
                self.driver.rename_container(info.id, name)
            except CTFError as exc:
                log.warning("pool: claim of %s for team %s failed (%s); trying the next",
                            info.name, team, exc)
                self._remove(info)
                continue
            self.keys.count(self.host, ch.id, "claims", time.perf_counter() - began)
            log.info("pool: team=%s claimed %s as %s", team, info.name, name)
            return replace(info, name=name, labels=read_claim(info.labels, name))

    def _remove(self, info: ContainerInfo | None, network: bool = True) -> None:
        """Remove a pool container (its address released first), then its own network.

        ``network=False``: a pooled group's member (the group's network goes once all do).
        """
        if info is None:
            return
        with contextlib.suppress(CTFError):
            self.egress.release(info)
            self.driver.remove_container(info.id)
        if network:
            self.remove_slot_network(info)

    def remove_slot_network(self, info: ContainerInfo) -> bool:
        """Remove the network of the pool slot ``info`` booted in (gone is fine).

        A single pooled container's network is its own (``ctfpool-<challenge>-<slot>``) and
        stays the instance's after the claim: a stop, the pass or a claim that failed
        removes it with the container. Returns whether a network was removed.
        """
        slot = info.labels.get(LABEL_POOL)
        if not slot:
            return False
        with contextlib.suppress(CTFError):
            net = self.driver.get_network(pool_network_name(info.challenge, slot))
            if net is not None and carries(net.labels, {**self.scope_labels,
                                                        LABEL_POOL: slot}):
                return self.driver.remove_network(net.id)
        return False

    # -- pooled Compose groups (SPEC §12): a slot is a whole group on a network of its own -----

    def claim_group(self, ch: Challenge, team: str,
                    inst: Instance) -> dict[str, ContainerInfo] | None:
        """Hand a ready pooled group of ``ch`` to ``team``; ``None`` (a miss) when none is ready.

        The caller holds the (challenge, team) lock and has reserved ``inst``; it records and
        probes what this returns as it does a cold group (each service's container, in start
        order). No network call: the group already sits on a network of its own, which stays
        its network. Steps: 1. take a ready slot (one Redis step); 2. list its containers
        (one call): every service there, up, unclaimed; 3. bind the slot to the team (its
        flags); 4. rename the other services, then the primary one, to the instance's names
        (the primary's name is Docker's record that the claim is whole). A group that fails a
        step is removed whole and the next ready one tried.
        """
        if self.size(ch) <= 0 or not self.usable or ch.app is None:
            return None
        began = time.perf_counter()
        layout = self.specs.layout(ch.id, team, ch.app)
        while True:
            slot = self.keys.take(self.host, ch.id)
            if slot is None:
                self.keys.count(self.host, ch.id, "misses")
                return None
            members = self._group_of_slot(ch.id, slot)
            if not self._whole(ch, slot, members):
                self._remove_group(ch.id, slot)
                continue
            try:
                self.keys.bind(ch.id, team, slot)
                for service in reversed(layout.services):  # the primary last
                    self.driver.rename_container(members[service].id, layout.of(service))
            except CTFError as exc:
                log.warning("pool: claim of group %s of %s for team %s failed (%s); trying "
                            "the next", slot, ch.id, team, exc)
                self._remove_group(ch.id, slot)
                continue
            self.keys.count(self.host, ch.id, "claims", time.perf_counter() - began)
            log.info("pool: team=%s claimed group %s of %s", team, slot, ch.id)
            # As the engine now reads them: the new names, and the team they hold (read_claim;
            # the start probes each endpoint behind the ingress at its team's host).
            return {s.name: replace(members[s.name], name=layout.of(s.name),
                                    labels=read_claim(members[s.name].labels,
                                                      layout.of(s.name)))
                    for s in ch.app.services}

    def _group_of_slot(self, challenge: str, slot: str) -> dict[str, ContainerInfo]:
        """The containers of one pooled group, by service (one list call)."""
        found = self.driver.list_containers(
            {**self.scope_labels, LABEL_HOST: self.host, LABEL_CHALLENGE: challenge,
             LABEL_POOL: slot})
        return {c.labels.get(LABEL_SERVICE, ""): c for c in found}

    def _whole(self, ch: Challenge, slot: str, members: dict[str, ContainerInfo]) -> bool:
        """Whether every service of the slot's group is there, unclaimed and up (or done)."""
        assert ch.app is not None
        names = self.specs.pool_layout(ch, slot)
        for service in ch.app.services:
            c = members.get(service.name)
            if c is None or c.name != names.of(service.name):
                return False
            if c.state != "running":
                seen = self.driver.get_container(c.id)  # a list has no exit code
                if seen is None or not ch.app.done(service.name, seen.state, seen.exit_code):
                    return False
        return True

    def _remove_group(self, challenge: str, slot: str) -> None:
        """Remove a pooled group whole: its containers, then its network (gone is fine)."""
        with contextlib.suppress(CTFError):
            for c in self._group_of_slot(challenge, slot).values():
                self._remove(c, network=False)
            net = self.driver.get_network(pool_network_name(challenge, slot))
            if net is not None and carries(net.labels, self.scope_labels):
                self.driver.remove_network(net.id)

    def _remove_slot(self, challenge: str, slot: str) -> None:
        """Remove an unclaimed slot's container, or its whole group (a Compose challenge)."""
        if self._is_group(challenge):
            self._remove_group(challenge, slot)
        else:
            self._remove(self.driver.get_container(pool_container_name(challenge, slot)))

    def _is_group(self, challenge: str) -> bool:
        with contextlib.suppress(CTFError):
            return self.catalog.get(challenge).is_group
        return False

    def _group_answers(self, ch: Challenge, members: dict[str, ContainerInfo]) -> bool:
        """Every endpoint of the group answers the cold start's probe (one try each)."""
        assert ch.app is not None
        for ep in ch.app.endpoints:
            ip = members[ep.service].ip if ep.service in members else None
            if not ip or not probe_once(ip, ep.port, ep.protocol, ep.health_path, timeout=1.0):
                return False
        return True

    def _boot_group(self, ch: Challenge, slot: str) -> tuple[str, bool]:
        """Boot one pooled group of ``ch`` (counted already); return its name and readiness.

        Its services start in ``depends_on`` order on a network of its own (from the team
        subnet pool, labelled with the slot), with the slot's flag; all or nothing: a
        service that fails leaves no container and no network. A group whose endpoints
        answer at once is offered to claims now; otherwise a later pass probes it.
        """
        assert ch.app is not None
        name = pool_container_name(ch.id, slot)
        try:
            self.specs.ensure_image(ch)
            self.egress.require()  # fail closed, as a cold start
            layout = self.specs.pool_layout(ch, slot)
            labels = {**self.scope_labels, LABEL_HOST: self.host, LABEL_CHALLENGE: ch.id,
                      LABEL_POOL: slot}
            net = self.driver.ensure_named_network(
                layout.network, labels, self.settings.team_subnet_pool,
                self.settings.team_subnet_prefix)
            flag = slot_flag(self.settings.flag_secret_value(), ch.id, slot,
                             self.settings.flag_format)
            made = start_group(self.driver, self.specs.members_of(ch, layout, labels, flag, ""),
                               timeout=min(ch.start_timeout, GROUP_BOOT_LIMIT),
                               what=f"warm-pool group {name} of {ch.id}")
            for info in made.values():
                self.egress.admit(info, net)
        except BaseException:
            self.keys.withdraw(self.host, ch.id, slot)
            self._remove_group(ch.id, slot)
            raise
        ready = self._group_answers(ch, made) and self.keys.offer(self.host, ch.id, slot)
        return name, ready

    # -- capacity ---------------------------------------------------------------------------

    def _weight(self, challenge: str) -> int:
        """Containers one unclaimed slot of ``challenge`` holds: k for a group of k services.

        A challenge gone from the catalog (its leftovers wait for the pass) counts one.
        """
        with contextlib.suppress(CTFError):
            return self.catalog.get(challenge).containers
        return 1

    def _overflow(self) -> int:
        """How many containers this host (or the service) holds beyond its limit.

        The instances' containers (``StateStore.count``: k for a Compose instance of k
        services) plus the unclaimed pool containers (k for a pooled group of k services),
        against the limits that count containers. Never more than the pools hold here.
        """
        members = self.keys.members()
        weights: dict[str, int] = {}
        total = here = 0
        for key, challenge in members.items():
            if challenge not in weights:
                weights[challenge] = self._weight(challenge)
            total += weights[challenge]
            if key.startswith(f"{self.host}/"):
                here += weights[challenge]
        over = self.store.count() + total - self.settings.max_instances
        if self.host_max:
            over = max(over, self.store.count(self.host) + here - self.host_max)
        return min(over, here)

    def make_room(self) -> list[str]:
        """Remove unclaimed containers while the host is over its limit (a cold start made it).

        Starts are never refused for the pools' sake: the reservation counts the instances'
        containers only, and the pools give way here, before the start creates its
        container(s) (a Compose instance's start calls it too, for its k containers).
        """
        removed: list[str] = []
        if not self.keys.members(self.host):
            return removed  # no pool container here to give way (a cold start's usual case)
        over = self._overflow()
        if over <= 0:
            return removed
        members = self.keys.members(self.host)
        by_size = sorted(members.items(),
                         key=lambda item: -sum(1 for c in members.values() if c == item[1]))
        freed = 0  # containers, not slots: a pooled group frees its k
        for slot, challenge in by_size:
            if freed >= over:
                break
            if self.keys.withdraw(self.host, challenge, slot):
                self._remove_slot(challenge, slot)
                removed.append(pool_container_name(challenge, slot))
                freed += self._weight(challenge)
        if removed:
            log.info("pool: host=%s gave way to a start: removed %s", self.host, removed)
        return removed

    # -- the pass that keeps the pools (the refill_pools task) -------------------------------

    def run_once(self, now: float | None = None) -> PoolSummary:
        """Keep this host's pools: replace dead containers, park ready ones, remove extras, refill.

        1. one pass at a time per host; 2. read every pool container of the host from Docker;
        claimed ones re-bind their slot to their team (after a Redis loss); 3. per challenge:
        dead, drained, stale half-claims and (past the pool's size or the host's capacity)
        extras go; booting ones that answer the readiness probe are parked and offered;
        4. refill, at most ``BOOT_AT_ONCE`` booting at a time (``BOOT_BESIDE_STARTS`` while a
        user's start is in flight here) and never beyond capacity.
        """
        now = time.time() if now is None else now
        summary = PoolSummary()
        with one_at_a_time(self.keys.pass_lock(self.host), "pool pass") as ours:
            if not ours:
                summary.skipped = True
                return summary
            self._pass(now, summary)
        if summary.booted or summary.removed or summary.ready or summary.errors:
            log.info("pool host=%s %s", self.host, summary.as_dict())
        return summary

    def _pass(self, now: float, summary: PoolSummary) -> None:
        self._sizes = (float("-inf"), {})  # the pass reads the sizes afresh
        sized = [self._sized(ch) for ch in self.catalog] if self.usable else []
        pooled = {ch.id: ch for ch in sized if ch.pool > 0}
        if not pooled:
            return  # nothing to keep; leftovers of a pool set to 0 are the janitor's orphans
        # 2. Docker is the truth
        unclaimed: dict[str, list[ContainerInfo]] = {
            ch.id: [] for ch in pooled.values() if not ch.is_group}
        groups: dict[str, dict[str, list[ContainerInfo]]] = {
            ch.id: {} for ch in pooled.values() if ch.is_group}
        seen: set[str] = set()  # every single pooled container's slot, claimed or not
        for c in self.driver.list_containers({**self.scope_labels, LABEL_HOST: self.host}):
            slot = c.labels.get(LABEL_POOL)
            if not slot:
                continue
            if LABEL_SERVICE in c.labels:  # a member of a pooled Compose group: judged whole
                groups.setdefault(c.challenge, {}).setdefault(slot, []).append(c)
                continue
            seen.add(slot)
            if not c.name.startswith(POOL_NAME_PREFIX):
                if c.team_id:  # claimed: its flags stay its team's (Redis may have lost it)
                    self.keys.bind(c.challenge, c.team_id, slot,
                                   self._owner(c.challenge, c.team_id, slot))
                continue
            unclaimed.setdefault(c.challenge, []).append(c)
        live: dict[str, str] = {}
        booting = 0
        kept: dict[str, int] = {}
        for challenge, found in unclaimed.items():
            keep = self._judge(pooled.get(challenge), found, now, summary)
            ready = self.keys.ready(self.host, challenge)
            kept[challenge] = len(keep)
            booting += sum(1 for c in keep if c.labels[LABEL_POOL] not in ready)
            live.update({c.labels[LABEL_POOL]: challenge for c in keep})
        booting += self._keep_groups(pooled, groups, now, summary, kept, live)
        self._sweep_slot_networks(seen | set(self.keys.members(self.host)))
        self.keys.set_members(self.host, live)
        self._prune_ready(live, [ch.id for ch in sized])
        # 3b. the host is over capacity (instances grew): the pools give way
        for _ in range(max(0, self._overflow())):
            gone = self.make_room()
            summary.removed += gone
            if not gone:
                break
        # 4. refill, gently: one boot at a time, fewer booting while a user's start is in
        #    flight here (they come first, but the pool keeps pace with the claims)
        for ch in [c for c in pooled.values() if not c.is_group]:
            while kept.get(ch.id, 0) < ch.pool and booting < self._boot_limit() \
                    and self._overflow() < 0:
                try:
                    summary.booted.append(self._boot(ch))
                except CTFError as exc:
                    summary.errors.append(f"{ch.id}: {exc}")
                    break
                kept[ch.id] = kept.get(ch.id, 0) + 1
                booting += 1
        self._refill_groups([ch for ch in pooled.values() if ch.is_group], kept, booting,
                            summary)

    def _prune_ready(self, live: dict[str, str], challenges: list[str]) -> None:
        """Step 3a: drop ready slots whose container is gone (removed while no worker ran).

        They are then neither offered nor counted by ``ctf_pool_ready``.
        """
        if gone := self.keys.prune_ready(self.host, live, challenges):
            log.info("pool host=%s: ready slots without a container dropped: %s",
                     self.host, sorted(gone))

    def _refill_groups(self, pooled: list[Challenge], kept: dict[str, int], booting: int,
                       summary: PoolSummary) -> None:
        """Boot the missing pooled groups, side by side (at most :meth:`_boot_limit` booting).

        A group's services start in ``depends_on`` order, waiting for health checks, so a
        group boots within the pass (each counted first, as a member, so capacity holds).
        """
        boots: list[tuple[Challenge, str]] = []
        for ch in pooled:
            # room for the whole group: its k containers, each counted against the limits
            while kept.get(ch.id, 0) < ch.pool and booting + len(boots) < self._boot_limit() \
                    and self._overflow() + ch.containers <= 0:
                slot = secrets.token_hex(6)
                self.keys.add_member(self.host, slot, ch.id)  # counted before it exists
                boots.append((ch, slot))
                kept[ch.id] = kept.get(ch.id, 0) + 1
        if not boots:
            return

        def boot(item: tuple[Challenge, str]) -> tuple[str, bool] | str:
            try:
                return self._boot_group(*item)
            except CTFError as exc:
                return f"{item[0].id}: {exc}"

        with ThreadPoolExecutor(len(boots), thread_name_prefix="pool-boot") as threads:
            for outcome in threads.map(boot, boots):
                if isinstance(outcome, str):
                    summary.errors.append(outcome)
                    continue
                summary.booted.append(outcome[0])
                if outcome[1]:
                    summary.ready.append(outcome[0])

    def _keep_groups(
        self, pooled: dict[str, Challenge], groups: dict[str, dict[str, list[ContainerInfo]]],
        now: float, summary: PoolSummary, kept: dict[str, int], live: dict[str, str],
    ) -> int:
        """Judge every pooled group (:meth:`_judge_groups`); return how many still boot."""
        booting = 0
        for challenge, slots in groups.items():
            kept_slots = self._judge_groups(pooled.get(challenge), challenge, slots, now,
                                            summary)
            ready = self.keys.ready(self.host, challenge)
            kept[challenge] = len(kept_slots)
            booting += sum(1 for slot in kept_slots if slot not in ready)
            live.update(dict.fromkeys(kept_slots, challenge))
        self._sweep_group_networks(groups)
        return booting

    def _judge_groups(
        self, ch: Challenge | None, challenge: str, slots: dict[str, list[ContainerInfo]],
        now: float, summary: PoolSummary,
    ) -> list[str]:
        """Judge one challenge's pooled groups as :meth:`_judge` does containers.

        Claimed groups re-bind their flags to their team; an unclaimed group with a member
        missing, dead or renamed (a claim that died half-way), drained, stale or past the
        pool's size goes whole. Returns the unclaimed slots kept.
        """
        drained = self.keys.drained_at(challenge)
        ready = self.keys.ready(self.host, challenge)
        target = ch.pool if ch is not None else 0
        unclaimed: dict[str, list[ContainerInfo]] = {}
        for slot, found in slots.items():
            primary = next((c for c in found if ch is not None and ch.app is not None
                            and c.labels.get(LABEL_SERVICE) == ch.app.primary.service), None)
            if primary is not None and not primary.name.startswith(POOL_NAME_PREFIX):
                if primary.team_id:  # claimed: its flags stay its team's (Redis may have lost it)
                    self.keys.bind(challenge, primary.team_id, slot)
                continue
            unclaimed[slot] = found

        def made_at(found: list[ContainerInfo]) -> float:
            return min(float(c.created) if c.created.isdigit() else now for c in found)

        keep: list[str] = []
        for slot, found in sorted(unclaimed.items(),
                                  key=lambda item: (item[0] not in ready, made_at(item[1]))):
            taken = self.keys.taken_at(slot)
            if taken is not None:
                if now - taken > STALE_CLAIM:  # a claim (or removal) that died half-way
                    self._remove_group(challenge, slot)
                    summary.removed.append(pool_container_name(challenge, slot))
                continue
            made = made_at(found)
            members = {c.labels.get(LABEL_SERVICE, ""): c for c in found}
            if ch is None or made < drained or len(keep) >= target \
                    or not self._whole(ch, slot, members) \
                    or (slot not in ready and now - made > ch.start_timeout):
                if self.keys.withdraw(self.host, challenge, slot):
                    self._remove_group(challenge, slot)
                    summary.removed.append(pool_container_name(challenge, slot))
                continue
            if slot not in ready and self._group_answers(ch, members) \
                    and self.keys.offer(self.host, challenge, slot):
                summary.ready.append(pool_container_name(challenge, slot))
                ready.add(slot)
            keep.append(slot)
        return keep

    def _sweep_group_networks(self, groups: dict[str, dict[str, list[ContainerInfo]]]) -> None:
        """Remove pooled groups' networks left without any container (a boot that died)."""
        for challenge, slots in groups.items():
            members = self.keys.members(self.host)
            for net in self.driver.list_networks(
                    {**self.scope_labels, LABEL_HOST: self.host, LABEL_CHALLENGE: challenge}):
                slot = net.labels.get(LABEL_POOL)
                if not slot or slot in slots or slot in members \
                        or net.name != pool_network_name(challenge, slot):
                    continue
                with contextlib.suppress(CTFError):
                    self.driver.remove_network(net.id)  # refused while a container is on it

    def _sweep_slot_networks(self, seen: set[str]) -> None:
        """Remove single pooled containers' networks left without their container.

        A claimed instance's network goes at its stop; this catches the rest (a failed
        start's, a boot that died half-way, a container removed by hand or as an orphan).
        ``seen``: the slots of every pooled container found (or counted) now.
        """
        for net in self.driver.list_networks({**self.scope_labels, LABEL_HOST: self.host}):
            slot = net.labels.get(LABEL_POOL, "")
            challenge = net.labels.get(LABEL_CHALLENGE, "")
            if not slot or slot == "holding" or slot in seen or self._is_group(challenge) \
                    or net.name != pool_network_name(challenge, slot):
                continue
            with contextlib.suppress(CTFError):
                self.driver.remove_network(net.id)  # refused while a container is on it

    def _user_starting(self) -> bool:
        """Whether a user's start is in flight on this host (it comes first)."""
        return any(r.status == "starting" for r in self.store.list(host=self.host))

    def _boot_limit(self) -> int:
        """How many pool containers (or groups) may be booting here now.

        ``BOOT_AT_ONCE``; ``BOOT_BESIDE_STARTS`` while a user's start is in flight on the
        host: user starts come first, yet a pool drained during an opening refills while
        the starts go on (issue 27; before, it booted nothing until no start was in flight).
        """
        return BOOT_BESIDE_STARTS if self._user_starting() else BOOT_AT_ONCE

    def _judge(
        self, ch: Challenge | None, found: list[ContainerInfo], now: float,
        summary: PoolSummary,
    ) -> list[ContainerInfo]:
        """Remove what must go among one challenge's unclaimed containers; return the rest."""
        target = ch.pool if ch is not None else 0
        drained = self.keys.drained_at(found[0].challenge) if found else 0.0
        ready = self.keys.ready(self.host, found[0].challenge) if found else set()
        keep: list[ContainerInfo] = []
        for c in sorted(found, key=lambda c: (c.labels[LABEL_POOL] not in ready, c.created)):
            slot = c.labels[LABEL_POOL]
            taken = self.keys.taken_at(slot)
            if taken is not None:
                if now - taken > STALE_CLAIM:  # a claim that died half-way
                    self._remove(c)
                    summary.removed.append(c.name)
                continue
            made = float(c.created) if c.created.isdigit() else now
            # anywhere but on its own network alone: a claim that died half-way (and Redis
            # lost its mark), or a container of the layout before issue 27 (parked on no
            # network, or on the holding one); never offered to a team
            misplaced = self._networks(c) != {pool_network_name(c.challenge, slot)}
            if ch is None or c.state != "running" or made < drained or len(keep) >= target \
                    or misplaced or (slot not in ready and now - made > ch.start_timeout):
                if self.keys.withdraw(self.host, c.challenge, slot):
                    self._remove(c)
                    summary.removed.append(c.name)
                continue
            # ready: it answers the cold start's probe on its own network, where it stays
            if slot not in ready and self._answers(ch, c) \
                    and self.keys.offer(self.host, c.challenge, slot):
                summary.ready.append(c.name)
                ready.add(slot)
            keep.append(c)
        return keep

    @staticmethod
    def _networks(c: ContainerInfo) -> set[str]:
        return set((c.attrs.get("NetworkSettings") or {}).get("Networks") or {})

    def _answers(self, ch: Challenge, c: ContainerInfo) -> bool:
        """The cold start's readiness probe, on the container's holding address."""
        if not c.ip:
            return False
        port = self.specs.container_port(ch)  # a cold start's port rule
        return probe_once(c.ip, port, ch.protocol, ch.health_path, timeout=1.0)

    def _boot(self, ch: Challenge) -> str:
        """Boot one pool container of ``ch`` on a network of its own; return its name.

        The network (``ctfpool-<challenge>-<slot>``, a /``CTF_TEAM_SUBNET_PREFIX`` of
        ``CTF_TEAM_SUBNET_POOL``, labelled with the slot) becomes the instance's at the claim,
        so the claim makes no network call (issue 27). The container is admitted by the
        egress firewall as a cold start's is; all or nothing: a failure leaves neither.
        """
        self.specs.ensure_image(ch)
        self.egress.require()  # fail closed, as a cold start
        port = self.specs.container_port(ch)
        slot = secrets.token_hex(6)
        name = pool_container_name(ch.id, slot)
        network = pool_network_name(ch.id, slot)
        env = dict(ch.env)
        if ch.flag_env:
            env[ch.flag_env] = slot_flag(self.settings.flag_secret_value(), ch.id, slot,
                                         self.settings.flag_format)
        labels = self._pool_labels(ch, slot)
        spec = self.specs.container_spec(  # the cold start's hardening
            ch, name, "", labels, env, port, ip=None, network=network)
        self.keys.add_member(self.host, slot, ch.id)  # counted before it exists
        try:
            net = self.driver.ensure_named_network(
                network, {**self.scope_labels, LABEL_HOST: self.host, LABEL_CHALLENGE: ch.id,
                          LABEL_POOL: slot},
                self.settings.team_subnet_pool, self.settings.team_subnet_prefix)
            info = self.driver.run_container(spec)
            self.egress.admit(info, net)
        except BaseException:
            self.keys.withdraw(self.host, ch.id, slot)
            with contextlib.suppress(CTFError):
                self.driver.remove_container(name)
            # its network, known by name (the container may never have existed)
            self.remove_slot_network(ContainerInfo(id=name, name=name, state="",
                                                   labels=labels, ports={}))
            raise
        return name

    # -- operating ---------------------------------------------------------------------------

    def drain(self, challenge: str) -> None:
        """Remove the challenge's unclaimed containers now (before an image update)."""
        self.catalog.get(challenge)
        self.keys.drain(challenge)
        self.run_once()


def pool_status(keys: PoolKeys, catalog: Catalog, hosts: list[str]) -> list[dict[str, Any]]:
    """Each pool of each host: size wanted, unclaimed containers, ready, claims, misses.

    ``size`` is ``ctfctl pool warm``'s when it set one (``warmed``: true), else the catalog's.
    """
    members = keys.members()
    sizes = keys.sizes()
    rows = []
    for host in hosts:
        stats = keys.stats(host)
        for ch in catalog:
            here = sum(1 for k, v in members.items() if k.startswith(f"{host}/") and v == ch.id)
            claims = int(stats.get(f"claims|{ch.id}", 0))
            misses = int(stats.get(f"misses|{ch.id}", 0))
            size = sizes.get(ch.id, ch.pool)
            if not (size or here or claims or misses):
                continue
            rows.append({"host": host, "challenge": ch.id, "size": size, "containers": here,
                         "warmed": ch.id in sizes,
                         "ready": len(keys.ready(host, ch.id)), "claims": claims,
                         "misses": misses, "drained_at": keys.drained_at(ch.id) or None})
    return rows


class PoolCollector(Collector):
    """Pool gauges, claim/miss counters and the claim-latency histogram, read from Redis."""

    def __init__(self, keys: PoolKeys, catalog: Catalog, hosts: list[str]) -> None:
        self.keys = keys
        self.catalog = catalog
        self.hosts = hosts

    def collect(self) -> Iterator[Metric]:
        """Yield ``ctf_pool_*`` metrics (nothing when Redis does not answer)."""
        try:
            rows = pool_status(self.keys, self.catalog, self.hosts)
            stats = {h: self.keys.stats(h) for h in self.hosts}
        except CTFError as exc:
            log.warning("metrics: cannot read pools: %s", exc)
            return
        labels = ["host", "challenge"]
        size = GaugeMetricFamily("ctf_pool_size", "Pool containers wanted per host", labels=labels)
        have = GaugeMetricFamily("ctf_pool_containers", "Unclaimed pool containers",
                                 labels=labels)
        ready = GaugeMetricFamily("ctf_pool_ready", "Pool containers ready to claim",
                                  labels=labels)
        claims = CounterMetricFamily("ctf_pool_claims", "Starts served by a pool container",
                                     labels=labels)
        misses = CounterMetricFamily("ctf_pool_misses", "Starts of a pooled challenge that "
                                     "found none ready (cold start)", labels=labels)
        latency = HistogramMetricFamily("ctf_pool_claim_seconds", "Time to claim a pool "
                                        "container (Docker connect + rename)", labels=labels)
        for row in rows:
            key = [row["host"], row["challenge"]]
            size.add_metric(key, row["size"])
            have.add_metric(key, row["containers"])
            ready.add_metric(key, row["ready"])
            claims.add_metric(key, row["claims"])
            misses.add_metric(key, row["misses"])
            raw = stats[row["host"]]
            buckets = [(str(b) if b != float("inf") else "+Inf",
                        float(raw.get(f"le|{row['challenge']}|{b}", 0)))
                       for b in (*LATENCY_BUCKETS, float("inf"))]
            latency.add_metric(key, buckets, float(raw.get(f"sum|{row['challenge']}", 0)))
        yield from (size, have, ready, claims, misses, latency)
