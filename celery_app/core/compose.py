"""Challenges of several services (SPEC §12): an organiser's Compose file, read and checked.

The file is validated against the Compose Specification by the ``compose-spec`` bindings (a
maintained parser of the whole format, with line and column in its messages), then held to
SPEC §12's subset: every key outside it is refused, with a message that names the challenge,
the service and the key. What is left becomes a :class:`ComposeApp`: its services in start
order (``depends_on``), each with the container settings the instancer applies, and its
endpoints in file order (the first is the instance's primary one).

Values may use ``${CTF_FLAG}`` (the team's flag) and ``${CTF_TEAM}`` (its id), ``$$`` for a
``$``; nothing is read from the environment, so any other variable is refused here, at
start-up, not met at a team's start. :meth:`ComposeService.for_team` fills the two in.
"""

from __future__ import annotations

import re
import shlex
import string
from collections.abc import Iterator, Mapping
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from compose_spec import PyOptions, parse_duration
from pydantic import BaseModel, ConfigDict

from celery_app.errors import CatalogError
from celery_app.vocab.limits import ALLOWED_CAPS, size_bytes

VARIABLES: Final = frozenset({"CTF_FLAG", "CTF_TEAM"})
SERVICE_KEYS: Final = frozenset(
    {
        "image", "command", "entrypoint", "environment", "ports", "expose", "healthcheck",
        "depends_on", "mem_limit", "cpus", "pids_limit", "deploy", "read_only", "tmpfs",
        "cap_add", "user", "working_dir", "networks",
        "x-ctf-protocol", "x-ctf-health-path", "x-ctf-egress",
    }
)
# Why the keys an organiser's file most often carries are refused, and what to do instead.
_REFUSED_WHY: Final = {
    "volumes": "mounts reach the host's files; bake the files into the image",
    "build": "images are not built at a team's start; build and tag it beforehand "
             "(docker build -t NAME .) and name it in 'image:'",
    "privileged": "a privileged container owns the host",
    "network_mode": "every service sits on its instance's own network",
    "networks": "every service sits on its instance's own network, the default one",
    "pid": "services do not share the host's process namespace",
    "ipc": "services do not share the host's IPC namespace",
    "devices": "host devices are not given to instances",
    "security_opt": "the instancer sets each container's security options",
    "cap_add": "only SPEC §7's capabilities may be added back",
    "container_name": "the instancer names every container (ctf-<challenge>-<team>-…)",
    "restart": "the instancer decides restarts; a service that dies makes the instance failed",
    "env_file": "nothing is read from files or the environment; write the values in "
                "'environment:'",
}
_SERVICE_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_CONDITIONS: Final = ("service_started", "service_healthy", "service_completed_successfully")
Condition = Literal["service_started", "service_healthy", "service_completed_successfully"]


class HealthCheck(BaseModel):
    """A service's healthcheck, as Docker's ``Healthcheck`` wants it (durations in seconds)."""

    model_config = ConfigDict(frozen=True)

    test: tuple[str, ...]
    interval: float | None = None
    timeout: float | None = None
    retries: int | None = None
    start_period: float | None = None


class Endpoint(BaseModel):
    """A container port of a service that the team reaches (SPEC §12, "Endpoints")."""

    model_config = ConfigDict(frozen=True)

    service: str
    port: int
    protocol: Literal["http", "tcp"]
    health_path: str


