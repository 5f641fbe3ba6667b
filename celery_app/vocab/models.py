"""The instance as every interface shows it (SPEC §4), and time helpers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from celery_app.vocab.naming import instance_key

Status = Literal["starting", "running", "stopping", "failed"]
STATUSES: tuple[Status, ...] = ("starting", "running", "stopping", "failed")
# Fields shown only when set: why an instance failed (SPEC §4's shape otherwise).
FAILURE_FIELDS = ("error", "exit_code", "oom", "logs")
# Fields shown only when set: a Compose instance's endpoints (SPEC §12).
OPTIONAL_FIELDS = (*FAILURE_FIELDS, "endpoints")
# Fields of the record never shown: what the limits count (SPEC §4's shape is unchanged).
INTERNAL_FIELDS = ("containers",)


# The expiry of a ``share: global`` challenge's instance (SPEC §13): it never expires. Kept in
# the expiry index all the same (what CTF_MAX_INSTANCES counts), where no pass reaches it.
NEVER_EXPIRES = "9999-12-31T23:59:59Z"


def utcnow() -> datetime:
    """Return the current time, timezone-aware, in UTC, without microseconds."""
    return datetime.now(UTC).replace(microsecond=0)


def iso(moment: datetime) -> str:
    """Format a moment as ``2026-11-25T13:14:32Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    """Parse what :func:`iso` wrote."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class InstanceKey:
    """One team's instance of one challenge: the request, validated once at the edge.

    Build it with :meth:`celery_app.core.catalog.Catalog.key`, which checks the team id and the
    challenge; the layers below take it as valid and never check again.
    """

    challenge: str
    team: str

    def __str__(self) -> str:
        """``<challenge>/<team>``, the instance's key in Redis."""
        return instance_key(self.challenge, self.team)


class EndpointView(BaseModel):
    """One endpoint of a Compose instance as users see it (SPEC §12): service, port, URL."""

    model_config = ConfigDict(extra="ignore")

    service: str
    port: int  # the container port
    protocol: Literal["http", "tcp"]
    url: str | None = None


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
    # Set only on an instance whose container died (the event follower or the janitor saw it):
    # its exit code, whether the kernel killed it for memory, and its last output lines.
    exit_code: int | None = None
    oom: bool | None = None
    logs: str | None = None
    # A Compose instance's endpoints, the primary first (SPEC §12); unset for one image.
    endpoints: list[EndpointView] | None = None
    # How many containers the instance is (a Compose instance: one per service): what it
    # uses of CTF_MAX_INSTANCES and of its host's max_instances. Internal: never shown.
    containers: int = 1

    @property
    def key(self) -> str:
        """``<challenge>/<team_id>``, the instance's key in Redis."""
        return instance_key(self.challenge, self.team_id)

    @property
    def expires(self) -> datetime:
        """``expires_at`` as a datetime."""
        return parse_iso(self.expires_at)

    @property
    def started(self) -> datetime:
        """``started_at`` as a datetime."""
        return parse_iso(self.started_at)

    def public(self) -> dict[str, Any]:
        """Return SPEC §4's JSON shape (failure details and §12's ``endpoints`` only when set)."""
        data = self.model_dump(exclude=set(INTERNAL_FIELDS))
        for extra in OPTIONAL_FIELDS:
            if data.get(extra) is None:
                data.pop(extra, None)
        return data
