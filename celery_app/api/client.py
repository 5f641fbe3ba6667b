"""How the API and the CLI talk to the workers: Celery ``send_task`` and Redis reads.

Neither the API nor the CLI needs Docker: they may run on another machine than the workers.
They validate input, read instance state from Redis (:class:`~celery_app.state.store.StateStore`),
send tasks by name, and read task state and results from the result backend. A task that
failed comes back as the :mod:`celery_app.errors` class it raised, rebuilt by class name.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, TypeVar, cast

import redis
import redis.asyncio
import redis.asyncio.retry
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from starlette.concurrency import run_in_threadpool

from celery_app import errors
from celery_app.core.audit import ADMIN, Auditor
from celery_app.core.catalog import Catalog, load_catalog, shared_key
from celery_app.errors import CTFError, InstanceNotFound, MaxLifetimeReached, TaskFailed
from celery_app.hosts.hostsfile import Hosts, load_hosts
from celery_app.hosts.liveness import parse_beats
from celery_app.hosts.placement import HostLoad, host_loads, host_of
from celery_app.hosts.present import present, present_with
from celery_app.hosts.routing import host_queue
from celery_app.ingress import Ingress
from celery_app.settings import Settings
from celery_app.state.reads import AsyncIndex
from celery_app.state.store import StateStore, map_redis_errors
from celery_app.vocab.models import Instance, InstanceKey, iso
from celery_app.vocab.naming import check_team_id
from celery_app.vocab.team_tokens import team_token

TASK_PREFIX = "celery_app.tasks."
# Who sent a task: kept as long as Celery keeps results (celery_config.result_expires).
TASK_OWNER_TTL = 86400
# A pending marker (StateStore.pending) outlives its task's wait in the queue; a
# finished task's marker is ignored at once, so this only bounds a task whose message was lost.
PENDING_TTL = 600
# The answer to a start of an instance that already runs (no task is sent): one result per
# instance and container, refreshed by each such request, gone this long after the last.
NOOP_TTL = 300
ADMIN_OWNER = "*admin*"
# Celery states in which a task has finished.
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


@dataclass
class TaskView:
    """What is known about one task: its Celery state, progress, result or error."""

    task_id: str
    state: str
    result: Any = None
    error: CTFError | None = None
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Whether the task has finished (succeeded or failed)."""
        return self.state in READY_STATES

    def public(self) -> dict[str, Any]:
        """Return ``{"task_id", "state", "result" or "error", "progress"?}`` for the API."""
        data: dict[str, Any] = {"task_id": self.task_id, "state": self.state}
        if self.progress:
            data["progress"] = self.progress
        if self.error is not None:
            data["error"] = self.error.to_dict()
        elif self.state == "SUCCESS":
            data["result"] = self.result
        return data


def rebuild_error(exc: object) -> CTFError:
    """Turn what a failed task left in the result backend into one of our errors.

    Celery's JSON backend carries an exception as its class name and arguments; the client
    usually rebuilds the class itself, but when it cannot (another version, a module it may
    not import) it hands back a stand-in class of the same name, or the raw dict.

    Args:
        exc: the task's ``result`` in state ``FAILURE``.

    Returns:
        The matching :class:`CTFError`, or :class:`TaskFailed` for anything else.

    """
    if isinstance(exc, CTFError):
        return exc
    if isinstance(exc, dict):
        name = str(exc.get("exc_type", "Exception"))
        raw = exc.get("exc_message")
        args = list(raw) if isinstance(raw, list | tuple) else [raw]
    else:
        name = type(exc).__name__
        args = list(getattr(exc, "args", ()) or [str(exc)])
    message = str(args[0]) if args else name
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, CTFError):
        return cls(message)
    return TaskFailed(f"the task failed unexpectedly ({name}: {message[:300]}); see the worker log")


def make_celery(settings: Settings) -> Celery:
    """Build a Celery client (not a worker) for ``settings``' broker and result backend.

    Failures to reach the broker or the backend surface within a few seconds instead of the
    default minute of retries, so the API can answer 503 while the client is still there.
    """
    app = Celery(
        "ctf_instancer_client", broker=settings.broker_url, backend=settings.result_backend,
        set_as_current=False,
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_extended=True,
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=3,
        broker_connection_max_retries=1,
        task_publish_retry_policy={
            "max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
        },
        redis_socket_connect_timeout=2,
        redis_socket_timeout=5,
        result_backend_transport_options={
            "retry_policy": {
                "max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                "interval_max": 0.5, "timeout": 2.0,
            },
        },
    )
    return app


