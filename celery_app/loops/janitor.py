"""The janitor: removes expired instances, then orphans (SPEC §7).

:meth:`Janitor.run_once` is one pure pass over "now"; :meth:`Janitor.loop` repeats it for
cron-less set-ups, and the Celery beat runs the ``reap_expired`` task, which calls it.
A container or network that is already gone counts as removed, so two janitors, or a janitor
racing a user's stop, are harmless.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery_app.core.audit import ADMIN, Auditor
from celery_app.core.service import NO_INTENT, InstanceService
from celery_app.engine.driver import ContainerInfo
from celery_app.errors import CTFError, InstanceNotFound
from celery_app.state.store import one_at_a_time
from celery_app.vocab.models import Instance, InstanceKey, utcnow
from celery_app.vocab.naming import (
    CANARY_TEAM,
    GLOBAL_TEAM,
    LABEL_CHALLENGE,
    LABEL_DISK,
    LABEL_POOL,
    LABEL_ROLE,
    LABEL_SERVICE,
    LABEL_TEAM,
    POOL_NAME_PREFIX,
    ROLE_SOLVER,
    instance_key,
    network_name,
    read_claim,
    split_instance_key,
)
from celery_app.vocab.signals import ERROR_OR_SIGNAL, InstanceBusy

log = logging.getLogger(__name__)

# Seconds one pass may spend removing empty networks (about 0.2 s each on a 2-core host). It
# also stops as soon as an instance expires, so a backlog of networks never holds back the
# next expired instances; the cap keeps one pass well inside its 300 s janitor lock.
NETWORK_BUDGET = 60.0
# Networks one pass removes before it gives way to a new expiry, so that a steady stream of
# expiries (one every few seconds in a busy event) cannot starve network removal for good.
NETWORK_MINIMUM = 5
# Threads that remove the networks a pass's expiries empty while the other expired containers
# are still being removed (issue 27): the engine removes networks one at a time, so more
# lanes would only queue in it, and the container removals keep CTF_JANITOR_CONCURRENCY.
NETWORK_LANES = 2


@dataclass
class Summary:
    """What one janitor pass did."""

    expired: list[str] = field(default_factory=list)
    orphan_containers: list[str] = field(default_factory=list)
    orphan_networks: list[str] = field(default_factory=list)
    marked_failed: list[str] = field(default_factory=list)
    over_disk: list[str] = field(default_factory=list)
    started_global: list[str] = field(default_factory=list)
    reconciled: bool = False
    skipped: bool = False
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reap_seconds: float = 0.0  # of ``seconds``: until the expired instances were removed
    # ``orphan_networks`` also lists the team networks this pass's expiries emptied (removed
    # beside the expiries, step 3) as well as those found empty afterwards (step 5).

    @property
    def removed(self) -> int:
        """How many things this pass removed."""
        return len(self.expired) + len(self.orphan_containers) + len(self.orphan_networks)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able summary."""
        return {
            "expired": self.expired,
            "orphan_containers": self.orphan_containers,
            "orphan_networks": self.orphan_networks,
            "marked_failed": self.marked_failed,
            "over_disk": self.over_disk,
            "started_global": self.started_global,
            "reconciled": self.reconciled,
            "skipped": self.skipped,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "reap_seconds": round(self.reap_seconds, 3),
        }


