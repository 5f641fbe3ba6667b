"""The audit trail (SPEC §13): who did what and when, and the flags teams shared (admin).

Plain functions: FastAPI runs them in the thread pool (their Redis reads are blocking).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from celery_app.api.deps import ERRORS, Disp, Who
from celery_app.core.audit import MAX_LIMIT
from celery_app.vocab.naming import TEAM_ID_RE

router = APIRouter()

Kind = Literal["start", "stop", "extend", "restart", "expire", "flag", "flag_shared", "admin"]
TeamFilter = Annotated[str | None, Query(
    pattern=TEAM_ID_RE.pattern, description="only this team's events")]
ChallengeFilter = Annotated[str | None, Query(
    max_length=200, description="only this challenge's events")]
Since = Annotated[str | None, Query(
    max_length=40, description="only events at or after this ISO 8601 UTC time, "
                               "e.g. 2026-12-03T18:00:00Z")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="at most this many events")]


@router.get("/api/v1/audit", responses=ERRORS, tags=["admin"])
def audit_trail(
    who: Who, disp: Disp, team: TeamFilter = None, challenge: ChallengeFilter = None,
    kind: Annotated[Kind | None, Query(description="only events of this kind")] = None,
    since: Since = None, limit: Limit = 100,
) -> dict[str, Any]:
    """Return the audit trail, newest first: ``{"events": [...]}`` (admin only).

    Each event has ``time`` (ISO 8601 UTC, Redis's clock), ``kind``, ``team_id``,
    ``challenge``, ``actor`` (``team:<id>`` or ``admin``), ``outcome`` (``ok``,
    ``correct``/``wrong`` for flag checks, or the error code), ``id`` (the entry's), and
    what the kind adds: ``owner`` (``flag_shared``), ``action`` (``admin``), ``task_id``.
    """
    who.require_admin()
    return {"events": disp.auditor.read(team=team, challenge=challenge, kind=kind,
                                        since=since, limit=limit)}


@router.get("/api/v1/flags/shared", responses=ERRORS, tags=["admin"])
def shared_flags(
    who: Who, disp: Disp, team: TeamFilter = None, challenge: ChallengeFilter = None,
    since: Since = None, limit: Limit = 100,
) -> dict[str, Any]:
    """Return the flag checks in which a team submitted another team's flag (admin only).

    ``{"events": [...]}`` newest first, in the audit's shape: ``team_id`` is the team that
    submitted, ``owner`` the team whose instance the flag came from.
    """
    who.require_admin()
    return {"events": disp.auditor.read(team=team, challenge=challenge, kind="flag_shared",
                                        since=since, limit=limit)}
