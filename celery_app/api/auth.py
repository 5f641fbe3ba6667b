"""Bearer tokens of the HTTP API (SPEC §6): the admin token and stateless team tokens.

A team token is ``<team_id>.<hex HMAC-SHA256 of the team id>`` under a key derived from the
admin token. Nothing is stored: the API checks a token by recomputing it, and rotating the
admin token revokes every team token at once. The team id is inside the token so routes
without a team in their path (``/challenges``, ``/tasks/{id}``) know who is asking.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from celery_app.core.naming import TEAM_ID_RE
from celery_app.errors import Forbidden, Unauthorized

# Domain separation: the team-token key is never the admin token itself.
# The two errors live in celery_app.errors; they are re-exported for the ingress gate.
__all__ = ["Forbidden", "Principal", "Unauthorized", "principal_for", "team_token"]

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


def team_token(admin_token: str, team_id: str) -> str:
    """Return the token of ``team_id``.

    Args:
        admin_token: the admin token (the secret the team-token key derives from).
        team_id: a valid team id.

    Returns:
        ``<team_id>.<64 hex digits>``.

    """
    digest = hmac.new(_team_key(admin_token), team_id.encode(), hashlib.sha256).hexdigest()
    return f"{team_id}.{digest}"


def principal_for(admin_token: str, token: str | None) -> Principal:
    """Return who holds ``token``.

    Args:
        admin_token: the admin token.
        token: the bearer token the request carried, or ``None``.

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
        given, team_token(admin_token, team_id).encode()
    ):
        return Principal(team_id)
    raise Unauthorized("the token is not valid; ask the organisers for your team's token")
