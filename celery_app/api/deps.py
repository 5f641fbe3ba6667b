"""What the routes declare: their parameters, their error answers, and their dependencies.

:func:`~celery_app.api.app.create_app` keeps the API's objects on ``app.state`` (the
Dispatcher, the metrics, the health cache, the waiter and wait slots, the settings); a route
asks for one with the ``Annotated`` aliases below (``disp: Disp``), which FastAPI fills
through a small dependency per object. The dependencies are coroutines returning what is
already there: they are awaited on the event loop and never take a thread, also for the
routes that run in the thread pool. A test may swap one through ``app.dependency_overrides``.

``Who`` is the caller: the admin or one team, from the bearer token (401 when nobody).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from celery_app.api.access import AccessGenerations
from celery_app.api.client import AsyncWaiter, Dispatcher
from celery_app.api.health import Health
from celery_app.api.metrics import ApiMetrics
from celery_app.api.waits import WaitSlots
from celery_app.settings import Settings
from celery_app.vocab.naming import TEAM_ID_RE
from celery_app.vocab.team_tokens import Principal, claimed_team, principal_for

# -- parameters and error answers -------------------------------------------------------------

TeamId = Annotated[str, Path(
    pattern=TEAM_ID_RE.pattern, description="1-63 letters, digits, '_' or '-'",
)]
ChallengeId = Annotated[str, Path(max_length=200, description="a catalog id")]
Wait = Annotated[float | None, Query(
    gt=0, le=300, description="wait up to this many seconds for the task to finish",
)]


class ErrorBody(BaseModel):
    """Every error: a code from SPEC §6 and what happened / what to do."""

    error: str
    detail: str


# The documented error answers of the routes (OpenAPI ``responses``).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (401, 403, 404, 409, 413, 422, 429, 503)
}

bearer = HTTPBearer(auto_error=False, description="the admin token or a team token")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]

# -- who is asking ----------------------------------------------------------------------------


async def who(request: Request, creds: Bearer) -> Principal:
    """Return who the request's bearer token belongs to (401 when nobody)."""
    token = creds.credentials if creds else None
    team = claimed_team(token) if token else None
    generations: AccessGenerations = request.app.state.generations
    generation = await generations.get(team) if team else 0
    return principal_for(request.app.state.admin_token, token, generation)


Who = Annotated[Principal, Depends(who)]

# -- the API's objects, kept on app.state by create_app ---------------------------------------


async def dispatcher(request: Request) -> Dispatcher:
    """Return the API's Dispatcher (Redis reads, tasks sent to the workers)."""
    disp: Dispatcher = request.app.state.dispatcher
    return disp


async def settings(request: Request) -> Settings:
    """Return the API's settings."""
    found: Settings = request.app.state.settings
    return found


async def metrics(request: Request) -> ApiMetrics:
    """Return the API's Prometheus metrics."""
    found: ApiMetrics = request.app.state.metrics
    return found


async def health(request: Request) -> Health:
    """Return the API's cached health measurement (``/healthz``)."""
    found: Health = request.app.state.health
    return found


async def waiter(request: Request) -> AsyncWaiter:
    """Return the API's waiter for tasks (on the event loop)."""
    found: AsyncWaiter = request.app.state.waiter
    return found


async def wait_slots(request: Request) -> WaitSlots:
    """Return the API's bounds on requests waiting for their task."""
    found: WaitSlots = request.app.state.wait_slots
    return found


async def generations(request: Request) -> AccessGenerations:
    """Return the teams' access generations the API checks team tokens against."""
    found: AccessGenerations = request.app.state.generations
    return found


Disp = Annotated[Dispatcher, Depends(dispatcher)]
SettingsDep = Annotated[Settings, Depends(settings)]
Metrics = Annotated[ApiMetrics, Depends(metrics)]
HealthDep = Annotated[Health, Depends(health)]
Waiter = Annotated[AsyncWaiter, Depends(waiter)]
Slots = Annotated[WaitSlots, Depends(wait_slots)]
Generations = Annotated[AccessGenerations, Depends(generations)]
