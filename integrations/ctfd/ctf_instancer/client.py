"""Server-side client of the instancer's HTTP API (SPEC §6), for the CTFd plugin.

Everything here runs inside CTFd's server. The instancer's URL and admin token are read from
environment variables or from the plugin's own settings table (never CTFd's ``configs``
table, which CTFd's admin API hands to browsers), and no token ever leaves this process.
Player actions use the team's own token, so a mistake elsewhere in the plugin still cannot
act on another team's instance.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

TEAM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")
DEFAULT_PREFIX = "ctfd"
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 40.0
STOP_WAIT = 30
MAX_FLAG = 256  # the API's limit on a submitted flag

# The plugin's settings page, by the one name the admin menu, the page and the docs use.
SETTINGS_PAGE = "Admin > Instancer > Settings"

UNREACHABLE = ("The instancer cannot be reached right now; try again in a minute, and tell "
               "the organisers if it persists.")


class InstancerError(Exception):
    """Raised when the instancer refuses a request or cannot be reached.

    ``detail`` is the instancer's own words (its ``detail`` field), fit to show a player.
    """

    def __init__(self, detail: str, status: int = 503, code: str = "backend_unavailable"):
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code


class NotConfigured(InstancerError):
    """Raised when no instancer URL or admin token is set."""

    def __init__(self, detail: str):
        super().__init__(detail, 503, "not_configured")


@dataclass(frozen=True)
class Connection:
    """Where the instancer is and how to authenticate, with where each value came from.

    ``url_env``, ``token_env`` and ``prefix_env`` name the environment variable that sets
    the value in use, or are ``None`` when the settings page sets it: a field set by the
    environment is shown read-only there, and a form post never overwrites it.
    """

    url: str | None
    admin_token: str | None
    prefix: str
    url_source: str
    token_source: str
    prefix_source: str
    url_env: str | None = None
    token_env: str | None = None
    prefix_env: str | None = None


# -- the saved admin token: sealed, and bound to the URL it was saved for --------------------

SEALED_PREFIX = "sealed1:"


def _keys(secret: bytes) -> tuple[bytes, bytes]:
    """The cipher and MAC keys derived from ``secret`` (CTFd's SECRET_KEY)."""
    return (hmac.new(secret, b"ctf_instancer token cipher", hashlib.sha256).digest(),
            hmac.new(secret, b"ctf_instancer token mac", hashlib.sha256).digest())


def _stream(key: bytes, nonce: bytes, length: int) -> bytes:
    blocks = (hmac.new(key, nonce + i.to_bytes(4, "big"), hashlib.sha256).digest()
              for i in range((length + 31) // 32))
    return b"".join(blocks)[:length]


def seal_token(secret: bytes, url: str, token: str) -> str:
    """Encrypt and authenticate ``token`` together with the ``url`` it may be sent to.

    The sealed value is what the plugin's table holds, so CTFd's backup export (which
    includes every table) carries no usable token: opening it needs CTFd's SECRET_KEY, which
    is not in the database. The URL inside cannot be changed without the key either.
    """
    cipher, mac = _keys(secret)
    nonce = secrets.token_bytes(16)
    plain = json.dumps({"url": url.rstrip("/"), "token": token}).encode()
    body = bytes(a ^ b for a, b in zip(plain, _stream(cipher, nonce, len(plain)), strict=True))
    tag = hmac.new(mac, nonce + body, hashlib.sha256).digest()
    return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + tag + body).decode()


def open_token(secret: bytes, sealed: str) -> tuple[str, str] | None:
    """Return ``(url, token)`` of a value :func:`seal_token` made, or ``None``.

    ``None`` for anything else: another key (a backup restored into another CTFd), a changed
    value, or a token an older version of the plugin saved in plain text.
    """
    if not sealed.startswith(SEALED_PREFIX):
        return None
    try:
        raw = base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX):].encode())
    except ValueError:
        return None
    nonce, tag, body = raw[:16], raw[16:48], raw[48:]
    cipher, mac = _keys(secret)
    if len(tag) != 32 or not hmac.compare_digest(
            tag, hmac.new(mac, nonce + body, hashlib.sha256).digest()):
        return None
    plain = bytes(a ^ b for a, b in zip(body, _stream(cipher, nonce, len(body)), strict=True))
    try:
        value = json.loads(plain)
        return str(value["url"]), str(value["token"])
    except (ValueError, KeyError, TypeError):
        return None


