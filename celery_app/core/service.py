"""The instance service: the rules of starting, stopping, extending and listing instances.

Tasks, the API and the CLI call this; it calls the Docker driver and the Redis state store.
Docker (read through labels) is the source of truth; Redis is the index and lock service.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

from redis.lock import Lock

from celery_app.core.catalog import Catalog, Challenge
from celery_app.core.pool import Pool
from celery_app.core.reconcile import BUSY_WAIT, Reconciler, ReconcileSummary
from celery_app.core.specs import InstanceSpecs
from celery_app.engine.driver import ContainerInfo, ContainerSpec, Driver, NetworkInfo, ProgressFn
from celery_app.engine.firewall import EgressGuard
from celery_app.errors import (
    InstanceNotFound,
    MaxLifetimeReached,
    Superseded,
)
from celery_app.ingress import Ingress
from celery_app.settings import Settings
from celery_app.state.store import LOCK_HOLD, Beats, Done, StateStore
from celery_app.vocab.models import Instance, InstanceKey, iso, utcnow
from celery_app.vocab.naming import CANARY_TEAM, GLOBAL_TEAM, check_team_id, container_name
from celery_app.vocab.signals import ERROR_OR_SIGNAL, OnOtherHost

log = logging.getLogger(__name__)

# Passed as ``intent`` by the janitor: act regardless of what users last asked.
NO_INTENT = -1


class InstanceService:
    """Starts, stops, extends and lists the instances of one Docker host.

    It builds the parts below it and hands each what it uses, never itself: the
    :class:`InstanceSpecs` (settings, driver, store, ingress, host), then the
    :class:`Reconciler` and the :class:`Pool` (those parts and the specs; the pool also the
    egress guard and ``host_max``). The pool reaches the specs' creation as its warm pool.

    Args:
        settings: the service settings.
        catalog: the challenges.
        driver: the Docker host's driver.
        store: the Redis state store.
        host: the name of the Docker host this service drives.
        public_host: the host name written in instance URLs.
        host_max: that host's ``max_instances`` (0: no per-host limit).
        egress: keeps the host's egress firewall (none: not enforced by this service).
    """

    def __init__(self, settings: Settings, catalog: Catalog, driver: Driver, store: StateStore,
                 host: str = "local", public_host: str | None = None, host_max: int = 0,
                 egress: EgressGuard | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.driver = driver
        self.store = store
        self.host = host
        self.public_host = public_host or settings.public_host
        self.host_max = host_max
        self.egress = egress or EgressGuard(None, driver, "not configured")
        # SPEC §11: with CTF_INGRESS=traefik instances sit behind this host's Traefik.
        # Labels follow each team's access generation (a revocation moves its hosts).
        self.ingress = Ingress(settings, store.access_generation)
        if self.ingress.enabled and not driver.is_local:
            log.warning("CTF_INGRESS=traefik with the remote engine of host %s: Traefik must run "
                        "on the Docker host to reach its containers; run this worker there", host)
        self.specs = InstanceSpecs(settings, driver, store, self.ingress, host, self.public_host)
        # Only what carries all these labels is ours (tests add a run label here).
        self.scope_labels = self.specs.scope_labels
        # The parts below the service get what they use, never the service itself.
        self.reconciler = Reconciler(settings, catalog, driver, store, self.specs, host)
        # Warm pools (issue 14): containers booted ahead, claimed in start's step 7.
        self.pool = Pool(settings, catalog, driver, store, self.specs, self.egress, host,
                         host_max)

    # -- helpers ----------------------------------------------------------------------------

    def _challenge(self, key: InstanceKey) -> Challenge:
        """The key's challenge: a look-up, not a check (the edge validated the key)."""
        return self.catalog.get(key.challenge)

    def _elsewhere(self, record: Instance) -> OnOtherHost:
        return OnOtherHost(
            f"instance {record.container_name} lives on host {record.host}, not {self.host}; "
            f"its worker (queue ctf.host.{record.host}) acts on it", host=record.host,
        )

    def _here(self, key: InstanceKey) -> Instance | None:
        """The instance's record; one of another host is that host's (``OnOtherHost``).

        The one place the service decides which host owns an instance: called under the
        instance lock, which every host takes in the same Redis, so the answer holds until
        the operation ends. The edges only route (``celery_app.hosts.placement.host_of``).
        """
        record = self.store.get(key.challenge, key.team)
        if record is not None and record.host != self.host:
            raise self._elsewhere(record)
        return record

    def _latest(self, op: str, ch: Challenge, team: str, intent: int) -> None:
        """The latest request wins: refuse ``op`` when the opposite was asked after it."""
        if intent != NO_INTENT and self.store.superseded(ch.id, team, intent, op):
            other, still = ("stop", "still") if op == "start" else ("start", "no longer")
            raise Superseded(f"a {other} of {ch.id} for team {team} was requested after this "
                             f"{op}; {op} it again if it is {still} wanted")

    @staticmethod
    def _done(task_id: str | None, answer: str) -> Done | None:
        """The answer to record with a task's effect (none outside a task)."""
        return (task_id, answer) if task_id else None

    def _team_quota(self, ch: Challenge, team: str) -> int:
        """The per-team limit a start reserves under.

        A ``share: global`` challenge's instance is no team's (SPEC §13): it counts toward
        the service's and its host's capacity only. The canary team (SPEC §14) has one
        instance per challenge.
        """
        if ch.is_global:
            return 1 << 30
        if team == CANARY_TEAM:
            return max(len(self.catalog), 1)
        return self.settings.max_instances_per_team

    def globals_down(self) -> list[InstanceKey]:
        """The ``share: global`` instances this host should start now (SPEC §13).

        The janitor's pass asks every few seconds on each host: an instance never started
        (the workers just came up), failed (its container died: the event follower or the
        janitor marked it) or gone (stopped by the admin, lost with its engine or Redis) is
        due; one recorded on another host is that host's, one being started or stopped is
        left to that operation. One record read per global challenge.
        """
        due = []
        for ch in self.catalog:
            if not ch.is_global:
                continue
            record = self.store.get(ch.id, GLOBAL_TEAM)
            if record is not None and (record.host != self.host
                                       or record.status in ("running", "starting", "stopping")):
                continue
            due.append(InstanceKey(ch.id, GLOBAL_TEAM))
        return due

    def _count_rate(self, team: str) -> None:
        self.store.hit_rate(team, self.settings.rate_limit_count, self.settings.rate_limit_window)

    def locked(self, challenge: str, team_id: str, hold: float,
               wait: float | None = None) -> AbstractContextManager[Lock]:
        """Hold the (challenge, team) lock (``StateStore.holding``; ``lock_wait`` by default)."""
        return self.store.holding(challenge, team_id, hold,
                                  self.settings.lock_wait if wait is None else wait)

    def _lock_or(self, held: Lock | None, challenge: str, team_id: str,
                 wait: float | None) -> AbstractContextManager[Lock]:
        """``held`` as it is (a caller holds the instance lock already), else :meth:`locked`."""
        if held is not None:
            return contextlib.nullcontext(held)
        return self.locked(challenge, team_id, hold=LOCK_HOLD, wait=wait)

    def flag_for(self, key: InstanceKey) -> str:
        """Return the team's flag for a challenge (see :mod:`celery_app.core.flags`)."""
        return self.specs.flag(key.challenge, key.team)

    def ensure_image(self, ch: Challenge, progress: ProgressFn | None = None) -> None:
        """Make the challenge image present, following ``CTF_PULL_POLICY``."""
        self.specs.ensure_image(ch, progress)

    # -- start ------------------------------------------------------------------------------

    def start(
        self, key: InstanceKey, progress: ProgressFn | None = None,
        intent: int | None = None, *, count_rate: bool = True, lock_wait: float | None = None,
        task_id: str | None = None, held: Lock | None = None,
    ) -> Instance:
        """Start the team's instance of a challenge; return it ``running`` once it answers.

        Idempotent: an instance that already runs is returned unchanged (same container).
        ``progress`` gets ``{"phase": …}`` dicts; ``intent`` is the request's sequence number
        (``StateStore.register_intent``; taken now when ``None``), superseded by a later
        stop; ``count_rate=False`` when the request was counted against the team's rate
        limit already (the dispatcher did before queueing it, or an earlier copy of the task
        passed this step); ``lock_wait`` (the settings' by default) bounds the wait for
        another operation.
        ``task_id`` (the Celery task's) makes the start take effect once: a redelivered copy
        of a start that already answered ``running`` returns that answer and does nothing,
        even if the instance was stopped since (SPEC §10: none is done twice). ``held``: the
        instance lock, already held by the caller (:meth:`restart`), not taken again.

        ``key`` was validated at the edge (:meth:`Catalog.key`): it is not checked again.

        Raises:
            TeamQuotaExceeded, CapacityExhausted, RateLimited: a limit was hit.
            StartFailed: the container exited or never answered.
            Superseded: a later stop of this instance was requested meanwhile.
            OnOtherHost: the instance lives on another Docker host (hand the request there).
            InstanceBusy: another operation held the instance for ``lock_wait`` seconds.
            BackendUnavailable: Docker or Redis trouble (retryable).
        """
        ch, team = self._challenge(key), key.team
        name = container_name(ch.id, team)
        report = progress or (lambda _event: None)
        # A copy of a start that took effect answers as it did: before the intent and the rate
        # count, so that it neither counts again nor outranks a stop requested after it.
        if (done := self.store.applied(task_id)) is not None:
            return Instance.model_validate_json(done)
        if intent is None:
            intent = self.store.register_intent(ch.id, team, "start")
        # 0. rate limit before any work: only a start that makes a new instance counts (one
        #    that already runs, or is being started, is returned and costs nothing).
        # A global instance (SPEC §13) is no team's: its start makes one container for
        # everyone at most, and the janitor's pass would start it anyway.
        if count_rate and not ch.is_global:
            seen = self.store.get(ch.id, team)
            if seen is None or seen.status == "failed":
                self._count_rate(team)
        if ch.is_group:  # a Compose challenge (SPEC §12): its services, all or nothing
            return self._start_group(key, ch, report, progress, intent, lock_wait, task_id,
                                     held)
        # 1. the image: pulls can be long and need no lock. A start that will claim a warm
        #    pool container (one is ready on this host) needs no image at all; it is checked
        #    (one Docker call saved) only if the claim then misses (step 7).
        report({"phase": "image", "image": ch.image})
        image_checked = not self.pool.has_ready(ch)
        if image_checked:
            self.specs.ensure_image(ch, progress)
        port = self.specs.container_port(ch)
        # Fail closed: no instance starts while the egress firewall is not in place.
        self.egress.require()
        # 2. lock (challenge, team): concurrent starts create one container, on every host.
        with self._lock_or(held, ch.id, team, lock_wait) as lock:
            # 3. the latest request wins: a stop sent after this start cancels it.
            self._latest("start", ch, team, intent)
            # 4. an instance recorded on another host is that host's to start (one container
            #    per instance across all hosts); its worker takes the request over. Decided
            #    here only, under the lock.
            record = self._here(key)
            # 5. an existing container is reused (idempotency, redelivered tasks).
            existing = self.specs.own_container(name, ch.id, team)
            if existing is not None and existing.state == "running":
                if record is not None and record.status == "running" \
                        and record.container_id == existing.id:
                    # Nothing to do, but this is the task's answer: a copy of it redelivered
                    # after a later stop must not start the instance again.
                    if task_id:
                        self.store.remember(task_id, record.model_dump_json())
                    return record
                # A redelivered start (its worker died) or a lost record: adopt the container,
                # taking its id and port from Docker, not from a reservation made before it.
                inst = record or self.specs.from_container(ch, existing, "starting")
                inst = self.specs.with_container(ch, inst, existing, port)
                return self.specs.await_ready(ch, existing, inst, port, report, lock, task_id)
            if existing is not None:
                # Exited, dead or created-but-never-started: start over from scratch.
                self.driver.remove_container(existing.id)
            # 6. reserve a slot: quotas are checked and the record written in one step.
            inst = self.specs.new_instance(ch, team)
            self.store.reserve(inst, self._team_quota(ch, team), self.settings.max_instances,
                               self.host_max)
            try:
                # 7. a ready warm-pool container, claimed with no network call (it sits on a
                #    network of its own: issue 27); else the team network and a cold start,
                #    under the team's network lock (a stop of the team's last instance must
                #    not remove the network we are joining).
                info, claimed = self._claim_or_cold(ch, team, port, inst, image_checked,
                                                    report)
            except BaseException:
                # Nothing half-made: the reservation, and a network made only for this
                # instance, go with the failed creation.
                self.store.delete(ch.id, team, self.host)
                with contextlib.suppress(*ERROR_OR_SIGNAL):
                    self.remove_network_if_unused(team)
                raise
            # 8. record the container and its port.
            inst = self.specs.with_container(ch, inst, info, port)
            self.store.put(inst)
            # 9. running only once the port answers. A claimed container answered the
            #    pool pass's probe on the address it keeps (the claim renamed it, nothing
            #    else): probed again only through the ingress, whose route is new.
            answered = claimed and not self.ingress.enabled
            return self.specs.await_ready(ch, info, inst, port, report, lock, task_id,
                                          answered=answered)

    def _start_group(
        self, key: InstanceKey, ch: Challenge, report: ProgressFn,
        progress: ProgressFn | None, intent: int, lock_wait: float | None,
        task_id: str | None, held: Lock | None = None,
    ) -> Instance:
        """:meth:`start`'s steps 1-9 for a Compose challenge: one instance, several services.

        The images of every service first (no lock); then under the instance lock a running
        group is returned as it is, anything else of it (half made, failed, unrecorded) is
        removed and the group made again on a network of its own (``InstanceSpecs``:
        ``create_group``, all or nothing), recorded with its endpoints, and ``running`` once
        every endpoint answers.
        """
        team = key.team
        assert ch.app is not None
        primary = ch.app.primary.service
        # 1. every service's image (pulls can be long and need no lock); a start that will
        #    claim a pooled group (one is ready here) needs none: checked if the claim misses.
        images = [s.image for s in ch.app.services]
        report({"phase": "image", "image": ", ".join(images)})
        pooled = self.pool.has_ready(ch)
        if not pooled:
            self.specs.ensure_image(ch, progress)
        self.egress.require()
        # 2. lock (challenge, team)
        with self._lock_or(held, ch.id, team, lock_wait) as lock:
            # 3. the latest request wins; 4. another host's instance is that host's.
            self._latest("start", ch, team, intent)
            record = self._here(key)
            # 5. a running group is reused (idempotency): its primary container is the record's
            main = self.specs.own_container(self.specs.layout(ch.id, team, ch.app).main,
                                            ch.id, team)
            if main is not None and main.state == "running" and record is not None \
                    and record.status == "running" and record.container_id == main.id:
                if task_id:
                    self.store.remember(task_id, record.model_dump_json())
                return record
            # A whole group already up (a redelivered start whose worker died while it
            # waited for the endpoints, or a lost record) is adopted and awaited.
            whole = self.specs.whole_group(ch, team, main)
            if whole is not None and (record is None or record.status == "starting"):
                inst = self.specs.with_group(
                    ch, record or self.specs.from_container(ch, whole[primary], "starting"),
                    whole)
                self.specs.route_group(ch, team, inst.started_at, whole)
                return self.specs.await_group_ready(ch, whole, inst, report, lock, self.egress,
                                                    task_id)
            # Anything else of it (a half group, a failed one) goes: a group is made whole,
            # never patched up. (Before a claim, its network is looked for only if a
            # container was found: a claim makes no network call.)
            self.specs.remove_group(ch.id, team, self.egress, network=not pooled)
            # 6. reserve a slot: quotas are checked and the record written in one step.
            inst = self.specs.new_instance(ch, team)
            self.store.reserve(inst, self._team_quota(ch, team),
                               self.settings.max_instances, self.host_max)
            try:
                # 7. a ready pooled group, claimed whole; else the instance's network and its
                #    services, in depends_on order
                report({"phase": "creating"})
                made = self._claim_or_cold_group(ch, team, inst, pooled)
            except BaseException:
                self.store.delete(ch.id, team, self.host)  # create_group removed its parts
                raise
            # 8. record the containers and the endpoints (behind the ingress: one route each,
            #    written before the instance is probed through them)
            inst = self.specs.with_group(ch, inst, made)
            self.store.put(inst)
            try:
                self.specs.route_group(ch, team, inst.started_at, made)
            except BaseException:
                self.specs.remove_group(ch.id, team, self.egress)
                self.store.delete(ch.id, team, self.host)
                raise
            # 9. running only once every endpoint answers
            report({"phase": "starting", "container": inst.container_name})
            return self.specs.await_group_ready(ch, made, inst, report, lock, self.egress,
                                                task_id)

    def _claim_or_cold_group(self, ch: Challenge, team: str, inst: Instance,
                             image_skipped: bool) -> dict[str, ContainerInfo]:
        """Step 7 of a Compose start: claim a ready pooled group, else make the group cold.

        ``image_skipped``: step 1 skipped the images because a group was ready; a cold
        start after a missed claim checks (or pulls) them first. Before a cold start the
        pools give way when the host is full, as for one image.
        """
        claimed = self.pool.claim_group(ch, team, inst)  # None: not pooled, or none ready
        if claimed is not None:
            return claimed
        if image_skipped:
            self.specs.ensure_image(ch)  # the ready one was taken meanwhile (rare)
        self.pool.make_room()
        return self.specs.create_group(ch, team, inst, self.egress)

    def _claim_or_cold(
        self, ch: Challenge, team: str, port: int, inst: Instance, image_checked: bool,
        report: ProgressFn,
    ) -> tuple[ContainerInfo, bool]:
        """Step 7: claim a ready warm-pool container, else start one cold; (it, claimed).

        A claim takes milliseconds: no progress is published for it (each report is a
        result-backend write and a message to the caller, on the path of every start of an
        opening's herd). A cold start reports ``creating``, then ``starting`` once made.
        """
        info = self.pool.claim(ch, team, inst)  # None: not pooled, or none ready
        if info is not None:
            return info, True
        report({"phase": "creating"})
        info = self.specs.create(ch, team, port, inst, self.egress,
                                 self._cold(ch, image_checked))
        report({"phase": "starting", "container": info.name})
        return info, False

    def _cold(
        self, ch: Challenge, image_checked: bool,
    ) -> Callable[[NetworkInfo, ContainerSpec], ContainerInfo]:
        """Step 7's cold start, after a warm-pool claim missed (or the challenge has no pool).

        Returned as what :meth:`InstanceSpecs.create` calls under the team's network lock,
        with the team network and the cold start's spec. ``image_checked=False``: step 1
        skipped the image because a pool container was ready; the claim then missed (the
        ready one was taken meanwhile, rare), so the image is checked (or pulled) first.
        Before a cold start the pools give way when the host is full, so no start is
        refused for their sake.
        """

        def make(_net: NetworkInfo, spec: ContainerSpec) -> ContainerInfo:
            if not image_checked:
                self.specs.ensure_image(ch)
            self.pool.make_room()
            return self.driver.run_container(spec)

        return make

    # -- stop -------------------------------------------------------------------------------

    def stop(
        self, key: InstanceKey, *, count_rate: bool = True,
        lock_wait: float | None = None, intent: int | None = None, keep_network: bool = False,
        task_id: str | None = None, held: Lock | None = None,
    ) -> dict[str, str]:
        """Stop and remove the team's instance, and the team network if it was the last.

        ``count_rate``, ``lock_wait`` and ``intent`` as for :meth:`start` (``NO_INTENT``: the
        janitor, which acts whatever users asked). ``keep_network`` leaves an emptied team
        network to the janitor's network pass: the engine removes networks one at a time
        (about 0.2 s each), so the janitor removes every expired container first.
        ``task_id`` (the Celery task's) makes the stop take effect once: a redelivered copy of
        a stop that removed the instance answers ``stopped`` again and leaves alone an instance
        started since. ``held``: the instance lock, already held by the caller
        (:meth:`restart`), not taken again.

        Returns:
            ``{"team_id", "challenge", "status": "stopped"}``.

        Raises:
            InstanceNotFound: there is no such instance.
            RateLimited: the team stops and starts too fast.
            Superseded: a later start of this instance was requested meanwhile.
            OnOtherHost: the instance lives on another Docker host (hand the request there).
        """
        ch, team = self._challenge(key), key.team
        name = container_name(ch.id, team)
        answer = {"team_id": team, "challenge": ch.id, "status": "stopped"}
        # A copy of a stop that took effect answers as it did (before the intent and the rate
        # count: it must not outrank, or undo, a start requested after it).
        if self.store.applied(task_id) is not None:
            return answer
        if intent is None:
            intent = self.store.register_intent(ch.id, team, "stop")
        # 0. rate limit before any work (the janitor is not limited; a stop of nothing is free)
        if count_rate and self.store.get(ch.id, team) is not None:
            self._count_rate(team)
        # 1. lock (challenge, team)
        with self._lock_or(held, ch.id, team, lock_wait):
            # A copy of this very task (redelivered while it ran) may have done it meanwhile.
            if self.store.applied(task_id) is not None:
                return answer
            # 2. the latest request wins: a start sent after this stop cancels it.
            self._latest("stop", ch, team, intent)
            # 3. is there anything to stop, here? Another host's instance is its worker's:
            #    "stopped" is said only once the container is gone from its own engine.
            record = self._here(key)
            existing = self.specs.own_container(name, ch.id, team)
            group = self.specs.group_of(ch.id, team) if ch.is_group else []
            if record is None and existing is None and not group:
                raise InstanceNotFound(f"team {team} has no instance of {ch.id}; start one first")
            if record is not None:
                self.store.put(record.model_copy(update={"status": "stopping"}))
            # 4. route, container, then record: a crash in between leaves a record the
            #    janitor drops (and a route reconcile drops); the host answers 404 at once.
            self.ingress.remove_route(name)
            if ch.is_group:  # every service's container, then the instance's network
                self.specs.remove_group(ch.id, team, self.egress)
            elif existing is not None:
                self.egress.release(existing)  # before its address is free for another
                self.driver.remove_container(existing.id)
                # a claimed warm-pool container's network is its own (issue 27): it goes too
                self.pool.remove_slot_network(existing)
            # The record goes with this task's answer, in one step: done once.
            self.store.delete(ch.id, team, self.host,
                              done=self._done(task_id, json.dumps(answer)))
        # 5. the team's network goes with its last instance.
        if not keep_network:
            self.remove_network_if_unused(team)
        return answer

    def remove_network_if_unused(self, team_id: str, network: str | None = None) -> bool:
        """Remove the team's network when no container is left on it (see ``specs``)."""
        return self.specs.remove_network_if_unused(team_id, network)

    # -- restart (SPEC §13) -------------------------------------------------------------------

    def restart(
        self, key: InstanceKey, progress: ProgressFn | None = None,
        intent: int | None = None, *, count_rate: bool = True, lock_wait: float | None = None,
        task_id: str | None = None,
    ) -> Instance:
        """Replace the team's instance with a fresh one; return it ``running``.

        A stop then a start as one operation, under one hold of the instance lock (no other
        request of this instance runs in between): new containers from the image (a warm
        pool's, or cold), so nothing the team wrote survives; the same per-team flag; an
        expiry (and maximum lifetime) counted from now, as for a new start. Single-image,
        pooled and Compose instances alike. With no instance at all it is a start: a copy of
        a restart redelivered after its worker died between the stop and the start completes
        it (the API and ``ctfctl`` answer ``instance_not_found`` before sending one).

        ``intent`` is a start's (a stop requested later supersedes it); ``count_rate``,
        ``lock_wait`` and ``task_id`` as for :meth:`start`: the restart counts as one action
        for the team's rate limit, and a redelivered copy of one that answered returns that
        answer without restarting again.

        Raises:
            RateLimited, TeamQuotaExceeded, CapacityExhausted: a limit was hit.
            StartFailed: the new container exited or never answered.
            Superseded: a later stop of this instance was requested meanwhile.
            OnOtherHost: the instance lives on another Docker host (hand the request there).
            InstanceBusy: another operation held the instance for ``lock_wait`` seconds.
        """
        ch, team = self._challenge(key), key.team
        if (done := self.store.applied(task_id)) is not None:
            return Instance.model_validate_json(done)
        if intent is None:
            intent = self.store.register_intent(ch.id, team, "start")
        # 0. one action for the rate limit, whatever there was to stop.
        if count_rate:
            self._count_rate(team)
        # The images before the lock (pulls can be long); the start checks them again, cheaply.
        self.specs.ensure_image(ch, progress)
        with self.locked(ch.id, team, hold=LOCK_HOLD, wait=lock_wait) as lock:
            self._latest("start", ch, team, intent)
            self._here(key)  # another host's instance is that host's to restart
            with contextlib.suppress(InstanceNotFound):  # nothing to stop: a start
                # The network stays: the start puts the new container on it at once.
                self.stop(key, count_rate=False, intent=NO_INTENT, keep_network=True,
                          held=lock)
            return self.start(key, progress, intent, count_rate=False, task_id=task_id,
                              held=lock)

    # -- extend -----------------------------------------------------------------------------

    def extend(self, key: InstanceKey, *, lock_wait: float | None = None,
               task_id: str | None = None) -> Instance:
        """Push the expiry out by the challenge's ttl, never past its maximum lifetime.

        ``task_id`` (the Celery task's) makes the extend take effect once: the new expiry is
        written together with the task's answer, and a redelivered copy (its worker died
        before Celery stored the answer) returns that answer without extending again.

        Raises:
            InstanceNotFound: there is no such instance.
            MaxLifetimeReached: the instance is already at ``started_at + max_lifetime``.
            OnOtherHost: the instance lives on another Docker host.
            InstanceBusy: another operation held the instance for ``lock_wait`` seconds.
        """
        ch, team = self._challenge(key), key.team
        assert ch.ttl is not None and ch.max_lifetime is not None
        with self.locked(ch.id, team, hold=LOCK_HOLD, wait=lock_wait):
            # Checked under the lock: two copies of one task never both extend.
            if (done := self.store.applied(task_id)) is not None:
                return Instance.model_validate_json(done)
            inst = self._here(key)
            if inst is None or inst.status not in ("running", "starting"):
                raise InstanceNotFound(f"team {team} has no running instance of {ch.id}")
            if ch.is_global:  # it never expires (SPEC §13): nothing to push out
                return inst
            ceiling = inst.started + timedelta(seconds=ch.max_lifetime)
            current = inst.expires
            if current >= ceiling:
                raise MaxLifetimeReached(
                    f"instance {inst.container_name} already lives until {iso(ceiling)}, its "
                    f"maximum lifetime ({ch.max_lifetime} s); stop it and start a new one"
                )
            new = min(max(current, utcnow()) + timedelta(seconds=ch.ttl), ceiling)
            inst = inst.model_copy(update={"expires_at": iso(new)})
            self.store.put(inst, done=self._done(task_id, inst.model_dump_json()))
            return inst

    # -- read -------------------------------------------------------------------------------

    def get(self, key: InstanceKey) -> Instance:
        """Return one instance from the index (``InstanceNotFound`` when there is none)."""
        inst = self.store.get(key.challenge, key.team)
        if inst is None:
            raise InstanceNotFound(f"team {key.team} has no instance of {key.challenge}")
        return inst

    def status(
        self, team_id: str | None = None, challenge: str | None = None, *, verify: bool = False
    ) -> list[Instance]:
        """List instances, filtered by what is given.

        ``verify`` cross-checks with Docker (one list call), so a dead container is never
        reported as running.
        """
        if team_id is not None:
            check_team_id(team_id)
        if challenge is not None:
            self.catalog.get(challenge)
        found = self.store.list(team_id=team_id, challenge=challenge)
        if team_id is not None:  # every team sees the global instances (SPEC §13)
            found = sorted([*found, *self.store.list(team_id=GLOBAL_TEAM, challenge=challenge)],
                           key=lambda i: i.key)
        return self.reconciler.verified(found) if verify else found

    def view(
        self, team_id: str, challenge: str | None, hosts: list[str]
    ) -> tuple[list[Instance], Beats]:
        """Return the team's instances from the index, and the heartbeats of ``hosts``.

        One Redis round trip (:meth:`StateStore.view`): the read behind status polling while
        this host's event follower keeps the index true.

        Raises:
            InvalidTeamId, UnknownChallenge: bad input.
            RedisUnavailable: Redis cannot be reached.

        """
        check_team_id(team_id)
        if challenge is not None:  # a global challenge's instance is every team's
            return self.store.view(self.catalog.get(challenge).holder(team_id), challenge,
                                   hosts)
        return self.store.view(team_id, challenge, hosts)

    # -- reconcile and one container's news (celery_app.core.reconcile) ---------------------------

    def reconcile(self, now: datetime | None = None) -> ReconcileSummary:
        """Rebuild this host's Redis index from Docker labels (:meth:`Reconciler.run`)."""
        return self.reconciler.run(now)

    def adopt(self, challenge: str, team_id: str) -> ReconcileSummary:
        """Bring one instance's record in line with its container (:meth:`Reconciler.adopt`)."""
        return self.reconciler.adopt(challenge, team_id)

    def sync_routes(self) -> None:
        """Make this host's ingress routes match its running instances."""
        self.reconciler.sync_routes()

    def mark_failed(self, challenge: str, team_id: str, container_id: str = "", *,
                    wait: float = BUSY_WAIT, service: str = "") -> str:
        """Record that a running instance's container died (:meth:`Reconciler.mark_failed`)."""
        return self.reconciler.mark_failed(challenge, team_id, container_id, wait=wait,
                                           service=service)

    def forget_removed(self, challenge: str, team_id: str, container_id: str, *,
                       wait: float = BUSY_WAIT) -> str:
        """Forget an instance whose container was removed (:meth:`Reconciler.forget_removed`)."""
        return self.reconciler.forget_removed(challenge, team_id, container_id, wait=wait)

    def mark_reconciled(self) -> None:
        """Note in Redis that this host's index is complete."""
        self.store.mark_reconciled(self.host)

    def index_is_complete(self) -> bool:
        """Whether Redis still holds the index since the last reconcile (not flushed)."""
        return self.store.index_is_complete(self.host)
