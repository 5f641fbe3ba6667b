"""The HTTP API of SPEC §6 (FastAPI), built by :func:`create_app`.

The API needs no Docker: it validates requests, reads instance state from Redis and sends
start/stop/extend to the workers through Celery, so it may run on another machine. Every
error, including the framework's own (validation, unknown route, wrong method, oversized
body), answers ``{"error": code, "detail": text}``; the only 5xx is 503.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path as FsPath
from typing import Annotated, Any

import kombu.exceptions
import redis.exceptions
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from celery_app.api.client import AsyncWaiter, Dispatcher, TaskView
from celery_app.api.metrics import ApiMetrics
from celery_app.core.flags import check_flag, check_in_app_flag
from celery_app.core.pool import flag_held, pool_status
from celery_app.engine.docker_driver import DockerDriver
from celery_app.errors import (
    BackendUnavailable,
    CTFError,
    InvalidRequest,
    InvalidTeamId,
    RateLimited,
    TaskNotFound,
    Unauthorized,
)
from celery_app.hosts.metrics import HostCollector
from celery_app.ingress.gate import Gate, GateFastPath
from celery_app.ingress.gate import build_router as build_gate_router
from celery_app.settings import Settings
from celery_app.vocab.models import Status
from celery_app.vocab.naming import TEAM_ID_RE
from celery_app.vocab.team_tokens import Principal, claimed_team, principal_for

log = logging.getLogger(__name__)

STATIC_DIR = FsPath(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024
EXTEND_WAIT = 10.0
HEALTH_TTL = 2.0
# Seconds an API process trusts a team's access generation it read (the process that
# revokes knows the new one at once; others within this long).
GENERATION_TTL = 1.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class FlagSubmission(BaseModel):
    """A flag a team submitted, to check against its per-team flag."""

    flag: str = Field(min_length=1, max_length=256)
    name: str | None = Field(
        None, min_length=1, max_length=200,
        description="an in-app challenge's name (OWASP Juice Shop's own flags): the flag is "
                    "then the app's HMAC-SHA1 of this name under the team's key",
    )


class ErrorBody(BaseModel):
    """Every error: a code from SPEC §6 and what happened / what to do."""

    error: str
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (401, 403, 404, 409, 413, 422, 429, 503)
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _error(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _error_bytes(status: int, code: str, detail: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": code, "detail": detail}).encode()


# -- middleware -------------------------------------------------------------------------------

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# The dashboard is plain files of our own: nothing inline, nothing from elsewhere, never framed.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; object-src 'none'; "
       "frame-ancestors 'none'")
# FastAPI's interactive docs load Swagger UI from its CDN with an inline script.
DOCS_CSP = "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
_COMMON_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def _security_headers(path: str) -> list[tuple[bytes, bytes]]:
    """Return the security headers of every response to ``path``."""
    csp = DOCS_CSP if path.startswith("/api/docs") else CSP
    headers = [(b"content-security-policy", csp.encode()), *_COMMON_HEADERS]
    if path.startswith("/api/"):
        # Answers carry tokens and per-team state: no cache keeps them.
        headers.append((b"cache-control", b"no-store"))
    return headers


class GuardMiddleware:
    """Bounds request bodies, turns any escaped exception into a 503, and counts requests.

    Our routes take no body. A body is still tolerated when it is JSON (some clients always
    send ``{}``), but one that is larger than ``max_body`` or is not JSON is refused before
    any route runs, so a garbled request can never start anything.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status_seen = [0]

        headers = _security_headers(str(scope.get("path", "")))

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        try:
            refusal, replay = await self._read_body(scope, receive)
            if refusal is not None:
                await self._answer(send_counted, *refusal)
                return
            await self.app(scope, replay, send_counted)
        except Exception:
            # Whatever escaped the exception handlers: log it, and never answer 500.
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status_seen[0] == 0:
                await self._answer(send_counted, *_error_bytes(
                    503, "backend_unavailable",
                    "the service hit an unexpected error; try again, and tell the organisers "
                    "if it persists"))
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            # Only known values become labels: a made-up method or path adds no series.
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(method if method in KNOWN_METHODS else "other",
                                         template, str(status_seen[0])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - began)

    async def _read_body(
        self, scope: Scope, receive: Receive
    ) -> tuple[tuple[int, bytes] | None, Receive]:
        """Read the whole body (bounded) and return a refusal or a receive that replays it."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return _error_bytes(422, "invalid_request", "Content-Length is not a number"), \
                    receive
            if declared > self.max_body:
                return _error_bytes(413, "payload_too_large",
                                    f"request bodies are limited to {self.max_body} bytes; "
                                    "these routes take no body"), receive
        if length is None and b"chunked" not in headers.get(b"transfer-encoding", b""):
            return None, receive
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return _error_bytes(413, "payload_too_large",
                                    f"request bodies are limited to {self.max_body} bytes"), \
                    receive
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        if body.strip():
            try:
                json.loads(body)
            except (ValueError, RecursionError) as exc:
                what = "is nested too deeply to be read" if isinstance(exc, RecursionError) \
                    else "is not JSON"
                return _error_bytes(422, "invalid_request",
                                    f"the request body {what}; these routes take no body "
                                    "(send none)"), receive
        replayed = [False]

        async def replay() -> Message:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


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


# -- health -----------------------------------------------------------------------------------


class Health:
    """Redis, Docker and live workers, cached for a couple of seconds.

    Asking the workers costs a broadcast and half a second of waiting for replies, so a busy
    load balancer hitting ``/healthz`` must not trigger one per request, nor wait for one:
    once there is an answer, a stale one is served while a background thread refreshes it.
    """

    def __init__(self, settings: Settings, dispatcher: Dispatcher, ttl: float = HEALTH_TTL) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.ttl = ttl
        self._lock = threading.Lock()
        self._first = threading.Lock()
        self._refreshing = False
        self._at = 0.0
        self._cached: tuple[dict[str, Any], bool] | None = None
        self._driver: DockerDriver | None = None
        if settings.hosts_file is None and (
            settings.docker_host or FsPath("/var/run/docker.sock").exists()
        ):
            self._driver = DockerDriver(settings.docker_host, timeout=2)

    def _workers(self) -> int:
        try:
            replies = self.dispatcher.celery.control.ping(timeout=0.5)
        except Exception as exc:  # noqa: BLE001  # any broker failure means: no worker seen
            log.warning("healthz: cannot ping workers: %s", exc)
            return 0
        return len(replies or [])

    def _measure(self) -> tuple[dict[str, Any], bool]:
        redis_ok = self.dispatcher.store.ping()
        workers = self._workers() if redis_ok else 0
        docker: bool | str = self._driver.ping() if self._driver is not None else "n/a"
        body: dict[str, Any] = {"redis": redis_ok, "docker": docker, "workers": workers}
        if redis_ok:
            with contextlib.suppress(CTFError):
                loads = self.dispatcher.host_loads()
                body["hosts"] = {"alive": sum(h.alive for h in loads), "total": len(loads)}
        return body, redis_ok and workers > 0 and docker is not False

    def _refresh(self) -> None:
        try:
            measured = self._measure()
            with self._lock:
                self._cached, self._at = measured, time.monotonic()
        finally:
            self._refreshing = False

    def peek(self) -> tuple[dict[str, Any], bool] | None:
        """Return the last answer at once (refreshing it in the background when stale).

        ``None`` only before the first answer exists: call :meth:`snapshot` then.
        """
        with self._lock:
            if self._cached is not None and time.monotonic() - self._at >= self.ttl \
                    and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, name="healthz", daemon=True).start()
            return self._cached

    def snapshot(self) -> tuple[dict[str, Any], bool]:
        """Return ``({"redis", "docker", "workers"}, usable)``, measuring it the first time."""
        cached = self.peek()
        if cached is not None:
            return cached
        with self._first:  # the first callers wait for one measurement, not one each
            if self._cached is None:
                self._refreshing = True
                self._refresh()
        assert self._cached is not None
        return self._cached

    def close(self) -> None:
        """Close the Docker client."""
        if self._driver is not None:
            self._driver.close()


class WaitSlots:
    """Bounds the requests that wait for their task at once, per team and in all.

    Used on the event loop only (no lock needed). A request over a bound is refused before
    anything is sent, so a refused ``?wait`` leaves nothing behind.
    """

    def __init__(self, per_team: int, total: int) -> None:
        self.per_team = per_team
        self.total = total
        self.used: dict[str, int] = {}
        self.used_total = 0

    def take(self, team_id: str) -> None:
        """Take a slot for ``team_id``'s waiting request.

        Raises:
            RateLimited: the team already has ``per_team`` requests waiting.
            BackendUnavailable: the API already holds ``total`` waiting requests.

        """
        if self.used.get(team_id, 0) >= self.per_team:
            raise RateLimited(
                f"team {team_id} already has {self.per_team} requests waiting for their task "
                "(CTF_API_MAX_WAITS_PER_TEAM); send it without ?wait and follow "
                "GET /api/v1/tasks/{task_id}, or wait for one to finish"
            )
        if self.used_total >= self.total:
            raise BackendUnavailable(
                f"the API already holds {self.total} requests waiting for their task "
                "(CTF_API_MAX_WAITS); send it without ?wait and follow "
                "GET /api/v1/tasks/{task_id}, or try again shortly"
            )
        self.used[team_id] = self.used.get(team_id, 0) + 1
        self.used_total += 1

    def give_back(self, team_id: str) -> None:
        """Return the slot taken by :meth:`take`."""
        self.used_total -= 1
        left = self.used.get(team_id, 1) - 1
        if left > 0:
            self.used[team_id] = left
        else:
            self.used.pop(team_id, None)

    @contextlib.contextmanager
    def held(self, team_id: str) -> Iterator[None]:
        """Hold a slot for the block (see :meth:`take`)."""
        self.take(team_id)
        try:
            yield
        finally:
            self.give_back(team_id)


# -- the app ----------------------------------------------------------------------------------


TeamId = Annotated[str, Path(
    pattern=TEAM_ID_RE.pattern, description="1-63 letters, digits, '_' or '-'",
)]
ChallengeId = Annotated[str, Path(max_length=200, description="a catalog id")]
Wait = Annotated[float | None, Query(
    gt=0, le=300, description="wait up to this many seconds for the task to finish",
)]


_bearer = HTTPBearer(auto_error=False, description="the admin token or a team token")


class AccessGenerations:
    """Teams' access generations, as team tokens are checked against them (issue 22).

    One Redis read per team and ``GENERATION_TTL`` at most, on the event loop.

    Args:
        disp: the dispatcher (its index, or its store before the index is open).
        ttl: seconds a generation read is trusted.
    """

    MAX_TEAMS = 10_000

    def __init__(self, disp: Dispatcher, ttl: float = GENERATION_TTL) -> None:
        self.disp = disp
        self.ttl = ttl
        self._seen: dict[str, tuple[float, int]] = {}

    async def get(self, team_id: str) -> int:
        """Return the team's access generation (read again after ``ttl`` seconds)."""
        now = time.monotonic()
        hit = self._seen.get(team_id)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        if self.disp.index.is_open:
            generation = await self.disp.index.access_generation(team_id)
        else:
            generation = await run_in_threadpool(self.disp.store.access_generation, team_id)
        self.note(team_id, generation, now)
        return generation

    def note(self, team_id: str, generation: int, now: float | None = None) -> None:
        """Remember a generation just read or just raised (a revocation here)."""
        now = time.monotonic() if now is None else now
        known = self._seen.get(team_id)
        if known is not None and now - known[0] < self.ttl:
            # Generations only go up: a read that started before a revocation here must not
            # bring the old one back.
            generation = max(generation, known[1])
        if len(self._seen) >= self.MAX_TEAMS:
            self._seen.clear()  # tokens naming made-up teams must not grow it without end
        self._seen[team_id] = (now, generation)


