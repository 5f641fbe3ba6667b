"""The instance as every interface shows it (SPEC §4), and time helpers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Status = Literal["starting", "running", "stopping", "failed"]
STATUSES: tuple[Status, ...] = ("starting", "running", "stopping", "failed")


def utcnow() -> datetime:
    """Return the current time, timezone-aware, in UTC, without microseconds."""
    return datetime.now(UTC).replace(microsecond=0)


def iso(moment: datetime) -> str:
    """Format a moment as ``2026-11-25T13:14:32Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    """Parse what :func:`iso` wrote."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Instance(BaseModel):
    """One container of one challenge for one team."""

    model_config = ConfigDict(extra="ignore")

    team_id: str
    challenge: str
    status: Status
    container_name: str
    container_id: str = ""
    host: str = "local"
    ports: dict[str, int] = {}
    url: str | None = None
    started_at: str
    expires_at: str
    error: str | None = None

    @property
    def key(self) -> str:
        """``<challenge>/<team_id>``, the instance's key in Redis."""
        return f"{self.challenge}/{self.team_id}"

    @property
    def expires(self) -> datetime:
        """``expires_at`` as a datetime."""
        return parse_iso(self.expires_at)

    @property
    def started(self) -> datetime:
        """``started_at`` as a datetime."""
        return parse_iso(self.started_at)

    def public(self) -> dict[str, Any]:
        """Return the JSON shape of SPEC §4 (``error`` only when there is one)."""
        data = self.model_dump()
        if data.get("error") is None:
            data.pop("error", None)
        return data