class ComposeService(BaseModel):
    """One service of a Compose challenge: what its container is made of.

    ``None`` limits take the challenge's defaults (SPEC §12: section 8's ``memory``, ``cpus``
    and ``pids`` are the defaults of each service that sets none of its own).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    image: str
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    environment: dict[str, str] = {}
    ports: tuple[int, ...] = ()
    expose: tuple[int, ...] = ()
    healthcheck: HealthCheck | None = None
    depends_on: dict[str, Condition] = {}
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None
    read_only: bool | None = None
    tmpfs: dict[str, int] = {}
    cap_add: tuple[str, ...] = ()
    user: str | None = None
    working_dir: str | None = None
    protocol: Literal["http", "tcp"] | None = None
    health_path: str | None = None
    egress: Literal["none", "internet"] = "none"

    def for_team(self, flag: str, team: str) -> ComposeService:
        """Return this service with ``${CTF_FLAG}`` and ``${CTF_TEAM}`` filled in.

        Args:
            flag: the team's flag for this challenge.
            team: the team id.

        Returns:
            A copy whose command, entrypoint, environment, healthcheck, user and working
            directory hold the team's values (``$$`` becomes ``$``).
        """
        values = {"CTF_FLAG": flag, "CTF_TEAM": team}

        def fill(text: str) -> str:
            return string.Template(text).substitute(values)

        def fill_all(items: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if items is None else tuple(fill(item) for item in items)

        health = self.healthcheck
        return self.model_copy(
            update={
                "command": fill_all(self.command),
                "entrypoint": fill_all(self.entrypoint),
                "environment": {key: fill(value) for key, value in self.environment.items()},
                "healthcheck": None if health is None else health.model_copy(
                    update={"test": fill_all(health.test)}),
                "user": None if self.user is None else fill(self.user),
                "working_dir": None if self.working_dir is None else fill(self.working_dir),
            }
        )

    @property
    def uses_flag(self) -> bool:
        """Whether any value of the service asks for the team's flag."""
        return any("CTF_FLAG" in string.Template(text).get_identifiers()
                   for text in _strings(self.model_dump()))

    def keys_using(self, variable: str) -> list[str]:
        """The service's keys whose value uses ``${variable}`` (``environment.TEAM``, ``command``).

        Args:
            variable: ``CTF_FLAG`` or ``CTF_TEAM``.
        """
        found = []
        for key, value in self.model_dump().items():
            if isinstance(value, Mapping) and key == "environment":
                found += [f"environment.{name}" for name, text in value.items()
                          if variable in string.Template(text).get_identifiers()]
            elif any(variable in string.Template(text).get_identifiers()
                     for text in _strings(value)):
                found.append(key)
        return found


class ComposeApp(BaseModel):
    """A Compose challenge: its services in start order and its endpoints in file order."""

    model_config = ConfigDict(frozen=True)

    services: tuple[ComposeService, ...]
    endpoints: tuple[Endpoint, ...]

    def service(self, name: str) -> ComposeService:
        """Return the service called ``name``.

        Raises:
            KeyError: when the file has no such service.
        """
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)

    @property
    def one_shots(self) -> frozenset[str]:
        """Services another waits to complete: once they exit 0 they are done, not dead."""
        return frozenset(dep for s in self.services for dep, cond in s.depends_on.items()
                         if cond == "service_completed_successfully")

    def done(self, service: str, state: str, exit_code: int | None) -> bool:
        """Whether a service whose container is in ``state`` finished its work (a one-shot)."""
        return service in self.one_shots and state == "exited" and exit_code == 0

    @property
    def primary(self) -> Endpoint:
        """The first endpoint in file order: the instance's ``url`` and ``ports``."""
        return self.endpoints[0]


