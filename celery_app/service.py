"""The instance service: the rules of starting, stopping, extending and listing instances.

Tasks, the API and the CLI call this; it calls the Docker driver and the Redis state store.
Docker (read through labels) is the source of truth; Redis is the index and lock service.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import LockError
from redis.lock import Lock

from celery_app.catalog import Catalog, Challenge
from celery_app.docker_driver import (
    ContainerInfo,
    ContainerSpec,
    DockerDriver,
    Filesystem,
    NetworkInfo,
    ProgressFn,
    carries,
    check_ours,
)
from celery_app.errors import (
    CatalogError,
    CTFError,
    ImageNotFound,
    InstanceBusy,
    InstanceNotFound,
    InvalidRequest,
    MaxLifetimeReached,
    OnOtherHost,
    StartFailed,
    Superseded,
)
from celery_app.firewall import EgressGuard
from celery_app.flags import team_flag
from celery_app.ingress import Ingress
from celery_app.models import Instance, iso, parse_iso, utcnow
from celery_app.naming import (
    LABEL_CHALLENGE,
    LABEL_EGRESS,
    LABEL_EXPIRES_AT,
    LABEL_HOST,
    LABEL_MANAGED,
    LABEL_STARTED_AT,
    LABEL_TEAM,
    check_team_id,
    container_name,
    network_name,
)
from celery_app.pool import Pool
from celery_app.readiness import probe_once, wait_until
from celery_app.settings import Settings
from celery_app.state import StateStore, map_redis_errors

log = logging.getLogger(__name__)

# Seconds a (challenge, team) lock lives without renewal: how long a killed worker blocks it.
LOCK_HOLD = 30.0
# Seconds background passes (reconcile, the janitor) wait for an instance someone else holds;
# then they leave it to that operation and look again next pass.
BUSY_WAIT = 0.5
# Passed as ``intent`` by the janitor: act regardless of what users last asked.
NO_INTENT = -1
# A failed start stays visible (status "failed" with its error) this long, then is reaped.
FAILED_RECORD_TTL = 120
# After Redis lost an instance, an adopted one past its recorded expiry gets this much grace.
ADOPT_GRACE = 60
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


class InstanceService:
    """Starts, stops, extends and lists the instances of one Docker host.

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

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        driver: DockerDriver,
        store: StateStore,
        host: str = "local",
        public_host: str | None = None,
        host_max: int = 0,
        egress: EgressGuard | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.driver = driver
        self.store = store
        self.host = host
        self.public_host = public_host or settings.public_host
        self.host_max = host_max
        # Only what carries all these labels is ours (tests add a run label here).
        self.scope_labels = {LABEL_MANAGED: "true", **settings.extra_labels}
        self._exposed_port_cache: dict[str, int] = {}
        self.egress = egress or EgressGuard(None, driver, "not configured")
        # SPEC §11: with CTF_INGRESS=traefik instances sit behind this host's Traefik.
        self.ingress = Ingress(settings)
        # Warm pools (issue 14): containers booted ahead, claimed in start's step 7.
        self.pool = Pool(self)
        if self.ingress.enabled and not driver.is_local:
            log.warning("CTF_INGRESS=traefik with the remote engine of host %s: Traefik must run "
                        "on the Docker host to reach its containers; run this worker there", host)

    # -- helpers ----------------------------------------------------------------------------

    def _validate(self, challenge: object, team_id: object) -> tuple[Challenge, str]:
        """Refuse bad input before Docker or Redis is touched."""
        team = check_team_id(team_id)
        return self.catalog.get(challenge), team

    def _elsewhere(self, record: Instance) -> OnOtherHost:
        return OnOtherHost(
            f"instance {record.container_name} lives on host {record.host}, not {self.host}; "
            f"its worker (queue ctf.host.{record.host}) acts on it", host=record.host,
        )

    @contextlib.contextmanager
    def locked(
        self, challenge: str, team_id: str, hold: float, wait: float | None = None
    ) -> Iterator[Lock]:
        """Hold the (challenge, team) lock; released in ``finally``, expires if we die.

        It expires ``hold`` seconds after it was last renewed, so a worker killed mid-start
        blocks the instance for at most that long; a live holder renews it while it waits.
        """
        lock = self.store.instance_lock(challenge, team_id, timeout=hold)
        with map_redis_errors("lock instance"):
            acquired = lock.acquire(
                blocking=True,
                blocking_timeout=self.settings.lock_wait if wait is None else wait,
            )
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

    def _container_port(self, ch: Challenge) -> int:
        if ch.port is not None:
            return ch.port
        if ch.image not in self._exposed_port_cache:
            port = self.driver.image_exposed_port(ch.image)
            if port is None:
                raise CatalogError(
                    f"challenge {ch.id!r}, field 'port': not set and image {ch.image!r} EXPOSEs "
                    "no TCP port; set port in the catalog"
                )
            self._exposed_port_cache[ch.image] = port
        return self._exposed_port_cache[ch.image]

    def _url(self, ch: Challenge, team: str, host_port: int | None) -> str | None:
        if self.ingress.enabled:
            return self.ingress.url(ch.id, team, ch.protocol)
        if host_port is None:
            return None
        scheme = "http" if ch.protocol == "http" else "tcp"
        return f"{scheme}://{self.public_host}:{host_port}"

    def flag_for(self, challenge: str, team_id: str) -> str:
        """Return the team's flag for a challenge (see :mod:`celery_app.flags`)."""
        ch, team = self._validate(challenge, team_id)
        return team_flag(self.settings.flag_secret_value(), ch.id, team, self.settings.flag_format)

    def ensure_image(self, ch: Challenge, progress: ProgressFn | None = None) -> None:
        """Make the challenge image present, following ``CTF_PULL_POLICY``.

        Raises:
            ImageNotFound: missing with policy ``never``, or the registry has no such image.
        """
        policy = self.settings.pull_policy
        if policy == "always" or (policy == "if-not-present" and not self.driver.image_present(
            ch.image
        )):
            log.info("pulling image=%s challenge=%s", ch.image, ch.id)
            self.driver.pull(ch.image, progress)
        elif policy == "never" and not self.driver.image_present(ch.image):
            raise ImageNotFound(
                f"image {ch.image!r} of challenge {ch.id!r} is not present and CTF_PULL_POLICY "
                "is 'never'; load it (docker load/pull) or change the policy"
            )

    # -- start ------------------------------------------------------------------------------

    def start(
        self, challenge: str, team_id: str, progress: ProgressFn | None = None,
        intent: int | None = None, *, rate_limit: bool = True, lock_wait: float | None = None,
    ) -> Instance:
        """Start the team's instance of a challenge and wait until it answers.

        Idempotent: an instance that already runs is returned unchanged (same container).

        Args:
            challenge: a catalog id.
            team_id: the team.
            progress: called with ``{"phase": …}`` dicts while pulling and starting.
            intent: the request's sequence number from ``StateStore.register_intent`` (taken
                now when ``None``); a later stop of the same instance supersedes it.
            rate_limit: count this start against the team's rate limit (the dispatcher counts
                the requests it sends itself, before they are queued).
            lock_wait: seconds to wait for another operation on the instance (the settings'
                ``lock_wait`` by default); tasks wait briefly and retry later instead.

        Returns:
            The instance, ``running``.

        Raises:
            InvalidTeamId, UnknownChallenge: bad input (nothing was touched).
            TeamQuotaExceeded, CapacityExhausted, RateLimited: a limit was hit.
            StartFailed: the container exited or never answered.
            Superseded: a later stop of this instance was requested meanwhile.
            OnOtherHost: the instance lives on another Docker host (hand the request there).
            InstanceBusy: another operation held the instance for ``lock_wait`` seconds.
            BackendUnavailable: Docker or Redis trouble (retryable).
        """
        ch, team = self._validate(challenge, team_id)
        name = container_name(ch.id, team)
        report = progress or (lambda _event: None)
        if intent is None:
            intent = self.store.register_intent(ch.id, team, "start")
        # 0. rate limit before any work: only a start that makes a new instance counts (one
        #    that already runs, or is being started, is returned and costs nothing).
        seen = self.store.get(ch.id, team)
        if rate_limit and (seen is None or seen.status == "failed"):
            self.store.hit_rate(team, self.settings.rate_limit_count,
                                self.settings.rate_limit_window)
        if seen is not None and seen.host != self.host:
            raise self._elsewhere(seen)

        # 1. the image: pulls can be long and need no lock.
        report({"phase": "image", "image": ch.image})
        self.ensure_image(ch, progress)
        port = self._container_port(ch)
        # Fail closed: no instance starts while the egress firewall is not in place.
        self.egress.require()

        # 2. lock (challenge, team): concurrent starts create one container, on every host.
        with self.locked(ch.id, team, hold=LOCK_HOLD, wait=lock_wait) as lock:
            # 3. the latest request wins: a stop sent after this start cancels it.
            if self.store.superseded(ch.id, team, intent, "start"):
                raise Superseded(
                    f"a stop of {ch.id} for team {team} was requested after this start; "
                    "start it again if it is still wanted"
                )
            # 4. an instance recorded on another host is that host's to start (one container
            #    per instance across all hosts); its worker takes the request over.
            record = self.store.get(ch.id, team)
            if record is not None and record.host != self.host:
                raise self._elsewhere(record)
            # 5. an existing container is reused (idempotency, redelivered tasks).
            existing = self._own_container(name, ch.id, team)
            if existing is not None and existing.state == "running":
                if record is not None and record.status == "running" \
                        and record.container_id == existing.id:
                    return record
                # A redelivered start (its worker died) or a lost record: adopt the container,
                # taking its id and port from Docker, not from a reservation made before it.
                inst = record or self._instance_from_container(ch, existing, "starting")
                inst = self._with_container(ch, inst, existing, port)
                return self._await_ready(ch, existing, inst, port, report, lock)
            if existing is not None:
                # Exited, dead or created-but-never-started: start over from scratch.
                self.driver.remove_container(existing.id)

            # 6. reserve a slot: quotas are checked and the record written in one step.
            now = utcnow()
            assert ch.ttl is not None
            inst = Instance(
                team_id=team, challenge=ch.id, status="starting", container_name=name,
                host=self.host, started_at=iso(now),
                expires_at=iso(now + timedelta(seconds=ch.ttl)),
            )
            self.store.reserve(inst, self.settings.max_instances_per_team,
                               self.settings.max_instances, self.host_max)
            try:
                # 7. network and container, under the team's network lock (a stop of the
                #    team's last instance must not remove the network we are joining).
                report({"phase": "creating"})
                with self._network_locked(team):
                    net = self.driver.ensure_network(
                        team, self._labels(team), self.settings.team_subnet_pool,
                        self.settings.team_subnet_prefix,
                    )
                    info = self._claim_or_run(ch, team, net, self._spec(ch, team, port, inst),
                                              inst)
                    try:
                        self.egress.admit(info, net)  # its bridge known, internet or not
                    except CTFError:
                        self.driver.remove_container(info.id)
                        raise
            except BaseException:
                # Nothing half-made: the reservation, and a network made only for this
                # instance, go with the failed creation.
                self.store.delete(ch.id, team, self.host)
                with contextlib.suppress(CTFError):
                    self.remove_network_if_unused(team)
                raise
            # 8. record the container and its port.
            inst = self._with_container(ch, inst, info, port)
            self.store.put(inst)
            # 9. running only once the port answers.
            report({"phase": "starting", "container": name})
            return self._await_ready(ch, info, inst, port, report, lock)

    def _claim_or_run(
        self, ch: Challenge, team: str, net: NetworkInfo, spec: ContainerSpec, inst: Instance
    ) -> ContainerInfo:
        """Start step 7's container: a claimed warm-pool one (issue 14), else a cold one.

        Before a cold one, the pools give way when the host is full: no start is refused
        for their sake.
        """
        info = self.pool.claim(ch, team, net, spec, inst) if ch.pool else None
        if info is None:
            self.pool.make_room()
            info = self.driver.run_container(spec)
        return info

    @contextlib.contextmanager
    def _network_locked(self, team_id: str) -> Iterator[None]:
        lock = self.store.network_lock(team_id)
        with map_redis_errors("lock network"):
            if not lock.acquire(blocking=True, blocking_timeout=60):
                raise InstanceBusy(f"the network of team {team_id} is busy; try again shortly")
        try:
            yield
        finally:
            with contextlib.suppress(LockError), map_redis_errors("unlock network"):
                lock.release()

    def _labels(self, team_id: str, challenge: str | None = None) -> dict[str, str]:
        labels = {**self.scope_labels, LABEL_TEAM: team_id, LABEL_HOST: self.host}
        if challenge is not None:
            labels[LABEL_CHALLENGE] = challenge
        return labels

    def _spec(self, ch: Challenge, team: str, port: int, inst: Instance) -> ContainerSpec:
        env = dict(ch.env)
        if ch.flag_env:
            env[ch.flag_env] = team_flag(
                self.settings.flag_secret_value(), ch.id, team, self.settings.flag_format
            )
        labels = self._labels(team, ch.id)
        labels[LABEL_STARTED_AT] = inst.started_at
        labels[LABEL_EXPIRES_AT] = inst.expires_at
        labels[LABEL_EGRESS] = ch.egress
        ip = None
        if self.ingress.enabled:
            # The route is written before the container exists, with the address the
            # container will get (we hold the team's network lock): Traefik loads it while
            # Docker creates and starts the container, not after.
            ip = self.driver.free_address(network_name(team))
            if ip is not None:
                self.ingress.add_route(inst.container_name, ch.id, team, ch.protocol, ip, port)
        return self._container_spec(ch, inst.container_name, team, labels, env, port, ip)

    def _container_spec(
        self, ch: Challenge, name: str, team: str, labels: dict[str, str],
        env: dict[str, str], port: int, ip: str | None, network: str | None = None,
    ) -> ContainerSpec:
        """The hardened container of ``ch`` (cold starts and warm pools alike)."""
        return ContainerSpec(
            name=name, image=ch.image, port=port, team_id=team, labels=labels,
            env=env, memory_bytes=ch.memory_bytes, nano_cpus=int(ch.cpus * 1e9), pids=ch.pids,
            cap_add=ch.cap_add, publish_ip=self.settings.publish_ip,
            port_range=self.settings.port_range, command=ch.command, hostname=ch.id,
            filesystem=Filesystem(ch.read_only, ch.tmpfs_bytes, ch.storage_bytes),
            publish=not self.ingress.enabled, ip=ip, network=network,
        )

    def _own_container(self, name: str, challenge: str, team_id: str) -> ContainerInfo | None:
        """Return the container named ``name`` when it is ours; ``None`` when there is none.

        The name alone is not proof: another deployment on the same engine (or a person)
        may use it. Ours carries every scope label and the instance's team and challenge.

        Raises:
            InvalidRequest: the name is taken by a container this instancer does not manage.
        """
        info = self.driver.get_container(name)
        if info is not None:
            check_ours("container", name, info.labels,
                       {**self.scope_labels, LABEL_TEAM: team_id, LABEL_CHALLENGE: challenge})
        return info

    def _with_container(
        self, ch: Challenge, inst: Instance, info: ContainerInfo, port: int
    ) -> Instance:
        """Return ``inst`` with the container's id, published ports and URL (and its route)."""
        if self.ingress.enabled and info.ip:
            # Unchanged when _spec already wrote it; written for an adopted container.
            self.ingress.add_route(info.name, ch.id, inst.team_id, ch.protocol, info.ip, port)
        return inst.model_copy(update={
            "container_id": info.id,
            "ports": info.ports,
            "url": self._url(ch, inst.team_id, info.ports.get(f"{port}/tcp")),
        })

    def _probe_target(
        self, ch: Challenge, info: ContainerInfo, port: int
    ) -> Callable[[float], bool] | None:
        """Return the readiness check of the container: ``check(timeout) -> answered``."""
        if self.ingress.enabled:
            # Through Traefik, the instance's route and the gate: what players will use.
            return self.ingress.probe(ch.id, info.team_id, ch.protocol, ch.health_path)
        # On the engine's own machine the container's address is routable and probing it
        # avoids docker-proxy, which accepts TCP connections even when nothing listens.
        if self.driver.is_local and info.ip:
            host, target_port = info.ip, port
        else:
            host_port = info.ports.get(f"{port}/tcp")
            if host_port is None:
                return None
            host = self.settings.probe_host if self.driver.is_local else self.public_host
            target_port = host_port
        return lambda timeout: probe_once(host, target_port, ch.protocol, ch.health_path,
                                          timeout=timeout)

    def _await_ready(
        self, ch: Challenge, info: ContainerInfo, inst: Instance, port: int,
        report: Callable[[dict[str, Any]], None], lock: Lock,
    ) -> Instance:
        target = self._probe_target(ch, info, port)

        def alive() -> bool:
            # Called every few polls: renew our lock while we are demonstrably working.
            with contextlib.suppress(LockError), map_redis_errors("renew lock"):
                lock.reacquire()
            current = self.driver.get_container(info.id)
            return current is not None and current.state in ("running", "created", "restarting")

        started = parse_iso(inst.started_at)
        remaining = max(1.0, ch.start_timeout - (utcnow() - started).total_seconds())
        ready = target is not None and wait_until(target, remaining, still_alive=alive)
        if ready:
            inst = inst.model_copy(update={"status": "running", "error": None, "exit_code": None,
                                           "oom": None, "logs": None})
            self.store.put(inst)
            report({"phase": "running", "url": inst.url})
            return inst
        # It died or never answered: say why, remove it, leave a short-lived failed record.
        current = self.driver.get_container(info.id)
        logs = self.driver.container_logs(info.id, tail=10).strip()
        why = (
            f"exited with code {current.exit_code}" if current and current.state == "exited"
            else f"did not answer on port {port} within {ch.start_timeout:.0f} s"
            + (self.ingress.probe_hint() if self.ingress.enabled else "")
        )
        detail = (
            f"instance {inst.container_name} {why}; check the image and the catalog's port "
            f"and health_path" + (f". Last output: {logs[-500:]}" if logs else "")
        )
        self.ingress.remove_route(inst.container_name)
        self.driver.remove_container(info.id)
        failed = inst.model_copy(update={
            "status": "failed", "error": detail, "container_id": info.id,
            "expires_at": iso(utcnow() + timedelta(seconds=FAILED_RECORD_TTL)),
        })
        self.store.put(failed)
        raise StartFailed(detail)

    def _instance_from_container(
        self, ch: Challenge, info: ContainerInfo, status: str
    ) -> Instance:
        """Rebuild an instance record from a container's labels (Redis lost it)."""
        now = utcnow()
        try:
            started = parse_iso(info.labels[LABEL_STARTED_AT])
            expires = parse_iso(info.labels[LABEL_EXPIRES_AT])
        except (KeyError, ValueError):
            started, expires = now, now + timedelta(seconds=ch.ttl or 0)
        assert ch.max_lifetime is not None
        if expires <= now:
            expires = min(now + timedelta(seconds=ADOPT_GRACE),
                          started + timedelta(seconds=ch.max_lifetime))
        port = self._container_port(ch)
        return Instance(
            team_id=info.team_id, challenge=ch.id, status=status,
            container_name=info.name, container_id=info.id, host=self.host, ports=info.ports,
            url=self._url(ch, info.team_id, info.ports.get(f"{port}/tcp")),
            started_at=iso(started),
            expires_at=iso(expires),
        )

    # -- stop -------------------------------------------------------------------------------

    def stop(
        self, challenge: str, team_id: str, *, rate_limit: bool = True,
        lock_wait: float | None = None, intent: int | None = None, keep_network: bool = False,
    ) -> dict[str, str]:
        """Stop and remove the team's instance, and the team network if it was the last.

        Args:
            challenge: a catalog id.
            team_id: the team.
            rate_limit: count this stop against the team's rate limit (not for the janitor).
            lock_wait: seconds to wait for a running start/stop of the same instance.
            intent: the request's sequence number (taken now when ``None``; ``NO_INTENT`` for
                the janitor, which acts whatever users asked).
            keep_network: leave an emptied team network for the janitor's network pass.
                The engine removes networks one at a time (about 0.2 s each here), so the
                janitor removes every expired container first and the networks after.

        Returns:
            ``{"team_id", "challenge", "status": "stopped"}``.

        Raises:
            InstanceNotFound: there is no such instance.
            RateLimited: the team stops and starts too fast.
            Superseded: a later start of this instance was requested meanwhile.
            OnOtherHost: the instance lives on another Docker host (hand the request there).
        """
        ch, team = self._validate(challenge, team_id)
        name = container_name(ch.id, team)
        if intent is None:
            intent = self.store.register_intent(ch.id, team, "stop")
        # 0. rate limit before any work (the janitor is not limited; a stop of nothing is free)
        seen = self.store.get(ch.id, team)
        if rate_limit and seen is not None:
            self.store.hit_rate(team, self.settings.rate_limit_count,
                                self.settings.rate_limit_window)
        # 1. lock (challenge, team)
        with self.locked(ch.id, team, hold=LOCK_HOLD, wait=lock_wait):
            # 2. the latest request wins: a start sent after this stop cancels it.
            if intent != NO_INTENT and self.store.superseded(ch.id, team, intent, "stop"):
                raise Superseded(
                    f"a start of {ch.id} for team {team} was requested after this stop; "
                    "stop it again if it is no longer wanted"
                )
            # 3. is there anything to stop, here? Another host's instance is its worker's:
            #    "stopped" is said only once the container is gone from its own engine.
            record = self.store.get(ch.id, team)
            if record is not None and record.host != self.host:
                raise self._elsewhere(record)
            existing = self._own_container(name, ch.id, team)
            if record is None and existing is None:
                raise InstanceNotFound(
                    f"team {team} has no instance of {ch.id}; start one first"
                )
            if record is not None:
                self.store.put(record.model_copy(update={"status": "stopping"}))
            # 4. route, container, then record: a crash in between leaves a record the
            #    janitor drops (and a route reconcile drops); the host answers 404 at once.
            self.ingress.remove_route(name)
            if existing is not None:
                self.egress.release(existing)  # before its address is free for another
                self.driver.remove_container(existing.id)
            self.store.delete(ch.id, team, self.host)
        # 5. the team's network goes with its last instance.
        if not keep_network:
            self.remove_network_if_unused(team)
        return {"team_id": team, "challenge": ch.id, "status": "stopped"}

    def remove_network_if_unused(self, team_id: str, network: str | None = None) -> bool:
        """Remove the team's network when no container is left on it.

        Args:
            team_id: the team (its network lock is held meanwhile).
            network: the network's name or id; the team's usual network by default.
        """
        with self._network_locked(team_id):
            net = self.driver.get_network(network or network_name(team_id))
            if net is None or net.containers > 0:
                return False
            if not carries(net.labels, self.scope_labels):
                return False  # not ours to remove
            return self.driver.remove_network(net.id)

    # -- extend -----------------------------------------------------------------------------

    def extend(
        self, challenge: str, team_id: str, *, lock_wait: float | None = None
    ) -> Instance:
        """Push the expiry out by the challenge's ttl, never past its maximum lifetime.

        Raises:
            InstanceNotFound: there is no such instance.
            MaxLifetimeReached: the instance is already at ``started_at + max_lifetime``.
            OnOtherHost: the instance lives on another Docker host.
            InstanceBusy: another operation held the instance for ``lock_wait`` seconds.
        """
        ch, team = self._validate(challenge, team_id)
        assert ch.ttl is not None and ch.max_lifetime is not None
        with self.locked(ch.id, team, hold=LOCK_HOLD, wait=lock_wait):
            inst = self.store.get(ch.id, team)
            if inst is not None and inst.host != self.host:
                raise self._elsewhere(inst)
            if inst is None or inst.status not in ("running", "starting"):
                raise InstanceNotFound(f"team {team} has no running instance of {ch.id}")
            ceiling = inst.started + timedelta(seconds=ch.max_lifetime)
            current = inst.expires
            if current >= ceiling:
                raise MaxLifetimeReached(
                    f"instance {inst.container_name} already lives until {iso(ceiling)}, its "
                    f"maximum lifetime ({ch.max_lifetime} s); stop it and start a new one"
                )
            new = min(max(current, utcnow()) + timedelta(seconds=ch.ttl), ceiling)
            inst = inst.model_copy(update={"expires_at": iso(new)})
            self.store.put(inst)
            return inst

    # -- read -------------------------------------------------------------------------------

    def get(self, challenge: str, team_id: str) -> Instance:
        """Return one instance from the index.

        Raises:
            InstanceNotFound: there is none.
        """
        ch, team = self._validate(challenge, team_id)
        inst = self.store.get(ch.id, team)
        if inst is None:
            raise InstanceNotFound(f"team {team} has no instance of {ch.id}")
        return inst

    def status(
        self, team_id: str | None = None, challenge: str | None = None, *, verify: bool = False
    ) -> list[Instance]:
        """List instances, filtered by what is given.

        Args:
            team_id: only this team's.
            challenge: only this challenge's.
            verify: cross-check with Docker (one list call) so a dead container is never
                reported as running.
        """
        if team_id is not None:
            check_team_id(team_id)
        if challenge is not None:
            self.catalog.get(challenge)
        found = self.store.list(team_id=team_id, challenge=challenge)
        if not verify:
            return found
        live = {c.name: c for c in self.driver.list_containers(self.scope_labels)}
        result = []
        for inst in found:
            c = live.get(inst.container_name)
            dead = inst.host == self.host and inst.status == "running" \
                and (c is None or c.state != "running")
            result.append(
                inst.model_copy(update={"status": "failed",
                                        "error": "the container is no longer running"})
                if dead else inst
            )
        return result

    # -- reconcile --------------------------------------------------------------------------

    def reconcile(self, now: datetime | None = None) -> ReconcileSummary:
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
        containers = self.driver.list_containers(self.scope_labels)
        summary.containers = len(containers)
        records = {i.key: i for i in self.store.list(host=self.host)}
        suspects: dict[str, Challenge] = {}
        for c in containers:
            try:
                ch = self.catalog.get(c.challenge)
                check_team_id(c.team_id)
            except CTFError:
                log.info("reconcile: %s is not an instance; left to the janitor", c.name)
                continue
            if c.name != container_name(ch.id, c.team_id):
                continue
            key = f"{ch.id}/{c.team_id}"
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
            self._reconcile_one(ch, key.split("/", 1)[1], now, summary)
        self.sync_routes()
        self.mark_reconciled()
        log.info("reconcile host=%s %s", self.host, summary.as_dict())
        return summary

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
            with self.locked(ch.id, team, hold=LOCK_HOLD, wait=BUSY_WAIT):
                self._bring_in_line(ch, team, now, summary)
        except InstanceBusy:
            log.info("reconcile: %s/%s is busy; left to the operation in progress", ch.id, team)

    def _bring_in_line(
        self, ch: Challenge, team: str, now: datetime, summary: ReconcileSummary
    ) -> None:
        key = f"{ch.id}/{team}"
        # 2. look again: the listings may be out of date by now.
        rec = self.store.get(ch.id, team)
        if rec is not None and rec.host != self.host:
            return  # recorded on another host: that host's reconcile owns it
        try:
            info = self._own_container(container_name(ch.id, team), ch.id, team)
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
            inst = self._instance_from_container(ch, info, status)
            if status == "running" and not self._answers(ch, info):
                inst = inst.model_copy(update={"status": "starting"})
            self.store.put(inst)
            summary.adopted.append(key)
        # 5. a record that says running for a container that is not.
        elif rec.status == "running" and info.state != "running":
            # With its exit code, OOM flag and last output, as mark_failed records them.
            self.store.put(rec.model_copy(update=self._failure(rec, info)))
            summary.marked_failed.append(key)

    def _answers(self, ch: Challenge, info: ContainerInfo) -> bool:
        target = self._probe_target(ch, info, self._container_port(ch))
        return target is not None and target(1.0)

    def sync_routes(self) -> None:
        """Make this host's routes match its running instance containers (ingress on).

        Routes are written and removed by start and stop; this repairs what a crash in
        between left behind: a route for every running container of ours, none for the rest.
        A route younger than ``CTF_ORPHAN_GRACE`` is left alone: a start writes its route
        before its container exists.
        """
        if not self.ingress.enabled:
            return
        running = {}
        for c in self.driver.list_containers(self._labels_scope_host()):
            if c.state == "running" and c.ip:
                with contextlib.suppress(CTFError):
                    ch = self.catalog.get(c.challenge)
                    if c.name == container_name(ch.id, c.team_id):
                        running[c.name] = (ch, c)
        for name in self.ingress.route_names() - set(running):
            if self.ingress.route_age(name) >= self.settings.orphan_grace:
                self.ingress.remove_route(name)
        for name, (ch, c) in running.items():
            # Only for a live instance: a stop marks its record "stopping" before it removes
            # the route, and must not see the route come back before the container goes.
            record = self.store.get(ch.id, c.team_id)
            if record is None or record.status not in ("running", "starting") \
                    or record.container_id not in ("", c.id):
                continue
            with contextlib.suppress(CTFError):
                port = self._container_port(ch)
                self.ingress.add_route(name, ch.id, c.team_id, ch.protocol, str(c.ip), port)

    def _labels_scope_host(self) -> dict[str, str]:
        return {**self.scope_labels, LABEL_HOST: self.host}

    def mark_reconciled(self) -> None:
        """Note in Redis that this host's index is complete (see :meth:`index_is_complete`)."""
        with map_redis_errors("mark reconciled"):
            self.store.redis.set(f"ctf:epoch:{self.host}", str(time.time()))

    def index_is_complete(self) -> bool:
        """Whether Redis still holds the index since the last reconcile (not flushed)."""
        with map_redis_errors("read epoch"):
            return bool(self.store.redis.exists(f"ctf:epoch:{self.host}"))

    # -- the engine's events (celery_app.events) and the janitor's dead containers ------------

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
        verdict = self._judge(seen, container_id)
        if verdict != "go":
            return verdict
        # 2. lock the instance; a start or stop holding it knows better.
        try:
            with self.locked(challenge, team_id, hold=LOCK_HOLD, wait=wait):
                # 3. look again under the lock, at the record and at the container itself.
                rec = self.store.get(challenge, team_id)
                verdict = self._judge(rec, container_id)
                if verdict != "go" or rec is None:
                    return verdict
                info = self.driver.get_container(rec.container_id or rec.container_name)
                if info is not None and info.state == "running" and info.health != "unhealthy":
                    return "unchanged"  # alive after all (an old event, an OOM of a child)
                # 4. the failed record, with why.
                self.store.put(rec.model_copy(update=self._failure(rec, info)))
                return "marked"
        except InstanceBusy:
            return "busy"

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
            logs = logs.replace(self.flag_for(rec.challenge, rec.team_id), "[flag]")
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
            with self.locked(challenge, team_id, hold=LOCK_HOLD, wait=wait):
                rec = self.store.get(challenge, team_id)
                verdict = self._judge_removal(rec, container_id)
                if verdict != "go" or rec is None:
                    return verdict
                if self.driver.get_container(rec.container_name) is not None:
                    return "unchanged"  # a container of that name exists again
                self.store.delete(challenge, team_id, self.host)
        except InstanceBusy:
            return "busy"
        with contextlib.suppress(CTFError):
            self.remove_network_if_unused(team_id)
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
        self._reconcile_one(ch, check_team_id(team_id), utcnow(), summary)
        return summary
