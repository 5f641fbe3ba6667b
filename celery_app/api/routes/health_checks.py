"""The solvers' verdicts (SPEC §14): which challenges are proven solvable right now (admin).

A plain function: FastAPI runs it in the thread pool (its Redis reads are blocking).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from celery_app.api.deps import ERRORS, Disp, Who
from celery_app.state.redis_errors import map_redis_errors

router = APIRouter()


@router.get("/api/v1/health/challenges", responses=ERRORS, tags=["admin"])
def challenge_health(who: Who, disp: Disp) -> dict[str, Any]:
    """Return each solver's verdict: ``{"challenges": [...]}`` (admin only).

    One row per challenge with a ``solver:`` block, in catalog order: ``challenge``,
    ``state`` (``ok``, ``broken``, or ``unknown`` until its first run), ``last_run``
    (ISO 8601 UTC, or null), ``output`` (the run's last lines, the flag masked) and ``host``
    (the Docker host of the canary the run proved, or null before the first run: with
    several hosts, the verdict vouches for that host's instances).
    """
    who.require_admin()
    checked = [ch.id for ch in disp.catalog if ch.solver is not None]
    with map_redis_errors("read the solvers' results"):
        rows = disp.store.solvers.report(checked)
    return {"challenges": rows}
