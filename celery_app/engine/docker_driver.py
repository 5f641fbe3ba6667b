"""The Docker edge: the only module that imports ``docker``.

Every Docker SDK error is translated here into the tree of :mod:`celery_app.errors` by
:func:`map_docker_errors`, so nothing above this module knows the SDK exists.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from celery_app.engine.driver import (
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    Driver,
    Filesystem,
    Healthcheck,
    NetworkInfo,
    ProgressFn,
    WritableLayer,
    carries,
    check_ours,
)
from celery_app.errors import (
    CapacityExhausted,
    CatalogError,
    CTFError,
    DockerUnavailable,
    ImageNotFound,
    ImagePullFailed,
    InvalidRequest,
)
from celery_app.vocab.naming import LABEL_MANAGED, network_name, read_claim

# The data classes live in celery_app.engine.driver; they are re-exported for older imports.
__all__ = [
    "ContainerEvent", "ContainerInfo", "ContainerSpec", "DockerDriver", "EventStream",
    "Filesystem", "NetworkInfo", "ProgressFn", "carries", "check_ours", "map_docker_errors",
]

log = logging.getLogger(__name__)

# Messages with which the engine says a resource is used up (it answers 500 for these).
_PORTS_EXHAUSTED = (
    "all ports are allocated", "port is already allocated", "address already in use",
)
_POOL_OVERLAP = ("pool overlaps", "overlaps with")
# Seconds a subnet this process is making a network with (or just made one with) is skipped by
# its other threads: a herd of new teams' starts would otherwise all try the pool's first free
# subnet, and all but one be refused, round after round (issue 27: 125 refused creates for 20
# new teams). By then the engine's network list shows it.
SUBNET_HOLD = 30.0
# Seconds one listing of the engine's networks (the subnets in use) serves every thread's
# subnet search: a herd of new teams lists once a second, not once per team. A network made
# meanwhile by another process costs one refused create (its subnet is then skipped); one
# removed meanwhile leaves its subnet unused for that second.
SUBNETS_LISTED_FOR = 1.0


# A registry that throttles or is briefly overloaded: the same pull may work a moment later.
_REGISTRY_BUSY = ("toomanyrequests", "too many requests", "503 service unavailable")


def _pull_failed(image: str, answer: str) -> ImagePullFailed:
    """The permanent error of a pull the registry could not serve, saying how to go on."""
    return ImagePullFailed(
        f"cannot pull image {image!r}: the registry answered: {answer.strip()[:400]}. Check the "
        "image name and that this Docker host can reach its registry, or make the image present "
        "on the host another way (docker load -i image.tar, or ctfctl pull once the registry is "
        "reachable); CTF_PULL_POLICY=never uses only local images"
    )


@contextlib.contextmanager
def map_docker_errors(what: str) -> Iterator[None]:
    """Translate Docker SDK and transport errors raised inside the block.

    Args:
        what: names the operation in the error message ("create container ctf-x-y").

    Raises:
        CapacityExhausted: the engine has no port left in the range.
        DockerUnavailable: the engine cannot be reached or answered 5xx (retry).
        InvalidRequest: the engine refused the request (4xx).

    """
    try:
        yield
    except CTFError:
        raise
    except docker.errors.APIError as exc:
        message = str(exc.explanation or exc)
        status = exc.status_code or 500
        if any(marker in message.lower() for marker in _PORTS_EXHAUSTED):
            raise CapacityExhausted(
                f"{what}: no free host port left ({message}); widen CTF_PORT_RANGE or stop "
                "some instances"
            ) from exc
        if status >= 500:
            raise DockerUnavailable(f"{what}: Docker engine error {status}: {message}") from exc
        raise InvalidRequest(f"{what}: Docker refused the request ({status}): {message}") from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise DockerUnavailable(
            f"{what}: cannot reach the Docker engine ({exc.__class__.__name__}); is dockerd "
            "running and DOCKER_HOST right?"
        ) from exc
    except docker.errors.DockerException as exc:
        # The SDK raises this plain class when it cannot even ask the engine its version.
        raise DockerUnavailable(
            f"{what}: cannot reach the Docker engine ({exc}); is dockerd running and "
            "DOCKER_HOST right?"
        ) from exc


# A tmpfs the image's own VOLUMEs get when the root filesystem is read-only, so they cannot
# grow without bound on the host's disk either.
VOLUME_TMPFS_BYTES = 64 * 1024**2


def _healthcheck(check: Healthcheck | None) -> dict[str, Any] | None:
    """Docker's ``Healthcheck`` of a container's own check (durations in nanoseconds)."""
    if check is None:
        return None

    def ns(seconds: float | None) -> int | None:
        return None if seconds is None else int(seconds * 1e9)

    found = {"test": list(check.test), "interval": ns(check.interval),
             "timeout": ns(check.timeout), "retries": check.retries,
             "start_period": ns(check.start_period)}
    return {k: v for k, v in found.items() if v is not None}


def _container_info(attrs: dict[str, Any]) -> ContainerInfo:
    """Build a ContainerInfo from inspect output (or the list endpoint's summary)."""
    state = attrs.get("State")
    oom_killed, health = False, None
    if isinstance(state, dict):  # inspect
        status = state.get("Status", "")
        exit_code = state.get("ExitCode")
        oom_killed = bool(state.get("OOMKilled"))
        health = (state.get("Health") or {}).get("Status")
        image_id = str(attrs.get("Image") or "")  # the ID (Config.Image is the name asked)
        labels = attrs.get("Config", {}).get("Labels") or {}
        name = attrs.get("Name", "").lstrip("/")
        raw_ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
        ports = {
            key: int(bindings[0]["HostPort"])
            for key, bindings in raw_ports.items()
            if bindings and bindings[0].get("HostPort")
        }
        nets = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    else:  # list summary
        status = str(state or "")
        exit_code = None
        image_id = str(attrs.get("ImageID") or "")  # here Image is the name asked
        labels = attrs.get("Labels") or {}
        name = (attrs.get("Names") or ["/"])[0].lstrip("/")
        ports = {
            f"{p['PrivatePort']}/{p['Type']}": int(p["PublicPort"])
            for p in attrs.get("Ports") or []
            if p.get("PublicPort")
        }
        nets = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    ip = next((n.get("IPAddress") for n in nets.values() if n.get("IPAddress")), None)
    options: dict[str, str] = {}
    for endpoint in nets.values():
        options.update((endpoint or {}).get("DriverOpts") or {})
    return ContainerInfo(
        id=attrs.get("Id", ""),
        name=name,
        state=status,
        labels=read_claim(labels, name, options),
        ports=ports,
        ip=ip,
        exit_code=exit_code,
        created=str(attrs.get("Created", "")),
        attrs=attrs,
        oom_killed=oom_killed,
        health=health,
        image_id=image_id,
    )


# Attributes of a container event that are not labels.
_EVENT_ATTRIBUTES = ("name", "image", "exitCode", "signal", "execID", "healthStatus")


def _container_event(raw: dict[str, Any]) -> ContainerEvent:
    actor = raw.get("Actor") or {}
    attributes = dict(actor.get("Attributes") or {})
    action, _, detail = str(raw.get("Action") or raw.get("status") or "").partition(":")
    exit_code = attributes.get("exitCode")
    return ContainerEvent(
        action=action.strip(),
        id=str(actor.get("ID") or raw.get("id") or ""),
        name=str(attributes.get("name", "")),
        labels=read_claim({k: v for k, v in attributes.items() if k not in _EVENT_ATTRIBUTES},
                          str(attributes.get("name", ""))),
        exit_code=int(str(exit_code)) if str(exit_code or "").lstrip("-").isdigit() else None,
        health=(detail.strip() or attributes.get("healthStatus")) if action == "health_status"
        else None,
        time=int(raw.get("timeNano") or 0) / 1e9 or float(raw.get("time") or 0),
    )


class EventStream:
    """The engine's container events, as they happen; iterate it, ``close()`` from anywhere.

    Iteration ends when the connection breaks (engine restart, network loss) or the stream is
    closed: the follower then reconnects.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __iter__(self) -> Iterator[ContainerEvent]:
        try:
            for raw in self._raw:
                if isinstance(raw, dict) and raw.get("Type", "container") == "container":
                    yield _container_event(raw)
        except (requests.exceptions.RequestException, OSError, ValueError) as exc:
            # A broken or closed connection (or a truncated last line): the stream is over.
            log.info("event stream ended: %s", exc.__class__.__name__)

    def close(self) -> None:
        """Close the connection; a thread iterating the stream stops."""
        with contextlib.suppress(Exception):
            self._raw.close()


def _network_info(attrs: dict[str, Any]) -> NetworkInfo:
    configs = (attrs.get("IPAM") or {}).get("Config") or []
    return NetworkInfo(
        id=attrs.get("Id", ""),
        name=attrs.get("Name", ""),
        labels=attrs.get("Labels") or {},
        subnets=[c["Subnet"] for c in configs if c.get("Subnet")],
        containers=len(attrs.get("Containers") or {}),
        bridge=_bridge_name(attrs),
    )


def _bridge_name(attrs: dict[str, Any]) -> str:
    """A bridge network's interface on the host: its option, else Docker's ``br-<id12>``."""
    if attrs.get("Driver") != "bridge":
        return ""
    options = attrs.get("Options") or {}
    return str(options.get("com.docker.network.bridge.name") or f"br-{attrs.get('Id', '')[:12]}")


class DockerDriver:
    """Drives one Docker engine for the instancer.

    Args:
        base_url: the engine's URL (``unix:///var/run/docker.sock``, ``tcp://…``); ``None``
            reads ``DOCKER_HOST`` and friends as the Docker SDK does.
        timeout: seconds for one API call.

    """

    def __init__(self, base_url: str | None = None, timeout: float = 60.0) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()
        self._subnets_lock = threading.Lock()
        self._subnets_taken: dict[str, float] = {}  # subnet -> when a thread here took it
        self._subnets_listed: tuple[float, list[ipaddress.IPv4Network]] = (float("-inf"), [])

    @property
    def is_local(self) -> bool:
        """Whether the engine runs on this machine (so container IPs are routable from here)."""
        # Without a URL the SDK follows DOCKER_HOST (how a TLS engine is reached), so must we.
        url = self._base_url or os.environ.get("DOCKER_HOST", "")
        return url == "" or url.startswith(("unix://", "npipe://"))

    @property
    def client(self) -> docker.DockerClient:
        """The SDK client, made on first use (so an engine that is down is a retryable error)."""
        if self._client is None:
            with self._client_lock, map_docker_errors("connect to Docker"):
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def _connect(self) -> docker.DockerClient:
        """Make the SDK client: ``base_url``, or the environment (DOCKER_HOST, TLS) without.

        requests lets REQUESTS_CA_BUNDLE (set system-wide on many hosts) replace the
        engine's own CA from DOCKER_CERT_PATH, failing every TLS handshake; the engine
        connection wants no proxy or netrc from the environment either. So the client
        ignores the environment of requests, from its first request on: the API version is
        asked with a client made at the oldest version (which sends nothing when made),
        then the real client is made at the engine's version.
        """

        def make(version: str) -> docker.DockerClient:
            # Enough pooled connections for the worker's threads and the janitor's.
            if self._base_url:
                client = docker.DockerClient(base_url=self._base_url, version=version,
                                             timeout=int(self._timeout), max_pool_size=32)
            else:
                client = docker.from_env(version=version, timeout=int(self._timeout),
                                         max_pool_size=32)
            client.api.trust_env = False
            return client

        probe = make(docker.constants.MINIMUM_DOCKER_API_VERSION)
        try:
            version = str(probe.api.version(api_version=False)["ApiVersion"])
        finally:
            probe.close()
        return make(version)

    def close(self) -> None:
        """Close the client's connections."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- engine -----------------------------------------------------------------------------

    def events(self, labels: dict[str, str], since: float | None = None) -> EventStream:
        """Open the engine's stream of events of containers carrying all of ``labels``.

        Args:
            labels: the scope labels (``ctf.managed=true`` and the deployment's own).
            since: also replay the events since this moment (epoch s) that the engine kept.

        Raises:
            DockerUnavailable: the engine cannot be reached.
        """
        filters = {"type": ["container"], "label": [f"{k}={v}" for k, v in labels.items()]}
        with map_docker_errors("follow Docker events"):
            raw = self.client.api.events(decode=True, filters=filters,
                                         since=int(since) if since else None)
        return EventStream(raw)

    def ping(self) -> bool:
        """Return whether the engine answers."""
        try:
            with map_docker_errors("ping Docker"):
                return bool(self.client.ping())
        except CTFError:
            return False

    def engine_id(self) -> str:
        """Return the engine's ID (the egress keepers' heartbeats are keyed by it)."""
        with map_docker_errors("read the engine's ID"):
            return str(self.client.info()["ID"])

    # -- images -----------------------------------------------------------------------------

    def image_present(self, image: str) -> bool:
        """Return whether ``image`` is present locally."""
        return self.image_id(image) is not None

    def image_id(self, image: str) -> str | None:
        """Return the local image's ID (``sha256:…``), or ``None`` when it is absent."""
        with map_docker_errors(f"inspect image {image}"):
            try:
                return str(self.client.api.inspect_image(image)["Id"])
            except docker.errors.ImageNotFound:
                return None

    def _image_config(self, image: str) -> dict[str, Any]:
        with map_docker_errors(f"inspect image {image}"):
            try:
                attrs = self.client.api.inspect_image(image)
            except docker.errors.ImageNotFound:
                raise ImageNotFound(f"image {image!r} is not present locally") from None
        return dict(attrs.get("Config") or {})

    def image_volumes(self, image: str) -> list[str]:
        """Return the paths the image declares as VOLUMEs (anonymous volumes on run)."""
        return sorted((self._image_config(image).get("Volumes") or {}).keys())

    def _tmpfs(self, spec: ContainerSpec) -> dict[str, str] | None:
        """Return the tmpfs mounts of ``spec``: its own, plus its image's VOLUMEs when read-only."""
        fs = spec.filesystem
        sizes = dict(fs.tmpfs)
        if fs.read_only:
            for path in self.image_volumes(spec.image):
                sizes.setdefault(path, VOLUME_TMPFS_BYTES)
        return {path: f"rw,nosuid,nodev,size={size}" for path, size in sizes.items()} or None

    def image_exposed_port(self, image: str) -> int | None:
        """Return the lowest TCP port the image EXPOSEs, or ``None``."""
        exposed = self._image_config(image).get("ExposedPorts") or {}
        ports = sorted(int(k.split("/")[0]) for k in exposed if k.endswith("/tcp"))
        return ports[0] if ports else None

    def pull(self, image: str, progress: ProgressFn | None = None) -> None:
        """Pull ``image``, reporting ``{"layers_done", "layers_total", "bytes_done", …}``.

        Raises:
            ImageNotFound: the registry does not have the image.
            DockerUnavailable: the engine or the registry cannot be reached (retry).

        """
        repository, _, tag = image.rpartition(":")
        if not repository or "/" in tag:
            repository, tag = image, "latest"
        layers: dict[str, dict[str, int]] = {}
        done: set[str] = set()
        with map_docker_errors(f"pull image {image}"):
            try:
                stream = self.client.api.pull(repository, tag=tag, stream=True, decode=True)
                for event in stream:
                    if "error" in event:
                        raise _pull_failed(image, str(event["error"]))
                    layer = event.get("id")
                    status = str(event.get("status", ""))
                    if layer and layer != tag:
                        detail = event.get("progressDetail") or {}
                        entry = layers.setdefault(layer, {"current": 0, "total": 0})
                        if detail.get("total"):
                            entry["total"] = int(detail["total"])
                        if status.startswith("Downloading") and detail.get("current"):
                            entry["current"] = int(detail["current"])
                        if status in ("Download complete", "Pull complete", "Already exists"):
                            entry["current"] = entry["total"]
                            done.add(layer)
                    if progress is not None:
                        progress(
                            {
                                "phase": "pulling",
                                "image": image,
                                "layers_done": len(done),
                                "layers_total": len(layers),
                                "bytes_done": sum(e["current"] for e in layers.values()),
                                "bytes_total": sum(e["total"] for e in layers.values()),
                            }
                        )
            except docker.errors.APIError as exc:
                # The engine answered: what failed is the registry (unreachable, no such image,
                # access refused). Only a registry that asks us to slow down is worth a retry.
                message = str(exc.explanation or exc)
                if any(marker in message.lower() for marker in _REGISTRY_BUSY):
                    raise DockerUnavailable(
                        f"pull image {image}: the registry asks to retry later: {message}"
                    ) from exc
                raise _pull_failed(image, message) from exc

    # -- containers -------------------------------------------------------------------------

    def get_container(self, name_or_id: str) -> ContainerInfo | None:
        """Return the container, or ``None`` when there is none."""
        with map_docker_errors(f"inspect container {name_or_id}"):
            try:
                return _container_info(self.client.api.inspect_container(name_or_id))
            except docker.errors.NotFound:
                return None

    def list_containers(self, labels: dict[str, str] | None = None) -> list[ContainerInfo]:
        """Return every container (running or not) carrying all of ``labels``."""
        filters = [f"{k}={v}" for k, v in (labels or {LABEL_MANAGED: "true"}).items()]
        with map_docker_errors("list containers"):
            summaries = self.client.api.containers(all=True, filters={"label": filters})
        return [_container_info(s) for s in summaries]

    def run_container(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a hardened container; on failure nothing is left behind.

        Returns:
            The container as inspected once started (with its host port).

        Raises:
            CapacityExhausted: no host port left.
            InvalidRequest: the name is taken by a container we did not expect.
            DockerUnavailable: engine trouble (retry).

        """
        api = self.client.api
        ports = [p for p in (spec.port, *spec.extra_ports) if p is not None]
        network = spec.network or network_name(spec.team_id)
        host_config = api.create_host_config(
            port_bindings={f"{p}/tcp": (spec.publish_ip, spec.port_range or "") for p in ports}
            if spec.publish and ports else None,
            network_mode=network,
            cap_drop=["ALL"],
            cap_add=spec.cap_add or None,
            security_opt=["no-new-privileges:true"],
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            nano_cpus=spec.nano_cpus,
            pids_limit=spec.pids,
            log_config=docker.types.LogConfig(
                type="json-file", config={"max-size": "10m", "max-file": "2"}
            ),
            restart_policy={"Name": "no"},
            read_only=spec.filesystem.read_only,
            tmpfs=self._tmpfs(spec),
            storage_opt=({"size": str(spec.filesystem.storage_bytes)}
                         if spec.filesystem.storage_bytes else None),
        )
        with map_docker_errors(f"create container {spec.name}"):
            try:
                created = api.create_container(
                    image=spec.image,
                    name=spec.name,
                    command=spec.command,
                    entrypoint=spec.entrypoint,
                    working_dir=spec.working_dir,
                    environment=spec.env,
                    labels=spec.labels,
                    ports=[(p, "tcp") for p in ports] or None,
                    host_config=host_config,
                    hostname=spec.hostname,
                    user=spec.user or None,
                    detach=True,
                    healthcheck=_healthcheck(spec.healthcheck),
                    networking_config=api.create_networking_config({
                        network: api.create_endpoint_config(
                            ipv4_address=spec.ip, aliases=list(spec.aliases) or None),
                    }) if spec.ip or spec.aliases else None,
                )
            except docker.errors.APIError as exc:
                if spec.filesystem.storage_bytes and "storage-opt" in str(exc.explanation):
                    raise CatalogError(
                        f"{spec.name}: the catalog's field 'storage' cannot be applied: this "
                        f"Docker engine cannot limit the writable layer ({exc.explanation}); "
                        "remove 'storage' and use read_only with tmpfs sizes instead"
                    ) from None
                raise
        container_id = created["Id"]
        try:
            with map_docker_errors(f"start container {spec.name}"):
                api.start(container_id)
            info = self.get_container(container_id)
        except BaseException:
            # Nothing half-made: a container that could not start is removed at once.
            self.remove_container(container_id)
            raise
        if info is None:
            raise DockerUnavailable(f"container {spec.name} vanished right after start")
        return info

    def remove_container(self, name_or_id: str) -> bool:
        """Force-remove a container; return ``False`` when it was already gone (success)."""
        with map_docker_errors(f"remove container {name_or_id}"):
            try:
                self.client.api.remove_container(name_or_id, force=True, v=True)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and "already in progress" in str(exc.explanation):
                    return True  # someone else is removing it: as good as done
                raise
        return True

    def kill_container(self, name_or_id: str) -> bool:
        """Stop a container at once (SIGKILL), keeping it; ``False`` when it was not running."""
        with map_docker_errors(f"kill container {name_or_id}"):
            try:
                self.client.api.kill(name_or_id)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if exc.status_code == 409:  # not running (any more)
                    return False
                raise
        return True

    def writable_layers(self, labels: dict[str, str], key: str) -> list[WritableLayer]:
        """Return the writable-layer size of each running container with ``labels`` and ``key``.

        One list call with ``size=true``: the engine sizes each matching container's layer
        (SizeRw), whatever its storage driver or backing filesystem.
        """
        wanted = [f"{k}={v}" for k, v in labels.items()] + [key]
        with map_docker_errors("measure writable layers"):
            listed = self.client.api.containers(
                filters={"label": wanted, "status": "running"}, size=True)
        return [
            WritableLayer(id=c["Id"], name=(c.get("Names") or ["/"])[0].lstrip("/"),
                          labels=dict(c.get("Labels") or {}), size=int(c.get("SizeRw") or 0))
            for c in listed
        ]

    def container_logs(self, name_or_id: str, tail: int = 20) -> str:
        """Return the last lines of a container's output (for error messages)."""
        with map_docker_errors(f"read logs of {name_or_id}"):
            try:
                raw = self.client.api.logs(name_or_id, tail=tail)
            except docker.errors.NotFound:
                return ""
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    # -- networks ---------------------------------------------------------------------------

    def list_networks(self, labels: dict[str, str] | None = None) -> list[NetworkInfo]:
        """Return the networks carrying all of ``labels`` (every network with ``{}``)."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]} if labels else None
        with map_docker_errors("list networks"):
            return [_network_info(n) for n in self.client.api.networks(filters=filters)]

    def get_network(self, name: str) -> NetworkInfo | None:
        """Return the network named ``name``, or ``None``."""
        with map_docker_errors(f"inspect network {name}"):
            try:
                return _network_info(self.client.api.inspect_network(name))
            except docker.errors.NotFound:
                return None

    def ensure_network(
        self, team_id: str, labels: dict[str, str], pool: str, prefix: int
    ) -> NetworkInfo:
        """Return the team's bridge network, creating it with a subnet from ``pool``.

        Subnets in use by any network on the engine are skipped; when two workers race for
        the same subnet, the engine refuses the second and it moves on to the next.

        Raises:
            CapacityExhausted: every subnet of the pool is taken.

        """
        return self.ensure_named_network(network_name(team_id), labels, pool, prefix)

    def ensure_named_network(
        self, name: str, labels: dict[str, str], pool: str, prefix: int, *,
        internal: bool = False, options: dict[str, str] | None = None,
    ) -> NetworkInfo:
        """Return the bridge network ``name``, creating it with a subnet from ``pool``.

        Args:
            name: the network's name.
            labels: its labels (an existing one must carry them).
            pool: the subnet pool.
            prefix: the subnet's prefix length.
            internal: no route out of the subnet (warm pools' holding network).
            options: bridge driver options (``com.docker.network.bridge.enable_icc``).

        Raises:
            CapacityExhausted: every subnet of the pool is taken.

        """
        existing = self.get_network(name)
        if existing is not None:
            check_ours("network", name, existing.labels, labels)
            return existing
        used = self._used_subnets()
        for subnet in ipaddress.IPv4Network(pool).subnets(new_prefix=prefix):
            if any(subnet.overlaps(u) for u in used) or not self._take_subnet(str(subnet)):
                continue
            ipam = docker.types.IPAMConfig(
                pool_configs=[docker.types.IPAMPool(subnet=str(subnet))]
            )
            try:
                with map_docker_errors(f"create network {name}"):
                    created = self.client.api.create_network(
                        name, driver="bridge", ipam=ipam, labels=labels, check_duplicate=True,
                        internal=internal, options=options,
                    )
            except (InvalidRequest, DockerUnavailable) as exc:
                self._drop_subnet(str(subnet))
                text = str(exc).lower()
                if "already exists" in text:
                    found = self.get_network(name)
                    if found is not None:
                        return found
                if any(marker in text for marker in _POOL_OVERLAP):
                    used.append(subnet)
                    continue
                raise
            except BaseException:
                self._drop_subnet(str(subnet))
                raise
            log.info("created network %s subnet=%s", name, subnet)
            # What an inspect would say of the network just made (one call fewer per new
            # network; its bridge is Docker's br-<id12> unless the options name one).
            net_id = str(created.get("Id", ""))
            return NetworkInfo(
                id=net_id, name=name, labels=dict(labels), subnets=[str(subnet)], containers=0,
                bridge=str((options or {}).get("com.docker.network.bridge.name")
                           or f"br-{net_id[:12]}"),
            )
        raise CapacityExhausted(
            f"no free /{prefix} subnet left in CTF_TEAM_SUBNET_POOL {pool}; use a larger pool "
            "or a longer CTF_TEAM_SUBNET_PREFIX"
        )

    def _used_subnets(self) -> list[ipaddress.IPv4Network]:
        """The IPv4 subnets of the engine's networks, listed at most once a second (a copy)."""
        at, listed = self._subnets_listed
        if time.monotonic() - at > SUBNETS_LISTED_FOR:
            listed = [
                ipaddress.IPv4Network(s, strict=False)
                for net in self.list_networks()
                for s in net.subnets
                if ":" not in s
            ]
            self._subnets_listed = (time.monotonic(), listed)
        return list(listed)

    def _take_subnet(self, subnet: str) -> bool:
        """Take ``subnet`` for a network this thread makes; ``False``: another thread has it."""
        now = time.monotonic()
        with self._subnets_lock:
            for held, at in list(self._subnets_taken.items()):
                if now - at > SUBNET_HOLD:
                    del self._subnets_taken[held]
            if subnet in self._subnets_taken:
                return False
            self._subnets_taken[subnet] = now
            return True

    def _drop_subnet(self, subnet: str) -> None:
        """Give back a subnet whose network was not made."""
        with self._subnets_lock:
            self._subnets_taken.pop(subnet, None)

    def remove_network(self, name_or_id: str) -> bool:
        """Remove a network; ``False`` when it was already gone or still has containers."""
        with map_docker_errors(f"remove network {name_or_id}"):
            try:
                self.client.api.remove_network(name_or_id)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if exc.status_code in (403, 409) or "active endpoints" in str(exc.explanation):
                    return False  # still in use: the next stop or the janitor removes it
                raise
        return True

    def free_address(self, name: str) -> str | None:
        """Return the lowest address of network ``name`` that no container (or gateway) uses.

        Callers hold the team's network lock, so no other start takes it meanwhile.
        Returns ``None`` when the network is missing, has no IPv4 subnet, or is full.
        """
        with map_docker_errors(f"inspect network {name}"):
            try:
                attrs = self.client.api.inspect_network(name)
            except docker.errors.NotFound:
                return None
        configs = [c for c in (attrs.get("IPAM") or {}).get("Config") or []
                   if c.get("Subnet") and ":" not in c["Subnet"]]
        if not configs:
            return None
        subnet = ipaddress.IPv4Network(configs[0]["Subnet"], strict=False)
        used = {str(configs[0].get("Gateway") or next(subnet.hosts()))}
        for endpoint in (attrs.get("Containers") or {}).values():
            used.add(str(endpoint.get("IPv4Address", "")).split("/", 1)[0])
        return next((str(a) for a in subnet.hosts() if str(a) not in used), None)

    # -- warm pools (issue 14): a booted container changes hands --------------------------------

    def connect_network(
        self, container: str, network: str, ip: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        """Connect a running container to ``network`` (at ``ip``), with endpoint ``options``.

        The options are kept by the engine with the endpoint and shown by inspect: a claim
        writes there what labels, fixed at creation, cannot say.
        """
        with map_docker_errors(f"connect {container} to {network}"):
            self.client.api.connect_container_to_network(
                container, network, ipv4_address=ip, driver_opt=options or None)

    def disconnect_network(self, container: str, network: str) -> bool:
        """Disconnect a container from ``network``; ``False`` when it was not connected."""
        with map_docker_errors(f"disconnect {container} from {network}"):
            try:
                self.client.api.disconnect_container_from_network(container, network,
                                                                  force=True)
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                if "is not connected" in str(exc.explanation):
                    return False
                raise
        return True

    def rename_container(self, container: str, name: str) -> None:
        """Rename a container (the engine refuses a name in use: InvalidRequest)."""
        with map_docker_errors(f"rename {container} to {name}"):
            self.client.api.rename(container, name)


if TYPE_CHECKING:  # mypy proves here that DockerDriver keeps the Driver contract
    _CONTRACT: type[Driver] = DockerDriver
