"""Several Docker hosts (SPEC §10): the hosts file, worker heartbeats and placement.

Each Docker host has its own Celery worker, which consumes the host's queue
(:func:`celery_app.hosts.routing.host_queue`). Celery and Redis do the distribution: the
:class:`~celery_app.api.client.Dispatcher` picks a host for a new instance here and sends the
start to that host's queue; every later task of the instance goes to the queue of the host
recorded in it.

Liveness: every worker runs a :class:`Heartbeat` thread that keeps the host's heartbeat key
alive in the state Redis (TTL ``CTF_HEARTBEAT_TTL``, refreshed every third of it). A host
whose key has expired has no worker: new instances go elsewhere and its instances are shown
as unreachable (:func:`present`) until the worker is back. When *no* host has a heartbeat
(every worker down, or Redis was just flushed) liveness is unknown: placement falls back to
room alone (the start waits in the queue) and instances are shown as recorded; ``/healthz``
then reports no worker.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from celery_app.core.config_files import describe, read_yaml
from celery_app.errors import BackendUnavailable, CapacityExhausted, HostsFileError
from celery_app.hosts.routing import host_queue
from celery_app.settings import Settings
from celery_app.state.pool_keys import PoolKeys
from celery_app.state.store import StateStore
from celery_app.vocab.models import Instance
from celery_app.vocab.naming import TEAM_ID_RE

log = logging.getLogger(__name__)


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


# -- liveness ---------------------------------------------------------------------------------


def heartbeats(store: StateStore, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    """Return each host's last heartbeat (``{"worker", "at", "engine"}``), ``None`` if none."""
    names = list(names)
    if not names:
        return {}
    return parse_beats(dict(zip(names, store.heartbeats(names), strict=True)))


def parse_beats(raw: Mapping[str, str | None]) -> dict[str, dict[str, Any] | None]:
    """Decode raw heartbeats (``{host: JSON or None}``) as :func:`heartbeats` returns them."""
    beats: dict[str, dict[str, Any] | None] = {}
    for name, value in raw.items():
        try:
            beats[name] = json.loads(value) if value else None
        except ValueError:
            beats[name] = {"worker": "?", "at": None}
    return beats


def liveness(beats: Mapping[str, dict[str, Any] | None]) -> dict[str, bool]:
    """Return ``{host: alive}`` from :func:`heartbeats`; all alive when none has a heartbeat.

    No heartbeat at all means Redis was just flushed or every worker is down: we cannot tell
    which, so nothing is judged dead (``/healthz`` reports the missing workers). A worker
    whose Docker engine does not answer keeps beating with ``"engine": false``: its host is
    down, and that is known for certain.
    """
    if not any(beats.values()):
        return dict.fromkeys(beats, True)
    return {name: beat is not None and beat.get("engine", True) is not False
            for name, beat in beats.items()}


class Heartbeat:
    """Keeps the host's heartbeat alive while this worker runs (a daemon thread).

    A thread rather than a periodic task: a queue full of slow starts must not make a busy
    host look dead.
    """

    def __init__(
        self, store: StateStore, host: str, ttl: float, worker: str = "",
        engine_up: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.ttl = ttl
        # A worker whose Docker engine does not answer cannot serve its host: while it
        # cannot, its beat says so, so starts go elsewhere and its instances are not
        # reported running.
        self.engine_up = engine_up
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        """Beat again now, not at the next third of the TTL (the engine came or went)."""
        self._wake.set()

    def beat(self, engine: bool = True) -> None:
        """Publish one heartbeat, saying whether this host's Docker engine answers."""
        value = json.dumps({"worker": self.worker, "at": time.time(), "engine": engine})
        self.store.beat(self.host, value, self.ttl)

    def _run(self) -> None:
        interval = self.ttl / 3
        while not self._stop.is_set():
            try:
                engine = self.engine_up is None or self.engine_up()
                if not engine:
                    log.warning("host %s: the Docker engine does not answer", self.host)
                self.beat(engine)
            except Exception as exc:  # noqa: BLE001  # keep beating once Redis is back
                log.warning("heartbeat of host %s failed: %s", self.host, exc)
            self._wake.wait(interval)
            self._wake.clear()

    def start(self) -> None:
        """Beat now, then every third of the TTL in the background."""
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.host}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and withdraw the heartbeat (when it is still ours)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self._withdraw()

    def _withdraw(self) -> None:
        """Remove the heartbeat at once (when it is still ours)."""
        with contextlib.suppress(Exception):
            raw = self.store.heartbeat(self.host)
            if raw and json.loads(raw).get("worker") == self.worker:
                self.store.drop_heartbeat(self.host)


# -- capacity and placement -------------------------------------------------------------------


@dataclass(frozen=True)
class HostLoad:
    """One host's capacity as the API and the CLI show it."""

    name: str
    public_host: str
    used: int
    max: int
    alive: bool
    last_seen: float | None

    @property
    def room(self) -> int:
        """How many more instances fit on it."""
        return max(0, self.max - self.used)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able view."""
        return {"name": self.name, "public_host": self.public_host, "used": self.used,
                "max": self.max, "room": self.room, "alive": self.alive,
                "last_seen": self.last_seen, "queue": host_queue(self.name)}


def host_loads(hosts: Hosts, store: StateStore) -> list[HostLoad]:
    """Return every host's used/max instances and liveness (file order)."""
    beats = heartbeats(store, hosts)
    alive = liveness(beats)
    loads = []
    for name, cfg in hosts.items():
        beat = beats.get(name)
        assert cfg.max_instances is not None
        loads.append(HostLoad(
            name=name, public_host=cfg.public_host, used=store.count(host=name),
            max=cfg.max_instances, alive=alive[name],
            last_seen=beat.get("at") if beat else None,
        ))
    return loads


