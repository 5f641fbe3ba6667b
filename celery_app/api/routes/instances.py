"""One team's instances: start, status, stop, restart, extend (the admin or that team's token).

They are coroutines: the quick parts (Redis reads, sending the task) run in the thread pool,
and a wait runs on the event loop (:class:`~celery_app.api.client.AsyncWaiter`), holding no
thread. The two status reads are the platform's polling: read on the event loop in one Redis
round trip and answered as a ready ``JSONResponse`` (PERFORMANCE.md §8), with nothing more in
their way than the caller's token check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from celery_app.api.client import AsyncWaiter, Dispatcher, TaskView
from celery_app.api.deps import ERRORS, ChallengeId, Disp, Metrics, Slots, TeamId, Wait, Waiter, Who
from celery_app.api.metrics import ApiMetrics
from celery_app.api.waits import WaitSlots
from celery_app.core.audit import principal_actor
from celery_app.errors import CTFError
from celery_app.vocab.models import InstanceKey
from celery_app.vocab.team_tokens import Principal

EXTEND_WAIT = 10.0

router = APIRouter()

Sent = tuple[str, dict[str, Any]]
T = TypeVar("T")

# -- the Dispatcher's instance requests -------------------------------------------------------
# The Dispatcher validates the request once into an ``InstanceKey`` (in the thread pool, with
# the send: an unknown challenge answers 404 from there); a finished start's result already
# carries ``access_url`` (the task adds it), so the routes answer it as it is.


def _sender(act: Callable[[InstanceKey, str], T], disp: Dispatcher, challenge: str,
            team_id: str, who: Principal) -> Callable[[], T]:
    """Return the call that sends one of the Dispatcher's requests (run in the thread pool).

    Args:
        act: the Dispatcher's method (``start``, ``stop``, ``restart``, ``extend``).
        disp: the Dispatcher, which validates the request into its key.
        challenge: the challenge id, as asked.
        team_id: the team id, as asked.
        who: the caller; ``act`` gets its actor in the audit trail (SPEC §13): the admin or
            the token's team. The key is validated as the actor's, so that the admin may
            name a global instance by its team id ``global`` (SPEC §13: the admin may stop,
            extend or restart it).

    """
    actor = principal_actor(who)
    return lambda: act(disp.key(challenge, team_id, actor), actor)


# -- helpers ----------------------------------------------------------------------------------


def _failed(metrics: ApiMetrics, task: str, view: TaskView) -> CTFError:
    """Count a task's failure and return its error, to be raised."""
    assert view.error is not None
    metrics.task_failures.labels(task, view.error.code).inc()
    return view.error


async def _send_then_wait(
    slots: WaitSlots, waiter: AsyncWaiter, team_id: str, wait: float | None,
    send: Callable[[], Sent],
) -> tuple[str, dict[str, Any], TaskView | None]:
    """Run ``send`` in the thread pool, then (with ``wait``) wait for its task in a slot.

    Returns:
        The task id, the instance so far, and the last view (``None`` without ``wait``).

    Raises:
        RateLimited, BackendUnavailable: no slot to wait in (nothing was sent).

    """
    if wait is None:
        task_id, so_far = await run_in_threadpool(send)
        return task_id, so_far, None
    with slots.held(team_id):
        task_id, so_far = await run_in_threadpool(send)
        return task_id, so_far, await waiter.wait(task_id, wait)


async def _act(
    task: str, act: Callable[[InstanceKey, str], Sent], challenge: str, team_id: str,
    who: Principal, disp: Dispatcher, metrics: ApiMetrics, waiter: AsyncWaiter,
    slots: WaitSlots, wait: float | None, *, reread: bool, timed: bool = False,
) -> JSONResponse:
    """Answer a start, stop or restart: check the caller, send ``act``'s task, maybe wait.

    Without ``wait``: 202 with the task id and the instance so far. With it: 200 with the
    task's result once it is done, the task's error (counted) when it failed, or 202 when it
    is not done in time.

    Args:
        task: the task's name, for the metrics (``start_container``, ...).
        act: the Dispatcher's method that sends it (see :func:`_sender`).
        challenge: the challenge id, as asked.
        team_id: the team id, as asked.
        who: the caller: the admin or that team's token.
        disp: the Dispatcher.
        metrics: the API's metrics.
        waiter: the waits on the event loop.
        slots: the team's wait slots.
        wait: ``?wait=N``, or ``None``.
        reread: a 202 after a wait shows the instance as Redis has it now (start, restart),
            not as it was when sent.
        timed: a 200 is observed as the start's duration.

    Raises:
        CTFError: the caller may not act for the team, the request is refused, or the task
            failed.

    """
    who.require_team(team_id)
    began = time.monotonic()
    task_id, so_far, view = await _send_then_wait(
        slots, waiter, team_id, wait,
        _sender(act, disp, challenge, team_id, who))
    metrics.tasks_sent.labels(task, challenge).inc()
    if view is None:
        return JSONResponse({"task_id": task_id, **so_far}, status_code=202)
    if view.error is not None:
        raise _failed(metrics, task, view)
    if not view.ready:
        if reread:
            record = await run_in_threadpool(disp.store.get, challenge, team_id)
            so_far = record.public() if record else so_far
        return JSONResponse({"task_id": task_id, **so_far}, status_code=202)
    if timed:
        metrics.start_duration.labels(challenge).observe(time.monotonic() - began)
    return JSONResponse(view.result, status_code=200)


