"""The team gate in the API: what Traefik asks about the requests it cannot decide alone.

With ``CTF_INGRESS_GATE=plugin`` (the default) our Traefik plugin (``plugin/ctfgate``) admits
a request with a valid access cookie itself and asks here only about access links, denials
and requests with a bearer token other than a JWT; with ``forwardauth`` Traefik asks about
every request. Either sends the request's headers (``X-Forwarded-Host``,
``X-Forwarded-Uri``, ``Cookie``, …) to ``GET /_ingress/gate`` and goes on to the challenge only
on a 2xx, replacing the request's ``Cookie`` and ``Authorization`` with what the gate answers
(absent: removed). Any other answer goes back to the player as it is. So the gate:

- answers an access link (``/_ctf/access/<token>``) with a redirect to ``/`` that sets the
  access cookie (HttpOnly, SameSite=Lax; over HTTPS Secure and named with the ``__Host-``
  prefix), or 403 when it is forged or expired. The scheme is ``X-Forwarded-Proto`` as the
  plugin sends it: ``https`` when Traefik got TLS, or when a front proxy of
  ``CTF_INGRESS_TRUSTED_PROXIES`` says so;
- answers 401 without our cookie (a page pointing to the dashboard), 403 with a cookie not
  valid for this host (another team's, forged, expired);
- otherwise 200, with the ``Cookie`` header minus our cookie and ``Authorization`` unless it
  carries one of our bearer tokens. Every other header reaches the challenge unchanged.

It needs no Redis or Docker: links and cookies are HMACs bound to the host's label.

Every request to an instance pays for this round trip, so :class:`GateFastPath` answers
``/_ingress/gate`` in front of the rest of the API (no routing, no per-request metrics);
the plain ``router`` here (which finds the :class:`Gate` on ``app.state.gate``) gives the
same answers where the fast path is not installed.
"""

from __future__ import annotations

import hmac
import html
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from celery_app.ingress import tokens
from celery_app.ingress.labels import label_of_host
from celery_app.ingress.probe import GATE_HEADER
from celery_app.ingress.routes import GATE_PATH, bind_parts
from celery_app.settings import Settings
from celery_app.vocab.team_tokens import looks_like_team_token

log = logging.getLogger(__name__)