def make_store(settings: Settings) -> StateStore:
    """Connect to the state Redis with short timeouts and few retries (for request paths)."""
    client = redis.Redis.from_url(
        settings.state_redis_url, decode_responses=True, socket_timeout=5,
        socket_connect_timeout=2, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
    )
    return StateStore(client)


T = TypeVar("T")


def _not_found(challenge: str, team_id: str) -> InstanceNotFound:
    return InstanceNotFound(
        f"team {team_id} has no instance of {challenge}; start one with PUT first")


class Dispatcher:
    """Validates requests, sends tasks to the workers and reads their outcome.

    Args:
        settings: the service settings.
        catalog: the challenges (loaded from the settings when ``None``).
        store: the Redis state store (connected from the settings when ``None``).
        celery: a Celery client (built from the settings when ``None``).
        hosts: the Docker hosts (loaded from ``CTF_HOSTS_FILE`` when ``None``).

    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        store: StateStore | None = None,
        celery: Celery | None = None,
        hosts: Hosts | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog or load_catalog(settings)
        self.hosts = hosts or load_hosts(settings)
        self.store = store or make_store(settings)
        self.celery = celery or make_celery(settings)
        # The audit trail (SPEC §13): requests refused here, flag checks, admin actions.
        self.auditor = Auditor(settings, self.store)
        # The hot reads on the event loop; opened by the API's lifespan.
        self.index = AsyncIndex(settings.state_redis_url)

    def close(self) -> None:
        """Release the broker, backend and Redis connections."""
        self.celery.close()
        self.store.close()

    # -- validation and reads ---------------------------------------------------------------

    def key(self, challenge: str, team_id: str, actor: str | None = None) -> InstanceKey:
        """Validate a request into the key :meth:`start`, :meth:`stop` and :meth:`extend` take.

        The API's and ctfctl's edge: nothing is sent or read before this passes, and nothing
        after it checks the team or the challenge again. ``actor`` ``admin``: the organisers
        may name a global challenge's instance by its team id ``global`` (SPEC §13).

        Raises:
            InvalidTeamId: the team id does not match the SPEC's rule (checked first).
            UnknownChallenge: the catalog has no such challenge.

        """
        return self.catalog.key(challenge, team_id, admin=actor == ADMIN)

    def instance(self, key: InstanceKey) -> Instance:
        """Return the recorded instance.

        Raises:
            InstanceNotFound: there is none.

        """
        inst = self.store.get(key.challenge, key.team)
        if inst is None:
            raise _not_found(key.challenge, key.team)
        return inst

    # -- tasks ------------------------------------------------------------------------------

    def send(
        self, task: str, args: list[Any], owner: str | None, queue: str,
        kwargs: dict[str, Any] | None = None, task_id: str | None = None,
    ) -> str:
        """Send ``celery_app.tasks.<task>`` and remember who sent it.

        Args:
            task: the task's short name, e.g. ``start_container``.
            args: its positional arguments.
            owner: the team the task concerns (it and the admin may read the task), or
                ``None`` for a task only the admin may read.
            queue: the queue to send it to.
            kwargs: its keyword arguments.
            task_id: the id to send it under (a new one when ``None``).

        Returns:
            The task id.

        """
        task_id = task_id or str(uuid.uuid4())
        # Recorded first, so a client polling the id right after cannot see a 404.
        self.store.set_task_owner(task_id, json.dumps({"owner": owner or ADMIN_OWNER,
                                                       "task": task}), TASK_OWNER_TTL)
        self.celery.send_task(TASK_PREFIX + task, args=args, kwargs=kwargs, task_id=task_id,
                              queue=queue)
        return task_id

    def queue_for(self, record: Instance | None, instance: str | None = None,
                  containers: int = 1) -> str:
        """Return the queue of the worker that owns ``record``'s Docker host.

        An existing instance's tasks go to its host's worker (SPEC §10); a new one goes to
        the live host with room for its ``containers`` and the most room
        (:func:`celery_app.hosts.placement.pick_host`).

        Raises:
            CapacityExhausted: a new instance, and no live host has room.

        """
        return host_queue(host_of(self.hosts, self.store, record, instance or uuid.uuid4().hex,
                                  containers))

    def host_loads(self) -> list[HostLoad]:
        """Return every Docker host's used/max instances and whether its worker is alive."""
        return host_loads(self.hosts, self.store)

    async def shown_instance(self, challenge: str, team_id: str) -> dict[str, Any]:
        """Return the instance as :meth:`present` shows it, read on the event loop.

        One Redis round trip when :attr:`index` is open; through the store (in the thread
        pool) when it is not, e.g. in an app run without its lifespan.

        Raises:
            InvalidTeamId, UnknownChallenge: see :meth:`key`.
            InstanceNotFound: there is none.
            RedisUnavailable: Redis cannot be reached.

        """
        key = self.key(challenge, team_id)
        # A global challenge's instance is every team's (SPEC §13).
        shown = await self._shown_view(self.catalog.get(challenge).holder(key.team), challenge,
                                       viewer=team_id)
        if not shown:
            raise _not_found(challenge, team_id)
        return shown[0]

    async def shown_team(self, team_id: str) -> list[dict[str, Any]]:
        """Return the team's instances as :meth:`present` shows them, read on the event loop.

        Raises:
            InvalidTeamId: the team id does not match the SPEC's rule.
            RedisUnavailable: Redis cannot be reached.

        """
        check_team_id(team_id)
        return await self._shown_view(team_id, None, viewer=team_id)

    async def _shown_view(self, team_id: str, challenge: str | None, *,
                          viewer: str | None = None) -> list[dict[str, Any]]:
        """Return ``team_id``'s instances (of ``challenge``), with the links ``viewer`` opens.

        ``viewer``: the team whose request this answers. A ``share: global`` instance's
        ``access_url`` names that team, not ``global`` (SPEC §13): every admitted team opens it.
        """
        hosts = list(self.hosts)
        if self.index.is_open:
            found, beats = await self.index.view(team_id, challenge, hosts)
        else:
            found, beats = await run_in_threadpool(self.store.view, team_id, challenge, hosts)
        return self._with_access(present_with(found, parse_beats(beats)), viewer)

    def present(self, instances: list[Instance]) -> list[dict[str, Any]]:
        """Return instances as listings show them, with ``host_up``.

        None is shown as running on a host whose worker is gone (see
        :func:`celery_app.hosts.present.present`).
        """
        return self._with_access(present(instances, self.store, self.hosts))

    def _with_access(self, shown: list[dict[str, Any]],
                     viewer: str | None = None) -> list[dict[str, Any]]:
        """Add ``access_url``, a fresh short-lived link (SPEC §11), with ``Ingress.with_access``.

        With the tasks' results (the workers add it there), the one place it is added: what
        the dispatcher returns carries it already, and callers add nothing. ``viewer``: the
        team asking (its links name it; a global instance's would name ``global`` otherwise).
        """
        ingress = Ingress(self.settings)
        return [ingress.with_access(d, viewer) for d in shown]

    # -- coalescing: one pending task per instance and kind ---------------------------------

    def finished(self, task_id: str) -> bool:
        """Whether the result backend says ``task_id`` has finished (unknown ids have not)."""
        meta = self.celery.backend.get_task_meta(task_id)
        return str(meta.get("status", "PENDING")) in READY_STATES

    def _pending(self, kind: str, challenge: str, team_id: str
                 ) -> tuple[str, dict[str, str] | None]:
        """Return the marker's raw value and, while its task has not finished, the marker.

        ``kind`` ``"run"`` holds the latest start or stop (they supersede each other),
        ``"extend"`` the latest extend.
        """
        raw = self.store.pending(kind, challenge, team_id)
        if not raw:
            return "", None
        marker = json.loads(raw)
        if self.finished(str(marker.get("task_id", ""))):
            return raw, None
        return raw, {"op": str(marker.get("op")), "task_id": str(marker.get("task_id"))}

    def _swap_marker(self, kind: str, challenge: str, team_id: str, expected: str,
                     new: str) -> bool:
        return self.store.swap_pending(kind, challenge, team_id, expected, new, PENDING_TTL)

    def _coalesced(
        self, kind: str, op: str, challenge: str, team_id: str, send: Callable[[str], None],
    ) -> tuple[str, bool]:
        """Send ``op`` unless the same op of this instance is pending; return (task id, sent).

        1. a pending task of the same op (not finished in the result backend) is the answer;
        2. otherwise a marker naming a new task id replaces what was there, by
           compare-and-set (of racing duplicates exactly one gets past this step);
        3. ``send(task_id)`` counts the rate limit, registers the intent and sends; when it
           fails, the marker is put back as it was, so nothing points at a task never sent.
        """
        for _ in range(8):
            raw, marker = self._pending(kind, challenge, team_id)
            if marker is not None and marker["op"] == op:
                return marker["task_id"], False
            task_id = str(uuid.uuid4())
            mine = json.dumps({"op": op, "task_id": task_id})
            if not self._swap_marker(kind, challenge, team_id, raw, mine):
                continue  # another request changed it meanwhile: look again
            try:
                send(task_id)
            except BaseException:
                with contextlib.suppress(CTFError, redis.RedisError):
                    self._swap_marker(kind, challenge, team_id, mine, raw)
                raise
            return task_id, True
        raise errors.InstanceBusy(
            f"requests for {challenge} of team {team_id} keep changing; try again shortly"
        )

    def _rate_limit(self, team_id: str) -> None:
        """Count one start/stop that will do real work (before it is queued)."""
        self.store.hit_rate(team_id, self.settings.rate_limit_count,
                            self.settings.rate_limit_window)

    def _noop_start(self, record: Instance, owner: str) -> str:
        """Answer a start of a running instance without a task; return its (reused) id.

        The result is written where Celery keeps task results, under an id derived from
        the instance and its container (and the asking team, ``owner``, who may read it),
        so a loop of such starts rewrites one short-lived entry instead of adding a task
        and a result per request.
        """
        name = f"ctf-noop-start:{record.key}:{record.container_id}"
        if owner != record.team_id:  # a global instance (SPEC §13): one answer per team
            name += f":{owner}"
        task_id = str(uuid.uuid5(uuid.NAMESPACE_URL, name))
        backend = self.celery.backend
        self.store.set_task_owner(task_id, json.dumps({"owner": owner,
                                                       "task": "start_container"}), NOOP_TTL)
        # The answer a start task gives: the instance with its access_url.
        answer = self._with_access([record.public()], owner)[0]
        with map_redis_errors("answer start"):
            backend.store_result(task_id, answer, "SUCCESS")
            backend.client.expire(backend.get_key_for_task(task_id), NOOP_TTL)
        return task_id

    def _audited(self, kind: str, key: InstanceKey, actor: str, acts: bool,
                 send: Callable[[InstanceKey, InstanceKey, str], T]) -> T:
        """Run ``send(key, instance, actor)``; a refusal it raises is recorded in the audit.

        ``instance`` is what the request is about (:func:`~celery_app.core.catalog.shared_key`:
        a global challenge's one instance); the task goes out for the team that asked.

        Args:
            kind: the audit event's kind (``start``, ``stop``, ``restart``, ``extend``).
            key: the request, validated (:meth:`key`).
            actor: who asks (``admin`` or ``team:<team_id>``).
            acts: the request stops, extends or restarts the instance (a team may not, on a
                global challenge).
            send: sends the task.

        Raises:
            SharedInstance: a team acts on a ``share: global`` challenge (SPEC §13).

        """
        return cast(T, self.auditor.refused(
            kind, key.challenge, key.team, actor,
            lambda: send(key, shared_key(self.catalog, key, actor, acts), actor)))

    def start(self, key: InstanceKey, actor: str = ADMIN) -> tuple[str, dict[str, Any]]:
        """Start the instance; return the task id and the instance so far.

        A start while another start of it is pending answers that task; a start of an
        instance that runs (on a live host, with no stop pending) sends nothing and answers
        it at once. Only a start that will do work counts against the rate limit, here,
        before it is queued; the task is told so (``counted``). Requests coalesce, so the
        task belongs to the instance's team whoever asked: that team and the admin may read
        it. The task's result (:meth:`view`, :meth:`wait`) is the instance with its
        ``access_url`` already.

        Args:
            key: the instance (:meth:`key`).
            actor: who asks, for the audit trail (``admin`` or ``team:<team_id>``): a refusal
                here is recorded, the task records its outcome.

        Returns:
            The task id and the instance so far.

        Raises:
            RateLimited: the team made too many starts/stops lately (nothing was sent).

        """
        return self._audited("start", key, actor, False, self._start)

    def _start(self, asked: InstanceKey, key: InstanceKey,
               actor: str) -> tuple[str, dict[str, Any]]:
        # ``key`` is the instance (a global challenge's: team ``global``, SPEC §13); the task
        # goes out for the team that ``asked``, which it belongs to and is counted against.
        challenge, team_id, asker = key.challenge, key.team, asked.team
        record = self.store.get(challenge, team_id)
        if record is not None and record.status == "running" and record.container_id:
            _raw, marker = self._pending("run", challenge, team_id)
            shown = self.present([record])[0]
            if marker is None and "host_up" not in shown:
                return self._noop_start(record, asker), record.public()

        def send(task_id: str) -> None:
            self._rate_limit(asker)
            # The request's place in line is taken now, on arrival: when starts and stops
            # of one instance race, the one that arrived last wins (InstanceService.start).
            intent = self.store.register_intent(challenge, team_id, "start")
            self.send("start_container", [challenge, asker], asker,
                      self.queue_for(record, str(key), self.catalog.get(challenge).containers),
                      {"intent": intent, "counted": True, "actor": actor}, task_id=task_id)

        task_id, _sent = self._coalesced("run", "start", challenge, team_id, send)
        if record is not None and record.status != "failed":
            so_far = record.public()
        else:
            so_far = {"team_id": team_id, "challenge": challenge, "status": "starting"}
        return task_id, so_far

    def stop(self, key: InstanceKey, actor: str = ADMIN) -> tuple[str, dict[str, Any]]:
        """Send a stop of an existing instance; return the task id and the instance so far.

        A stop while another stop of it is pending answers that task; counted, owned and
        audited as for :meth:`start`.

        Raises:
            InstanceNotFound: Redis has no record of it (nothing is sent).
            RateLimited: the team made too many starts/stops lately (nothing was sent).
            SharedInstance: a team's stop of a ``share: global`` challenge (SPEC §13).

        """
        return self._audited("stop", key, actor, True, partial(self._send_run, "stop"))

    # A stop and a restart of an existing instance: its place in line (the intent) is a stop's
    # or a start's (a restart comes up as a start), and what the instance shows meanwhile.
    _RUN_OPS: ClassVar[dict[str, tuple[str, str]]] = {
        "stop": ("stop", "stopping"), "restart": ("start", "starting")}

    def _send_run(self, op: str, asked: InstanceKey, key: InstanceKey,
                  actor: str) -> tuple[str, dict[str, Any]]:
        """Send the stop or restart (``op``) of the recorded instance ``key``, counted.

        Raises:
            InstanceNotFound: Redis has no record of it (nothing is sent).
            RateLimited: the team made too many starts/stops lately (nothing was sent).

        """
        challenge, team_id, asker = key.challenge, key.team, asked.team  # as in _start
        intent_op, status = self._RUN_OPS[op]
        record = self.instance(key)

        def send(task_id: str) -> None:
            self._rate_limit(asker)
            intent = self.store.register_intent(challenge, team_id, intent_op)
            self.send(f"{op}_container", [challenge, asker], asker, self.queue_for(record),
                      {"intent": intent, "counted": True, "actor": actor}, task_id=task_id)

        task_id, _sent = self._coalesced("run", op, challenge, team_id, send)
        return task_id, {**record.public(), "status": status}

    def stop_solved(self, key: InstanceKey, actor: str = ADMIN) -> str | None:
        """Send the stop of a solved instance (``stop_on_solve``, SPEC §13); return its task.

        The normal stop task (audited as a ``stop`` by ``actor``), sent without waiting for
        it; not counted against the team's rate limit (the organisers' rule, not the team's
        request, like an expiry). ``None`` when the team has no instance (nothing is sent).
        """
        challenge, team_id = key.challenge, key.team
        record = self.store.get(challenge, team_id)
        if record is None:
            return None

        def send(task_id: str) -> None:
            intent = self.store.register_intent(challenge, team_id, "stop")
            self.send("stop_container", [challenge, team_id], team_id, self.queue_for(record),
                      {"intent": intent, "counted": True, "actor": actor}, task_id=task_id)

        return self._coalesced("run", "stop", challenge, team_id, send)[0]

    def restart(self, key: InstanceKey, actor: str = ADMIN) -> tuple[str, dict[str, Any]]:
        """Send a restart of an existing instance; return the task id and the instance so far.

        A fresh instance replaces it (SPEC §13). A restart while another restart of it is
        pending answers that task; it counts as one action for the rate limit (always: it
        does work), here, before it is queued; its place in line is a start's (a stop sent
        after it wins); owned and audited as for :meth:`start`.

        Raises:
            InstanceNotFound: Redis has no record of it (nothing is sent): start one.
            RateLimited: the team made too many starts/stops lately (nothing was sent).
            SharedInstance: a team's restart of a ``share: global`` challenge (SPEC §13).

        """
        return self._audited("restart", key, actor, True, partial(self._send_run, "restart"))

    def extend(self, key: InstanceKey, actor: str = ADMIN) -> str:
        """Send an extend of an existing instance; return the task id.

        An extend while another is pending answers that task; one already at its maximum
        lifetime is refused here, without a task; owned and audited as for :meth:`start`.
        The task's result is the instance with its ``access_url``.

        Raises:
            InstanceNotFound: Redis has no record of it (nothing is sent).
            MaxLifetimeReached: it already lives until its maximum lifetime.
            SharedInstance: a team's extend of a ``share: global`` challenge (SPEC §13).

        """
        return self._audited("extend", key, actor, True, self._extend)

    def _extend(self, asked: InstanceKey, key: InstanceKey, actor: str) -> str:
        challenge, team_id, asker = key.challenge, key.team, asked.team  # as in _start
        ch = self.catalog.get(challenge)
        record = self.instance(key)
        assert ch.max_lifetime is not None
        ceiling = record.started.timestamp() + ch.max_lifetime
        # A global instance never expires: the admin's extend answers it as it is.
        if record.expires.timestamp() >= ceiling and not ch.is_global:
            raise MaxLifetimeReached(
                f"instance {record.container_name} already lives until {iso(record.expires)}, "
                f"its maximum lifetime ({ch.max_lifetime} s); stop it and start a new one"
            )

        def send(task_id: str) -> None:
            self.send("extend_container", [challenge, asker], asker, self.queue_for(record),
                      {"actor": actor}, task_id=task_id)

        return self._coalesced("extend", "extend", challenge, team_id, send)[0]

    # -- team tokens and their revocation (issue 22) ------------------------------------------

    def team_token(self, team_id: str) -> str:
        """Return the team's current API token (its access generation's).

        Raises:
            InvalidTeamId: the team id is not valid.
            RedisUnavailable: Redis cannot be reached.
        """
        team = check_team_id(team_id)
        token = team_token(self.settings.admin_token_value(), team,
                           self.store.access_generation(team))
        self.auditor.try_record("admin", team, None, ADMIN, "ok", action="token")
        return token

    def revoke_access(self, team_id: str) -> dict[str, Any]:
        """Revoke the team's token, access links and cookies, and move its instances' hosts.

        The team's access generation goes up by one: its token is refused from now on (a
        new one is returned), and each host's worker gives the team's running instances a
        new host name on its next janitor pass (``CTF_JANITOR_INTERVAL``, 5 s by default):
        the old name answers 404, cookies and links of the old name open nothing, and the
        instances' ``url``/``access_url`` name the new host.

        Raises:
            InvalidTeamId: the team id is not valid.
            RedisUnavailable: Redis cannot be reached.
        """
        team = check_team_id(team_id)
        generation = self.store.revoke_access(team)
        self.auditor.try_record("admin", team, None, ADMIN, "ok", action="revoke")
        return {"team_id": team, "generation": generation,
                "token": team_token(self.settings.admin_token_value(), team, generation),
                "hosts_move_within_s": self.settings.janitor_interval}

    def owner_of(self, task_id: str) -> str | None:
        """Return who sent a task through us (a team id or ``ADMIN_OWNER``), or ``None``."""
        raw = self.store.task_owner(task_id)
        if not raw:
            return None
        return str(json.loads(raw).get("owner", ADMIN_OWNER))

    def view(self, task_id: str) -> TaskView:
        """Return the task's state, progress, result or error (one backend read)."""
        return view_from_meta(task_id, self.celery.backend.get_task_meta(task_id))

    def exists(self, task_id: str) -> bool:
        """Whether the result backend has anything on ``task_id`` (unknown ids have nothing)."""
        backend = self.celery.backend
        key = backend.get_key_for_task(task_id)
        with map_redis_errors("read task"):
            return bool(backend.client.exists(key))

    def wait(
        self,
        task_id: str,
        timeout: float,
        on_progress: Callable[[TaskView], None] | None = None,
    ) -> TaskView:
        """Wait for the task to finish, or for ``timeout`` seconds.

        A pub/sub subscription of its own per call (not ``AsyncResult.get``, whose consumer
        is shared by the threads of one process and is not safe there).

        Args:
            task_id: the task.
            timeout: seconds to wait at most.
            on_progress: called with each new view while the task runs.

        Returns:
            The last view: ``ready`` when it finished in time.

        """
        deadline = time.monotonic() + timeout
        backend = self.celery.backend
        # The Redis result backend PUBLISHes every state it stores on the task's key: wait
        # for those instead of polling (one GET per change, not one every 10 ms).
        pubsub = backend.client.pubsub(ignore_subscribe_messages=True)
        try:
            with map_redis_errors("wait for task"):
                pubsub.subscribe(backend.get_key_for_task(task_id))
            while True:
                view = self.view(task_id)  # read after subscribing: no change is missed
                if view.ready:
                    return view
                if on_progress is not None:
                    on_progress(view)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return view
                with map_redis_errors("wait for task"):
                    # woken by the next stored state; re-read at least once a second anyway
                    pubsub.get_message(timeout=min(remaining, 1.0))
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()


