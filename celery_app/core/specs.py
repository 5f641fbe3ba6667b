"""What an instance's container is made of: its spec, labels, URL, readiness probe and image.

:class:`InstanceSpecs` turns a catalog challenge and a team into the container the driver
creates (hardening is the driver's; what and where is decided here), makes it on the team's
network, reads an instance back from a container's labels, and probes it until it answers.
The rules of when to create, reuse or remove are :mod:`celery_app.core.service`'s.

An instance is a group of containers on a network (:class:`InstanceLayout`, from
:meth:`InstanceSpecs.layout`): one container today; a Compose challenge's services join the
group there. The specs sit below the pool and reconcile and import neither: the service hands
a creation its choice between a warm-pool claim and a cold start (``make``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.exceptions import LockError
from redis.lock import Lock

from celery_app.core.catalog import Challenge
from celery_app.core.compose import ComposeApp, Endpoint
from celery_app.core.flags import team_flag
from celery_app.core.group import Member, start_group
from celery_app.core.readiness import probe_once, wait_until
from celery_app.engine.driver import (
    ContainerInfo,
    ContainerSpec,
    Driver,
    Filesystem,
    Healthcheck,
    NetworkInfo,
    ProgressFn,
    carries,
    check_ours,
)
from celery_app.engine.firewall import EgressGuard
from celery_app.errors import CatalogError, CTFError, ImageNotFound, StartFailed
from celery_app.ingress import Ingress
from celery_app.ingress.labels import endpoint_key
from celery_app.settings import Settings
from celery_app.state.redis_errors import map_redis_errors
from celery_app.state.store import StateStore
from celery_app.vocab.limits import catalog_size_bytes
from celery_app.vocab.models import NEVER_EXPIRES, EndpointView, Instance, iso, parse_iso, utcnow
from celery_app.vocab.naming import (
    LABEL_CHALLENGE,
    LABEL_DISK,
    LABEL_EGRESS,
    LABEL_EXPIRES_AT,
    LABEL_HOST,
    LABEL_MANAGED,
    LABEL_POOL,
    LABEL_SERVICE,
    LABEL_STARTED_AT,
    LABEL_TEAM,
    container_name,
    endpoint_route_name,
    instance_network_name,
    network_name,
    pool_container_name,
    pool_network_name,
    pool_service_container_name,
    service_container_name,
)

log = logging.getLogger(__name__)

# After Redis lost an instance, an adopted one past its recorded expiry gets this much grace.
ADOPT_GRACE = 60
# A failed start stays visible (status "failed" with its error) this long, then is reaped.
FAILED_RECORD_TTL = 120


def _created(raw: str) -> datetime | None:
    """A container's creation time from list (epoch s) or inspect (ISO) output."""
    with contextlib.suppress(ValueError):
        if raw.isdigit():
            return datetime.fromtimestamp(float(raw), tz=UTC)
        return datetime.fromisoformat(raw[:26].rstrip("Z") + "+00:00")
    return None


@dataclass(frozen=True)
class InstanceLayout:
    """Where one instance lives on its engine: its network and the names of its containers.

    An instance is a group of containers on a network. Today the group has one member, the
    challenge's container (:attr:`main`), on the team's network. Compose challenges (the next
    issue, SPEC §12) add one member per service, each named by
    :mod:`celery_app.vocab.naming`; everything that creates or names an instance's parts
    asks :meth:`InstanceSpecs.layout` for them.
    """

    network: str
    containers: tuple[str, ...]
    # A Compose instance's services, one per container in the same order (empty: one image).
    services: tuple[str, ...] = ()

    def of(self, service: str) -> str:
        """The container name of ``service`` (a Compose instance's).

        Raises:
            KeyError: the instance has no such service.
        """
        return dict(zip(self.services, self.containers, strict=True))[service]

    @property
    def main(self) -> str:
        """The container players reach: routed, probed, recorded as ``container_name``."""
        return self.containers[0]