COOKIE_TTL = 12 * 3600
Headers = list[tuple[bytes, bytes]]
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;max-width:34rem;margin:4rem auto;padding:0 1rem}}
a{{color:#0b63ce}}</style></head>
<body><h1>{title}</h1><p>{text}</p>
<p><a href="{dashboard}">Open the instances dashboard</a> and use this instance's
<strong>Open</strong> button: it lets your team in.</p></body></html>
"""
_COOKIES = tuple(name.encode() for name in tokens.COOKIE_NAMES)


def _dashboard(settings: Settings) -> str:
    if settings.dashboard_url:
        return settings.dashboard_url
    host, port = bind_parts(settings.api_bind)
    if host in ("127.0.0.1", "::1"):
        host = "localhost"
    return f"http://{host}:{port}/"


def split_cookies(values: list[bytes]) -> tuple[list[str], list[bytes]]:
    """Split Cookie header values into our cookies' values and every other pair (as sent).

    Ours are both names: the plain one (set over HTTP) and the ``__Host-`` one (over HTTPS).
    """
    ours: list[str] = []
    others: list[bytes] = []
    for value in values:
        for part in value.split(b";"):
            pair = part.strip()
            if not pair:
                continue
            name, _, cookie = pair.partition(b"=")
            if name.strip() in _COOKIES:
                ours.append(cookie.strip().strip(b'"').decode("latin-1"))
            else:
                others.append(pair)
    return ours, others


class Gate:
    """The gate's decisions, bound to the settings' secrets.

    Args:
        settings: the settings (the flag secret signs links and cookies).
        admin_token: the admin token (our bearer tokens are removed from requests).
    """

    def __init__(self, settings: Settings, admin_token: str) -> None:
        self.key = tokens.gate_key(settings.flag_secret_value())
        self.admin_token = admin_token
        self.dashboard = _dashboard(settings)
        self.pages = {
            why: self._page(title, text)
            for why, title, text in (
                ("no-cookie", "Open this instance from the dashboard",
                 "This instance belongs to one team; your browser has no access to it yet."),
                ("refused", "This instance is not yours",
                 "Your access does not cover this instance (another team's, or expired)."),
                ("link", "This link does not open this instance",
                 "The access link is expired or not valid for this instance."),
            )
        }

    def _page(self, title: str, text: str) -> bytes:
        return _PAGE.format(title=html.escape(title), text=html.escape(text),
                            dashboard=html.escape(self.dashboard, quote=True)).encode()

    def _denied(self, status: int, page: str, why: str) -> tuple[int, Headers, bytes]:
        body = self.pages[page]
        return status, [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (GATE_HEADER.lower().encode(), why.encode()),
        ], body

    def _ours(self, authorization: bytes) -> bool:
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        # Any team token, of any access generation (the gate reads no Redis): a revoked
        # token is no secret the challenge should see either.
        return hmac.compare_digest(token.encode("latin-1"), self.admin_token.encode()) \
            or looks_like_team_token(token)

    def decide(self, headers: Headers) -> tuple[int, Headers, bytes]:
        """Answer one forwardAuth request.

        Args:
            headers: the request's raw headers (lower-case names), as Traefik sent them.

        Returns:
            ``(status, headers, body)`` of the answer.
        """
        host = uri = proto = b""
        cookies: list[bytes] = []
        authorizations: list[bytes] = []
        for name, value in headers:
            if name == b"x-forwarded-host":
                host = value
            elif name == b"x-forwarded-uri":
                uri = value
            elif name == b"x-forwarded-proto":
                proto = value
            elif name == b"cookie":
                cookies.append(value)
            elif name == b"authorization":
                authorizations.append(value)
        forwarded_host = host.decode("latin-1")
        label = label_of_host(forwarded_host)
        path = uri.decode("latin-1") or "/"
        secure = proto == b"https"
        # 1. an access link: check it, set the cookie, send the player to the challenge.
        if path.startswith(tokens.LINK_PREFIX):
            token = path[len(tokens.LINK_PREFIX):].split("?", 1)[0].split("/", 1)[0]
            verdict = tokens.verify(self.key, "link", label, token)
            if not verdict.ok:
                log.info("gate: %s access link refused for %s", verdict.reason, label)
                return self._denied(403, "link", f"link-{verdict.reason}")
            assert verdict.principal is not None
            cookie = tokens.issue(self.key, "cookie", label, verdict.principal, COOKIE_TTL)
            # Absolute: Traefik would resolve a relative Location against the gate's URL.
            location = f"{'https' if secure else 'http'}://{forwarded_host}/"
            # Over HTTPS the __Host- name: Secure, Path=/ and no Domain, or browsers drop it.
            cookie_name = tokens.SECURE_COOKIE_NAME if secure else tokens.COOKIE_NAME
            set_cookie = (f"{cookie_name}={cookie}; HttpOnly; Max-Age={COOKIE_TTL}; "
                          f"Path=/; SameSite=Lax{'; Secure' if secure else ''}")
            return 302, [
                (b"location", location.encode("latin-1")),
                (b"set-cookie", set_cookie.encode()),
                (b"cache-control", b"no-store"),
                (b"content-length", b"0"),
                (GATE_HEADER.lower().encode(), b"access"),
            ], b""
        # 2. our cookie: none is 401, one not valid for this host is 403.
        ours, others = split_cookies(cookies)
        if not ours:
            return self._denied(401, "no-cookie", "no-cookie")
        if not any(tokens.verify(self.key, "cookie", label, v).ok for v in ours):
            return self._denied(403, "refused", "refused")
        # 3. through: the challenge gets every header but our cookie and our tokens.
        answer: Headers = [(b"content-length", b"0")]
        if others:
            answer.append((b"cookie", b"; ".join(others)))
        answer += [(b"authorization", a) for a in authorizations if not self._ours(a)]
        return 200, answer, b""


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class GateFastPath:
    """Answers ``/_ingress/gate`` before the rest of the API runs (pure ASGI).

    Args:
        app: the API.
        gate: the gate's decisions.
    """

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http" or scope.get("path") != GATE_PATH:
            await self.app(scope, receive, send)
            return
        status, headers, body = self.gate.decide(list(scope.get("headers") or []))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


router = APIRouter(tags=["ingress"])


@router.api_route(GATE_PATH, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
                  include_in_schema=False)
async def gate_route(request: Request) -> Response:
    """Decide one request to an instance (Traefik forwardAuth), by the app's ``state.gate``."""
    gate: Gate = request.app.state.gate
    status, headers, body = gate.decide(list(request.scope.get("headers") or []))
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response
