"""An in-memory container engine that keeps the :class:`celery_app.engine.driver.Driver` contract.

For fast unit tests of the rules (start/stop, expiry, reconcile, events) without Docker.
``tests/test_driver_contract.py`` runs the same tests against it and the real engine, so
it answers as Docker does: ``None``/``False`` for what is gone, ``InvalidRequest`` for a
taken name, a missing network or a missing image, ``CapacityExhausted`` for a full pool.

Besides the contract, tests steer it: :meth:`FakeDriver.add_image` makes an image present,
:meth:`FakeDriver.exit` ends a container as a crash would (its ``die``/``oom`` events too),
and ``down = True`` makes every call fail like an engine that does not answer.
"""

from __future__ import annotations

import ipaddress
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from celery_app.engine.driver import (
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    NetworkInfo,
    ProgressFn,
    WritableLayer,
    check_ours,
)
from celery_app.errors import (
    CapacityExhausted,
    DockerUnavailable,
    ImageNotFound,
    ImagePullFailed,
    InvalidRequest,
)
from celery_app.vocab.naming import LABEL_MANAGED, network_name, read_claim

_END = object()


@dataclass
class FakeImage:
    """An image the fake engine has (or a registry would give it)."""

    port: int | None = 8080
    volumes: list[str] = field(default_factory=list)


def _image_id(image: FakeImage) -> str:
    """A fake image's ID: one per image object, so a pull or add under a name changes it."""
    return f"sha256:{id(image):x}"


class FakeEvents:
    """A stream of container events; iteration ends when it is closed."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, event: ContainerEvent) -> None:
        """Deliver ``event`` when its container carries the stream's labels."""
        if all(event.labels.get(k) == v for k, v in self.labels.items()):
            self._queue.put(event)

    def __iter__(self) -> Iterator[ContainerEvent]:
        while (item := self._queue.get()) is not _END:
            yield item

    def close(self) -> None:
        """End the stream; a thread iterating it stops."""
        self._queue.put(_END)


def _as_read(info: ContainerInfo) -> ContainerInfo:
    """The container as the Docker driver reads it: a claimed pool container's team folded in.

    Labels cannot change after creation; the real driver reads a claimed warm-pool
    container's team from its name (:func:`read_claim`), and so does the fake.
    """
    folded = read_claim(info.labels, info.name)
    return info if folded is info.labels else replace(info, labels=folded)