# -- the routes -------------------------------------------------------------------------------


@router.put("/api/v1/teams/{team_id}/instances/{challenge}", status_code=202,
            responses={**ERRORS, 200: {"description": "the running instance (with ?wait)"}},
            tags=["instances"])
async def start_instance(
    team_id: TeamId, challenge: ChallengeId, who: Who, disp: Disp, metrics: Metrics,
    waiter: Waiter, slots: Slots, wait: Wait = None,
) -> JSONResponse:
    """Start the team's instance (idempotent): 202 with the task id and the instance so far.

    With ``?wait=N``: 200 with the running instance once it runs, the task's error when
    it failed, or 202 when it is not done within N seconds. A start while another start
    of the instance is pending answers that same task.
    """
    return await _act("start_container", disp.start, challenge, team_id, who, disp, metrics,
                      waiter, slots, wait, reread=True, timed=True)


# The polling routes take the Dispatcher from ``request.app.state`` themselves: a dependency
# would cost each poll one more layer of FastAPI's dependency solving (~10 µs, a tenth of
# what the framework spends on such a request).


@router.get("/api/v1/teams/{team_id}/instances", responses=ERRORS, tags=["instances"],
            response_model=dict[str, Any])
async def list_team_instances(team_id: TeamId, who: Who, request: Request) -> JSONResponse:
    """Return the team's instances, from the Redis index: ``{"instances": [...]}``."""
    who.require_team(team_id)
    disp: Dispatcher = request.app.state.dispatcher
    return JSONResponse({"instances": await disp.shown_team(team_id)})


@router.get("/api/v1/teams/{team_id}/instances/{challenge}", responses=ERRORS,
            tags=["instances"], response_model=dict[str, Any])
async def get_instance(
    team_id: TeamId, challenge: ChallengeId, who: Who, request: Request
) -> JSONResponse:
    """Return the team's instance of a challenge, or 404 ``instance_not_found``.

    On a host whose worker is gone it is not shown as running: ``host_up`` is false.
    """
    who.require_team(team_id)
    disp: Dispatcher = request.app.state.dispatcher
    return JSONResponse(await disp.shown_instance(challenge, team_id))


@router.delete("/api/v1/teams/{team_id}/instances/{challenge}", status_code=202,
               responses={**ERRORS, 200: {"description": "stopped (with ?wait)"}},
               tags=["instances"])
async def stop_instance(
    team_id: TeamId, challenge: ChallengeId, who: Who, disp: Disp, metrics: Metrics,
    waiter: Waiter, slots: Slots, wait: Wait = None,
) -> JSONResponse:
    """Stop and remove the instance: 202, or 200 with ``?wait=N``; 404 when there is none."""
    return await _act("stop_container", disp.stop, challenge, team_id, who, disp, metrics,
                      waiter, slots, wait, reread=False)


@router.post("/api/v1/teams/{team_id}/instances/{challenge}/restart", status_code=202,
             responses={**ERRORS, 200: {"description": "the fresh instance (with ?wait)"}},
             tags=["instances"])
async def restart_instance(
    team_id: TeamId, challenge: ChallengeId, who: Who, disp: Disp, metrics: Metrics,
    waiter: Waiter, slots: Slots, wait: Wait = None,
) -> JSONResponse:
    """Replace the instance with a fresh one (SPEC §13); answers like a start.

    New containers from the image (nothing the team wrote survives), the same flag, an
    expiry as for a new start; one action for the rate limit. 202 with the task id and the
    instance so far; with ``?wait=N``, 200 with the running instance once it runs, the
    task's error when it failed, or 202 when it is not done within N seconds. 404
    ``instance_not_found`` when there is no instance (start one).
    """
    return await _act("restart_container", disp.restart, challenge, team_id, who, disp,
                      metrics, waiter, slots, wait, reread=True)


@router.post("/api/v1/teams/{team_id}/instances/{challenge}/extend", responses=ERRORS,
             tags=["instances"])
async def extend_instance(
    team_id: TeamId, challenge: ChallengeId, who: Who, disp: Disp, metrics: Metrics,
    waiter: Waiter, slots: Slots,
) -> JSONResponse:
    """Push ``expires_at`` out by the challenge's ttl, up to its maximum lifetime.

    200 with the instance once extended (it waits a few seconds), else 202 with the task.
    """
    who.require_team(team_id)
    send = _sender(disp.extend, disp, challenge, team_id, who)
    try:
        slots.take(team_id)
    except CTFError:
        # No slot to wait in: the extend is still sent, and followed through its task.
        task_id = await run_in_threadpool(send)
        metrics.tasks_sent.labels("extend_container", challenge).inc()
        return JSONResponse({"task_id": task_id, "state": "PENDING"}, status_code=202)
    try:
        task_id = await run_in_threadpool(send)
        metrics.tasks_sent.labels("extend_container", challenge).inc()
        view = await waiter.wait(task_id, EXTEND_WAIT)
    finally:
        slots.give_back(team_id)
    if view.error is not None:
        raise _failed(metrics, "extend_container", view)
    if not view.ready:
        return JSONResponse({"task_id": task_id, "state": view.state}, status_code=202)
    return JSONResponse(view.result, status_code=200)