def _env_token() -> tuple[str | None, str, str | None]:
    """The environment's token, where it came from, and the variable (when one is in use)."""
    token = os.environ.get("CTF_INSTANCER_ADMIN_TOKEN", "").strip()
    if token:
        return (token, "the CTF_INSTANCER_ADMIN_TOKEN environment variable",
                "CTF_INSTANCER_ADMIN_TOKEN")
    path = os.environ.get("CTF_INSTANCER_ADMIN_TOKEN_FILE", "").strip()
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError:
            return None, f"CTF_INSTANCER_ADMIN_TOKEN_FILE ({path}: cannot be read)", None
        return (value or None, f"the file {path} (CTF_INSTANCER_ADMIN_TOKEN_FILE)",
                "CTF_INSTANCER_ADMIN_TOKEN_FILE" if value else None)
    return None, "", None


def resolve(stored: dict[str, str]) -> Connection:
    """Return the connection: environment variables first, then the admin page's values.

    A token saved on the admin page is used only with the URL it was saved for
    (``token_url``): saving another URL never sends it anywhere new; the organiser enters the
    token again for the new URL. A token from the environment is the operator's, and is used
    with whatever URL is in use.

    Args:
        stored: the values saved on the plugin's admin page (``url``, ``prefix``, and the
            opened ``token`` with its ``token_url``).

    Returns:
        The connection; ``url`` or ``admin_token`` is ``None`` when neither source sets it.
    """
    env_url = os.environ.get("CTF_INSTANCER_URL", "").strip()
    url, url_source = (env_url, "the CTF_INSTANCER_URL environment variable") if env_url \
        else (stored.get("url") or None, "the admin page" if stored.get("url") else "")
    token, token_source, token_env = _env_token()
    if token is None and stored.get("token"):
        if (stored.get("token_url") or "").rstrip("/") == (url or "").rstrip("/"):
            token, token_source = stored["token"], "the admin page"
        else:
            token_source = ("the admin page, saved for another URL: enter the token again "  # noqa: S105
                            "for this one")
    env_prefix = os.environ.get("CTF_INSTANCER_TEAM_PREFIX", "").strip()
    if env_prefix:
        prefix, prefix_source = env_prefix, "the CTF_INSTANCER_TEAM_PREFIX environment variable"
    elif stored.get("prefix"):
        prefix, prefix_source = stored["prefix"], "the admin page"
    else:
        prefix, prefix_source = DEFAULT_PREFIX, "the default"
    if not PREFIX_RE.fullmatch(prefix):
        prefix, prefix_source = DEFAULT_PREFIX, "the default (the configured prefix is invalid)"
    return Connection(url.rstrip("/") if url else None, token, prefix,
                      url_source, token_source, prefix_source,
                      url_env="CTF_INSTANCER_URL" if env_url else None,
                      token_env=token_env,
                      prefix_env="CTF_INSTANCER_TEAM_PREFIX" if env_prefix else None)


def team_id_for(prefix: str, kind: str, number: int) -> str:
    """Return the instancer team id of a CTFd team (``kind`` "t") or user (``kind`` "u").

    Raises:
        ValueError: when the result would break the instancer's team-id rule.
    """
    team_id = f"{prefix}-{kind}{int(number)}"
    if kind not in ("t", "u") or not TEAM_ID_RE.fullmatch(team_id):
        raise ValueError(f"{team_id!r} is not a valid instancer team id")
    return team_id


def parse_team_id(prefix: str, team_id: str) -> tuple[str, int] | None:
    """Return ``(kind, number)`` of one of this CTFd's team ids, or ``None`` for others."""
    match = re.fullmatch(re.escape(prefix) + r"-([tu])(\d{1,18})", team_id)
    return (match.group(1), int(match.group(2))) if match else None


