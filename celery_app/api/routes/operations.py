"""What runs the service: ``/healthz`` and ``/metrics`` (no token: load balancers, Prometheus).

With ``CTF_METRICS_TOKEN`` set, ``/metrics`` asks for it (or the admin token) as a bearer
token. The dashboard's static files are mounted at ``/`` by :func:`dashboard`, after every
route (``/openapi.json`` and ``/api/docs`` are FastAPI's own).
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match, Mount
from starlette.types import Scope

from celery_app.api.deps import Bearer, ErrorBody, HealthDep, Metrics, SettingsDep
from celery_app.errors import Unauthorized
from celery_app.settings import Settings

router = APIRouter()


def metrics_tokens(settings: Settings) -> list[bytes]:
    """Return the bearer tokens ``/metrics`` accepts (none asked when empty)."""
    if settings.metrics_token is None:
        return []
    return [settings.metrics_token.get_secret_value().encode(),
            settings.admin_token_value().encode()]


@router.get("/healthz", tags=["operations"],
            responses={503: {"description": "Redis down or no worker answers"}})
async def healthz(health: HealthDep) -> JSONResponse:
    """Report Redis, Docker (``"n/a"`` when the API has no engine) and live workers."""
    cached = health.peek()
    body, usable = cached if cached is not None else await run_in_threadpool(
        health.snapshot)
    return JSONResponse(body, status_code=200 if usable else 503)


@router.get("/metrics", tags=["operations"], response_class=Response,
            responses={401: {"model": ErrorBody}})
def prometheus_metrics(creds: Bearer, metrics: Metrics, settings: SettingsDep) -> Response:
    """Expose instances, requests, tasks and start durations in Prometheus text format.

    Counts, not one series per instance; the Redis-backed ones are read at most every
    two seconds. With ``CTF_METRICS_TOKEN`` set, it needs that bearer token (or the
    admin token).
    """
    allowed = metrics_tokens(settings)
    if allowed:
        given = (creds.credentials if creds else "").encode("utf-8", "surrogateescape")
        if not any(hmac.compare_digest(given, a) for a in allowed):
            raise Unauthorized("/metrics needs 'Authorization: Bearer <CTF_METRICS_TOKEN>' "
                               "(or the admin token); configure your Prometheus with it")
    data, content_type = metrics.render()
    return Response(content=data, media_type=content_type)


class DashboardMount(Mount):
    """The dashboard's static files at ``/``, never answering for ``/api/…``.

    A mount at ``/`` matches every path, so without this a wrong method on an API route
    (``GET …/extend``) would fall through to the static files and answer 404 instead of 405.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """Match like a mount, except under ``/api/``."""
        if str(scope.get("path", "")).startswith("/api/"):
            return Match.NONE, {}
        return super().matches(scope)


def dashboard(static_dir: Path) -> DashboardMount:
    """Return the mount of the dashboard's files in ``static_dir`` (append it last)."""
    return DashboardMount("/", app=StaticFiles(directory=static_dir, html=True), name="dashboard")
