"""Reconcile: keep the Redis index true to the engine's containers.

:class:`Reconciler` is handed the parts it uses (settings, catalog, driver, store and the
host's :class:`~celery_app.core.specs.InstanceSpecs`), never the service, which builds it.
It rebuilds a host's index from Docker labels (:meth:`Reconciler.run`, at worker start, on
demand and when the index was lost), brings one instance in line (:meth:`Reconciler.adopt`),
judges one container's news (:meth:`Reconciler.mark_failed`,
:meth:`Reconciler.forget_removed`: the event follower and the janitor's safety net) and
repairs ingress routes (:meth:`Reconciler.sync_routes`). Every change is decided under the
instance's lock on a fresh look; an instance busy in another operation is left to it.
:class:`~celery_app.core.service.InstanceService` keeps the public names (``reconcile``,
``adopt``, ``mark_failed``, ``forget_removed``, ``sync_routes``).
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.lock import Lock

from celery_app.core.catalog import Catalog, Challenge
from celery_app.core.compose import Endpoint
from celery_app.core.specs import InstanceSpecs
from celery_app.engine.driver import ContainerInfo, Driver, carries
from celery_app.errors import CTFError, InvalidRequest
from celery_app.settings import Settings
from celery_app.state.store import LOCK_HOLD, StateStore
from celery_app.vocab.models import Instance, utcnow
from celery_app.vocab.naming import (
    LABEL_CHALLENGE,
    LABEL_POOL,
    LABEL_SERVICE,
    LABEL_STARTED_AT,
    LABEL_TEAM,
    check_team_id,
    instance_key,
    split_instance_key,
)
from celery_app.vocab.signals import ERROR_OR_SIGNAL, InstanceBusy

log = logging.getLogger(__name__)

# Seconds background passes (reconcile, the janitor, events) wait for an instance someone
# else holds; then they leave it to that operation and look again next pass.
BUSY_WAIT = 0.5
# Lines of a dead container's output kept in its failed record (``logs``), and their size cap.
FAILED_LOG_LINES = 20
FAILED_LOG_CHARS = 2000
CONTAINER_GONE = "the container is gone"


@dataclass
class ReconcileSummary:
    """What a reconcile pass found and changed."""

    containers: int = 0
    adopted: list[str] = field(default_factory=list)
    marked_failed: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able summary."""
        return {
            "containers": self.containers,
            "adopted": self.adopted,
            "marked_failed": self.marked_failed,
            "forgotten": self.forgotten,
        }


