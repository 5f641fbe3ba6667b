"""The hosts file (``CTF_HOSTS_FILE``, SPEC §10): the Docker hosts, validated, by name.

Each Docker host has its own Celery worker, which consumes the host's queue
(:func:`celery_app.hosts.routing.host_queue`). Without a hosts file there is one host,
``CTF_HOST`` (``local`` by default), from the settings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from celery_app.core.config_files import describe, read_yaml
from celery_app.errors import HostsFileError
from celery_app.hosts.routing import host_queue
from celery_app.settings import Settings
from celery_app.vocab.naming import TEAM_ID_RE


class HostConfig(BaseModel):
    """One Docker host of the hosts file; ``None`` fields take the settings' values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    # None: the worker's environment (DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH).
    docker_url: str | None = None
    public_host: str = Field(min_length=1)
    publish_ip: str | None = None
    max_instances: int | None = Field(None, gt=0)

    @field_validator("docker_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("unix://", "tcp://", "ssh://",
                                                       "npipe://", "http://", "https://")):
            raise ValueError("must be a Docker URL like unix:///var/run/docker.sock, "
                             "tcp://10.0.0.6:2376 or ssh://user@host")
        return value

    @field_validator("publish_ip")
    @classmethod
    def _check_ip(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError("must be an IP address of that host, like 10.0.0.6") from None

    @property
    def queue(self) -> str:
        """The Celery queue its worker consumes."""
        return host_queue(self.name)


class Hosts(Mapping[str, HostConfig]):
    """The Docker hosts, in the order of the file, by name."""

    def __init__(self, hosts: dict[str, HostConfig], source: str) -> None:
        self._hosts = hosts
        self.source = source

    def __getitem__(self, name: str) -> HostConfig:
        return self._hosts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._hosts)

    def __len__(self) -> int:
        return len(self._hosts)

    def get_host(self, name: str) -> HostConfig:
        """Return host ``name``.

        Raises:
            HostsFileError: there is no such host (names the known ones).

        """
        if name not in self._hosts:
            raise HostsFileError(
                f"{self.source}: there is no host {name!r} (known: {', '.join(self._hosts)}); "
                "set CTF_HOST / --host to one of them or add it to CTF_HOSTS_FILE"
            )
        return self._hosts[name]


def build_hosts(raw: object, settings: Settings, source: str = "hosts file") -> Hosts:
    """Validate a raw ``{"hosts": {...}}`` mapping and fill in the defaults.

    Raises:
        HostsFileError: naming the host and field that is wrong.

    """
    if not isinstance(raw, dict) or not isinstance(raw.get("hosts"), dict):
        raise HostsFileError(f"{source}: expected a mapping with a 'hosts:' mapping inside")
    if set(raw) - {"hosts"}:
        raise HostsFileError(f"{source}: unknown top-level key(s) {sorted(set(raw) - {'hosts'})}; "
                             "only 'hosts:' is allowed")
    entries: dict[Any, Any] = raw["hosts"]
    if not entries:
        raise HostsFileError(f"{source}: 'hosts:' is empty; add at least one host")
    hosts: dict[str, HostConfig] = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not TEAM_ID_RE.fullmatch(name):
            raise HostsFileError(
                f"{source}: host name {name!r} is invalid: use letters, digits, '_' or '-'"
            )
        if not isinstance(entry, dict):
            raise HostsFileError(f"{source}: host {name!r} must be a mapping of fields")
        try:
            host = HostConfig.model_validate({**entry, "name": name})
        except ValidationError as exc:
            raise HostsFileError(describe(source, "host", name, exc)) from None
        hosts[name] = host.model_copy(update={
            "publish_ip": host.publish_ip or settings.publish_ip,
            "max_instances": host.max_instances or settings.max_instances,
        })
    return Hosts(hosts, source)


def load_hosts(settings: Settings) -> Hosts:
    """Load ``CTF_HOSTS_FILE``; without it, one host (``CTF_HOST``, ``local`` by default).

    Raises:
        HostsFileError: the file cannot be read or has a mistake.

    """
    path = settings.hosts_file
    if path is None:
        only = HostConfig(
            name=settings.host, docker_url=settings.docker_host,
            public_host=settings.public_host, publish_ip=settings.publish_ip,
            max_instances=settings.max_instances,
        )
        return Hosts({settings.host: only}, "the default host")
    raw = read_yaml(path, "CTF_HOSTS_FILE", HostsFileError)
    return build_hosts(raw, settings, str(path))
