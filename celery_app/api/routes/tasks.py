"""A task's state, for the team it concerns or the admin (``GET /api/v1/tasks/{task_id}``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from celery_app.api.deps import ERRORS, Disp, Who
from celery_app.errors import TaskNotFound

router = APIRouter()


@router.get("/api/v1/tasks/{task_id}", responses=ERRORS, tags=["tasks"])
def get_task(
    task_id: Annotated[str, Path(max_length=200)], who: Who, disp: Disp
) -> dict[str, Any]:
    """Return the task's state, ``progress`` while it runs, then ``result`` or ``error``."""
    owner = disp.owner_of(task_id)
    if owner is None and not (who.is_admin and disp.exists(task_id)):
        raise TaskNotFound(f"no task {task_id[:80]!r} is known; tasks are kept one day")
    if owner is not None and not who.is_admin and owner != who.team_id:
        who.require_admin()
    return disp.view(task_id).public()