class InstanceSpecs:
    """Specs, labels, URLs and probe targets of one Docker host's instances.

    Args:
        settings: the service settings.
        driver: the host's engine.
        store: the state store (for the team network's lock).
        ingress: the host's ingress (SPEC §11; disabled without ``CTF_INGRESS``).
        host: the host's name (label ``ctf.host``).
        public_host: the host name written in instance URLs.
    """

    def __init__(self, settings: Settings, driver: Driver, store: StateStore, ingress: Ingress,
                 host: str, public_host: str) -> None:
        self.settings = settings
        self.driver = driver
        self.store = store
        self.ingress = ingress
        self.host = host
        self.public_host = public_host
        # Only what carries all these labels is ours (tests add a run label here).
        self.scope_labels = {LABEL_MANAGED: "true", **settings.extra_labels}
        self._exposed_port_cache: dict[str, int] = {}

    # -- labels and names -------------------------------------------------------------------

    def layout(self, challenge: str, team_id: str, app: ComposeApp | None = None,
               ) -> InstanceLayout:
        """The network and container names of the team's instance of ``challenge``.

        With ``app`` (a Compose challenge, SPEC §12) the instance has a network of its own and
        one container per service: the primary endpoint's service first, under the instance's
        name (SPEC §4's), then the others in start order, ``<name>.<service>``.
        """
        if app is None:
            return InstanceLayout(network=network_name(team_id),
                                  containers=(container_name(challenge, team_id),))
        main = app.primary.service
        services = (main, *(s.name for s in app.services if s.name != main))
        return InstanceLayout(
            network=instance_network_name(challenge, team_id),
            containers=tuple(container_name(challenge, team_id) if s == main
                             else service_container_name(challenge, team_id, s)
                             for s in services),
            services=services,
        )

    def labels(self, team_id: str, challenge: str | None = None) -> dict[str, str]:
        """The labels of a team's network (and, with ``challenge``, of its container)."""
        labels = {**self.scope_labels, LABEL_TEAM: team_id, LABEL_HOST: self.host}
        if challenge is not None:
            labels[LABEL_CHALLENGE] = challenge
        return labels

    def scope_here(self) -> dict[str, str]:
        """The labels every container of ours on this host carries."""
        return {**self.scope_labels, LABEL_HOST: self.host}

    def own_container(self, name: str, challenge: str, team_id: str) -> ContainerInfo | None:
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

    # -- the image --------------------------------------------------------------------------

    def ensure_image(self, ch: Challenge, progress: ProgressFn | None = None) -> None:
        """Make the challenge image present, following ``CTF_PULL_POLICY``.

        Raises:
            ImageNotFound: missing with policy ``never``, or the registry has no such image.
        """
        if ch.app is None:
            self._ensure(ch.image, ch.id, None, progress)
            return
        for service in ch.app.services:  # a Compose challenge: every service's image
            try:
                self._ensure(service.image, ch.id, service.name, progress)
            except ImageNotFound as exc:
                if f"service {service.name!r}" in str(exc):
                    raise
                raise type(exc)(f"service {service.name!r} of challenge {ch.id!r}: "
                                f"{exc}") from None

    def _ensure(self, image: str, challenge: str, service: str | None,
                progress: ProgressFn | None) -> None:
        policy = self.settings.pull_policy
        if policy == "always" or (policy == "if-not-present" and not self.driver.image_present(
            image
        )):
            log.info("pulling image=%s challenge=%s%s", image, challenge,
                     f" service={service}" if service else "")
            self.driver.pull(image, progress)
        elif policy == "never" and not self.driver.image_present(image):
            of_service = f"service {service!r} of " if service else ""
            raise ImageNotFound(
                f"image {image!r} of {of_service}challenge {challenge!r} is not present and "
                "CTF_PULL_POLICY is 'never'; load it (docker load/pull) or change the policy"
            )

    def container_port(self, ch: Challenge) -> int:
        """The challenge's port: the catalog's, or the lowest its image EXPOSEs.

        Raises:
            CatalogError: neither says one.
        """
        if ch.port is not None:
            return ch.port
        if ch.app is not None:
            return ch.app.primary.port  # a Compose challenge: its primary endpoint's
        if ch.image not in self._exposed_port_cache:
            port = self.driver.image_exposed_port(ch.image)
            if port is None:
                raise CatalogError(
                    f"challenge {ch.id!r}, field 'port': not set and image {ch.image!r} EXPOSEs "
                    "no TCP port; set port in the catalog"
                )
            self._exposed_port_cache[ch.image] = port
        return self._exposed_port_cache[ch.image]

    # -- the container ----------------------------------------------------------------------

    def flag(self, challenge: str, team_id: str) -> str:
        """The team's flag for a challenge (see :mod:`celery_app.core.flags`)."""
        return team_flag(self.settings.flag_secret_value(), challenge, team_id,
                         self.settings.flag_format)

    def new_instance(self, ch: Challenge, team: str) -> Instance:
        """The record of a new instance, ``starting`` now, expiring after the challenge's ttl."""
        now = utcnow()
        assert ch.ttl is not None
        return Instance(
            team_id=team, challenge=ch.id, status="starting",
            container_name=self.layout(ch.id, team, ch.app).main, host=self.host,
            started_at=iso(now),
            # A global instance never expires (SPEC §13): the workers keep it running.
            expires_at=NEVER_EXPIRES if ch.is_global else iso(now + timedelta(seconds=ch.ttl)),
            containers=ch.containers,
        )

    def spec(self, ch: Challenge, team: str, port: int, inst: Instance) -> ContainerSpec:
        """The container of ``inst``; with the ingress on, its route is written first.

        Called under the team's network lock: the address the route points to is the one
        the container will get.
        """
        env = dict(ch.env)
        if ch.flag_env:
            env[ch.flag_env] = self.flag(ch.id, team)
        labels = self.labels(team, ch.id)
        labels[LABEL_STARTED_AT] = inst.started_at
        labels[LABEL_EXPIRES_AT] = inst.expires_at
        labels[LABEL_EGRESS] = ch.egress
        network = self.layout(ch.id, team).network
        ip = None
        if self.ingress.enabled:
            # The route is written before the container exists, with the address the
            # container will get (we hold the team's network lock): Traefik loads it while
            # Docker creates and starts the container, not after.
            ip = self.driver.free_address(network)
            if ip is not None:
                self.ingress.add_route(inst.container_name, ch.id, team, ch.protocol, ip, port,
                                       started_at=inst.started_at)
        return self.container_spec(ch, inst.container_name, team, labels, env, port, ip,
                                   network=network)

    def container_spec(
        self, ch: Challenge, name: str, team: str, labels: dict[str, str],
        env: dict[str, str], port: int, ip: str | None, network: str | None = None,
    ) -> ContainerSpec:
        """The hardened container of ``ch`` (cold starts and warm pools alike)."""
        if ch.disk_bytes is not None:
            labels = {**labels, LABEL_DISK: str(ch.disk_bytes)}  # the janitor's bound
        return ContainerSpec(
            name=name, image=ch.image, port=port, team_id=team, labels=labels,
            env=env, memory_bytes=ch.memory_bytes, nano_cpus=int(ch.cpus * 1e9), pids=ch.pids,
            cap_add=ch.cap_add, publish_ip=self.settings.publish_ip,
            port_range=self.settings.port_range, command=ch.command, hostname=ch.id,
            filesystem=Filesystem(ch.read_only, ch.tmpfs_bytes, ch.storage_bytes,
                                  ch.disk_bytes),
            publish=not self.ingress.enabled, ip=ip, network=network, user=ch.user,
        )

    def create(self, ch: Challenge, team: str, port: int, inst: Instance,
               egress: EgressGuard,
               make: Callable[[NetworkInfo, ContainerSpec], ContainerInfo] | None = None,
               ) -> ContainerInfo:
        """Make the team's network (if needed) and ``inst``'s container, admitted by ``egress``.

        Under the team's network lock: a stop of the team's last instance must not remove
        the network this container joins. A container the egress guard refuses is removed.
        ``make`` turns the network and the cold start's spec into the container (the
        service's choice between a warm-pool claim and a cold start); a cold start by default.
        """
        with self.store.holding_network(team):
            net = self.driver.ensure_named_network(
                self.layout(ch.id, team).network, self.labels(team),
                self.settings.team_subnet_pool, self.settings.team_subnet_prefix,
            )
            spec = self.spec(ch, team, port, inst)
            info = (make or (lambda _net, cold: self.driver.run_container(cold)))(net, spec)
            try:
                egress.admit(info, net)  # its bridge known, internet or not
            except CTFError:
                self.driver.remove_container(info.id)
                raise
        return info

    def remove_network_if_unused(self, team_id: str, network: str | None = None) -> bool:
        """Remove the team's network when no container is left on it.

        Args:
            team_id: the team (its network lock is held meanwhile).
            network: the network's name or id; the team's usual network by default.
        """
        with self.store.holding_network(team_id):
            net = self.driver.get_network(network or network_name(team_id))
            if net is None or net.containers > 0:
                return False
            if not carries(net.labels, self.scope_labels):
                return False  # not ours to remove
            return self.driver.remove_network(net.id)

    # -- the instance as users see it -------------------------------------------------------

    def url(self, ch: Challenge, team: str, host_port: int | None, started_at: str) -> str | None:
        """The URL players use: the ingress's, or the published port on the public host."""
        if self.ingress.enabled:
            return self.ingress.url(ch.id, team, ch.protocol, started_at=started_at)
        if host_port is None:
            return None
        scheme = "http" if ch.protocol == "http" else "tcp"
        return f"{scheme}://{self.public_host}:{host_port}"

    def with_container(
        self, ch: Challenge, inst: Instance, info: ContainerInfo, port: int
    ) -> Instance:
        """Return ``inst`` with the container's id, published ports and URL (and its route)."""
        if self.ingress.enabled and info.ip:
            # Unchanged when spec() already wrote it; written for an adopted container.
            self.ingress.add_route(info.name, ch.id, inst.team_id, ch.protocol, info.ip, port,
                                   started_at=inst.started_at)
        return inst.model_copy(update={
            "container_id": info.id,
            "ports": info.ports,
            "url": self.url(ch, inst.team_id, info.ports.get(f"{port}/tcp"), inst.started_at),
        })

    def from_container(self, ch: Challenge, info: ContainerInfo, status: str) -> Instance:
        """Rebuild an instance record from a container's labels (Redis lost it)."""
        now = utcnow()
        try:
            started = parse_iso(info.labels[LABEL_STARTED_AT])
            expires = parse_iso(info.labels[LABEL_EXPIRES_AT])
        except (KeyError, ValueError):
            started, expires = now, now + timedelta(seconds=ch.ttl or 0)
            if LABEL_POOL in info.labels:
                # A claimed pool container or group: no endpoint options hold its claim's
                # times (a claim makes no network call, issue 27), so it counts from its
                # boot, before the claim: never later than the truth for the lifetime ceiling.
                assert ch.max_lifetime is not None
                started = min(now, _created(info.created) or now)
                expires = min(now + timedelta(seconds=ch.ttl or 0),
                              max(started + timedelta(seconds=ch.max_lifetime),
                                  now + timedelta(seconds=ADOPT_GRACE)))
        assert ch.max_lifetime is not None
        if expires <= now:
            expires = min(now + timedelta(seconds=ADOPT_GRACE),
                          started + timedelta(seconds=ch.max_lifetime))
        port = self.container_port(ch)
        inst = Instance(
            team_id=info.team_id, challenge=ch.id, status=status,
            container_name=info.name, container_id=info.id, host=self.host, ports=info.ports,
            url=self.url(ch, info.team_id, info.ports.get(f"{port}/tcp"), iso(started)),
            started_at=iso(started),
            expires_at=iso(expires),
            containers=ch.containers,
        )
        if ch.app is None:
            return inst
        # A Compose instance: its endpoints from its services' containers (SPEC §12).
        members = {c.labels[LABEL_SERVICE]: c for c in self.group_of(ch.id, info.team_id)
                   if LABEL_SERVICE in c.labels}
        return self.with_group(ch, inst, {**members, ch.app.primary.service: info})

    # -- readiness --------------------------------------------------------------------------

    def probe_target(
        self, ch: Challenge, info: ContainerInfo, port: int, started_at: str
    ) -> Callable[[float], bool] | None:
        """Return the readiness check of the container: ``check(timeout) -> answered``.

        ``started_at`` is the instance's (a TCP instance's host name is derived from it).
        """
        if self.ingress.enabled:
            # Through Traefik, the instance's route and the gate: what players will use.
            return self.ingress.probe(ch.id, info.team_id, ch.protocol, ch.health_path,
                                      started_at=started_at)
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

    def await_ready(self, ch: Challenge, info: ContainerInfo, inst: Instance, port: int,
                    report: Callable[[dict[str, Any]], None], lock: Lock,
                    task_id: str | None = None, answered: bool = False) -> Instance:
        """Wait until the container answers (start step 9); record it ``running``.

        The start timeout counts from ``started_at``; ``lock`` (the instance's) is renewed
        every few polls while the container is alive. The ``running`` record is written
        together with the answer of the start task ``task_id`` (``StateStore.applied``).
        ``answered``: the caller knows it answers on the address probed (a warm-pool
        container the pass probed ready, claimed just now): recorded at once.

        Raises:
            StartFailed: it exited or never answered: it is removed (with its route) and a
                failed record with why and its last output stays ``FAILED_RECORD_TTL`` s.
        """
        target = self.probe_target(ch, info, port, inst.started_at)

        def alive() -> bool:
            # Called every few polls: renew our lock while we are demonstrably working.
            with contextlib.suppress(LockError), map_redis_errors("renew lock"):
                lock.reacquire()
            current = self.driver.get_container(info.id)
            return current is not None and current.state in ("running", "created", "restarting")

        started = parse_iso(inst.started_at)
        remaining = max(1.0, ch.start_timeout - (utcnow() - started).total_seconds())
        if target is not None and (answered or wait_until(target, remaining,
                                                          still_alive=alive)):
            inst = inst.model_copy(update={"status": "running", "error": None, "exit_code": None,
                                           "oom": None, "logs": None})
            self.store.put(inst, done=(task_id, inst.model_dump_json()) if task_id else None)
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
        failed = inst.model_copy(update={
            "status": "failed", "error": detail, "container_id": info.id,
            "expires_at": iso(utcnow() + timedelta(seconds=FAILED_RECORD_TTL)),
        })
        # Failed before the route goes: the janitor's route repair restores the route of a
        # running container whose record is still "starting", and would outlive the container.
        self.store.put(failed)
        self.ingress.remove_route(inst.container_name)
        self.driver.remove_container(info.id)
        raise StartFailed(detail)

    def answers(self, ch: Challenge, info: ContainerInfo) -> bool:
        """Whether the container answers its probe now (one try, 1 s)."""
        if ch.app is not None:  # a Compose instance's primary container: its endpoint's probe
            return self._endpoint_probe(ch, ch.app.primary, info, info.team_id,
                                        info.labels.get(LABEL_STARTED_AT, ""))(1.0)
        target = self.probe_target(ch, info, self.container_port(ch),
                                   info.labels.get(LABEL_STARTED_AT, ""))
        return target is not None and target(1.0)

    # -- a Compose instance (SPEC §12): a group of containers on a network of its own -------

    def group_members(self, ch: Challenge, team: str, inst: Instance) -> list[Member]:
        """One hardened container per service of ``ch``'s Compose file, in start order.

        Each carries every instance's labels plus ``ctf.service`` and its own egress; section
        7's limits are the service's own, or the challenge's (section 8) where it sets none;
        ``${CTF_FLAG}`` and ``${CTF_TEAM}`` are the team's. Endpoint ports are published
        as section 4 publishes an instance's port.
        """
        assert ch.app is not None
        labels = {**self.labels(team, ch.id), LABEL_STARTED_AT: inst.started_at,
                  LABEL_EXPIRES_AT: inst.expires_at}
        return self.members_of(ch, self.layout(ch.id, team, ch.app), labels,
                               self.flag(ch.id, team), team)

    def pool_layout(self, ch: Challenge, slot: str) -> InstanceLayout:
        """Where an unclaimed pooled Compose group lives: its slot's network and names."""
        assert ch.app is not None
        team_layout = self.layout(ch.id, "x", ch.app)
        return InstanceLayout(
            network=pool_network_name(ch.id, slot),
            containers=tuple(pool_container_name(ch.id, slot) if s == team_layout.services[0]
                             else pool_service_container_name(ch.id, slot, s)
                             for s in team_layout.services),
            services=team_layout.services,
        )

    def members_of(self, ch: Challenge, layout: InstanceLayout, labels: dict[str, str],
                   flag: str, team: str) -> list[Member]:
        """The services of ``ch`` as ``layout`` names them, with ``labels`` and ``flag``.

        Args:
            ch: a Compose challenge.
            layout: the names and network (a team's instance, or a warm pool's slot).
            labels: what every container carries (``ctf.service`` and ``ctf.egress`` added).
            flag: what ``${CTF_FLAG}`` (and ``flag_env``) hold.
            team: what ``${CTF_TEAM}`` holds ("" for a pool slot, whose file uses none).
        """
        assert ch.app is not None
        members = []
        for service in ch.app.services:
            svc = service.for_team(flag, team)
            own = {**labels, LABEL_EGRESS: svc.egress, LABEL_SERVICE: svc.name}
            read_only = ch.read_only if svc.read_only is None else svc.read_only
            disk = None if read_only else (ch.disk_bytes
                                           or catalog_size_bytes(self.settings.default_disk))
            if disk is not None:
                own[LABEL_DISK] = str(disk)  # the janitor's bound, as for one image
            health = svc.healthcheck
            env = {**ch.env, **svc.environment}
            if ch.flag_env:  # the catalog's flag_env, like env, applies to every service
                env[ch.flag_env] = flag
            spec = ContainerSpec(
                name=layout.of(svc.name), image=svc.image,
                port=svc.ports[0] if svc.ports else None, extra_ports=svc.ports[1:],
                team_id=team, labels=own, env=env,
                memory_bytes=svc.memory_bytes or ch.memory_bytes,
                nano_cpus=int((svc.cpus or ch.cpus) * 1e9), pids=svc.pids or ch.pids,
                cap_add=list(svc.cap_add or ch.cap_add), publish_ip=self.settings.publish_ip,
                port_range=self.settings.port_range,
                command=None if svc.command is None else list(svc.command),
                entrypoint=None if svc.entrypoint is None else list(svc.entrypoint),
                working_dir=svc.working_dir, hostname=svc.name,
                filesystem=Filesystem(read_only, dict(svc.tmpfs) or ch.tmpfs_bytes, None, disk),
                # Behind the ingress the endpoints are reached through Traefik (SPEC §11).
                publish=not self.ingress.enabled, network=layout.network, user=svc.user or ch.user,
                aliases=(svc.name,),
                healthcheck=None if health is None else Healthcheck(
                    test=health.test, interval=health.interval, timeout=health.timeout,
                    retries=health.retries, start_period=health.start_period),
            )
            members.append(Member(svc.name, spec, dict(svc.depends_on)))
        return members

    def create_group(self, ch: Challenge, team: str, inst: Instance, egress: EgressGuard,
                     ) -> dict[str, ContainerInfo]:
        """Make the instance's network and start its services; all of them, or nothing.

        The network comes from the team subnet pool and carries ``ctf.challenge``; the
        services start in ``depends_on`` order (:func:`start_group`) and each is admitted by
        ``egress`` right after it starts: ``x-ctf-egress: internet`` opens the internet to
        that service's container alone, its siblings stay ``none``. On any failure what was
        made (containers, network) is removed first.

        Returns:
            Each service's container, in start order.

        Raises:
            StartFailed: a service did not come up; the message names it and why.
            CTFError: the engine or the egress guard refused.
        """
        assert ch.app is not None
        layout = self.layout(ch.id, team, ch.app)
        net = self.driver.ensure_named_network(
            layout.network, self.labels(team, ch.id),
            self.settings.team_subnet_pool, self.settings.team_subnet_prefix,
        )
        made: dict[str, ContainerInfo] = {}
        try:
            # Each container is admitted as soon as it starts (its bridge known; the internet
            # only for a service with x-ctf-egress: internet), before the services after it.
            made = start_group(self.driver, self.group_members(ch, team, inst),
                               timeout=ch.start_timeout, what=f"{ch.id} for team {team}",
                               started=lambda info: egress.admit(info, net))
        except BaseException:
            self.remove_group(ch.id, team, egress)
            raise
        return made

    def group_of(self, challenge: str, team: str) -> list[ContainerInfo]:
        """Every container of the team's instance of ``challenge`` on this host (by labels).

        A group claimed from a warm pool carries no ``ctf.team`` (labels cannot change): its
        primary container's name tells the team, and its ``ctf.pool`` slot finds the others,
        each named for the team too (a half-made claim's members are the pool's to remove).
        """
        found = self.driver.list_containers(
            {**self.scope_here(), LABEL_TEAM: team, LABEL_CHALLENGE: challenge})
        main = container_name(challenge, team)
        if any(c.name == main for c in found):
            return found
        info = self.driver.get_container(main)
        slot = None if info is None else info.labels.get(LABEL_POOL)
        if info is None or not slot or info.labels.get(LABEL_CHALLENGE) != challenge \
                or not carries(info.labels, self.scope_here()):
            return found
        pooled = self.driver.list_containers(
            {**self.scope_here(), LABEL_CHALLENGE: challenge, LABEL_POOL: slot})
        return found + [c for c in pooled if c.name == main or c.name.startswith(f"{main}.")]

    def whole_group(self, ch: Challenge, team: str, main: ContainerInfo | None,
                    ) -> dict[str, ContainerInfo] | None:
        """The team's group of ``ch`` when every service is there and up, made together.

        Returns:
            Each service's container (keyed by service), or ``None`` when one is missing,
            not running (a one-shot: not done), or of another start (``started_at``).
        """
        if ch.app is None or main is None or main.state != "running":
            return None
        started = main.labels.get(LABEL_STARTED_AT)
        found = {c.labels.get(LABEL_SERVICE, ""): c for c in self.group_of(ch.id, team)
                 if c.labels.get(LABEL_STARTED_AT) == started}
        for service in ch.app.services:
            c = found.get(service.name)
            if c is None or not (c.state == "running"
                                 or ch.app.done(service.name, c.state, c.exit_code)):
                return None
        return {s.name: found[s.name] for s in ch.app.services}

    def remove_group(self, challenge: str, team: str, egress: EgressGuard,
                     network: bool = True) -> bool:
        """Remove every container of a Compose instance (and its routes), then its network.

        ``network=False`` (a start about to claim a pooled group) looks for the instance's own
        network only when a container of it was found: a claim makes no network call.

        Returns:
            Whether there was a container to remove.
        """
        found = self.group_of(challenge, team)
        for info in found:
            # Routes first: the endpoint's host answers 404 before its container goes.
            self.ingress.remove_routes(info.name)
            egress.release(info)  # before its address is free for another
            self.driver.remove_container(info.id)
        # A group claimed from a warm pool sits on its slot's network (pool_network_name).
        networks = {pool_network_name(challenge, c.labels[LABEL_POOL]) for c in found
                    if c.labels.get(LABEL_POOL)}
        if network or found:
            networks.add(instance_network_name(challenge, team))
        for name in sorted(networks):
            net = self.driver.get_network(name)
            if net is not None and carries(net.labels, self.scope_labels):
                self.driver.remove_network(net.id)
        return bool(found)

    def endpoint_route(self, ch: Challenge, team: str, ep: Endpoint) -> tuple[str, str]:
        """The ingress route name and endpoint key of a Compose instance's endpoint.

        The primary endpoint's are the instance's own: its container's name and no key (so
        its host is the one a single image of this (challenge, team) would have); every
        other endpoint's are ``<container>@<port>`` and ``<service>:<port>`` (a host of
        its own, see :mod:`celery_app.ingress.labels`).
        """
        assert ch.app is not None
        layout = self.layout(ch.id, team, ch.app)
        if ep == ch.app.primary:
            return layout.main, ""
        return (endpoint_route_name(layout.of(ep.service), ep.port),
                endpoint_key(ep.service, ep.port))

    def route_group(self, ch: Challenge, team: str, started_at: str,
                    made: dict[str, ContainerInfo], generation: int | None = None) -> None:
        """Write the ingress route of every endpoint of a Compose instance (ingress on).

        Written once the services run (their addresses known) and before the instance is
        probed: the routes exist before it is ``running`` (SPEC §11). Unchanged routes are
        not rewritten (an adopted group's).
        """
        if not self.ingress.enabled:
            return
        assert ch.app is not None
        if generation is None:
            generation = self.ingress.generation(team)
        for ep in ch.app.endpoints:
            info = made.get(ep.service)
            if info is None or not info.ip:
                continue  # not reachable: its probe fails and says so
            route, key = self.endpoint_route(ch, team, ep)
            self.ingress.add_route(route, ch.id, team, ep.protocol, info.ip, ep.port,
                                   started_at=started_at, generation=generation, endpoint=key)

    def endpoint_views(self, ch: Challenge, team: str, started_at: str,
                       made: dict[str, ContainerInfo], generation: int | None = None,
                       ) -> list[EndpointView]:
        """Every endpoint of a Compose instance as users see it, with its ``url``.

        Behind the ingress each endpoint's URL names its own host; with published ports,
        the public host and the endpoint's host port (``None`` when it has none).
        """
        assert ch.app is not None
        if self.ingress.enabled and generation is None:
            generation = self.ingress.generation(team)
        endpoints = []
        for ep in ch.app.endpoints:
            url: str | None
            if self.ingress.enabled:
                _, key = self.endpoint_route(ch, team, ep)
                url = self.ingress.url(ch.id, team, ep.protocol, started_at=started_at,
                                       generation=generation, endpoint=key)
            else:
                member = made.get(ep.service)
                host_port = None if member is None else member.ports.get(f"{ep.port}/tcp")
                scheme = "http" if ep.protocol == "http" else "tcp"
                url = None if host_port is None else \
                    f"{scheme}://{self.public_host}:{host_port}"
            endpoints.append(EndpointView(service=ep.service, port=ep.port,
                                          protocol=ep.protocol, url=url))
        return endpoints

    def with_group(self, ch: Challenge, inst: Instance, made: dict[str, ContainerInfo],
                   ) -> Instance:
        """Return ``inst`` with its primary service's container and every endpoint's URL."""
        assert ch.app is not None
        endpoints = self.endpoint_views(ch, inst.team_id, inst.started_at, made)
        main = made[ch.app.primary.service]
        return inst.model_copy(update={"container_id": main.id, "ports": main.ports,
                                       "url": endpoints[0].url, "endpoints": endpoints})

    def _endpoint_probe(self, ch: Challenge, ep: Endpoint, info: ContainerInfo, team: str,
                        started_at: str) -> Callable[[float], bool]:
        """One try at an endpoint, as :meth:`probe_target` reaches one image's port.

        Behind the ingress: through Traefik, the endpoint's route and the gate, as players
        reach it: the instance's team's host (``team``, not the container's label: a group
        claimed from a warm pool has none), ``started_at`` the instance's (a TCP endpoint's
        host depends on it).
        """
        if self.ingress.enabled:
            _, key = self.endpoint_route(ch, team, ep)
            return self.ingress.probe(ch.id, team, ep.protocol, ep.health_path,
                                      started_at=started_at, endpoint=key)
        if self.driver.is_local and info.ip:
            host, port = info.ip, ep.port
        else:
            host_port = info.ports.get(f"{ep.port}/tcp")
            if host_port is None:
                return lambda _timeout: False
            host = self.settings.probe_host if self.driver.is_local else self.public_host
            port = host_port
        return lambda timeout: probe_once(host, port, ep.protocol, ep.health_path,
                                          timeout=timeout)

    def await_group_ready(self, ch: Challenge, made: dict[str, ContainerInfo], inst: Instance,
                          report: Callable[[dict[str, Any]], None], lock: Lock,
                          egress: EgressGuard, task_id: str | None = None) -> Instance:
        """Wait until every endpoint answers (SPEC §12); record the instance ``running``.

        Raises:
            StartFailed: a service died or an endpoint never answered within the start
                timeout: the group is removed, and a failed record naming the service stays
                ``FAILED_RECORD_TTL`` s.
        """
        assert ch.app is not None
        pending = list(ch.app.endpoints)
        probes = {ep: self._endpoint_probe(ch, ep, made[ep.service], inst.team_id,
                                           inst.started_at)
                  for ep in pending}

        def check(timeout: float) -> bool:
            while pending:  # endpoints answer once: only the rest are tried again
                if not probes[pending[0]](timeout):
                    return False
                pending.pop(0)
            return True

        def alive() -> bool:
            with contextlib.suppress(LockError), map_redis_errors("renew lock"):
                lock.reacquire()
            return all(self._up(ch, service, info) for service, info in made.items())

        started = parse_iso(inst.started_at)
        remaining = max(1.0, ch.start_timeout - (utcnow() - started).total_seconds())
        if wait_until(check, remaining, still_alive=alive):
            inst = inst.model_copy(update={"status": "running", "error": None})
            self.store.put(inst, done=(task_id, inst.model_dump_json()) if task_id else None)
            report({"phase": "running", "url": inst.url})
            return inst
        why = self._group_failure(ch, made, pending[0] if pending else ch.app.primary,
                                  ch.start_timeout)
        detail = f"instance {inst.container_name} of {ch.id} for team {inst.team_id}: {why}"
        self.store.put(inst.model_copy(update={
            "status": "failed", "error": detail,
            "expires_at": iso(utcnow() + timedelta(seconds=FAILED_RECORD_TTL)),
        }))
        self.remove_group(ch.id, inst.team_id, egress)
        raise StartFailed(detail)

    def _up(self, ch: Challenge, service: str, info: ContainerInfo) -> bool:
        """Whether a group's service still runs (or, a one-shot, finished its work)."""
        current = self.driver.get_container(info.id)
        if current is None:
            return False
        return current.state in ("running", "created", "restarting") or (
            ch.app is not None and ch.app.done(service, current.state, current.exit_code))

    def _group_failure(self, ch: Challenge, made: dict[str, ContainerInfo], waiting: Endpoint,
                       timeout: float) -> str:
        """Why a group never became ready: the first service that died, or the endpoint."""
        for service, info in made.items():
            if not self._up(ch, service, info):
                current = self.driver.get_container(info.id)
                code = "" if current is None else f" with code {current.exit_code}"
                logs = self.driver.container_logs(info.id, tail=10).strip() if current else ""
                return (f"service {service} exited{code}"
                        + (f"; its last output: {logs[-500:]}" if logs else ""))
        return (f"service {waiting.service} did not answer on port {waiting.port} within "
                f"{timeout:.0f} s"
                + (self.ingress.probe_hint() if self.ingress.enabled else "")
                + "; check its x-ctf-protocol and x-ctf-health-path")
