"""The API's ASGI layer around the routes: bounded bodies, security headers, request metrics.

:class:`GuardMiddleware` wraps every route (the team gate's fast path sits outside it, see
:mod:`celery_app.ingress.gate`): it refuses an oversized or non-JSON body before any route
runs, adds the security headers to every answer, turns whatever escaped the exception
handlers into a 503, and counts each request by method, route template and status.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from celery_app.api.metrics import ApiMetrics

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
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

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_bytes(status: int, code: str, detail: str) -> tuple[int, bytes]:
    """Return ``(status, body)`` of an error answered below the framework (SPEC §6 shape)."""
    return status, json.dumps({"error": code, "detail": detail}).encode()


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
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

        headers = security_headers(str(scope.get("path", "")))

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
                await self._answer(send_counted, *error_bytes(
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
                return error_bytes(422, "invalid_request", "Content-Length is not a number"), \
                    receive
            if declared > self.max_body:
                return error_bytes(413, "payload_too_large",
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
                return error_bytes(413, "payload_too_large",
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
                return error_bytes(422, "invalid_request",
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
