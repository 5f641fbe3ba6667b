"""The seam between the rules and a container engine: the :class:`Driver` protocol.

:class:`~celery_app.engine.docker_driver.DockerDriver` is the real one (the only module that
imports ``docker``); the test support's ``FakeDriver`` keeps the same contract in memory,
and ``tests/test_driver_contract.py`` runs one set of tests against both. The service, the
janitor, reconcile, the event follower and the egress guard are typed against
:class:`Driver` and the plain data classes here, never against the SDK.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery_app.errors import InvalidRequest

ProgressFn = Callable[[dict[str, Any]], None]

def carries(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    """Whether ``labels`` hold every one of ``wanted`` with the same value."""
    return all(labels.get(k) == v for k, v in wanted.items())


def check_ours(kind: str, name: str, labels: dict[str, str], wanted: dict[str, str]) -> None:
    """Refuse a container or network that has our name but not our labels.

    The name alone is not proof: another deployment on the same engine (or a person) may
    use it, and we must never adopt or remove what is theirs.

    Raises:
        InvalidRequest: ``labels`` lack some of ``wanted``.
    """
    if not carries(labels, wanted):
        raise InvalidRequest(
            f"a {kind} named {name} exists on this Docker host but is not managed by this "
            "instancer (its labels differ); remove or rename it, then try again"
        )


@dataclass(frozen=True)
class Filesystem:
    """How much an instance may write, and where (catalog: read_only, tmpfs, storage).

    ``read_only``: the root filesystem is read-only; writes go to the ``tmpfs`` mounts
    (path -> size in bytes; tmpfs pages count against the container's memory limit too).
    ``storage_bytes``: a writable-layer size limit (``storage_opt size``), which only some
    engines support (overlay2 on xfs with pquota, btrfs, zfs).
    ``disk_bytes``: the bound of a writable root filesystem on every engine (catalog
    ``disk``): the container carries it as its ``ctf.disk`` label, and the janitor stops an
    instance whose writable layer (:meth:`Driver.writable_layers`) grew past it.
    """

    read_only: bool = False
    tmpfs: dict[str, int] = field(default_factory=dict)
    storage_bytes: int | None = None
    disk_bytes: int | None = None


@dataclass(frozen=True)
class Healthcheck:
    """A container's own health check (a Compose service's ``healthcheck``), in seconds."""

    test: tuple[str, ...]  # ("CMD", ...), ("CMD-SHELL", "..."), or ("NONE",)
    interval: float | None = None
    timeout: float | None = None
    retries: int | None = None
    start_period: float | None = None


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one hardened instance container."""

    name: str
    image: str
    port: int | None  # the published (or routed) container port; None: reached by no one
    team_id: str
    labels: dict[str, str]
    env: dict[str, str]
    memory_bytes: int
    nano_cpus: int
    pids: int
    cap_add: list[str]
    publish_ip: str
    port_range: str | None = None
    command: list[str] | None = None
    hostname: str | None = None
    filesystem: Filesystem = field(default_factory=Filesystem)
    # The ingress (SPEC §11): no host port at all, and the address the route points to.
    publish: bool = True
    ip: str | None = None
    # The network it joins: the instance's (InstanceSpecs.layout), a warm pool's holding one
    # (issue 14); the team's when unset.
    network: str | None = None
    # The user the process runs as (catalog ``user``: ``uid[:gid]`` or a name of the image).
    user: str | None = None
    # A service of a group (SPEC §12): its other container ports, the names it is reached by
    # on the instance's network (its service name), and what its Compose file sets.
    extra_ports: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()
    entrypoint: list[str] | None = None
    working_dir: str | None = None
    healthcheck: Healthcheck | None = None


@dataclass(frozen=True)
class ContainerInfo:
    """What the instancer reads of a container."""

    id: str
    name: str
    state: str  # created, running, restarting, paused, exited, dead, removing
    labels: dict[str, str]
    ports: dict[str, int]
    ip: str | None = None
    exit_code: int | None = None
    created: str = ""
    attrs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    oom_killed: bool = False
    health: str | None = None  # starting, healthy, unhealthy; None without a health check
    image_id: str = ""  # the image it was made from (``sha256:…``): a later pull of its tag differs

    @property
    def team_id(self) -> str:
        """The team label."""
        return self.labels.get("ctf.team", "")

    @property
    def challenge(self) -> str:
        """The challenge label."""
        return self.labels.get("ctf.challenge", "")


@dataclass(frozen=True)
class WritableLayer:
    """How much a running container has written to its root filesystem (its writable layer)."""

    id: str
    name: str
    labels: dict[str, str]
    size: int  # bytes


@dataclass(frozen=True)
class NetworkInfo:
    """What the instancer reads of a network."""

    id: str
    name: str
    labels: dict[str, str]
    subnets: list[str]
    containers: int
    bridge: str = ""  # the host interface of a bridge network (the egress firewall's key)


