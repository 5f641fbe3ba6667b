"""The HTTP API of SPEC §6 (FastAPI), built by :func:`create_app`.

The API needs no Docker: it validates requests, reads instance state from Redis and sends
start/stop/extend to the workers through Celery, so it may run on another machine. Every
error, including the framework's own (validation, unknown route, wrong method, oversized
body), answers ``{"error": code, "detail": text}``; the only 5xx is 503.

:func:`create_app` only assembles the parts: the objects the routes use, kept on
``app.state`` (:mod:`.deps` hands them to the routes), the lifespan, the middleware
(:mod:`.middleware`, the team gate's fast path in front), the exception handlers
(:mod:`.handlers`), the routers (:mod:`.routes`, then the gate's) and the dashboard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI

from celery_app.api.access import AccessGenerations
from celery_app.api.client import AsyncWaiter, Dispatcher
from celery_app.api.handlers import install_error_handlers
from celery_app.api.health import Health
from celery_app.api.metrics import ApiMetrics
from celery_app.api.middleware import KNOWN_METHODS, GuardMiddleware
from celery_app.api.routes import ROUTERS
from celery_app.api.routes.operations import dashboard
from celery_app.api.waits import WaitSlots
from celery_app.hosts.metrics import HostCollector
from celery_app.ingress import gate as team_gate
from celery_app.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the event loop's Redis clients; on shutdown close them and the Dispatcher."""
    state = app.state
    await state.waiter.open()
    await state.dispatcher.index.open()
    yield
    await state.dispatcher.index.close()
    await state.waiter.close()
    state.health.close()
    state.dispatcher.close()


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """Make ``router``'s routes the app's own, in their order.

    Not ``app.include_router``: FastAPI (0.165 here) keeps an included router behind a layer
    it matches twice per request, about 13 µs more on every poll of an instance (a tenth of
    what the framework spends on one). The routes are complete as their router built them;
    only ``app.dependency_overrides`` does not reach them (their router has no overrides
    provider): a test hands ``create_app`` its own Dispatcher instead.
    """
    app.router.routes.extend(router.routes)


def create_app(settings: Settings, dispatcher: Dispatcher | None = None) -> FastAPI:
    """Build the API for ``settings``.

    Args:
        settings: the service settings (``load_settings()``: the admin token must be set).
        dispatcher: how to reach Redis and the workers (built from the settings when
            ``None``); it is closed when the app shuts down.

    Returns:
        The FastAPI application; the dashboard is served at ``/`` when
        ``celery_app/api/static/`` exists.

    Raises:
        CatalogError: the catalog file has a mistake.

    """
    disp = dispatcher or Dispatcher(settings)
    metrics = ApiMetrics(disp.store, disp.catalog, list(disp.hosts),
                         HostCollector(disp.hosts, disp.store))
    app = FastAPI(
        title="CTF instancer",
        version="1",
        description="Per-team CTF challenge instances on demand (SPEC §6).",
        lifespan=_lifespan,
        docs_url="/api/docs",
        redoc_url=None,
    )
    state = app.state
    state.settings = settings
    state.admin_token = settings.admin_token_value()
    state.dispatcher = disp
    state.generations = AccessGenerations(disp)
    state.metrics = metrics
    state.health = Health(settings, disp)
    state.waiter = AsyncWaiter(disp, settings.api_max_waits)
    state.wait_slots = WaitSlots(settings.api_max_waits_per_team, settings.api_max_waits)
    # SPEC §11: the team gate (Traefik's forwardAuth), answered ahead of everything else.
    state.gate = team_gate.Gate(settings, state.admin_token)

    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, metrics=metrics)
    app.add_middleware(team_gate.GateFastPath, gate=state.gate)  # outermost: added last
    for router in (*ROUTERS, team_gate.router):
        _add_routes(app, router)
    if STATIC_DIR.is_dir():
        # Mounted last: every route above wins over a static file of the same path.
        app.router.routes.append(dashboard(STATIC_DIR))
    return app


__all__ = ["KNOWN_METHODS", "STATIC_DIR", "create_app"]
