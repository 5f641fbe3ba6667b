"""Signed access links and access cookies of the team gate (SPEC §11).

Both are stateless: ``<principal>.<expiry>.<signature>``, the signature an HMAC over the
kind, the instance's host label, the principal and the expiry, under that host's own key
(:func:`host_key`: an HMAC of the label under the gate key, itself derived from the flag
secret). A cookie is only valid for the host whose label it was signed for, so another
team's cookie (or an organiser's cookie for another instance) is refused on this host.

The host key is what Traefik's gate plugin gets (in that instance's route file): it checks
cookies of that one host and nothing else; the gate key never leaves our processes.

The principal is a team id, or ``ORGANISER`` (which no team id can be: they start with a
letter or digit).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from dataclasses import dataclass

from celery_app.vocab.naming import TEAM_ID_RE

ORGANISER = "_organiser"
_KEY_CONTEXT = b"ctf-instancer ingress gate key v1"
LINK_PREFIX = "/_ctf/access/"
# The access cookie's name over plain HTTP, and over HTTPS: there the ``__Host-`` prefix makes
# browsers refuse it unless it is Secure, has Path=/ and no Domain, so no sibling host (another
# team's instance under the same domain) can plant or shadow it (SPEC §11). The gate reads both.
COOKIE_NAME = "ctf_ingress_access"
SECURE_COOKIE_NAME = f"__Host-{COOKIE_NAME}"
COOKIE_NAMES = (COOKIE_NAME, SECURE_COOKIE_NAME)


def gate_key(secret: str) -> bytes:
    """Return the key links and cookies are signed with."""
    return hmac.new(secret.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


@functools.lru_cache(maxsize=4096)
def host_key(key: bytes, label: str) -> bytes:
    """Return the key of one instance host: tokens for ``label`` are signed with it.

    Args:
        key: :func:`gate_key` of the flag secret.
        label: the instance's host label.
    """
    return hmac.new(key, f"host|{label}".encode(), hashlib.sha256).digest()


def encode_key(key: bytes) -> str:
    """Return a key as the gate plugin reads it (base64url, no padding)."""
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def _sign(key: bytes, kind: str, label: str, principal: str, expiry: int) -> str:
    mac = hmac.new(host_key(key, label), f"{kind}|{label}|{principal}|{expiry}".encode(),
                   hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def issue(key: bytes, kind: str, label: str, principal: str, ttl: int,
          now: float | None = None) -> str:
    """Return a signed token of ``kind`` (``link`` or ``cookie``) for one host label.

    Args:
        key: :func:`gate_key` of the flag secret.
        kind: ``link`` (the short-lived access link) or ``cookie`` (the access cookie).
        label: the instance's host label.
        principal: the team id, or :data:`ORGANISER`.
        ttl: seconds the token is valid.
        now: the current time (tests).

    Returns:
        ``<principal>.<expiry>.<signature>`` (URL- and cookie-safe).
    """
    expiry = int((time.time() if now is None else now) + ttl)
    return f"{principal}.{expiry}.{_sign(key, kind, label, principal, expiry)}"


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a token: who it is for, or why it is refused."""

    principal: str | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        """Whether the token is valid."""
        return self.principal is not None


def verify(key: bytes, kind: str, label: str, token: str, now: float | None = None) -> Verdict:
    """Check a token of ``kind`` for the host ``label``.

    Returns:
        The principal when the token is valid for this host and not expired; otherwise a
        verdict without principal whose ``reason`` is ``expired`` or ``invalid``.
    """
    parts = token.split(".")
    if len(parts) != 3 or not label:
        return Verdict(None, "invalid")
    principal, expiry_text, signature = parts
    if principal != ORGANISER and not TEAM_ID_RE.fullmatch(principal):
        return Verdict(None, "invalid")
    try:
        expiry = int(expiry_text)
    except ValueError:
        return Verdict(None, "invalid")
    expected = _sign(key, kind, label, principal, expiry)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        return Verdict(None, "invalid")
    if expiry < (time.time() if now is None else now):
        return Verdict(None, "expired")
    return Verdict(principal)