def load_compose(
    path: Path, challenge: str, *, protocol: Literal["http", "tcp"] = "http",
    health_path: str = "/",
) -> ComposeApp:
    """Read and check the Compose file of ``challenge``.

    Args:
        path: the file (already resolved against the catalog file's folder).
        challenge: the challenge id, for the messages.
        protocol: the challenge's protocol, the default of services without ``x-ctf-protocol``.
        health_path: the challenge's health path, likewise for ``x-ctf-health-path``.

    Returns:
        The services and endpoints.

    Raises:
        CatalogError: the file cannot be read, is no valid Compose file, or uses what SPEC §12
            does not allow (the message names the challenge, the service and the key).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(
            f"challenge {challenge!r}: its compose file {str(path)!r} cannot be read: {exc}"
        ) from exc
    return parse_compose(text, challenge, protocol=protocol, health_path=health_path)


def parse_compose(
    text: str, challenge: str, *, protocol: Literal["http", "tcp"] = "http",
    health_path: str = "/",
) -> ComposeApp:
    """Check a Compose document's text; see :func:`load_compose`.

    Raises:
        CatalogError: as :func:`load_compose`.
    """
    where = f"challenge {challenge!r}, compose file"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict) \
            or not raw["services"]:
        raise CatalogError(f"{where}: expected a 'services:' mapping with at least one service")
    # SPEC §12's subset first (its messages name the key and say why), then the whole
    # Compose Specification (YAML merge keys applied, as Compose does).
    for key in raw:
        if key not in {"services", "name", "version"} and not str(key).startswith("x-"):
            raise CatalogError(
                f"{where}: top-level key {key!r} is not allowed (SPEC §12): an instance is its "
                "services on one network of its own, with no volumes, secrets or configs"
            )
    for name, body in raw["services"].items():
        _check_keys(f"{where}, service {name!r}", body)
    try:
        PyOptions(apply_merge=True).from_yaml(text)
    except ValueError as exc:
        raise CatalogError(f"{where}: not a valid Compose file: {exc}") from exc
    services = {
        str(name): _service(str(name), body, f"{where}, service {name!r}")
        for name, body in raw["services"].items()
    }
    ordered = _start_order(services, where)
    endpoints = tuple(
        Endpoint(
            service=service.name, port=port, protocol=service.protocol or protocol,
            health_path=service.health_path or health_path,
        )
        for service in services.values()
        for port in service.ports
    )
    if not endpoints:
        raise CatalogError(
            f"{where}: no service has 'ports:', so players could reach nothing; list the "
            "container port players use under that service's 'ports:' (like - \"8080\")"
        )
    return ComposeApp(services=tuple(services[name] for name in ordered), endpoints=endpoints)


def _service(name: str, body: object, where: str) -> ComposeService:
    """Turn one service's mapping into a :class:`ComposeService`, refusing what §12 does."""
    if not _SERVICE_NAME_RE.fullmatch(name):
        raise CatalogError(
            f"{where}: the service name must be 1-40 lowercase letters, digits, '_' or '-' "
            "(it becomes a host name on the instance's network)"
        )
    _check_keys(where, body)
    assert isinstance(body, dict)
    for text in _strings(body):
        _check_variables(text, where)
    if "image" not in body or not isinstance(body["image"], str) or not body["image"]:
        raise CatalogError(f"{where}, key 'image': every service needs the image it runs")
    if "networks" in body and not _only_default_network(body["networks"]):
        raise CatalogError(f"{where}, key 'networks': not allowed: {_REFUSED_WHY['networks']}")
    limits = _limits(body, where)
    return ComposeService(
        name=name,
        image=body["image"],
        command=_argv(body.get("command"), f"{where}, key 'command'"),
        entrypoint=_argv(body.get("entrypoint"), f"{where}, key 'entrypoint'"),
        environment=_environment(body.get("environment"), f"{where}, key 'environment'"),
        ports=tuple(_port(item, f"{where}, key 'ports'") for item in body.get("ports") or ()),
        expose=tuple(_exposed(item, f"{where}, key 'expose'")
                     for item in body.get("expose") or ()),
        healthcheck=_healthcheck(body.get("healthcheck"), f"{where}, key 'healthcheck'"),
        depends_on=_depends_on(body.get("depends_on"), f"{where}, key 'depends_on'"),
        memory_bytes=limits.get("memory"),
        cpus=limits.get("cpus"),
        pids=limits.get("pids"),
        read_only=_boolean(body.get("read_only"), f"{where}, key 'read_only'"),
        tmpfs=_tmpfs(body.get("tmpfs"), f"{where}, key 'tmpfs'"),
        cap_add=_caps(body.get("cap_add"), f"{where}, key 'cap_add'"),
        user=None if body.get("user") is None else str(body["user"]),
        working_dir=_working_dir(body.get("working_dir"), f"{where}, key 'working_dir'"),
        protocol=_choice(body.get("x-ctf-protocol"), ("http", "tcp"),
                         f"{where}, key 'x-ctf-protocol'"),
        health_path=_health_path(body.get("x-ctf-health-path"),
                                 f"{where}, key 'x-ctf-health-path'"),
        egress=_choice(body.get("x-ctf-egress"), ("none", "internet"),
                       f"{where}, key 'x-ctf-egress'") or "none",
    )


def _check_keys(where: str, body: object) -> None:
    """Refuse a service that is no mapping, or has a key outside SPEC §12's subset."""
    if not isinstance(body, dict):
        raise CatalogError(f"{where}: expected a mapping of keys")
    for key in body:
        if key not in SERVICE_KEYS:
            why = _REFUSED_WHY.get(key, "SPEC §12 allows only " + ", ".join(sorted(SERVICE_KEYS)))
            raise CatalogError(f"{where}, key {key!r}: not allowed: {why}")


def _strings(value: object) -> Iterator[str]:
    """Every string value inside ``value`` (mappings' values, lists' items), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _check_variables(text: str, where: str) -> None:
    """Refuse any ``$`` form but ``${CTF_FLAG}``, ``${CTF_TEAM}`` (or unbraced) and ``$$``."""
    template = string.Template(text)
    unknown = sorted(set(template.get_identifiers()) - VARIABLES)
    if unknown or not template.is_valid():
        shown = f"${{{unknown[0]}}}" if unknown else repr(text[:60])
        raise CatalogError(
            f"{where}: {shown} cannot be filled in: only ${{CTF_FLAG}} (the team's flag) and "
            "${CTF_TEAM} (its id) are, and '$$' is a '$'; nothing is read from the environment"
        )


def _only_default_network(value: object) -> bool:
    if isinstance(value, list):
        return value in ([], ["default"])
    return isinstance(value, dict) and set(value) <= {"default"} and not value.get("default")


def _argv(value: object, where: str) -> tuple[str, ...] | None:
    """A command or entrypoint: a list as it is, a string split as a shell would (Compose)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise CatalogError(f"{where}: {exc}; write it as a list of arguments") from exc
    if isinstance(value, list) and all(isinstance(item, str | int | float) for item in value):
        return tuple(str(item) for item in value)
    raise CatalogError(f"{where}: expected a string or a list of strings")


