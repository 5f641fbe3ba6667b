"""Bearer tokens of the HTTP API (SPEC §6): the admin token and stateless team tokens.

A team token is ``<team_id>.<hex HMAC-SHA256>`` of the team id and the team's access
generation, under a key derived from the admin token. The API checks a token by recomputing
it with the team's current generation (a counter in Redis, 0 until the first revocation):
``POST /api/v1/teams/{team_id}/revoke`` (``ctfctl revoke``) raises it, which revokes the
team's token (and its instances' links and cookies, see :mod:`celery_app.ingress`) at once;
rotating the admin token revokes every team token. The team id is inside the token so routes
without a team in their path (``/challenges``, ``/tasks/{id}``) know who is asking.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from celery_app.errors import Forbidden, Unauthorized
from celery_app.vocab.naming import TEAM_ID_RE

# Domain separation: the team-token key is never the admin token itself.
# The two errors live in celery_app.errors; they are re-exported for the ingress gate.
__all__ = ["Forbidden", "Principal", "Unauthorized", "claimed_team", "looks_like_team_token",
           "principal_for", "team_token"]

_KEY_CONTEXT = b"ctf-instancer team-token key v1"


@dataclass(frozen=True)
class Principal:
    """Who is asking: the admin, or one team."""

    team_id: str | None  # None: the admin

    @property
    def is_admin(self) -> bool:
        """Whether this is the admin."""
        return self.team_id is None

    def require_admin(self) -> None:
        """Refuse anyone but the admin.

        Raises:
            Forbidden: a team token was used.

        """
        if not self.is_admin:
            raise Forbidden("this route is for organisers only; use the admin token")

    def require_team(self, team_id: str) -> None:
        """Refuse anyone but the admin and team ``team_id``.

        Raises:
            Forbidden: the token belongs to another team.

        """
        if self.team_id is not None and not hmac.compare_digest(self.team_id, team_id):
            raise Forbidden("this token belongs to another team; use your own team's token")


def _team_key(admin_token: str) -> bytes:
    return hmac.new(admin_token.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


def team_token(admin_token: str, team_id: str, generation: int = 0) -> str:
    """Return the token of ``team_id`` at its access ``generation``.

    Args:
        admin_token: the admin token (the secret the team-token key derives from).
        team_id: a valid team id.
        generation: the team's access generation (0 until its first revocation; the
            generation-0 token is the one issued before revocations existed).

    Returns:
        ``<team_id>.<64 hex digits>``.

    """
    message = team_id if generation == 0 else f"{team_id}|{generation}"
    digest = hmac.new(_team_key(admin_token), message.encode(), hashlib.sha256).hexdigest()
    return f"{team_id}.{digest}"


_TOKEN_DIGEST = re.compile(r"[0-9a-f]{64}")


def claimed_team(token: str) -> str | None:
    """Return the team id a token claims to be for (``None``: not shaped as a team token).

    Nothing is checked: this only says whose access generation to look up.
    """
    team_id, _, digest = token.rpartition(".")
    if TEAM_ID_RE.fullmatch(team_id) and _TOKEN_DIGEST.fullmatch(digest):
        return team_id
    return None


def looks_like_team_token(token: str) -> bool:
    """Whether ``token`` has a team token's shape (the gate strips these without Redis)."""
    return claimed_team(token) is not None


def principal_for(admin_token: str, token: str | None, generation: int = 0) -> Principal:
    """Return who holds ``token``.

    Args:
        admin_token: the admin token.
        token: the bearer token the request carried, or ``None``.
        generation: the current access generation of the team the token claims
            (:func:`claimed_team`); a token of an older generation is refused.

    Returns:
        The admin or a team.

    Raises:
        Unauthorized: no token, or a token that is neither the admin's nor a team's.

    """
    if not token:
        raise Unauthorized(
            "this route needs 'Authorization: Bearer <token>' (the admin token, or a team "
            "token from GET /api/v1/teams/{team_id}/token)"
        )
    # Compare bytes: compare_digest refuses non-ASCII str, and a header may carry anything.
    given = token.encode("utf-8", "surrogateescape")
    if hmac.compare_digest(given, admin_token.encode()):
        return Principal(None)
    team_id, _, _ = token.rpartition(".")
    if TEAM_ID_RE.fullmatch(team_id) and hmac.compare_digest(
        given, team_token(admin_token, team_id, generation).encode()
    ):
        return Principal(team_id)
    raise Unauthorized("the token is not valid (or was revoked); ask the organisers for your "
                       "team's token")