# A placement counts against its host until its start reserves the instance there (the
# reservation removes it; then it is counted as used) or, if that never happens, this long.
PLACING_WINDOW = 30.0



def pick_host(hosts: Hosts, store: StateStore, instance: str | None = None) -> str:
    """Return the live host with the most room for a new instance (ties: at random).

    A host with a ready warm-pool container of the instance's challenge (issue 14) is
    preferred to one with more room and none.

    The choice is recorded as a placement on its way, so a burst of starts spreads out
    instead of all seeing the same counts.

    Args:
        hosts: the configured hosts.
        store: the Redis state store.
        instance: ``<challenge>/<team>`` of the new instance (one placement per instance).

    Raises:
        BackendUnavailable: no host is usable at all (workers gone or engines down).
        CapacityExhausted: the live hosts are full.

    """
    loads = host_loads(hosts, store)
    if not any(h.alive for h in loads):
        raise BackendUnavailable(
            "no Docker host is usable right now: "
            + ", ".join(f"{h.name} (no worker heartbeat or its engine does not answer)"
                        for h in loads)
            + "; try again shortly, or start the workers (./run-celery-worker.sh --host NAME)"
        )
    candidates = [h for h in loads if h.alive and h.room > 0]
    if not candidates:
        seen = ", ".join(f"{h.name} {h.used}/{h.max}{'' if h.alive else ' (no worker)'}"
                         for h in loads)
        raise CapacityExhausted(
            f"no Docker host with a live worker has room ({seen}); try again when instances "
            "have expired, start the missing workers, or raise max_instances in CTF_HOSTS_FILE"
        )
    # Choose and record the choice in one Redis step: a burst of starts sees each other's
    # placements (not yet counted as instances) and spreads over the hosts.
    random.shuffle(candidates)  # ties go to a random host
    # each host's ready pool containers of the challenge (a host with one is preferred)
    challenge = (instance or "").partition("/")[0]
    chosen = store.place([(h.name, h.max) for h in candidates], instance or uuid.uuid4().hex,
                         time.time(), PLACING_WINDOW,
                         [PoolKeys.ready_key(h.name, challenge) for h in candidates])
    if not chosen:
        raise CapacityExhausted(
            "every Docker host with a live worker is full once the starts already on their way "
            "are counted; try again in a few seconds"
        )
    return chosen


def host_of(hosts: Hosts, store: StateStore, record: Instance | None, instance: str) -> str:
    """Return the Docker host that must act on an instance (SPEC §10).

    An instance that has a record lives on its recorded host; a new one is placed on the live
    host with the most room (:func:`pick_host`). The dispatcher and every worker decide the
    same way, so a task sent by name to the default queue ends on the same host as one sent
    through the API.

    Args:
        hosts: the configured hosts.
        store: the Redis state store.
        record: the instance's record, or ``None`` when it has none.
        instance: ``<challenge>/<team>``.

    Raises:
        BackendUnavailable: a new instance, and no host is usable at all.
        CapacityExhausted: a new instance, and the live hosts are full.

    """
    if record is not None:
        return record.host
    return pick_host(hosts, store, instance)


# -- how instances are shown ------------------------------------------------------------------


def present(
    instances: Iterable[Instance], store: StateStore, hosts: Iterable[str]
) -> list[dict[str, Any]]:
    """Return the instances as listings show them; ``host_up: false`` on a host that is down.

    ``hosts`` are the configured host names: liveness is judged over all of them (and the
    hosts the instances name), so "no heartbeat anywhere" is told apart from "this one is down".

    An instance whose host has no live worker is not shown as running: its ``status`` is
    ``failed`` (when it was starting or running) with an ``error`` that says why, and
    ``host_up`` is false (the field is there only then, like ``error``, so the instance of a
    live host is exactly SPEC §4's). Nothing is written: when the worker is back, so is the
    instance, as it was.
    """
    found = list(instances)
    return present_with(found, heartbeats(store, sorted({*hosts, *(i.host for i in found)})))


def present_with(
    found: Iterable[Instance], beats: Mapping[str, dict[str, Any] | None]
) -> list[dict[str, Any]]:
    """:func:`present`, with the heartbeats already read (:func:`parse_beats`).

    ``beats`` must hold every configured host and every host the instances name.
    """
    alive = liveness(beats)
    shown = []
    for inst in found:
        data = inst.public()
        if alive.get(inst.host, True):
            shown.append(data)
            continue
        data["host_up"] = False
        if inst.status in ("running", "starting"):
            data["status"] = "failed"
            data["error"] = (
                f"host {inst.host} is unreachable: its worker sends no heartbeat or its Docker "
                "engine does not answer. The container may still run there; the instance is "
                "shown again when the host is back"
            )
        shown.append(data)
    return shown