async def _who(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """Return who the request's bearer token belongs to (401 when nobody)."""
    token = creds.credentials if creds else None
    team = claimed_team(token) if token else None
    generation = await request.app.state.generations.get(team) if team else 0
    return principal_for(request.app.state.admin_token, token, generation)


Who = Annotated[Principal, Depends(_who)]


def _validation_error(exc: RequestValidationError) -> CTFError:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc[:1] == ["path"] and loc[-1:] == ["team_id"]:
            return InvalidTeamId(
                "the team id is invalid: use 1 to 63 characters, letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        problems.append(f"{' '.join(loc)}: {err.get('msg', 'invalid')}")
    return InvalidRequest("; ".join(problems)[:500] or "the request is invalid")


def _install_error_handlers(app: FastAPI) -> None:
    async def ctf_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CTFError)
        return _error(exc.status, exc.code, exc.detail)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        err = _validation_error(exc)
        return _error(err.status, err.code, err.detail)

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        status = exc.status_code if exc.status_code < 500 else 503
        detail = {
            404: "no such route; see /openapi.json for the API",
            405: "this route does not take that method; see /openapi.json",
        }.get(exc.status_code, str(exc.detail))
        return _error(status, code, detail, headers=exc.headers)

    async def backend_error(_request: Request, exc: Exception) -> Response:
        log.warning("backend unavailable: %s: %s", type(exc).__name__, exc)
        err = BackendUnavailable(
            "Redis (the state store, broker or result backend) cannot be reached; "
            "try again shortly"
        )
        return _error(err.status, err.code, err.detail)

    app.add_exception_handler(CTFError, ctf_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for cls in (redis.exceptions.RedisError, kombu.exceptions.OperationalError,
                ConnectionError, TimeoutError):
        app.add_exception_handler(cls, backend_error)


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
    health = Health(settings, disp)
    waiter = AsyncWaiter(disp, settings.api_max_waits)
    slots = WaitSlots(settings.api_max_waits_per_team, settings.api_max_waits)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await waiter.open()
        await disp.index.open()
        yield
        await disp.index.close()
        await waiter.close()
        health.close()
        disp.close()

    app = FastAPI(
        title="CTF instancer",
        version="1",
        description="Per-team CTF challenge instances on demand (SPEC §6).",
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.admin_token = settings.admin_token_value()
    app.state.dispatcher = disp
    app.state.generations = AccessGenerations(disp)
    app.state.metrics = metrics
    _install_error_handlers(app)
    app.add_middleware(GuardMiddleware, metrics=metrics)
    _instance_routes(app, disp, metrics, waiter, slots)
    _admin_routes(app, disp)
    _team_access_routes(app, disp)
    _operations_routes(app, health, metrics, settings)
    # SPEC §11: the team gate (Traefik's forwardAuth), answered ahead of everything else.
    gate = Gate(settings, app.state.admin_token)
    app.include_router(build_gate_router(gate))
    app.add_middleware(GateFastPath, gate=gate)
    if STATIC_DIR.is_dir():
        # Mounted last: every route above wins over a static file of the same path.
        app.router.routes.append(DashboardMount(
            "/", app=StaticFiles(directory=STATIC_DIR, html=True), name="dashboard"))
    return app


def _failed(metrics: ApiMetrics, task: str, view: TaskView) -> CTFError:
    """Count a task's failure and return its error, to be raised."""
    assert view.error is not None
    metrics.task_failures.labels(task, view.error.code).inc()
    return view.error


async def _send_then_wait(
    slots: WaitSlots, waiter: AsyncWaiter, team_id: str, wait: float | None,
    send: Callable[[], tuple[str, dict[str, Any]]],
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


def _instance_routes(
    app: FastAPI, disp: Dispatcher, metrics: ApiMetrics, waiter: AsyncWaiter, slots: WaitSlots
) -> None:
    """Register the routes of one team's instances (admin or that team).

    They are coroutines: the quick parts (Redis reads, sending the task) run in the thread
    pool, and a wait runs on the event loop (:class:`AsyncWaiter`), holding no thread.
    """

    @app.put("/api/v1/teams/{team_id}/instances/{challenge}", status_code=202,
             responses={**_ERRORS, 200: {"description": "the running instance (with ?wait)"}},
             tags=["instances"])
    async def start_instance(
        team_id: TeamId, challenge: ChallengeId, who: Who, wait: Wait = None
    ) -> JSONResponse:
        """Start the team's instance (idempotent): 202 with the task id and the instance so far.

        With ``?wait=N``: 200 with the running instance once it runs, the task's error when
        it failed, or 202 when it is not done within N seconds. A start while another start
        of the instance is pending answers that same task.
        """
        who.require_team(team_id)
        began = time.monotonic()
        task_id, so_far, view = await _send_then_wait(
            slots, waiter, team_id, wait, lambda: disp.start(disp.key(challenge, team_id)))
        metrics.tasks_sent.labels("start_container", challenge).inc()
        if view is None:
            return JSONResponse({"task_id": task_id, **so_far}, status_code=202)
        if view.error is not None:
            raise _failed(metrics, "start_container", view)
        if not view.ready:
            record = await run_in_threadpool(disp.store.get, challenge, team_id)
            current = record.public() if record else so_far
            return JSONResponse({"task_id": task_id, **current}, status_code=202)
        metrics.start_duration.labels(challenge).observe(time.monotonic() - began)
        return JSONResponse(view.result, status_code=200)  # with access_url (the task's)

    # The platform's polling lands here: read on the event loop in one Redis round trip,
    # answered as a ready JSONResponse (PERFORMANCE.md §8).
    @app.get("/api/v1/teams/{team_id}/instances", responses=_ERRORS, tags=["instances"],
             response_model=dict[str, Any])
    async def list_team_instances(team_id: TeamId, who: Who) -> JSONResponse:
        """Return the team's instances, from the Redis index: ``{"instances": [...]}``."""
        who.require_team(team_id)
        return JSONResponse({"instances": await disp.shown_team(team_id)})

    @app.get("/api/v1/teams/{team_id}/instances/{challenge}", responses=_ERRORS,
             tags=["instances"], response_model=dict[str, Any])
    async def get_instance(team_id: TeamId, challenge: ChallengeId, who: Who) -> JSONResponse:
        """Return the team's instance of a challenge, or 404 ``instance_not_found``.

        On a host whose worker is gone it is not shown as running: ``host_up`` is false.
        """
        who.require_team(team_id)
        return JSONResponse(await disp.shown_instance(challenge, team_id))

    @app.delete("/api/v1/teams/{team_id}/instances/{challenge}", status_code=202,
                responses={**_ERRORS, 200: {"description": "stopped (with ?wait)"}},
                tags=["instances"])
    async def stop_instance(
        team_id: TeamId, challenge: ChallengeId, who: Who, wait: Wait = None
    ) -> JSONResponse:
        """Stop and remove the instance: 202, or 200 with ``?wait=N``; 404 when there is none."""
        who.require_team(team_id)
        task_id, so_far, view = await _send_then_wait(
            slots, waiter, team_id, wait, lambda: disp.stop(disp.key(challenge, team_id)))
        metrics.tasks_sent.labels("stop_container", challenge).inc()
        if view is None:
            return JSONResponse({"task_id": task_id, **so_far}, status_code=202)
        if view.error is not None:
            raise _failed(metrics, "stop_container", view)
        if not view.ready:
            return JSONResponse({"task_id": task_id, **so_far}, status_code=202)
        return JSONResponse(view.result, status_code=200)

    @app.post("/api/v1/teams/{team_id}/instances/{challenge}/extend", responses=_ERRORS,
              tags=["instances"])
    async def extend_instance(team_id: TeamId, challenge: ChallengeId, who: Who) -> JSONResponse:
        """Push ``expires_at`` out by the challenge's ttl, up to its maximum lifetime.

        200 with the instance once extended (it waits a few seconds), else 202 with the task.
        """
        who.require_team(team_id)
        try:
            slots.take(team_id)
        except CTFError:
            # No slot to wait in: the extend is still sent, and followed through its task.
            task_id = await run_in_threadpool(lambda: disp.extend(disp.key(challenge, team_id)))
            metrics.tasks_sent.labels("extend_container", challenge).inc()
            return JSONResponse({"task_id": task_id, "state": "PENDING"}, status_code=202)
        try:
            task_id = await run_in_threadpool(lambda: disp.extend(disp.key(challenge, team_id)))
            metrics.tasks_sent.labels("extend_container", challenge).inc()
            view = await waiter.wait(task_id, EXTEND_WAIT)
        finally:
            slots.give_back(team_id)
        if view.error is not None:
            raise _failed(metrics, "extend_container", view)
        if not view.ready:
            return JSONResponse({"task_id": task_id, "state": view.state}, status_code=202)
        return JSONResponse(view.result, status_code=200)


def _admin_routes(app: FastAPI, disp: Dispatcher) -> None:
    """Register the catalog, token, all-instances and task routes."""

    @app.get("/api/v1/challenges", responses=_ERRORS, tags=["challenges"])
    def list_challenges(_who: Who) -> dict[str, Any]:
        """Return the catalog: id, name, protocol, ttl and maximum lifetime of each challenge."""
        return {"challenges": [ch.public_view() for ch in disp.catalog]}

    @app.post("/api/v1/teams/{team_id}/flags/{challenge}", responses=_ERRORS, tags=["admin"])
    def check_team_flag(
        team_id: TeamId, challenge: ChallengeId, body: FlagSubmission, who: Who
    ) -> dict[str, Any]:
        """Check a flag a team submitted for a challenge (admin only, constant time).

        With ``name``, the flag is one of the app's own in-app flags (OWASP Juice Shop's):
        the hex HMAC-SHA1 of ``name`` under the key the team's container received in the
        challenge's ``flag_env`` variable (``CTF_KEY`` for juice-shop).
        """
        who.require_admin()
        ch = disp.catalog.get(challenge)
        settings = disp.settings
        if body.name is not None and ch.flag_env is None:
            raise InvalidRequest(
                f"challenge {ch.id!r} gives its containers no per-team key (it has no "
                "'flag_env' in the catalog), so it has no in-app flags to check by name; "
                "leave out 'name' or set flag_env (juice-shop: CTF_KEY)")
        if body.name is None:
            correct = check_flag(settings.flag_secret_value(), ch.id, team_id, body.flag,
                                 settings.flag_format)
        else:
            correct = check_in_app_flag(settings.flag_secret_value(), ch.id, team_id,
                                        body.name, body.flag, settings.flag_format)
        # Warm pools (issue 14): the flags of the pool containers this team has held.
        correct = flag_held(disp.store.pools, settings.flag_secret_value(), ch.id,
                            team_id, body.flag, settings.flag_format, body.name) or correct
        return {"team_id": team_id, "challenge": ch.id, "correct": correct}

    # -- warm pools (issue 14) ---------------------------------------------------------------

    @app.get("/api/v1/pools", responses=_ERRORS, tags=["admin"])
    def list_pools(who: Who) -> dict[str, Any]:
        """Each warm pool of each host: size, unclaimed containers, ready, claims, misses."""
        who.require_admin()
        return {"pools": pool_status(disp.store.pools, disp.catalog,
                                     list(disp.hosts))}

    @app.post("/api/v1/pools/{challenge}/drain", responses=_ERRORS, tags=["admin"])
    def drain_pool(challenge: ChallengeId, who: Who) -> dict[str, Any]:
        """Remove the challenge's unclaimed pool containers (each host's next pass, ≤ 10 s).

        Do it after pulling a new image: the pools then refill from the new one.
        """
        who.require_admin()
        ch = disp.catalog.get(challenge)
        return {"challenge": ch.id, "drained_at": disp.store.pools.drain(ch.id)}

    @app.get("/api/v1/instances", responses=_ERRORS, tags=["admin"])
    def list_instances(
        who: Who,
        challenge: Annotated[str | None, Query(max_length=200)] = None,
        status: Annotated[Status | None, Query()] = None,
    ) -> dict[str, Any]:
        """Return every instance (admin only), filtered by ``?challenge=`` and ``?status=``."""
        who.require_admin()
        if challenge is not None:
            disp.catalog.get(challenge)
        found = disp.present(disp.store.list(challenge=challenge))
        return {"instances": [i for i in found if status in (None, i["status"])]}

    @app.get("/api/v1/capacity", responses=_ERRORS, tags=["admin"])
    def capacity(who: Who) -> dict[str, Any]:
        """Return instances in use against ``CTF_MAX_INSTANCES``, total and per host (admin).

        Each host of ``CTF_HOSTS_FILE`` (SPEC §10) shows ``used``, its ``max`` and ``room``,
        and ``alive``: whether its worker sends heartbeats (new instances go only there).
        """
        who.require_admin()
        per_host: dict[str, int] = {}
        for inst in disp.store.list():
            per_host[inst.host] = per_host.get(inst.host, 0) + 1
        hosts = []
        for load in disp.host_loads():
            per_host.pop(load.name, None)
            hosts.append({"host": load.name, **load.as_dict()})
        # Instances on a host no longer in the hosts file: shown, with no worker of ours.
        hosts += [{"host": h, "used": n, "alive": False} for h, n in sorted(per_host.items())]
        return {
            "used": sum(h["used"] for h in hosts),
            "limit": disp.settings.max_instances,
            "per_team_limit": disp.settings.max_instances_per_team,
            "hosts": hosts,
        }

    @app.get("/api/v1/tasks/{task_id}", responses=_ERRORS, tags=["tasks"])
    def get_task(
        task_id: Annotated[str, Path(max_length=200)], who: Who
    ) -> dict[str, Any]:
        """Return the task's state, ``progress`` while it runs, then ``result`` or ``error``."""
        owner = disp.owner_of(task_id)
        if owner is None and not (who.is_admin and disp.exists(task_id)):
            raise TaskNotFound(f"no task {task_id[:80]!r} is known; tasks are kept one day")
        if owner is not None and not who.is_admin and owner != who.team_id:
            who.require_admin()
        return disp.view(task_id).public()


def _team_access_routes(app: FastAPI, disp: Dispatcher) -> None:
    """Register the team token and its revocation (admin only)."""

    @app.get("/api/v1/teams/{team_id}/token", responses=_ERRORS, tags=["admin"])
    def issue_team_token(team_id: TeamId, who: Who) -> dict[str, str]:
        """Issue the team's token (admin only); it acts on that team's routes only."""
        who.require_admin()
        return {"team_id": team_id, "token": disp.team_token(team_id)}

    @app.post("/api/v1/teams/{team_id}/revoke", responses=_ERRORS, tags=["admin"])
    def revoke_team_access(team_id: TeamId, who: Who, request: Request) -> dict[str, Any]:
        """Revoke the team's token, access links and cookies (admin only).

        For a member who left or a link that leaked: the old token is refused at once (the
        answer carries the new one), and within ``hosts_move_within_s`` seconds every
        running instance of the team moves to a new host name (HTTP and TCP): the old name
        answers 404 and the old cookies and links open nothing. The team opens its
        instances again from the dashboard (a fresh ``access_url``).
        """
        who.require_admin()
        revoked = disp.revoke_access(team_id)
        request.app.state.generations.note(revoked["team_id"], revoked["generation"])
        log.warning("access of team %s revoked (generation %d)", revoked["team_id"],
                    revoked["generation"])
        return revoked


def _operations_routes(app: FastAPI, health: Health, metrics: ApiMetrics,
                       settings: Settings) -> None:
    """Register ``/healthz`` and ``/metrics`` (no token: load balancers and Prometheus).

    With ``CTF_METRICS_TOKEN`` set, ``/metrics`` asks for it (or the admin token) as a bearer
    token.
    """
    allowed: list[bytes] = []
    if settings.metrics_token is not None:
        allowed = [settings.metrics_token.get_secret_value().encode(),
                   app.state.admin_token.encode()]

    @app.get("/healthz", tags=["operations"],
             responses={503: {"description": "Redis down or no worker answers"}})
    async def healthz() -> JSONResponse:
        """Report Redis, Docker (``"n/a"`` when the API has no engine) and live workers."""
        cached = health.peek()
        body, usable = cached if cached is not None else await run_in_threadpool(
            health.snapshot)
        return JSONResponse(body, status_code=200 if usable else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={401: {"model": ErrorBody}})
    def prometheus_metrics(
        creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> Response:
        """Expose instances, requests, tasks and start durations in Prometheus text format.

        Counts, not one series per instance; the Redis-backed ones are read at most every
        two seconds. With ``CTF_METRICS_TOKEN`` set, it needs that bearer token (or the
        admin token).
        """
        if allowed:
            given = (creds.credentials if creds else "").encode("utf-8", "surrogateescape")
            if not any(hmac.compare_digest(given, a) for a in allowed):
                raise Unauthorized("/metrics needs 'Authorization: Bearer <CTF_METRICS_TOKEN>' "
                                   "(or the admin token); configure your Prometheus with it")
        data, content_type = metrics.render()
        return Response(content=data, media_type=content_type)


__all__ = ["create_app"]