def view_from_meta(task_id: str, meta: dict[str, Any]) -> TaskView:
    """Return the view of a task from its result-backend meta (Celery's decoded record)."""
    state = str(meta.get("status", "PENDING"))
    result = meta.get("result")
    view = TaskView(task_id, state)
    if state == "SUCCESS":
        view.result = result
    elif state == "FAILURE":
        view.error = rebuild_error(result)
    elif state == "REVOKED":
        view.error = TaskFailed("the task was revoked before it finished; send it again")
    elif state == "PROGRESS" and isinstance(result, dict):
        view.progress = result
    return view


class AsyncWaiter:
    """Waits for tasks on the event loop: no thread is held while a request waits.

    Each wait subscribes to the channel on which the Redis result backend publishes every
    state it stores for the task (one connection from a bounded pool while it waits), and
    reads the task's record after subscribing, so no change is missed.

    Args:
        dispatcher: supplies the result backend's URL, key names and decoding.
        max_connections: connections the waits may hold at once (one per wait).

    """

    def __init__(self, dispatcher: Dispatcher, max_connections: int) -> None:
        self.backend = dispatcher.celery.backend
        self.url = dispatcher.settings.result_backend
        self.max_connections = max_connections
        self._client: redis.asyncio.Redis | None = None

    def _connect(self) -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(
            self.url, socket_timeout=5, socket_connect_timeout=2,
            max_connections=self.max_connections + 4,
            retry=redis.asyncio.retry.Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )

    async def open(self) -> None:
        """Connect (on the running event loop; connections belong to one loop)."""
        self._client = self._connect()

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def view(self, client: redis.asyncio.Redis, task_id: str) -> TaskView:
        """Return the task's view (one GET on the result backend)."""
        raw = await client.get(self.backend.get_key_for_task(task_id))
        if not raw:
            return TaskView(task_id, "PENDING")
        return view_from_meta(task_id, self.backend.decode_result(raw))

    async def wait(self, task_id: str, timeout: float) -> TaskView:
        """Wait for the task to finish, or for ``timeout`` seconds; return the last view.

        Raises:
            RedisUnavailable: the result backend cannot be reached.

        """
        own = self._client is None  # no lifespan (a bare test client): a client of our own
        client = self._connect() if own else self._client
        assert client is not None
        deadline = time.monotonic() + timeout
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            with map_redis_errors("wait for task"):
                await pubsub.subscribe(self.backend.get_key_for_task(task_id))
                while True:
                    view = await self.view(client, task_id)
                    remaining = deadline - time.monotonic()
                    if view.ready or remaining <= 0:
                        return view
                    # woken by the next stored state; re-read at least once a second anyway
                    await pubsub.get_message(timeout=min(remaining, 1.0))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            if own:
                with contextlib.suppress(Exception):
                    await client.aclose()