class FakeDriver:
    """A Docker engine in memory: containers, networks, images and their events.

    Args:
        images: images present from the start (name -> :class:`FakeImage`).
        registry: images a pull can fetch (an absent one fails like an unknown image).
        is_local: what :attr:`is_local` answers.
    """

    def __init__(self, images: dict[str, FakeImage] | None = None,
                 registry: dict[str, FakeImage] | None = None, *, is_local: bool = True) -> None:
        self.images: dict[str, FakeImage] = dict(images or {})
        self.registry: dict[str, FakeImage] = dict(registry or {})
        self.containers: dict[str, ContainerInfo] = {}  # by id
        self.networks: dict[str, NetworkInfo] = {}  # by id
        self.attached: dict[str, set[str]] = {}  # container id -> ids of its networks
        self.logs: dict[str, str] = {}
        self.written: dict[str, int] = {}  # container id -> bytes in its writable layer
        self.users: dict[str, str | None] = {}  # container id -> the user it runs as
        self.specs: dict[str, ContainerSpec] = {}  # container id -> what it was made of
        self.down = False
        self.calls: list[str] = []
        self._is_local = is_local
        self._lock = threading.RLock()
        self._streams: list[FakeEvents] = []
        self._next_port = 20000

    # -- steering (not part of the contract) ------------------------------------------------

    def add_image(self, name: str, port: int | None = 8080,
                  volumes: list[str] | None = None) -> None:
        """Make ``name`` present, EXPOSEing ``port``."""
        self.images[name] = FakeImage(port, list(volumes or []))

    def exit(self, name_or_id: str, code: int = 1, *, oom: bool = False,
             output: str = "") -> None:
        """End a running container as a crash would (``die``, and ``oom`` first if OOM)."""
        with self._lock:
            info = self._find(name_or_id)
            assert info is not None, f"no container {name_or_id}"
            self.containers[info.id] = replace(info, state="exited", exit_code=code,
                                               oom_killed=oom)
            self.logs[info.id] = self.logs.get(info.id, "") + output
        if oom:
            self._emit("oom", info)
        self._emit("die", info, exit_code=code)

    def write(self, name_or_id: str, size: int) -> None:
        """Make a container's writable layer hold ``size`` bytes (as its process would)."""
        with self._lock:
            info = self._find(name_or_id)
            assert info is not None, f"no container {name_or_id}"
            self.written[info.id] = size

    def set_health(self, name_or_id: str, health: str) -> None:
        """Give a container a health state (``healthy``, ``unhealthy``)."""
        with self._lock:
            info = self._find(name_or_id)
            assert info is not None
            self.containers[info.id] = replace(info, health=health)
        self._emit("health_status", info, health=health)

    # -- the Driver contract ----------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """Whether container addresses are routable from here."""
        return self._is_local

    def close(self) -> None:
        """Close every open event stream."""
        for stream in list(self._streams):
            stream.close()

    def events(self, labels: dict[str, str], since: float | None = None) -> FakeEvents:
        """Open a stream of the events of containers carrying all of ``labels``."""
        self._call("events")
        stream = FakeEvents(dict(labels))
        self._streams.append(stream)
        return stream

    def ping(self) -> bool:
        """Whether the engine answers (``down`` is False)."""
        return not self.down

    def engine_id(self) -> str:
        """The engine's ID (one per fake engine)."""
        return f"fake-{id(self):x}"

    def image_present(self, image: str) -> bool:
        """Whether ``image`` is present."""
        self._call("image_present")
        return image in self.images

    def image_id(self, image: str) -> str | None:
        """The image's ID: a new one each time the name gets another image (pull, add)."""
        self._call("image_id")
        found = self.images.get(image)
        return None if found is None else _image_id(found)

    def image_volumes(self, image: str) -> list[str]:
        """The image's VOLUMEs."""
        return list(self._image(image).volumes)

    def image_exposed_port(self, image: str) -> int | None:
        """The image's lowest EXPOSEd TCP port."""
        return self._image(image).port

    def pull(self, image: str, progress: ProgressFn | None = None) -> None:
        """Fetch ``image`` from the registry (``ImagePullFailed`` when it has none)."""
        self._call("pull")
        if image not in self.registry:
            raise ImagePullFailed(f"pull image {image}: the registry has no such image")
        self.images[image] = self.registry[image]
        if progress is not None:
            progress({"phase": "pulling", "image": image, "layers_done": 1, "layers_total": 1,
                      "bytes_done": 0, "bytes_total": 0})

    def get_container(self, name_or_id: str) -> ContainerInfo | None:
        """The container named (or with id) ``name_or_id``, or ``None``."""
        self._call("get_container")
        with self._lock:
            found = self._find(name_or_id)
            return None if found is None else self._read(found)

    def list_containers(self, labels: dict[str, str] | None = None) -> list[ContainerInfo]:
        """Every container carrying all of ``labels`` (``ctf.managed=true`` by default)."""
        self._call("list_containers")
        wanted = labels or {LABEL_MANAGED: "true"}
        with self._lock:  # filtered on the labels as made (the engine's), read as ours
            return [self._read(c) for c in self.containers.values()
                    if all(c.labels.get(k) == v for k, v in wanted.items())]

    def _read(self, info: ContainerInfo) -> ContainerInfo:
        """``info`` as read (:func:`_as_read`), with the networks it is on in its attrs."""
        names = {self.networks[n].name: {"IPAddress": info.ip or ""}
                 for n in self.attached.get(info.id, set()) if n in self.networks}
        read = _as_read(info)
        return replace(read, attrs={**read.attrs, "NetworkSettings": {"Networks": names}})

    def run_container(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a container on the team's network."""
        self._call("run_container")
        with self._lock:
            if spec.image not in self.images:
                raise InvalidRequest(f"create container {spec.name}: Docker refused the "
                                     f"request (404): No such image: {spec.image}")
            if self._find(spec.name) is not None:
                raise InvalidRequest(f"create container {spec.name}: Docker refused the "
                                     f"request (409): the name {spec.name} is in use")
            wanted = spec.network or network_name(spec.team_id)
            net = self._network(wanted)
            if net is None:
                raise InvalidRequest(f"create container {spec.name}: Docker refused the "
                                     f"request (404): network {wanted} not found")
            ip = spec.ip or self._free_ip(net)
            ports = {}
            if spec.publish:
                for port in (spec.port, *spec.extra_ports):
                    if port is not None:
                        self._next_port += 1
                        ports[f"{port}/tcp"] = self._next_port
            checked = spec.healthcheck is not None and spec.healthcheck.test[:1] != ("NONE",)
            info = ContainerInfo(
                id=uuid.uuid4().hex + uuid.uuid4().hex, name=spec.name, state="running",
                labels=dict(spec.labels), ports=ports, ip=ip,
                created=str(int(time.time())), health="starting" if checked else None,
                image_id=_image_id(self.images[spec.image]),
            )
            self.containers[info.id] = info
            self.specs[info.id] = spec
            self.users[info.id] = spec.user
            self.attached[info.id] = {net.id}
            self.networks[net.id] = replace(net, containers=net.containers + 1)
        self._emit("start", info)
        return info

    def remove_container(self, name_or_id: str) -> bool:
        """Force-remove a container; ``False`` when it was already gone."""
        self._call("remove_container")
        with self._lock:
            info = self._find(name_or_id)
            if info is None:
                return False
            del self.containers[info.id]
            for net_id in self.attached.pop(info.id, set()):
                net = self.networks.get(net_id)
                if net is not None:
                    self.networks[net_id] = replace(net, containers=max(0, net.containers - 1))
        if info.state == "running":
            self._emit("die", info, exit_code=137)
        self._emit("destroy", info)
        return True

    def kill_container(self, name_or_id: str) -> bool:
        """Stop a running container at once (exit code 137), keeping it."""
        self._call("kill_container")
        with self._lock:
            info = self._find(name_or_id)
            if info is None or info.state != "running":
                return False
            self.containers[info.id] = replace(info, state="exited", exit_code=137)
        self._emit("die", info, exit_code=137)
        return True

    def writable_layers(self, labels: dict[str, str], key: str) -> list[WritableLayer]:
        """The writable-layer size of each running container with ``labels`` and ``key``."""
        self._call("writable_layers")
        with self._lock:
            return [WritableLayer(c.id, c.name, dict(c.labels), self.written.get(c.id, 0))
                    for c in self.containers.values()
                    if c.state == "running" and key in c.labels
                    and all(c.labels.get(k) == v for k, v in labels.items())]

    def container_logs(self, name_or_id: str, tail: int = 20) -> str:
        """The last ``tail`` lines of a container's output (``""`` when it is gone)."""
        self._call("container_logs")
        with self._lock:
            info = self._find(name_or_id)
            if info is None:
                return ""
            lines = self.logs.get(info.id, "").splitlines(keepends=True)
        return "".join(lines[-tail:])

    def list_networks(self, labels: dict[str, str] | None = None) -> list[NetworkInfo]:
        """The networks carrying all of ``labels``."""
        self._call("list_networks")
        with self._lock:
            return [n for n in self.networks.values()
                    if all(n.labels.get(k) == v for k, v in (labels or {}).items())]

    def get_network(self, name: str) -> NetworkInfo | None:
        """The network named (or with id) ``name``, or ``None``."""
        self._call("get_network")
        with self._lock:
            return self._network(name)

    def ensure_network(
        self, team_id: str, labels: dict[str, str], pool: str, prefix: int
    ) -> NetworkInfo:
        """The team's network, made with the lowest free ``/prefix`` of ``pool``."""
        return self.ensure_named_network(network_name(team_id), labels, pool, prefix)

    def ensure_named_network(
        self, name: str, labels: dict[str, str], pool: str, prefix: int, *,
        internal: bool = False, options: dict[str, str] | None = None,
    ) -> NetworkInfo:
        """The network ``name``, made with the lowest free ``/prefix`` of ``pool``."""
        del internal, options  # the fake routes nothing anywhere
        self._call("ensure_network")
        with self._lock:
            existing = self._network(name)
            if existing is not None:
                check_ours("network", name, existing.labels, labels)
                return existing
            used = [ipaddress.ip_network(s) for n in self.networks.values() for s in n.subnets]
            for subnet in ipaddress.IPv4Network(pool).subnets(new_prefix=prefix):
                if not any(subnet.overlaps(u) for u in used):
                    net = NetworkInfo(id=uuid.uuid4().hex, name=name, labels=dict(labels),
                                      subnets=[str(subnet)], containers=0,
                                      bridge=f"br-{uuid.uuid4().hex[:12]}")
                    self.networks[net.id] = net
                    return net
        raise CapacityExhausted(
            f"no free /{prefix} subnet left in CTF_TEAM_SUBNET_POOL {pool}; use a larger pool "
            "or a longer CTF_TEAM_SUBNET_PREFIX"
        )

    def connect_network(
        self, container: str, network: str, ip: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        """Attach a container to ``network`` (at ``ip``, else its lowest free address)."""
        del options
        self._call("connect_network")
        with self._lock:
            info, net = self._find(container), self._network(network)
            if info is None or net is None:
                raise InvalidRequest(f"connect {container} to {network}: Docker refused the "
                                     "request (404): no such container or network")
            self.attached.setdefault(info.id, set()).add(net.id)
            self.networks[net.id] = replace(net, containers=net.containers + 1)
            self.containers[info.id] = replace(info, ip=ip or self._free_ip(net))

    def disconnect_network(self, container: str, network: str) -> bool:
        """Detach a container from ``network``; ``False`` when it was not attached."""
        self._call("disconnect_network")
        with self._lock:
            info, net = self._find(container), self._network(network)
            if info is None or net is None or net.id not in self.attached.get(info.id, set()):
                return False
            self.attached[info.id].discard(net.id)
            self.networks[net.id] = replace(net, containers=max(0, net.containers - 1))
            return True

    def rename_container(self, container: str, name: str) -> None:
        """Rename a container; a name in use is refused like the engine does (409)."""
        self._call("rename_container")
        with self._lock:
            info = self._find(container)
            if info is None or self._find(name) is not None:
                raise InvalidRequest(f"rename {container} to {name}: Docker refused the "
                                     "request (409): no such container, or the name is in use")
            self.containers[info.id] = replace(info, name=name)

    def remove_network(self, name_or_id: str) -> bool:
        """Remove a network; ``False`` when it is gone or still has containers."""
        self._call("remove_network")
        with self._lock:
            net = self._network(name_or_id)
            if net is None or net.containers > 0:
                return False
            del self.networks[net.id]
            return True

    def free_address(self, name: str) -> str | None:
        """The lowest address of network ``name`` that no container or gateway uses."""
        self._call("free_address")
        with self._lock:
            net = self._network(name)
            return None if net is None else self._free_ip(net)

    # -- inside -----------------------------------------------------------------------------

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise DockerUnavailable(f"{what}: cannot reach the Docker engine (fake engine down)")

    def _image(self, image: str) -> FakeImage:
        if image not in self.images:
            raise ImageNotFound(f"image {image!r} is not present locally")
        return self.images[image]

    def _find(self, name_or_id: str) -> ContainerInfo | None:
        if name_or_id in self.containers:
            return self.containers[name_or_id]
        return next((c for c in self.containers.values() if c.name == name_or_id), None)

    def _network(self, name_or_id: str) -> NetworkInfo | None:
        if name_or_id in self.networks:
            return self.networks[name_or_id]
        return next((n for n in self.networks.values() if n.name == name_or_id), None)

    def _free_ip(self, net: NetworkInfo) -> str | None:
        subnet = ipaddress.IPv4Network(net.subnets[0])
        hosts = subnet.hosts()
        used = {str(next(hosts))}  # the gateway
        used |= {str(c.ip) for c in self.containers.values()
                 if c.ip and network_name(c.team_id) == net.name}
        return next((str(a) for a in subnet.hosts() if str(a) not in used), None)

    def _emit(self, action: str, info: ContainerInfo, **extra: Any) -> None:
        event = ContainerEvent(action=action, id=info.id, name=info.name,
                               labels=dict(info.labels), time=time.time(), **extra)
        for stream in list(self._streams):
            stream.put(event)