def _created_at(raw: str) -> float:
    """Return a container's creation time (epoch s) from list or inspect output."""
    if raw.isdigit():
        return float(raw)
    try:
        return datetime.fromisoformat(raw[:26].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        return 0.0


class Janitor:
    """Removes what has expired or is no longer accounted for, on one Docker host."""

    def __init__(self, service: InstanceService) -> None:
        self.service = service
        self.auditor = Auditor(service.settings, service.store)  # each expiry (SPEC §13)

    def run_once(self, now: datetime | None = None) -> Summary:
        """Run one pass.

        1. When Redis lost the index (flushed, restarted empty): reconcile from Docker first,
           so nothing running is mistaken for an orphan.
        2. Remove every instance of this host whose ``expires_at`` has passed.
           A team network the expiries empty (every instance of the team here expired) is
           removed as soon as the team's last container is gone, by ``NETWORK_LANES``
           threads of its own, while the other expired containers are still being removed
           (issue 27: mass expiry and network removal run side by side, as the engine can).
        3. Remove containers with our labels that no instance accounts for (older than
           ``CTF_ORPHAN_GRACE``, so a start in flight is never touched).
        4. Remove the other team networks with no container and no instance, for at most
           ``NETWORK_BUDGET`` seconds and, past ``NETWORK_MINIMUM`` of them, only until
           another instance expires (the rest next pass).

        Args:
            now: the moment to judge expiry against (tests pass their own).

        Returns:
            What was removed.

        """
        now = now or utcnow()
        began = time.monotonic()
        summary = Summary()
        # 0. one pass at a time per host: passes queued behind a long one would only wait
        #    on the same instance locks and hold worker threads.
        with one_at_a_time(self.service.store.janitor_lock(self.service.host, timeout=300),
                           "janitor") as ours:
            if not ours:
                summary.skipped = True
                return summary
            self._pass(now, summary)
        summary.seconds = time.monotonic() - began
        if summary.removed or summary.errors or summary.reconciled or summary.marked_failed \
                or summary.over_disk or summary.started_global:
            log.info("janitor host=%s %s", self.service.host, summary.as_dict())
            self._count(summary)
        return summary

    def _count(self, summary: Summary) -> None:
        """Add what this pass removed to the counters ``/metrics`` exposes."""
        counts = {
            "expired": len(summary.expired),
            "orphan_containers": len(summary.orphan_containers),
            "orphan_networks": len(summary.orphan_networks),
            "marked_failed": len(summary.marked_failed),
            "over_disk": len(summary.over_disk),
        }
        with contextlib.suppress(CTFError):
            self.service.store.count_removals(counts)

    def _pass(self, now: datetime, summary: Summary) -> None:
        # 1. Redis lost the index: rebuild it before judging anything an orphan.
        if not self.service.index_is_complete():
            self.service.reconcile(now)
            summary.reconciled = True
        # 2. writable instances over their disk bound: stopped before anything slower
        self._enforce_disk(summary)
        # 3. expired instances, and the team networks they empty beside them
        judged = self._reap_expired(now, summary)
        # 4. orphan containers
        live_teams = self._remove_orphan_containers(now, summary)
        # 5. orphan networks
        self._remove_orphan_networks(live_teams, summary, now, judged)
        # 6. ingress routes (CTF_INGRESS=traefik): none left without its running container.
        self.service.sync_routes()
        # 7. the global instances (SPEC §13): started when the workers come up, and again
        #    once dead (marked in step 4, or by the event follower) or gone. Here rather than
        #    in the event follower: a pass every CTF_JANITOR_INTERVAL s also covers an engine
        #    restart, a Redis loss and a stop by the admin, with one record read each.
        self._ensure_global(summary)

    def _ensure_global(self, summary: Summary) -> None:
        """Start each global instance that is down (:meth:`InstanceService.globals_down`).

        A start is recorded in the audit trail as the organisers' rules' (actor ``admin``).
        """
        svc = self.service
        for key in svc.globals_down():
            try:
                svc.start(key, count_rate=False, lock_wait=2.0)
            except ERROR_OR_SIGNAL as exc:  # busy, on another host, a failed start: next pass
                # Logged with the pass, not audited: a broken image would add one event
                # every pass.
                summary.errors.append(f"{key}: {exc}")
                continue
            summary.started_global.append(str(key))
            self.auditor.try_record("start", key.team, key.challenge, ADMIN, "ok")

    def _enforce_disk(self, summary: Summary) -> None:
        """Stop each running instance whose writable layer is over its ``ctf.disk`` bound.

        The engine sizes every writable instance's layer (whatever its storage driver), so
        the bound holds on every engine: an instance is stopped within one janitor interval
        of crossing it, having written at most what it can write in that time beyond it.
        An unclaimed warm-pool container over its bound is removed.
        """
        svc = self.service
        for layer in svc.driver.writable_layers(svc.scope_labels, LABEL_DISK):
            try:
                bound = int(layer.labels.get(LABEL_DISK, ""))
            except ValueError:
                continue
            if layer.size <= bound:
                continue
            reason = (f"the instance wrote {layer.size // 1024**2} MiB to its filesystem, "
                      f"over its bound of {bound // 1024**2} MiB (the catalog's 'disk', "
                      "CTF_DEFAULT_DISK by default): it was stopped; start it again for a "
                      "fresh one")
            try:
                # A claimed warm-pool container's team is in its name (read_claim).
                team = read_claim(layer.labels, layer.name).get(LABEL_TEAM)
                if team is None:  # an unclaimed warm-pool container: nobody's yet
                    svc.driver.remove_container(layer.id)
                    summary.over_disk.append(layer.name)
                    continue
                outcome = svc.reconciler.fail_over_disk(
                    layer.labels.get(LABEL_CHALLENGE, ""), team, layer.id, reason, wait=2.0)
                if outcome == "marked":
                    summary.over_disk.append(layer.name)
                    log.warning("janitor: %s %s", layer.name, reason)
            except ERROR_OR_SIGNAL as exc:
                summary.errors.append(f"{layer.name}: {exc}")

    def _expired_here(
        self, at: float, skip: frozenset[str] | set[str] = frozenset()
    ) -> list[tuple[str, str, str]]:
        """Return ``(key, challenge, team)`` of this host's instances expired by ``at``."""
        svc = self.service
        mine = []
        for key in svc.store.expired(at):
            if key in skip:
                continue
            challenge, team = split_instance_key(key)
            if team == GLOBAL_TEAM:
                continue  # a global instance never expires (SPEC §13): step 7 keeps it up
            if team == CANARY_TEAM and self._solved(challenge):
                continue  # a solver's canary never expires while the solver is configured
            record = svc.store.get(challenge, team)
            if record is None or record.host == svc.host:  # other hosts reap their own
                mine.append((key, challenge, team))
        return mine

    def _reap_expired(self, now: datetime, summary: Summary) -> set[str]:
        """Reap this host's expired instances and the team networks they empty; return the keys.

        The keys returned are those it judged (reaped, busy or failing).
        The containers go ``CTF_JANITOR_CONCURRENCY`` at a time; a team network goes as soon
        as the last expired container of its team is gone (``NETWORK_LANES`` threads), so
        network removals overlap the remaining container removals instead of following them.
        ``summary.reap_seconds``: until the expired containers were gone.
        """
        svc = self.service
        began = time.monotonic()
        mine = self._expired_here(now.timestamp())
        if not mine:
            return set()
        left = self._emptied_teams(mine)
        guard = threading.Lock()

        with ThreadPoolExecutor(NETWORK_LANES, thread_name_prefix="janitor-net") as lanes:

            def reap(item: tuple[str, str, str]) -> tuple[str, str]:
                key, outcome = self._reap_one(*item)
                team = item[2]
                if outcome == "removed" and team in left:
                    with guard:
                        left[team] -= 1
                        last = left[team] == 0
                    if last:
                        lanes.submit(self._remove_team_network, team, summary)
                return key, outcome

            # Each stop takes its own locks; removals run side by side because Docker's
            # forced removal, not our code, is what takes the time.
            workers = min(svc.settings.janitor_concurrency, len(mine))
            with ThreadPoolExecutor(workers, thread_name_prefix="janitor") as pool:
                outcomes = list(pool.map(reap, mine))
            summary.reap_seconds = time.monotonic() - began
        for key, outcome in outcomes:
            if outcome == "removed":
                summary.expired.append(key)
            elif outcome:
                summary.errors.append(f"{key}: {outcome}")
        return {key for key, _, _ in mine}

    def _emptied_teams(self, mine: list[tuple[str, str, str]]) -> dict[str, int]:
        """Teams whose every instance here expires now, with how many (their network's count).

        Once that many are reaped the team's network has no instance left.
        One read of the host's records. A start of the team after it is harmless: the
        removal checks, under the team's network lock, that no container is on the network.
        """
        svc = self.service
        expiring = {key for key, _, _ in mine}
        keeping = {i.team_id for i in svc.store.list(host=svc.host) if i.key not in expiring}
        left: dict[str, int] = {}
        for _, _, team in mine:
            if team not in keeping:
                left[team] = left.get(team, 0) + 1
        return left

    def _remove_team_network(self, team: str, summary: Summary) -> None:
        """Remove ``team``'s network if nothing is on it (a lane of :meth:`_reap_expired`)."""
        try:
            if self.service.remove_network_if_unused(team):
                summary.orphan_networks.append(network_name(team))
        except ERROR_OR_SIGNAL as exc:  # a busy network lock: step 5 or the next pass
            summary.errors.append(f"{network_name(team)}: {exc}")

    def _reap_one(self, key: str, challenge: str, team: str) -> tuple[str, str]:
        svc = self.service
        try:
            svc.stop(InstanceKey(challenge, team), count_rate=False, lock_wait=2.0,
                     intent=NO_INTENT, keep_network=True)
        except InstanceNotFound:
            svc.store.delete(challenge, team, svc.host)  # already gone: done
        except InstanceBusy:
            return key, ""  # a user is acting on it; the next pass sees it again
        except ERROR_OR_SIGNAL as exc:  # e.g. it moved to another host meanwhile
            if isinstance(exc, CTFError):
                self.auditor.try_record("expire", team, challenge, ADMIN, exc.code)
            return key, str(exc)
        # The organisers' rules applied by the platform: the actor is the admin.
        self.auditor.try_record("expire", team, challenge, ADMIN, "ok")
        return key, "removed"

    def _remove_orphan_containers(self, now: datetime, summary: Summary) -> set[str]:
        """Remove unaccounted containers; return the teams that still have something."""
        svc = self.service
        records = {i.container_name: i for i in svc.store.list(host=svc.host)}
        keys = {i.key for i in records.values()}
        live_teams = {i.team_id for i in records.values()}
        containers = svc.driver.list_containers(svc.scope_labels)
        self._mark_dead(records, {c.name: c for c in containers}, summary)
        for c in containers:
            rec = records.get(c.name)
            if rec is not None and rec.container_id in ("", c.id):
                continue  # an instance (or a start in flight)
            if LABEL_SERVICE in c.labels and instance_key(c.challenge, c.team_id) in keys:
                continue  # another service of a Compose instance (SPEC §12): its group's
            if LABEL_POOL in c.labels and c.name.startswith(POOL_NAME_PREFIX) \
                    and self._pooled(c.challenge):
                continue  # unclaimed, in a warm pool: the pool pass keeps those (pool.py)
            age = now.timestamp() - _created_at(c.created)
            if c.labels.get(LABEL_ROLE) == ROLE_SOLVER and age < self._solver_hold(c.challenge):
                continue  # a solver's run (SPEC §14): its loop removes it when the run ends
            if age < svc.settings.orphan_grace:
                live_teams.add(c.team_id)
                continue
            try:
                svc.ingress.remove_routes(c.name)  # and its endpoints' (Compose)
                svc.driver.remove_container(c.id)
                summary.orphan_containers.append(c.name)
            except CTFError as exc:
                summary.errors.append(f"{c.name}: {exc}")
        return live_teams

    def _solved(self, challenge: str) -> bool:
        """Whether ``challenge`` has a solver (its canary is kept, SPEC §14)."""
        with contextlib.suppress(CTFError):
            return self.service.catalog.get(challenge).solver is not None
        return False

    def _solver_hold(self, challenge: str) -> float:
        """Seconds a solver's container may live before it counts as an orphan."""
        grace = self.service.settings.orphan_grace
        with contextlib.suppress(CTFError):
            solver = self.service.catalog.get(challenge).solver
            if solver is not None:
                return solver.timeout + grace
        return grace

    def _pooled(self, challenge: str) -> bool:
        """Whether ``challenge`` has a warm pool (its unclaimed containers are the pool's)."""
        with contextlib.suppress(CTFError):
            pool = self.service.pool
            return pool.size(self.service.catalog.get(challenge)) > 0 and pool.usable
        return False

    def _mark_dead(
        self, records: dict[str, Instance], containers: dict[str, ContainerInfo],
        summary: Summary,
    ) -> None:
        """Mark ``failed`` the running instances whose container died or vanished.

        So no interface keeps calling a dead container running (after an engine restart,
        an OOM kill, a ``docker rm`` by hand). The record stays, with the reason, until it
        expires or the team starts it again.
        """
        svc = self.service
        for name, rec in records.items():
            c = containers.get(name)
            if rec.status == "running" and c is not None and c.state == "running":
                gone = self._missing_member(rec, containers)
                if gone:  # a group's service removed by hand: judged by name, under the lock
                    if svc.mark_failed(rec.challenge, rec.team_id, rec.container_id,
                                       service=gone) == "marked":
                        summary.marked_failed.append(rec.key)
                    continue
                c = self._dead_member(rec, containers) or c  # a group's other services too
            if rec.status != "running" or (c is not None and c.state == "running"):
                continue
            if c is not None and c.id != rec.container_id:
                if svc.mark_failed(rec.challenge, rec.team_id, c.id) == "marked":
                    summary.marked_failed.append(rec.key)
                continue
            # Judged again under the instance's lock, as the event follower does; one that is
            # being started or stopped is left to that operation (next pass).
            if svc.mark_failed(rec.challenge, rec.team_id, rec.container_id) == "marked":
                summary.marked_failed.append(rec.key)

    def _dead_member(self, rec: Instance,
                     containers: dict[str, ContainerInfo]) -> ContainerInfo | None:
        """A Compose instance's other service that is there but not running, if any."""
        with contextlib.suppress(CTFError):
            ch = self.service.catalog.get(rec.challenge)
            if ch.app is not None:
                layout = self.service.specs.layout(ch.id, rec.team_id, ch.app)
                for service, name in zip(layout.services[1:], layout.containers[1:],
                                         strict=True):
                    c = containers.get(name)
                    if c is not None and c.state != "running" \
                            and not ch.app.done(service, c.state, c.exit_code):
                        return c
        return None

    def _missing_member(self, rec: Instance, containers: dict[str, ContainerInfo]) -> str:
        """A Compose instance's other service (not a one-shot) with no container, if any."""
        with contextlib.suppress(CTFError):
            ch = self.service.catalog.get(rec.challenge)
            if ch.app is not None:
                layout = self.service.specs.layout(ch.id, rec.team_id, ch.app)
                for service, name in zip(layout.services[1:], layout.containers[1:],
                                         strict=True):
                    if name not in containers and service not in ch.app.one_shots:
                        return service
        return ""

    def _remove_orphan_networks(
        self, live_teams: set[str], summary: Summary, now: datetime, judged: set[str]
    ) -> None:
        svc = self.service
        began = time.monotonic()

        def newly_expired() -> bool:
            # On the pass's clock; instances this pass already judged (reaped, busy or
            # failing) do not count, or one stuck instance would stall every network.
            at = now.timestamp() + time.monotonic() - began
            return bool(self._expired_here(at, skip=judged))

        tried = 0
        live_keys: set[str] | None = None
        for net in svc.driver.list_networks(svc.scope_labels):
            team = net.labels.get("ctf.team", "")
            if LABEL_POOL in net.labels and (net.labels[LABEL_POOL] == "holding"
                                              or self._pooled(net.labels.get(LABEL_CHALLENGE,
                                                                             ""))):
                continue  # a warm pool's holding network, or a pooled group's (pool.py)
            if net.containers:
                continue
            challenge = net.labels.get(LABEL_CHALLENGE)
            if challenge:
                # A Compose instance's own network (SPEC §12): kept while its instance is
                # recorded (a start reserves before it makes the network), whatever the team's
                # other instances.
                if live_keys is None:
                    live_keys = {i.key for i in svc.store.list(host=svc.host)}
                if instance_key(challenge, team) in live_keys:
                    continue
            elif team in live_teams:
                continue
            # Out of time, or (past the minimum) an instance expired meanwhile: the next pass
            # takes the rest, expired instances first.
            if time.monotonic() - began > NETWORK_BUDGET:
                break
            if tried >= NETWORK_MINIMUM and newly_expired():
                break
            tried += 1
            try:
                if svc.remove_network_if_unused(team, net.id):
                    summary.orphan_networks.append(net.name)
            except ERROR_OR_SIGNAL as exc:  # a busy network lock: the next pass
                summary.errors.append(f"{net.name}: {exc}")