def _web(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def link_target(inst: dict[str, Any] | None, endpoint: int | None = None) -> str | None:
    """Return where a player's click on their instance's link goes.

    The ingress's signed ``access_url`` when the instance has one (it sets the team's access
    cookie on the way), else its ``url``; only http(s) addresses (a TCP instance has none).
    With ``endpoint``, the same for that endpoint of a Compose instance (SPEC §12's
    ``endpoints``, by position); an instance without that list has its one endpoint, 0.
    """
    source: Any = inst or {}
    if endpoint is not None:
        endpoints = source.get("endpoints") or []
        if not endpoints:
            if endpoint != 0:
                return None
        elif 0 <= endpoint < len(endpoints) and isinstance(endpoints[endpoint], dict):
            source = endpoints[endpoint]
        else:
            return None
    for key in ("access_url", "url"):
        value = source.get(key)
        if _web(value):
            return str(value)
    return None


# Host names, IPv4 and bracketed IPv6 only: nothing that could break out of a copied line.
_TLS_URL = re.compile(r"^tls://([A-Za-z0-9.-]+):(\d{1,5})$")
_TCP_URL = re.compile(r"^tcp://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")


def connection_lines(url: Any) -> list[dict[str, str]]:
    """Return the lines a player copies to reach a TCP instance at ``url`` (issue 25).

    Behind the ingress (``tls://host:port``) the service speaks TLS with the host as SNI:
    ``ncat --ssl``, ``openssl s_client`` and pwntools' ``remote(…, ssl=True, sni=…)``. A
    published port (``tcp://host:port``) is plain TCP: ``nc`` and pwntools' ``remote``.
    Anything else (a web URL, nothing) has none. Each line is ``{"tool", "line"}``.
    """
    text = url if isinstance(url, str) else ""
    tls = _TLS_URL.match(text)
    if tls:
        host, port = tls.groups()
        return [
            {"tool": "ncat", "line": f"ncat --ssl {host} {port}"},
            {"tool": "openssl",
             "line": f"openssl s_client -quiet -connect {host}:{port} -servername {host}"},
            {"tool": "pwntools", "line": f'remote("{host}", {port}, ssl=True, sni="{host}")'},
        ]
    tcp = _TCP_URL.match(text)
    if tcp:
        host, port = tcp.group(1).strip("[]"), tcp.group(2)
        return [{"tool": "nc", "line": f"nc {host} {port}"},
                {"tool": "pwntools", "line": f'remote("{host}", {port})'}]
    return []


def endpoint_links(inst: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Return a Compose instance's endpoints as the player's modal lists them (SPEC §12).

    One entry per endpoint, in the instance's order (the primary first): its service, port,
    protocol, the address shown (a web URL, or ``host:port`` to copy for TCP) and whether a
    browser opens it (``web``). Empty for an instance of one image: its ``url`` is all.
    No ``access_url`` here: those are short-lived and fetched when the player clicks.
    """
    found = []
    for ep in (inst or {}).get("endpoints") or []:
        if not isinstance(ep, dict):
            continue
        url = ep.get("url")
        web = _web(url)
        address = url if web or not isinstance(url, str) else url.removeprefix("tcp://")
        found.append({"service": str(ep.get("service", "")), "port": ep.get("port"),
                      "protocol": str(ep.get("protocol", "")), "address": address,
                      "web": web})
    return found


class InstancerClient:
    """Calls the instancer's HTTP API with the admin token or a team's own token."""

    def __init__(self, conn: Connection, session: requests.Session | None = None):
        if not conn.url:
            raise NotConfigured("The instancer's URL is not set: an organiser sets it in "
                                f"CTFd on {SETTINGS_PAGE}, or with CTF_INSTANCER_URL.")
        if not conn.admin_token:
            raise NotConfigured("The instancer's admin token is not set: an organiser sets it "
                                f"in CTFd on {SETTINGS_PAGE}, or with "
                                "CTF_INSTANCER_ADMIN_TOKEN.")
        self.conn = conn
        self.session = session or _SESSION

    # -- plumbing --------------------------------------------------------------------------

    def _call(self, method: str, path: str, token: str, *, json: Any = None,
              params: dict[str, Any] | None = None, allow: tuple[int, ...] = ()) -> Any:
        try:
            response = self.session.request(
                method, f"{self.conn.url}/api/v1{path}", json=json, params=params,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), allow_redirects=False,
            )
        except requests.RequestException:
            raise InstancerError(UNREACHABLE) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code < 300 or response.status_code in allow:
            return body if body is not None else {}
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            raise InstancerError(body["detail"], response.status_code,
                                 str(body.get("error") or "error"))
        if response.status_code in (401, 403):
            raise InstancerError("The instancer refused CTFd's admin token; an organiser must "
                                 f"check it in CTFd on {SETTINGS_PAGE}.",
                                 response.status_code, "unauthorized")
        raise InstancerError(UNREACHABLE, 503)

    def team_token(self, team_id: str) -> str:
        """Return the team's own token (issued once by the instancer, then cached)."""
        key = (self.conn.url, self.conn.admin_token, team_id)
        with _TOKENS_LOCK:
            cached = _TOKENS.get(key)
        if cached:
            return cached
        body = self._call("GET", f"/teams/{quote(team_id)}/token", str(self.conn.admin_token))
        token = str(body["token"])
        with _TOKENS_LOCK:
            if len(_TOKENS) > 100_000:
                _TOKENS.clear()
            _TOKENS[key] = token
        return token

    def _forget_team_token(self, team_id: str) -> None:
        with _TOKENS_LOCK:
            _TOKENS.pop((self.conn.url, self.conn.admin_token, team_id), None)

    def _as_team(self, method: str, team_id: str, path: str, **kwargs: Any) -> Any:
        """Call ``path`` with the team's token; after a revocation, fetch the new one once.

        An organiser's ``revoke`` (a member left, a link leaked) makes the cached token
        answer 401: the plugin then asks the instancer for the team's current token.
        """
        try:
            return self._call(method, path, self.team_token(team_id), **kwargs)
        except InstancerError as exc:
            if exc.status != 401:
                raise
            self._forget_team_token(team_id)
            return self._call(method, path, self.team_token(team_id), **kwargs)

    def _team(self, method: str, team_id: str, path: str, **kwargs: Any) -> Any:
        return self._as_team(method, team_id, f"/teams/{quote(team_id)}{path}", **kwargs)

    # -- a team's own instance -------------------------------------------------------------

    def instance(self, team_id: str, challenge: str) -> dict[str, Any] | None:
        """Return the team's instance of ``challenge``, or ``None`` when it has none."""
        body = self._team("GET", team_id, f"/instances/{quote(challenge)}", allow=(404,))
        if body.get("error") == "instance_not_found":
            return None
        if body.get("error"):
            raise InstancerError(str(body.get("detail") or UNREACHABLE), 404,
                                 str(body["error"]))
        return dict(body)

    def start(self, team_id: str, challenge: str) -> dict[str, Any]:
        """Ask for the team's instance (idempotent); returns ``{"task_id", …so far}``."""
        return dict(self._team("PUT", team_id, f"/instances/{quote(challenge)}"))

    def stop(self, team_id: str, challenge: str) -> dict[str, Any]:
        """Stop and remove the team's instance, waiting up to 30 s for it to go."""
        return dict(self._team("DELETE", team_id, f"/instances/{quote(challenge)}",
                               params={"wait": STOP_WAIT}))

    def restart(self, team_id: str, challenge: str) -> dict[str, Any]:
        """Replace the team's instance with a fresh one; returns ``{"task_id", …so far}``."""
        return dict(self._team("POST", team_id, f"/instances/{quote(challenge)}/restart"))

    def extend(self, team_id: str, challenge: str) -> dict[str, Any]:
        """Push the instance's expiry out by the challenge's ttl (up to its lifetime)."""
        return dict(self._team("POST", team_id, f"/instances/{quote(challenge)}/extend"))

    def task(self, team_id: str, task_id: str) -> dict[str, Any]:
        """Return one of the team's tasks: state, progress, result or error."""
        return dict(self._as_team("GET", team_id, f"/tasks/{quote(task_id, safe='')}"))

    # -- organisers ------------------------------------------------------------------------

    def catalog(self) -> list[dict[str, Any]]:
        """Return the instancer's catalog: id, name, protocol, ttl, flag of each challenge."""
        body = self._call("GET", "/challenges", str(self.conn.admin_token))
        return list(body.get("challenges", []))

    def shared_flags(self) -> list[dict[str, Any]]:
        """Return the flag checks in which a team submitted another's flag, newest first."""
        return list(self._call("GET", "/flags/shared", str(self.conn.admin_token))
                    .get("events", []))

    def all_instances(self) -> list[dict[str, Any]]:
        """Return every instance the instancer runs (every CTFd's and any other's)."""
        return list(self._call("GET", "/instances", str(self.conn.admin_token))
                    .get("instances", []))

    def admin_stop(self, team_id: str, challenge: str) -> dict[str, Any]:
        """Stop any team's instance (admin token)."""
        return dict(self._call("DELETE", f"/teams/{quote(team_id)}/instances/{quote(challenge)}",
                               str(self.conn.admin_token), params={"wait": STOP_WAIT}))

    def admin_extend(self, team_id: str, challenge: str) -> dict[str, Any]:
        """Extend any team's instance (admin token)."""
        return dict(self._call(
            "POST", f"/teams/{quote(team_id)}/instances/{quote(challenge)}/extend",
            str(self.conn.admin_token)))

    def check_flag(self, team_id: str, challenge: str, flag: str,
                   name: str | None = None) -> bool:
        """Return whether ``flag`` is the team's own flag (or in-app flag ``name``)."""
        if not flag.strip() or len(flag) > MAX_FLAG:
            return False
        body: dict[str, str] = {"flag": flag}
        if name:
            body["name"] = name
        result = self._call("POST", f"/teams/{quote(team_id)}/flags/{quote(challenge)}",
                            str(self.conn.admin_token), json=body)
        return result.get("correct") is True

    def health(self) -> tuple[int, dict[str, Any]]:
        """Return the status and body of the instancer's ``/healthz``."""
        try:
            response = self.session.get(f"{self.conn.url}/healthz",
                                        timeout=(CONNECT_TIMEOUT, 10))
            return response.status_code, dict(response.json())
        except (requests.RequestException, ValueError):
            raise InstancerError(UNREACHABLE) from None


_SESSION = requests.Session()
_TOKENS: dict[tuple[str | None, str | None, str], str] = {}
_TOKENS_LOCK = threading.Lock()
