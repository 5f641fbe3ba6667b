"""Names and labels of what the instancer creates (SPEC §4), and the team id rule."""

from __future__ import annotations

import re
from typing import Final

from celery_app.errors import InvalidTeamId

TEAM_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
CHALLENGE_ID_RE: Final = TEAM_ID_RE

LABEL_MANAGED: Final = "ctf.managed"
LABEL_TEAM: Final = "ctf.team"
LABEL_CHALLENGE: Final = "ctf.challenge"
LABEL_HOST: Final = "ctf.host"
LABEL_STARTED_AT: Final = "ctf.started_at"
LABEL_EXPIRES_AT: Final = "ctf.expires_at"
# "internet" or "none": read by the egress firewall (celery_app.firewall) from Docker.
LABEL_EGRESS: Final = "ctf.egress"


def check_team_id(team_id: object) -> str:
    """Return ``team_id`` when it is a valid team id.

    Args:
        team_id: what the caller sent.

    Returns:
        The same id, as a string.

    Raises:
        InvalidTeamId: when it does not match ``^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$``.
    """
    # fullmatch, not match: "$" would accept a trailing newline.
    if not isinstance(team_id, str) or not TEAM_ID_RE.fullmatch(team_id):
        shown = repr(team_id)[:80]
        raise InvalidTeamId(
            f"team id {shown} is invalid: use 1 to 63 characters, letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return team_id


def container_name(challenge: str, team_id: str) -> str:
    """Return the container name of an instance: ``ctf-<challenge>-<team_id>``."""
    return f"ctf-{challenge}-{team_id}"


def network_name(team_id: str) -> str:
    """Return the name of a team's bridge network: ``ctf-team-<team_id>``."""
    return f"ctf-team-{team_id}"


def instance_key(challenge: str, team_id: str) -> str:
    """Return the key naming one instance in Redis sets: ``<challenge>/<team_id>``."""
    return f"{challenge}/{team_id}"


def split_instance_key(key: str) -> tuple[str, str]:
    """Invert :func:`instance_key`: return ``(challenge, team_id)``."""
    challenge, _, team_id = key.partition("/")
    return challenge, team_id