class Reconciler:
    """Keeps one host's index true to its engine (see the module docstring).

    Args:
        settings: the service settings (the orphan grace).
        catalog: the challenges.
        driver: the host's engine.
        store: the state store (records and the instances' locks).
        specs: the host's instance specs (names, labels, adoption, probes, flags, its ingress,
            the team network's removal).
        host: the host's name.
    """

    def __init__(self, settings: Settings, catalog: Catalog, driver: Driver, store: StateStore,
                 specs: InstanceSpecs, host: str) -> None:
        self.settings = settings
        self.catalog = catalog
        self.driver = driver
        self.store = store
        self.specs = specs
        self.ingress = specs.ingress
        self.host = host

    def _locked(self, challenge: str, team_id: str, wait: float) -> AbstractContextManager[Lock]:
        """Hold the instance's lock, waiting at most ``wait`` s (``InstanceBusy`` after)."""
        return self.store.holding(challenge, team_id, LOCK_HOLD, wait)

    def _main(self, challenge: str, team_id: str) -> str:
        """The name of the instance's container players reach (``InstanceSpecs.layout``)."""
        return self.specs.layout(challenge, team_id).main

    def run(self, now: datetime | None = None) -> ReconcileSummary:
        """Rebuild this host's Redis index from Docker labels.

        Containers with our labels are recorded (adopted when Redis lost them); records
        whose container is gone are forgotten (except starts still in their grace period);
        records of containers that stopped are marked failed.

        The two listings are only a shortlist: a start or stop may be half-way through
        while they are read. Each change is decided again under the instance's lock, on a
        fresh look at its record and container, and an instance busy in another operation
        is left to that operation (the next pass sees the outcome).
        """
        now = now or utcnow()
        summary = ReconcileSummary()
        containers = self.driver.list_containers(self.specs.scope_labels)
        summary.containers = len(containers)
        records = {i.key: i for i in self.store.list(host=self.host)}
        suspects: dict[str, Challenge] = {}
        for c in containers:
            try:
                ch = self.catalog.get(c.challenge)
                check_team_id(c.team_id, reserved_ok=True)
            except CTFError:
                log.info("reconcile: %s is not an instance; left to the janitor", c.name)
                continue
            if c.name != self._main(ch.id, c.team_id):
                continue
            key = instance_key(ch.id, c.team_id)
            rec = records.pop(key, None)
            if rec is None or (rec.status == "running" and c.state != "running"):
                suspects[key] = ch
        for key, rec in records.items():  # records without a container
            if rec.status == "failed" or self._starting_recently(rec, now):
                continue
            with contextlib.suppress(CTFError):
                suspects[key] = self.catalog.get(rec.challenge)
            if key not in suspects:  # its challenge left the catalog: nothing to adopt
                self.store.delete(rec.challenge, rec.team_id, self.host)
                summary.forgotten.append(key)
        for key, ch in suspects.items():
            self._reconcile_one(ch, split_instance_key(key)[1], now, summary)
        self.sync_routes()
        self.store.mark_reconciled(self.host)
        log.info("reconcile host=%s %s", self.host, summary.as_dict())
        return summary

    def verified(self, found: list[Instance]) -> list[Instance]:
        """Return ``found`` with this host's running records whose containers are not, failed.

        One list call to the engine, so a dead container is never reported as running. A
        Compose instance (SPEC §12) is running only while every service's container is
        there and running (a one-shot service that exited 0 is done, not dead): one removed
        or stopped behind our back makes it ``failed``, its ``error`` naming the service.
        """
        live = {c.name: c for c in self.driver.list_containers(self.specs.scope_labels)}
        result = []
        for inst in found:
            why = None
            if inst.host == self.host and inst.status == "running":
                why = self._not_running(inst, live)
            result.append(inst.model_copy(update={"status": "failed", "error": why})
                          if why else inst)
        return result

    def _not_running(self, inst: Instance, live: dict[str, ContainerInfo]) -> str | None:
        """Why a running record's instance does not run, from one listing; ``None`` if it does."""
        c = live.get(inst.container_name)
        if c is None or c.state != "running":
            return "the container is no longer running"
        try:
            app = self.catalog.get(inst.challenge).app
        except CTFError:
            return None  # left the catalog: its one container is all we know of
        if app is None:
            return None
        layout = self.specs.layout(inst.challenge, inst.team_id, app)
        for service, name in zip(layout.services[1:], layout.containers[1:], strict=True):
            member = live.get(name)
            if member is None:
                return f"service {service}: the container is gone"
            if member.state == "running":
                continue
            if service in app.one_shots and member.state == "exited":
                # The list call gives no exit code: ask for this one-shot's (rare).
                member = self.driver.get_container(member.id) or member
                if app.done(service, member.state, member.exit_code):
                    continue
            return f"service {service}: the container is no longer running"
        return None

    def _starting_recently(self, rec: Instance, now: datetime) -> bool:
        # A start in flight: its container may not exist yet.
        age = (now - rec.started).total_seconds()
        return rec.status == "starting" and age < self.settings.orphan_grace

    def _reconcile_one(
        self, ch: Challenge, team: str, now: datetime, summary: ReconcileSummary
    ) -> None:
        """Bring one instance's record in line with its container, under its lock."""
        # 1. lock (challenge, team); a start or stop holding it knows better than we do.
        try:
            with self._locked(ch.id, team, BUSY_WAIT):
                self._bring_in_line(ch, team, now, summary)
        except InstanceBusy:
            log.info("reconcile: %s/%s is busy; left to the operation in progress", ch.id, team)

    def _bring_in_line(
        self, ch: Challenge, team: str, now: datetime, summary: ReconcileSummary
    ) -> None:
        key = instance_key(ch.id, team)
        # 2. look again: the listings may be out of date by now.
        rec = self.store.get(ch.id, team)
        if rec is not None and rec.host != self.host:
            return  # recorded on another host: that host's reconcile owns it
        try:
            info = self.specs.own_container(self._main(ch.id, team), ch.id, team)
        except InvalidRequest:
            info = None  # not ours after all
        # 3. the container is gone: forget the record, unless a start is young.
        if info is None:
            if rec is not None and rec.status != "failed" \
                    and not self._starting_recently(rec, now):
                self.store.delete(ch.id, team, self.host)
                summary.forgotten.append(key)
            return
        # 4. a container without a record: adopt it from its labels.
        if rec is None:
            status = "running" if info.state == "running" else "failed"
            inst = self.specs.from_container(ch, info, status)
            if status == "running" and not self.specs.answers(ch, info):
                inst = inst.model_copy(update={"status": "starting"})
            self.store.put(inst)
            summary.adopted.append(key)
        # 5. a record that says running for a container that is not.
        elif rec.status == "running" and info.state != "running":
            # With its exit code, OOM flag and last output, as mark_failed records them.
            self.store.put(rec.model_copy(update=self._failure(rec, info)))
            summary.marked_failed.append(key)

    def sync_routes(self) -> None:
        """Make this host's routes match its running instance containers (ingress on).

        Routes are written and removed by start and stop; this repairs what a crash in
        between left behind: a route for every running container of ours, none for the rest.
        A Compose instance (SPEC §12) has one route per endpoint, each on the container of
        its service (:meth:`InstanceSpecs.endpoint_route`). A route younger than
        ``CTF_ORPHAN_GRACE`` is left alone: a start writes its route before its container
        exists.
        """
        if not self.ingress.enabled:
            return
        running = self._routed()
        for name in self.ingress.route_names() - set(running):
            if self.ingress.route_age(name) >= self.settings.orphan_grace:
                self.ingress.remove_route(name)
        generations: dict[str, int] = {}  # one read per team and pass (revocations)
        for name, (ch, c, point) in running.items():
            # Only for a live instance: a stop marks its record "stopping" before it removes
            # the route, and must not see the route come back before the container goes.
            record = self.store.get(ch.id, c.team_id)
            if record is None or record.status not in ("running", "starting"):
                continue
            if point is None and record.container_id not in ("", c.id):
                continue
            if point is not None and c.labels.get(LABEL_STARTED_AT) != record.started_at:
                continue  # a service of another start of the group
            with contextlib.suppress(CTFError):
                if c.team_id not in generations:
                    generations[c.team_id] = self.store.access_generation(c.team_id)
                generation = generations[c.team_id]
                if point is None:
                    port = self.specs.container_port(ch)
                    self.ingress.add_route(name, ch.id, c.team_id, ch.protocol, str(c.ip),
                                           port, started_at=record.started_at,
                                           generation=generation)
                    self._follow_label(ch, record, generation)
                    continue
                _, key = self.specs.endpoint_route(ch, c.team_id, point)
                self.ingress.add_route(name, ch.id, c.team_id, point.protocol, str(c.ip),
                                       point.port, started_at=record.started_at,
                                       generation=generation, endpoint=key)
                if ch.app is not None and point == ch.app.primary:
                    self._follow_label(ch, record, generation)

    def _routed(self) -> dict[str, tuple[Challenge, ContainerInfo, Endpoint | None]]:
        """The routes this host's running containers should have, by route name.

        Each maps to its challenge, its container and its endpoint (``None``: a single
        image's one route, named after its container).
        """
        routed: dict[str, tuple[Challenge, ContainerInfo, Endpoint | None]] = {}
        for c in self.driver.list_containers(self.specs.scope_here()):
            if c.state != "running" or not c.ip:
                continue
            with contextlib.suppress(CTFError, KeyError):
                ch = self.catalog.get(c.challenge)
                if ch.app is None:
                    if c.name == self._main(ch.id, c.team_id):
                        routed[c.name] = (ch, c, None)
                    continue
                service = c.labels.get(LABEL_SERVICE, "")
                if c.name != self.specs.layout(ch.id, c.team_id, ch.app).of(service):
                    continue  # not a name this group's service has
                for ep in ch.app.endpoints:
                    if ep.service == service:
                        routed[self.specs.endpoint_route(ch, c.team_id, ep)[0]] = (ch, c, ep)
        return routed

    def _follow_label(self, ch: Challenge, record: Instance, generation: int) -> None:
        """Give a running instance's record the URL of its current label (issue 22).

        A revocation (``ctfctl revoke``) raises the team's access generation: the route just
        rewritten names the new host, and the record (what the API shows, and what
        ``access_url`` is built from) must name it too. Done under the instance's lock on a
        fresh read; an instance busy in another operation gets it next pass. A Compose
        instance's endpoints follow with it (each has a host of its own).
        """
        update = self._current_urls(ch, record, generation)
        if record.status != "running" or not update:
            return
        with self._locked(ch.id, record.team_id, BUSY_WAIT):
            fresh = self.store.get(ch.id, record.team_id)
            if fresh is None or fresh.status != "running" \
                    or fresh.container_id != record.container_id:
                return
            update = self._current_urls(ch, fresh, generation)
            if not update:
                return
            self.store.put(fresh.model_copy(update=update))
            log.info("ingress: %s of team %s moved to %s (access revoked)", ch.id,
                     record.team_id, update["url"])

    def _current_urls(self, ch: Challenge, record: Instance, generation: int,
                      ) -> dict[str, Any]:
        """What of ``record`` names an old label: its ``url`` (and ``endpoints``), or nothing."""
        if ch.app is None:
            url = self.ingress.url(ch.id, record.team_id, ch.protocol,
                                   started_at=record.started_at, generation=generation)
            return {} if record.url == url else {"url": url}
        endpoints = self.specs.endpoint_views(ch, record.team_id, record.started_at, {},
                                              generation)
        if record.url == endpoints[0].url and record.endpoints == endpoints:
            return {}
        return {"url": endpoints[0].url, "endpoints": endpoints}

    # -- one container's news: the event follower and the janitor's dead containers --------

    def mark_failed(
        self, challenge: str, team_id: str, container_id: str = "", *,
        wait: float = BUSY_WAIT,
    ) -> str:
        """Record that a running instance's container died, OOM-killed or turned unhealthy.

        The container is inspected again under the instance's lock: only an instance that is
        ``running`` in the index, with that container (when ``container_id`` is given), whose
        container is gone, not running or unhealthy, becomes ``failed`` with its exit code,
        OOM flag and last output lines (the team's flag masked). Its expiry is unchanged.

        An instance a start is bringing up (``starting``) is that start's to judge, and one a
        stop is removing (``stopping``) is about to vanish: both are left alone, so our own
        stops never leave a failed record.

        Args:
            challenge: the challenge id.
            team_id: the team.
            container_id: the container the news is about (a newer one is not judged by it).
            wait: seconds to wait for the instance's lock.

        Returns:
            ``"marked"``; ``"busy"`` when a start holds the instance (ask again shortly), or
            ``"unchanged"``.
        """
        # 1. a cheap look first: most news is about instances that are not running here.
        seen = self.store.get(challenge, team_id)
        member = self._group_member(seen, container_id)
        verdict = self._judge(seen, seen.container_id if member and seen else container_id)
        if verdict != "go":
            return verdict
        # 2. lock the instance; a start or stop holding it knows better.
        try:
            with self._locked(challenge, team_id, wait):
                # 3. look again under the lock, at the record and at the container itself
                #    (another service of a Compose instance stands for the whole group).
                rec = self.store.get(challenge, team_id)
                member = self._group_member(rec, container_id)
                verdict = self._judge(rec, rec.container_id if member and rec else container_id)
                if verdict != "go" or rec is None:
                    return verdict
                info = member or self.driver.get_container(rec.container_id
                                                           or rec.container_name)
                if info is not None and info.state == "running" and info.health != "unhealthy":
                    return "unchanged"  # alive after all (an old event, an OOM of a child)
                # 4. the failed record, with why (and which service, in a group).
                failure = self._failure(rec, info)
                if member is not None:
                    failure["error"] = f"service {member.labels[LABEL_SERVICE]}: " \
                                       f"{failure['error']}"
                self.store.put(rec.model_copy(update=failure))
                return "marked"
        except InstanceBusy:
            return "busy"

    def fail_over_disk(
        self, challenge: str, team_id: str, container_id: str, reason: str, *,
        wait: float = BUSY_WAIT,
    ) -> str:
        """Stop a running instance that wrote more than its disk bound; record it ``failed``.

        Under the instance's lock, only while it is ``running`` with that container: the
        container is killed (kept, so its writable layer stops growing but the team's files
        remain until the instance expires or is started again) and the record says ``reason``.

        Returns:
            ``"marked"``, ``"busy"`` (a start or stop holds it) or ``"unchanged"``.
        """
        try:
            with self._locked(challenge, team_id, wait):
                rec = self.store.get(challenge, team_id)
                if self._judge(rec, container_id) != "go" or rec is None:
                    return "unchanged"
                self.driver.kill_container(container_id)
                info = self.driver.get_container(container_id)
                failure = self._failure(rec, info)
                self.store.put(rec.model_copy(update={**failure, "error": reason}))
                return "marked"
        except InstanceBusy:
            return "busy"

    def _group_member(self, rec: Instance | None, container_id: str) -> ContainerInfo | None:
        """The container ``container_id`` when it is another service of ``rec``'s group.

        SPEC §12: any service of a Compose instance that dies makes the instance ``failed``.
        It must carry our labels, the instance's team, challenge and ``started_at`` (news of
        an earlier group of the same instance is not judged by it), and ``ctf.service``; a
        one-shot service that exited 0 did its work and is no death.
        """
        if rec is None or not container_id or container_id == rec.container_id:
            return None
        try:
            app = self.catalog.get(rec.challenge).app
        except CTFError:
            return None
        if app is None:
            return None
        info = self.driver.get_container(container_id)
        wanted = {**self.specs.scope_here(), LABEL_TEAM: rec.team_id,
                  LABEL_CHALLENGE: rec.challenge, LABEL_STARTED_AT: rec.started_at}
        if info is not None and info.labels.get(LABEL_POOL):
            # A group claimed from a warm pool: no started_at label, its slot tells the group
            # (the same as the instance's primary container's).
            main = self.driver.get_container(rec.container_id or rec.container_name)
            wanted.pop(LABEL_STARTED_AT)
            wanted[LABEL_POOL] = "" if main is None else main.labels.get(LABEL_POOL, "")
        ours = info is not None and LABEL_SERVICE in info.labels \
            and carries(info.labels, wanted) \
            and not app.done(info.labels[LABEL_SERVICE], info.state, info.exit_code)
        return info if ours else None

    def _judge(self, rec: Instance | None, container_id: str) -> str:
        if rec is None or rec.host != self.host:
            return "unchanged"
        if container_id and rec.container_id and rec.container_id != container_id:
            return "unchanged"  # news of a container this instance no longer uses
        if rec.status == "starting":
            return "busy"
        return "go" if rec.status == "running" else "unchanged"

    def _failure(self, rec: Instance, info: ContainerInfo | None) -> dict[str, Any]:
        """The fields of a failed record: error, exit code, OOM flag, last output lines."""
        if info is None:
            return {"status": "failed", "error": CONTAINER_GONE}
        if info.state == "running":
            why = "the container is unhealthy: its health check fails"
        else:
            why = f"the container {info.state}"
            if info.exit_code is not None:
                why = f"the container exited with code {info.exit_code}"
            if info.oom_killed:
                why += ": killed for lack of memory (raise the challenge's memory limit)"
        logs = ""
        with contextlib.suppress(CTFError):
            logs = self.driver.container_logs(info.id, tail=FAILED_LOG_LINES).strip()
        with contextlib.suppress(CTFError):
            key = self.catalog.key(rec.challenge, rec.team_id)
            logs = logs.replace(self.specs.flag(key.challenge, key.team), "[flag]")
        return {"status": "failed", "error": why, "exit_code": info.exit_code,
                "oom": info.oom_killed, "logs": logs[-FAILED_LOG_CHARS:] or None}

    def forget_removed(
        self, challenge: str, team_id: str, container_id: str, *, wait: float = BUSY_WAIT
    ) -> str:
        """Forget an instance whose container was removed behind our back; clean its network.

        Args:
            challenge: the challenge id.
            team_id: the team.
            container_id: the removed container (an instance with another one is kept).
            wait: seconds to wait for the instance's lock.

        Returns:
            ``"forgotten"``, ``"busy"`` (a start holds it: ask again shortly) or
            ``"unchanged"``.
        """
        seen = self.store.get(challenge, team_id)
        verdict = self._judge_removal(seen, container_id)
        if verdict != "go":
            return verdict
        try:
            with self._locked(challenge, team_id, wait):
                rec = self.store.get(challenge, team_id)
                verdict = self._judge_removal(rec, container_id)
                if verdict != "go" or rec is None:
                    return verdict
                if self.driver.get_container(rec.container_name) is not None:
                    return "unchanged"  # a container of that name exists again
                self.store.delete(challenge, team_id, self.host)
        except InstanceBusy:
            return "busy"
        with contextlib.suppress(*ERROR_OR_SIGNAL):  # a busy network: the janitor's
            self.specs.remove_network_if_unused(team_id)
        return "forgotten"

    def _judge_removal(self, rec: Instance | None, container_id: str) -> str:
        if rec is None or rec.host != self.host or rec.container_id != container_id:
            return "unchanged"
        if rec.status == "starting":
            return "busy"
        # A running instance, or one that died in place (marked by mark_failed). Not a stop
        # (it deletes the record itself), nor a failed start, whose record stays a while
        # with its error after the start removed the container.
        died_in_place = rec.status == "failed" and (rec.oom is not None
                                                    or rec.error == CONTAINER_GONE)
        return "go" if rec.status == "running" or died_in_place else "unchanged"

    def adopt(self, challenge: str, team_id: str) -> ReconcileSummary:
        """Bring one instance's record in line with its container, as :meth:`reconcile` does.

        For a container started behind our back with our labels: recorded from its labels.
        """
        summary = ReconcileSummary()
        ch = self.catalog.get(challenge)
        self._reconcile_one(ch, check_team_id(team_id, reserved_ok=True), utcnow(), summary)
        return summary