@dataclass(frozen=True)
class ContainerEvent:
    """One container event of the engine (``die``, ``oom``, ``destroy``, ``start``, …)."""

    action: str  # "health_status: unhealthy" is reduced to "health_status"
    id: str
    name: str
    labels: dict[str, str]
    exit_code: int | None = None
    health: str | None = None
    time: float = 0.0


class EventStream(Protocol):
    """The engine's container events as they happen; iterate it, ``close()`` from anywhere.

    Iteration ends when the connection breaks or the stream is closed.
    """

    def __iter__(self) -> Iterator[ContainerEvent]: ...

    def close(self) -> None:
        """Close the stream; a thread iterating it stops."""


class Driver(Protocol):
    """What the instancer needs of one container engine.

    Every method raises only :mod:`celery_app.errors` classes (``DockerUnavailable`` for
    engine trouble, retryable); "not found" is a ``None`` or ``False`` answer, not an error.
    """

    @property
    def is_local(self) -> bool:
        """Whether the engine runs on this machine (so container IPs are routable from here)."""

    def close(self) -> None:
        """Release the engine connection."""

    def events(self, labels: dict[str, str], since: float | None = None) -> EventStream:
        """Open the stream of events of containers carrying all of ``labels``."""

    def ping(self) -> bool:
        """Return whether the engine answers."""

    def engine_id(self) -> str:
        """Return the engine's own ID (``docker info``'s, stable across its restarts)."""

    def image_present(self, image: str) -> bool:
        """Return whether ``image`` is present locally."""

    def image_id(self, image: str) -> str | None:
        """Return the local image's ID (``sha256:…``), or ``None`` when it is absent."""

    def image_volumes(self, image: str) -> list[str]:
        """Return the paths the image declares as VOLUMEs (``ImageNotFound`` if absent)."""

    def image_exposed_port(self, image: str) -> int | None:
        """Return the lowest TCP port the image EXPOSEs, or ``None``."""

    def pull(self, image: str, progress: ProgressFn | None = None) -> None:
        """Pull ``image`` (``ImageNotFound``/``ImagePullFailed`` when the registry refuses)."""

    def get_container(self, name_or_id: str) -> ContainerInfo | None:
        """Return the container, or ``None`` when there is none."""

    def list_containers(self, labels: dict[str, str] | None = None) -> list[ContainerInfo]:
        """Return every container (running or not) carrying all of ``labels``."""

    def run_container(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a container on the team's network; nothing is left on failure.

        A name already taken raises ``InvalidRequest``; no host port left,
        ``CapacityExhausted``.
        """

    def remove_container(self, name_or_id: str) -> bool:
        """Force-remove a container; ``False`` when it was already gone (success)."""

    def kill_container(self, name_or_id: str) -> bool:
        """Stop a container at once (SIGKILL), keeping it; ``False`` when it was not running."""

    def writable_layers(self, labels: dict[str, str], key: str) -> list[WritableLayer]:
        """Return the size of the writable layer of each running container with ``labels``.

        Only containers that also carry the label ``key`` (any value) are measured: the
        engine walks each one's writable layer to size it.
        """

    def container_logs(self, name_or_id: str, tail: int = 20) -> str:
        """Return the last lines of a container's output (``""`` when it is gone)."""

    def list_networks(self, labels: dict[str, str] | None = None) -> list[NetworkInfo]:
        """Return the networks carrying all of ``labels`` (every network with none)."""

    def get_network(self, name: str) -> NetworkInfo | None:
        """Return the network named ``name`` (or with that id), or ``None``."""

    def ensure_network(
        self, team_id: str, labels: dict[str, str], pool: str, prefix: int
    ) -> NetworkInfo:
        """Return the team's network, creating it with a free ``/prefix`` of ``pool``.

        A network of that name without ``labels`` raises ``InvalidRequest``; a full pool,
        ``CapacityExhausted``.
        """

    def ensure_named_network(
        self, name: str, labels: dict[str, str], pool: str, prefix: int, *,
        internal: bool = False, options: dict[str, str] | None = None,
    ) -> NetworkInfo:
        """Return the bridge network ``name``, creating it with a free ``/prefix`` of ``pool``.

        ``internal``: no route out of the subnet (warm pools' holding network); ``options``:
        bridge driver options.
        """

    def connect_network(
        self, container: str, network: str, ip: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        """Connect a running container to ``network`` (at ``ip``), with endpoint ``options``."""

    def disconnect_network(self, container: str, network: str) -> bool:
        """Disconnect a container from ``network``; ``False`` when it was not connected."""

    def rename_container(self, container: str, name: str) -> None:
        """Rename a container (a name in use raises ``InvalidRequest``)."""

    def remove_network(self, name_or_id: str) -> bool:
        """Remove a network; ``False`` when it was already gone or still has containers."""

    def free_address(self, name: str) -> str | None:
        """Return the lowest free address of network ``name`` (``None``: missing or full)."""
