"""The team gate: Traefik's forwardAuth asks it about every request to an instance.

Traefik sends each request's headers (``X-Forwarded-Host``, ``X-Forwarded-Uri``, ``Cookie``,
…) to ``GET /_ingress/gate`` and goes on to the challenge only on a 2xx, replacing the
request's ``Cookie`` and ``Authorization`` with what the gate answers (absent: removed).
Any other answer goes back to the player as it is. So the gate:

- answers an access link (``/_ctf/access/<token>``) with a redirect to ``/`` that sets the
  access cookie (HttpOnly, SameSite=Lax, Secure over HTTPS), or 403 when it is forged or
  expired;
- answers 401 without our cookie (a page pointing to the dashboard), 403 with a cookie not
  valid for this host (another team's, forged, expired);
- otherwise 200, with the ``Cookie`` header minus our cookie and ``Authorization`` unless it
  carries one of our bearer tokens. Every other header reaches the challenge unchanged.

It needs no Redis or Docker: links and cookies are HMACs bound to the host's label.
"""

from __future__ import annotations

import html
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from celery_app.auth import Unauthorized, principal_for
from celery_app.ingress import tokens
from celery_app.ingress.labels import label_of_host
from celery_app.ingress.probe import GATE_HEADER
from celery_app.ingress.routes import GATE_PATH, bind_parts
from celery_app.settings import Settings

log = logging.getLogger(__name__)

COOKIE_TTL = 12 * 3600
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;max-width:34rem;margin:4rem auto;padding:0 1rem}}
a{{color:#0b63ce}}</style></head>
<body><h1>{title}</h1><p>{text}</p>
<p><a href="{dashboard}">Open the instances dashboard</a> and use this instance's
<strong>Open</strong> button: it lets your team in.</p></body></html>
"""


def _dashboard(settings: Settings) -> str:
    if settings.dashboard_url:
        return settings.dashboard_url
    host, port = bind_parts(settings.api_bind)
    if host in ("127.0.0.1", "::1"):
        host = "localhost"
    return f"http://{host}:{port}/"


def _split_cookies(values: list[str]) -> tuple[list[str], list[str]]:
    """Split Cookie header values into our cookie's values and every other pair."""
    ours, others = [], []
    for value in values:
        for part in value.split(";"):
            pair = part.strip()
            if not pair:
                continue
            name, _, cookie = pair.partition("=")
            if name.strip() == tokens.COOKIE_NAME:
                ours.append(cookie.strip().strip('"'))
            else:
                others.append(pair)
    return ours, others


def build_router(settings: Settings, admin_token: str) -> APIRouter:
    """Return the gate's router (``GET /_ingress/gate``), bound to the settings' secrets."""
    key = tokens.gate_key(settings.flag_secret_value())
    dashboard = _dashboard(settings)
    router = APIRouter(tags=["ingress"])

    def page(status: int, title: str, text: str, why: str) -> Response:
        body = _PAGE.format(title=html.escape(title), text=html.escape(text),
                            dashboard=html.escape(dashboard, quote=True))
        return Response(body, status_code=status, media_type="text/html; charset=utf-8",
                        headers={GATE_HEADER: why, "Cache-Control": "no-store"})

    def ours(authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        try:
            principal_for(admin_token, token.strip())
        except Unauthorized:
            return False
        return True

    @router.api_route(GATE_PATH, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                          "OPTIONS"], include_in_schema=False)
    def gate(request: Request) -> Response:
        """Decide one request to an instance (Traefik forwardAuth)."""
        headers = request.headers
        forwarded_host = headers.get("x-forwarded-host") or headers.get("host", "")
        label = label_of_host(forwarded_host)
        uri = headers.get("x-forwarded-uri", "/")
        secure = headers.get("x-forwarded-proto", "http") == "https"
        # 1. an access link: check it, set the cookie, send the player to the challenge.
        if uri.startswith(tokens.LINK_PREFIX):
            token = uri[len(tokens.LINK_PREFIX):].split("?", 1)[0].split("/", 1)[0]
            verdict = tokens.verify(key, "link", label, token)
            if not verdict.ok:
                log.info("gate: %s access link refused for %s", verdict.reason, label)
                return page(403, "This link does not open this instance",
                            "The access link is expired or not valid for this instance.",
                            f"link-{verdict.reason}")
            assert verdict.principal is not None
            cookie = tokens.issue(key, "cookie", label, verdict.principal, COOKIE_TTL)
            # Absolute: Traefik would resolve a relative Location against the gate's URL.
            origin = f"{'https' if secure else 'http'}://{forwarded_host}"
            response = Response(status_code=302, headers={
                "Location": f"{origin}/", "Cache-Control": "no-store", GATE_HEADER: "access"})
            response.set_cookie(tokens.COOKIE_NAME, cookie, max_age=COOKIE_TTL, path="/",
                                httponly=True, secure=secure, samesite="lax")
            return response
        # 2. our cookie: none is 401, one not valid for this host is 403.
        ours_values, others = _split_cookies(headers.getlist("cookie"))
        if not ours_values:
            return page(401, "Open this instance from the dashboard",
                        "This instance belongs to one team; your browser has no access to it "
                        "yet.", "no-cookie")
        if not any(tokens.verify(key, "cookie", label, v).ok for v in ours_values):
            return page(403, "This instance is not yours",
                        "Your access does not cover this instance (another team's, or expired).",
                        "refused")
        # 3. through: the challenge gets every header but our cookie and our tokens.
        response = Response(status_code=200)
        if others:
            response.raw_headers.append((b"cookie", "; ".join(others).encode("latin-1")))
        for value in headers.getlist("authorization"):
            if not ours(value):
                response.raw_headers.append((b"authorization", value.encode("latin-1")))
        return response

    return router
