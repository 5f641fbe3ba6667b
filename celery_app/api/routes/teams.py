"""A team's access: its token, and the revocation of its token, links and cookies (admin)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from celery_app.api.deps import ERRORS, Disp, Generations, TeamId, Who

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/api/v1/teams/{team_id}/token", responses=ERRORS, tags=["admin"])
def issue_team_token(team_id: TeamId, who: Who, disp: Disp) -> dict[str, str]:
    """Issue the team's token (admin only); it acts on that team's routes only."""
    who.require_admin()
    return {"team_id": team_id, "token": disp.team_token(team_id)}


@router.post("/api/v1/teams/{team_id}/revoke", responses=ERRORS, tags=["admin"])
def revoke_team_access(
    team_id: TeamId, who: Who, disp: Disp, generations: Generations
) -> dict[str, Any]:
    """Revoke the team's token, access links and cookies (admin only).

    For a member who left or a link that leaked: the old token is refused at once (the
    answer carries the new one), and within ``hosts_move_within_s`` seconds every
    running instance of the team moves to a new host name (HTTP and TCP): the old name
    answers 404 and the old cookies and links open nothing. The team opens its
    instances again from the dashboard (a fresh ``access_url``).
    """
    who.require_admin()
    revoked = disp.revoke_access(team_id)
    generations.note(revoked["team_id"], revoked["generation"])
    log.warning("access of team %s revoked (generation %d)", revoked["team_id"],
                revoked["generation"])
    return revoked
