"""The Celery tasks of SPEC §5. Thin: each one calls the instance service.

Permanent errors (bad input, limits) fail at once; transient ones (Docker or Redis
unreachable, Docker 5xx) are retried with exponential backoff and jitter, a bounded number of
times. An instance busy with another operation does not park a worker thread: the task
retries a little later, for up to ``CTF_LOCK_WAIT`` seconds in all. Every task is idempotent,
so a redelivery after a worker died does no harm: start, stop and extend pass their task id
to the service, which writes each one's answer in the same step as its effect and answers a
redelivered copy with it (none is done twice, SPEC §10).

Any worker may take a task sent by name to the default queue (SPEC §10). A task about an
instance that lives on another Docker host, or a new start placed on another host, is handed
to that host's queue under the same task id (:func:`_hand_over`): the caller's ``AsyncResult``
receives the result of the worker that did the work.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from celery import Task
from celery.exceptions import Ignore

from celery_app.celery_app import app
from celery_app.core.audit import ADMIN, TASK_KINDS, Auditor, actor_of
from celery_app.core.catalog import shared_key
from celery_app.errors import CTFError, InstanceBusy, TransientError
from celery_app.hosts.liveness import parse_beats
from celery_app.hosts.placement import host_of
from celery_app.hosts.present import present, present_with
from celery_app.hosts.routing import host_queue
from celery_app.vocab import signals
from celery_app.vocab.models import InstanceKey
from celery_app.vocab.naming import container_name
from celery_app.vocab.signals import ControlSignal, OnOtherHost
from celery_app.worker.context import Context, get_context
from celery_app.worker.events import index_is_live

log = logging.getLogger("celery_app.tasks")
T = TypeVar("T")

MAX_RETRIES = 5
# Seconds a task waits for an instance another operation holds before it gives its thread
# back and retries later (at most BUSY_DELAY_MAX s later).
BUSY_LOCK_WAIT = 1.0
BUSY_DELAY_MAX = 5.0
# Seconds a status read's result stays in the result backend (the caller has it at once).
STATUS_RESULT_TTL = 600
# A request handed from host to host this often (the instance kept moving) gives up.
MAX_HOPS = 3
# The keyword that says a start's or stop's rate-limit count was taken already (explicit,
# set by whoever counted it: the dispatcher, or this task when it sends the request on).
COUNTED = "counted"


class InstancerTask(Task):  # type: ignore[misc]
    """Base of every task: late ack, bounded retries of transient errors only."""

    abstract = True
    autoretry_for = (TransientError,)
    # the error a busy request ends with: its own retries (retry_when_free) are used up
    dont_autoretry_for = (InstanceBusy,)
    max_retries = MAX_RETRIES
    retry_backoff = 1
    retry_backoff_max = 30
    retry_jitter = True
    acks_late = True

    _last_report = 0.0
    # A task whose request counts against the team's rate limit takes the ``counted`` flag.
    counts_rate = False

    def retry(self, args: Any = None, kwargs: Any = None, *more: Any,
              **options: Any) -> Any:
        """Celery's retry; a copy of a request that counts goes out marked ``counted``.

        Every retry (Celery's own of a transient error, or :meth:`retry_when_free`) comes
        after the first try reached the service's rate-limit step or failed before the work
        it guards: the copy must not be counted again.
        """
        if self.counts_rate:
            sent = (self.request.kwargs or {}) if kwargs is None else kwargs
            kwargs = {**sent, COUNTED: True}
        return super().retry(args, kwargs, *more, **options)

    def report(self, event: dict[str, Any]) -> None:
        """Publish progress as the task's ``PROGRESS`` state (at most ~4 times a second)."""
        if not self.request.id or self.request.called_directly:
            return
        # Each PROGRESS is a backend SET + PUBLISH on the start's critical path: skip "image"
        # (over at once unless a pull follows) and "running" (the result follows at once).
        if event.get("phase") in ("image", "running"):
            return
        now = time.monotonic()
        if event.get("phase") == "pulling" and now - self._last_report < 0.25:
            return
        self._last_report = now
        self.update_state(state="PROGRESS", meta=event)

    def retry_when_free(self, ctx: Context, busy: signals.InstanceBusy) -> NoReturn:
        """Retry later, without holding a thread, while the instance is busy.

        The delays grow to ``BUSY_DELAY_MAX`` seconds; the request gives up (with the error
        ``InstanceBusy``) once it has waited about ``CTF_LOCK_WAIT`` seconds in all.
        """
        tries = int(self.request.retries or 0)
        budget = int(ctx.settings.lock_wait / BUSY_DELAY_MAX) + MAX_RETRIES
        delay = min(BUSY_DELAY_MAX, 0.25 * 2 ** tries) * random.uniform(0.8, 1.2)  # noqa: S311
        # The signal becomes the error only if this was the last try (Celery raises ``exc``).
        raise self.retry(exc=InstanceBusy(busy.detail), countdown=delay, max_retries=budget)

    def hand_over(self, host: str, args: list[Any], kwargs: dict[str, Any]) -> NoReturn:
        """Send this very request to ``host``'s queue under the same task id; drop this copy.

        Raises:
            InstanceBusy: the request was already handed over ``MAX_HOPS`` times.
            Ignore: always otherwise (the message is acknowledged, no state is stored).

        """
        hops = int(kwargs.get("hops") or 0)
        if hops >= MAX_HOPS:
            raise InstanceBusy(
                f"the instance moved between hosts {hops} times while this request was on its "
                "way; send it again"
            )
        app.send_task(self.name, args=args, kwargs={**kwargs, "hops": hops + 1},
                      task_id=self.request.id, queue=host_queue(host))
        log.info("task=%s id=%s handed to host=%s", self.name.rsplit(".", 1)[-1],
                 self.request.id, host)
        raise Ignore()


def _logged(task: str, challenge: str | None, team_id: str | None, fn: Callable[[], T],
            level: int = logging.INFO) -> T:
    """Run ``fn`` and log team, challenge, container, outcome and duration.

    A success is logged at ``level``; a refusal at WARNING and a crash at ERROR, always.
    """
    began = time.monotonic()
    container = container_name(challenge, team_id) if challenge and team_id else "-"
    try:
        result = fn()
    except (ControlSignal, Ignore):
        raise  # not an outcome: the request goes on elsewhere or later
    except CTFError as exc:
        log.warning(
            "task=%s team=%s challenge=%s container=%s outcome=%s duration_ms=%d detail=%s",
            task, team_id, challenge, container, exc.code, (time.monotonic() - began) * 1000,
            exc.detail,
        )
        raise
    except Exception:
        log.exception(
            "task=%s team=%s challenge=%s container=%s outcome=crash duration_ms=%d",
            task, team_id, challenge, container, (time.monotonic() - began) * 1000,
        )
        raise
    outcome = result.get("status", "ok") if isinstance(result, dict) else "ok"
    log.log(
        level, "task=%s team=%s challenge=%s container=%s outcome=%s duration_ms=%d",
        task, team_id, challenge, container, outcome, (time.monotonic() - began) * 1000,
    )
    return result


def _audited(task: InstancerTask, ctx: Context, name: str, key: InstanceKey,
             actor: str, run: Callable[[], T]) -> T:
    """Run a start, stop, extend or restart and record its outcome in the audit trail (SPEC §13).

    ``ok``, or the error's code; a transient error with retries left is no outcome yet (its
    retry's is), and a control signal (hand-over, busy) is none at all.
    """
    if name not in TASK_KINDS:
        return run()
    auditor = Auditor(ctx.settings, ctx.store)
    try:
        result = run()
    except CTFError as exc:
        if not (exc.transient and int(task.request.retries or 0) < task.max_retries):
            auditor.task_outcome(name, key.challenge, key.team, actor, exc.code, task.request.id)
        raise
    auditor.task_outcome(name, key.challenge, key.team, actor, "ok", task.request.id)
    return result


def _route(
    task: InstancerTask, ctx: Context, key: InstanceKey, kwargs: dict[str, Any], placing: bool,
) -> None:
    """Hand the request to the host that must act on it, when that is not this one.

    Routing only, with the dispatcher's helper (:func:`host_of`): whether this host owns the
    instance is decided by the service, under the instance lock (``OnOtherHost``).
    """
    here = ctx.service.host
    record = ctx.store.get(key.challenge, key.team)
    # A start that reached this host's own queue was placed here already (by the
    # dispatcher, or by the worker that handed it over): placing it again would count it
    # twice and could send it back and forth.
    queue = (task.request.delivery_info or {}).get("routing_key")
    if record is not None or (placing and queue != host_queue(here)):
        host = host_of(ctx.hosts, ctx.store, record, str(key),
                       ctx.catalog.get(key.challenge).containers)
        if host != here:
            task.hand_over(host, [key.challenge, key.team], kwargs)


def _on_instance(
    task: InstancerTask, name: str, challenge: str, team_id: str, kwargs: dict[str, Any],
    act: Callable[[Context, InstanceKey], T], *, placing: bool = False,
) -> T:
    """Validate the request into its key, then run ``act`` here or hand it to its host.

    The task edge (SPEC §5: callers send plain strings by name): the team and the challenge
    are checked once, here (:meth:`Catalog.key`, the team first); the layers below take the
    key as valid.

    Args:
        task: the running task.
        name: the task's short name, for the log.
        challenge: the challenge id, as sent.
        team_id: the team, as sent.
        kwargs: the task's keyword arguments (passed on when handing over or retrying).
        act: what to do on the right host, with the validated key.
        placing: a start: an instance without a record is placed like the dispatcher does.

    """
    ctx = get_context()
    args = [challenge, team_id]

    def validated_here() -> T:
        # Bad input fails here, before placement; only the organisers name a global
        # challenge's instance by its own team id, "global" (SPEC §13).
        key = ctx.catalog.key(challenge, team_id, admin=kwargs.get("actor") == ADMIN)
        # Who asked (the API's or ctfctl's caller; by name: the platform, for the team).
        actor = actor_of(kwargs.get("actor"), key.team)
        key = shared_key(ctx.catalog, key, actor, name != "start_container")
        if len(ctx.hosts) > 1:
            _route(task, ctx, key, kwargs, placing)
        return _audited(task, ctx, name, key, actor, lambda: act(ctx, key))

    try:
        return _logged(name, challenge, team_id, validated_here)
    except OnOtherHost as moved:  # it moved (or was placed elsewhere) meanwhile
        # The service decides this under the instance lock, after its rate-limit step: the
        # host that takes the request over must not count it again.
        task.hand_over(moved.host, args, {**kwargs, "counted": True} if COUNTED in kwargs
                       else kwargs)
    except signals.InstanceBusy as busy:
        task.retry_when_free(ctx, busy)


@app.task(name="celery_app.tasks.start_container", bind=True, base=InstancerTask,
          counts_rate=True)
def start_container(
    self: InstancerTask, challenge: str, team_id: str, intent: int | None = None,
    hops: int = 0, counted: bool = False, actor: str | None = None,
) -> dict[str, Any]:
    """Start the team's instance and return it once ``running`` (idempotent).

    With the ingress on (SPEC §11) the instance carries ``access_url``, a short-lived link
    for the team's browser.

    ``intent`` is the request's place in line (the API and ctfctl pass it); a stop of the
    same instance requested later supersedes this start. ``counted``: the request was counted
    against the team's rate limit already (the API and ctfctl count before they send; a
    retried or handed-over copy carries it); a plain call by name is counted here. ``hops``
    counts hand-overs between hosts. ``actor``: who asked, for the audit trail (``admin`` or
    ``team:<team_id>``; left out: the platform acting for the team, ``team:<team_id>``).
    """
    return _on_instance(
        self, "start_container", challenge, team_id,
        {"intent": intent, "hops": hops, COUNTED: counted, "actor": actor},
        # The link names the team asking (a global instance's too: every team opens it).
        lambda ctx, key: ctx.service.ingress.with_access(ctx.service.start(
            key, progress=self.report, intent=intent,
            count_rate=not counted, lock_wait=BUSY_LOCK_WAIT, task_id=self.request.id,
        ).public(), team_id),
        placing=True,
    )


@app.task(name="celery_app.tasks.stop_container", bind=True, base=InstancerTask,
          counts_rate=True)
def stop_container(
    self: InstancerTask, challenge: str, team_id: str, intent: int | None = None,
    hops: int = 0, counted: bool = False, actor: str | None = None,
) -> dict[str, str]:
    """Stop and remove the team's instance; return ``{"team_id", "challenge", "status"}``.

    Answers only once the container is gone from the engine of the instance's host.
    ``intent``, ``counted``, ``hops`` and ``actor`` as for :func:`start_container`.
    """
    return _on_instance(
        self, "stop_container", challenge, team_id,
        {"intent": intent, "hops": hops, COUNTED: counted, "actor": actor},
        lambda ctx, key: ctx.service.stop(key, intent=intent, count_rate=not counted,
                                          lock_wait=BUSY_LOCK_WAIT, task_id=self.request.id),
    )


@app.task(name="celery_app.tasks.restart_container", bind=True, base=InstancerTask,
          counts_rate=True)
def restart_container(
    self: InstancerTask, challenge: str, team_id: str, intent: int | None = None,
    hops: int = 0, counted: bool = False, actor: str | None = None,
) -> dict[str, Any]:
    """Replace the team's instance with a fresh one; return it once ``running`` (SPEC §13).

    New containers (the image's original state), the same flag, an expiry as for a new
    start; one action for the rate limit. With no instance it starts one (see
    ``InstanceService.restart``). ``intent``, ``counted``, ``hops`` and ``actor`` as for
    :func:`start_container`.
    """
    return _on_instance(
        self, "restart_container", challenge, team_id,
        {"intent": intent, "hops": hops, COUNTED: counted, "actor": actor},
        lambda ctx, key: ctx.service.ingress.with_access(ctx.service.restart(
            key, progress=self.report, intent=intent,
            count_rate=not counted, lock_wait=BUSY_LOCK_WAIT, task_id=self.request.id,
        ).public(), team_id),
        placing=True,
    )


class StatusTask(InstancerTask):
    """A status read: its result is kept ``STATUS_RESULT_TTL`` s, not ``result_expires``.

    A platform polls status every few seconds for every team: results kept for a day would
    pile up millions of keys in the result backend's Redis during an event. The result is
    stored with that life at once (a backend of its own, on the same Redis), not shortened by
    a later EXPIRE: that was one more round trip per read, before the worker acknowledged
    the message and took the next.
    """

    abstract = True
    _status_backend: Any = None

    @property
    def backend(self) -> Any:
        """The app's result backend, with ``STATUS_RESULT_TTL`` as its expiry."""
        if StatusTask._status_backend is None:
            shared = self.app.backend
            StatusTask._status_backend = type(shared)(
                app=self.app, url=self.app.conf.result_backend, expires=STATUS_RESULT_TTL)
        return StatusTask._status_backend


# A read answered from the index in a few ms: no STARTED state (one backend write less).
@app.task(name="celery_app.tasks.get_container_status", bind=True, base=StatusTask,
          track_started=False)
def get_container_status(
    self: StatusTask, team_id: str | None = None, challenge: str | None = None,
    hops: int = 0,
) -> dict[str, Any]:
    """Return ``{"instances": [...]}``, from the index, filtered by what is given.

    The index follows each engine's events (celery_app.worker.events); while this worker's
    follower is not connected or is behind, this host's instances are checked against its
    engine instead. One instance (team and challenge given) is answered by its own host's
    worker. Instances whose host has no live worker are not shown as running (``host_up``).
    """
    ctx = get_context()
    host = ctx.service.host
    live = index_is_live(host)

    def read() -> dict[str, Any]:
        maybe_elsewhere = challenge is not None and len(ctx.hosts) > 1  # one instance's host
        shown: list[dict[str, Any]] | None = None
        if team_id is not None and (live or maybe_elsewhere):
            # The records and the heartbeats in one round trip (the platform's polling).
            found, beats = ctx.service.view(team_id, challenge, list(ctx.hosts))
            if maybe_elsewhere and found and found[0].host != host:
                self.hand_over(found[0].host, [], {"team_id": team_id, "challenge": challenge,
                                                   "hops": hops})
            if live:
                shown = present_with(found, parse_beats(beats))
        if shown is None:
            # Every team's instances, or this host's follower is not live (then Docker is asked).
            shown = present(ctx.service.status(team_id, challenge, verify=not live),
                            ctx.store, ctx.hosts)
        # A team's read: its links name it (a global instance's too, SPEC §13).
        return {"instances": [ctx.service.ingress.with_access(d, team_id) for d in shown]}

    # A platform asks this every few seconds for every team: logged at DEBUG, refusals at
    # WARNING (Celery's own received/succeeded lines for it are dropped: celery_app.py).
    return _logged("get_container_status", challenge, team_id, read, level=logging.DEBUG)


@app.task(name="celery_app.tasks.extend_container", bind=True, base=InstancerTask)
def extend_container(
    self: InstancerTask, challenge: str, team_id: str, hops: int = 0, actor: str | None = None,
) -> dict[str, Any]:
    """Push the instance's expiry out by its ttl, up to its maximum lifetime.

    ``actor`` as for :func:`start_container`.
    """
    return _on_instance(
        self, "extend_container", challenge, team_id, {"hops": hops, "actor": actor},
        lambda ctx, key: ctx.service.ingress.with_access(ctx.service.extend(
            key, lock_wait=BUSY_LOCK_WAIT, task_id=self.request.id).public()),
    )


# The beat runs it every few seconds: a result kept a day for each pass would only fill Redis.
@app.task(name="celery_app.tasks.reap_expired", bind=True, base=InstancerTask, max_retries=0,
          ignore_result=True)
def reap_expired(self: InstancerTask) -> dict[str, Any]:
    """Run one janitor pass: expired instances, then orphan containers and networks."""
    # Not _logged: this runs every few seconds; the janitor logs passes that did something.
    return get_context().janitor.run_once().as_dict()


# Warm pools (issue 14): the beat runs it on each host's queue, like the janitor; the pass
# boots a few containers and returns (it never waits for one to boot). Pooled Compose groups
# (issue 24) boot inside the pass, side by side (their services wait on each other's health),
# so a pass that refills them holds its thread for one group's boot (seconds).
@app.task(name="celery_app.tasks.refill_pools", bind=True, base=InstancerTask, max_retries=0,
          ignore_result=True)
def refill_pools(self: InstancerTask) -> dict[str, Any]:
    """Run one pool pass: replace dead pool containers, park ready ones, remove extras, refill."""
    return get_context().service.pool.run_once().as_dict()


@app.task(name="celery_app.tasks.reconcile", bind=True, base=InstancerTask)
def reconcile(self: InstancerTask) -> dict[str, Any]:
    """Rebuild the Redis index from Docker labels; return what changed."""
    svc = get_context().service
    return _logged("reconcile", None, None, lambda: svc.reconcile().as_dict())


@app.task(name="celery_app.tasks.prefetch_images", bind=True, base=InstancerTask)
def prefetch_images(self: InstancerTask) -> dict[str, Any]:
    """Pull every catalog image (following the pull policy) ahead of an event."""
    ctx = get_context()

    def pull_all() -> dict[str, Any]:
        done = []
        for ch in ctx.catalog:
            ctx.service.ensure_image(ch, self.report)
            done.extend([s.image for s in ch.app.services] if ch.app else [ch.image])
        return {"images": done, "status": "ok"}

    return _logged("prefetch_images", None, None, pull_all)