def _environment(value: object, where: str) -> dict[str, str]:
    """The variables, from a mapping or a ``KEY=value`` list; a bare ``KEY`` is refused."""
    if value is None:
        return {}
    pairs: list[tuple[str, object]] = []
    if isinstance(value, dict):
        pairs = [(str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        for item in value:
            key, sep, text = str(item).partition("=")
            pairs.append((key, text if sep else None))
    out: dict[str, str] = {}
    for key, item in pairs:
        if item is None:
            raise CatalogError(
                f"{where}: {key!r} has no value (Compose would read it from the environment, "
                "which the instancer never does); write its value, or use ${CTF_FLAG}/${CTF_TEAM}"
            )
        out[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return out


def _port(item: object, where: str) -> int:
    """A ``ports`` entry: the container port alone (TCP); a host part is refused."""
    refuse = (
        f"{where}: {item!r} names a host address or host port; the instancer publishes each "
        "endpoint itself (SPEC §4), so give the container port alone, like - \"8080\""
    )
    if isinstance(item, dict):
        if set(item) - {"target", "protocol", "name", "app_protocol"}:
            raise CatalogError(refuse)
        return _container_port(item.get("target"), item.get("protocol", "tcp"), where)
    text = str(item)
    if ":" in text:
        raise CatalogError(refuse)
    port, _, proto = text.partition("/")
    return _container_port(port, proto or "tcp", where)


def _exposed(item: object, where: str) -> int:
    port, _, proto = str(item).partition("/")
    return _container_port(port, proto or "tcp", where)


def _container_port(port: object, proto: object, where: str) -> int:
    if str(proto).lower() != "tcp":
        raise CatalogError(f"{where}: {port}/{proto}: only TCP ports can be endpoints")
    if not str(port).isdigit() or not 1 <= int(str(port)) <= 65535:
        raise CatalogError(
            f"{where}: {port!r} is not one container port (1-65535); ranges are not allowed, "
            "list each port"
        )
    return int(str(port))


def _healthcheck(value: object, where: str) -> HealthCheck | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CatalogError(f"{where}: expected a mapping")
    if value.get("disable"):
        return None
    test = value.get("test")
    if isinstance(test, str):
        argv: tuple[str, ...] = ("CMD-SHELL", test)
    elif isinstance(test, list) and test and test[0] in {"CMD", "CMD-SHELL", "NONE"}:
        argv = tuple(str(item) for item in test)
    else:
        raise CatalogError(f"{where}, 'test': expected a string or a list starting CMD, "
                           "CMD-SHELL or NONE")
    if argv[0] == "NONE":
        return None

    def seconds(key: str) -> float | None:
        raw = value.get(key)
        if raw is None:
            return None
        try:
            return float(parse_duration(str(raw)))
        except ValueError as exc:
            raise CatalogError(f"{where}, {key!r}: {raw!r} is not a duration like 2s") from exc

    retries = value.get("retries")
    return HealthCheck(
        test=argv, interval=seconds("interval"), timeout=seconds("timeout"),
        retries=None if retries is None else int(retries), start_period=seconds("start_period"),
    )


def _depends_on(value: object, where: str) -> dict[str, Condition]:
    if value is None:
        return {}
    if isinstance(value, list):
        return {str(name): "service_started" for name in value}
    if not isinstance(value, dict):
        raise CatalogError(f"{where}: expected a list of services or a mapping")
    out: dict[str, Condition] = {}
    for name, given in value.items():
        spec = given or {}
        extra = set(spec) - {"condition", "required"}
        if extra or spec.get("required", True) is not True:
            raise CatalogError(
                f"{where}, {name!r}: only 'condition' may be given (and 'required: true')"
            )
        condition = spec.get("condition", "service_started")
        if condition not in _CONDITIONS:
            raise CatalogError(f"{where}, {name!r}: condition must be one of {list(_CONDITIONS)}")
        out[str(name)] = condition
    return out


def _start_order(services: dict[str, ComposeService], where: str) -> list[str]:
    """The services in ``depends_on`` order; ties keep file order."""
    for service in services.values():
        for dependency in service.depends_on:
            if dependency not in services:
                raise CatalogError(
                    f"{where}, service {service.name!r}, key 'depends_on': there is no service "
                    f"{dependency!r}; known: {', '.join(services)}"
                )
    order = {name: index for index, name in enumerate(services)}
    sorter = TopologicalSorter({name: set(s.depends_on) for name, s in services.items()})
    try:
        sorter.prepare()
    except CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise CatalogError(f"{where}, key 'depends_on': the services wait on each other in a "
                           f"circle ({cycle}); remove one of those dependencies") from exc
    ordered: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=order.__getitem__)
        ordered.extend(ready)
        sorter.done(*ready)
    return ordered


def _size(value: object, where: str) -> int:
    size = size_bytes(value)
    if size is None:
        raise CatalogError(f"{where}: {value!r} is not a size like 256m or 1g")
    return size


def _limits(body: dict[str, Any], where: str) -> dict[str, Any]:
    """``mem_limit``/``cpus``/``pids_limit``, or ``deploy.resources.limits`` (not both)."""
    out: dict[str, Any] = {}
    deploy = body.get("deploy")
    if deploy is not None:
        resources = deploy.get("resources") if isinstance(deploy, dict) else None
        if not isinstance(deploy, dict) or set(deploy) != {"resources"} \
                or not isinstance(resources, dict) or set(resources) != {"limits"}:
            raise CatalogError(f"{where}, key 'deploy': only deploy.resources.limits (cpus, "
                               "memory, pids) is allowed")
        limits = resources["limits"] or {}
        extra = set(limits) - {"cpus", "memory", "pids"}
        if extra:
            raise CatalogError(f"{where}, key 'deploy.resources.limits.{sorted(extra)[0]}': "
                               "not allowed; use cpus, memory or pids")
        out = {"memory": limits.get("memory"), "cpus": limits.get("cpus"),
               "pids": limits.get("pids")}
    for key, ours in (("mem_limit", "memory"), ("cpus", "cpus"), ("pids_limit", "pids")):
        if body.get(key) is not None:
            if out.get(ours) is not None:
                raise CatalogError(f"{where}, key {key!r}: also set in deploy.resources.limits;"
                                   " keep one")
            out[ours] = body[key]
    checked: dict[str, Any] = {}
    if out.get("memory") is not None:
        checked["memory"] = _size(out["memory"], f"{where}, memory limit")
        if checked["memory"] < 6 * 1024**2:
            raise CatalogError(f"{where}, memory limit: at least 6m")
    if out.get("cpus") is not None:
        checked["cpus"] = float(out["cpus"])
        if not 0 < checked["cpus"] <= 64:
            raise CatalogError(f"{where}, cpus: must be above 0 and at most 64")
    if out.get("pids") is not None:
        checked["pids"] = int(out["pids"])
        if not 16 <= checked["pids"] <= 65536:
            raise CatalogError(f"{where}, pids limit: must be 16-65536")
    return checked


def _boolean(value: object, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise CatalogError(f"{where}: expected true or false")


def _tmpfs(value: object, where: str) -> dict[str, int]:
    """Mounts as ``/path`` (64m) or ``/path:size=32m``; other options are refused."""
    if value is None:
        return {}
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise CatalogError(f"{where}: expected a path or a list of paths")
    out: dict[str, int] = {}
    for item in items:
        path, _, options = str(item).partition(":")
        size = 64 * 1024**2
        for option in filter(None, options.split(",")):
            key, _, text = option.partition("=")
            if key != "size":
                raise CatalogError(f"{where}: option {option!r} of {path}: only size= is allowed")
            size = _size(text, f"{where}, size of {path}")
        if not path.startswith("/") or path == "/" or ".." in path.split("/"):
            raise CatalogError(f"{where}: {path!r} must be an absolute path below /")
        out[path] = size
    return out


def _caps(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CatalogError(f"{where}: expected a list of capabilities")
    caps = tuple(str(cap).upper().removeprefix("CAP_") for cap in value)
    bad = sorted(set(caps) - ALLOWED_CAPS)
    if bad:
        raise CatalogError(f"{where}: {bad} may not be added; allowed: {sorted(ALLOWED_CAPS)}")
    return caps


def _working_dir(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not str(value).startswith("/"):
        raise CatalogError(f"{where}: must be an absolute path")
    return str(value)


def _choice(value: object, allowed: tuple[str, ...], where: str) -> Any:
    if value is None or value in allowed:
        return value
    raise CatalogError(f"{where}: {value!r} must be one of {', '.join(allowed)}")


def _health_path(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not str(value).startswith("/"):
        raise CatalogError(f"{where}: must start with '/'")
    return str(value)
