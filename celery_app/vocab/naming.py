"""Names and labels of what the instancer creates (SPEC §4), and the team id rule."""

from __future__ import annotations

import re
from typing import Final

from celery_app.errors import InvalidTeamId

TEAM_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
CHALLENGE_ID_RE: Final = TEAM_ID_RE
# The team id of a ``share: global`` challenge's one instance (SPEC §13): no team may take it.
GLOBAL_TEAM: Final = "global"

LABEL_MANAGED: Final = "ctf.managed"
LABEL_TEAM: Final = "ctf.team"
LABEL_CHALLENGE: Final = "ctf.challenge"
LABEL_HOST: Final = "ctf.host"
LABEL_STARTED_AT: Final = "ctf.started_at"
LABEL_EXPIRES_AT: Final = "ctf.expires_at"
# "internet" or "none": read by the egress firewall (celery_app.engine.firewall) from Docker.
LABEL_EGRESS: Final = "ctf.egress"
# The bound in bytes of a writable instance's root filesystem, enforced by the janitor.
LABEL_DISK: Final = "ctf.disk"
# The Compose service a container of a group instance runs (SPEC §12).
LABEL_SERVICE: Final = "ctf.service"
# -- warm pools (issue 14, celery_app.core.pool) ------------------------------------------------
# The slot id of a container booted ahead of time for no team yet. Labels cannot change, so a
# claim writes what it decides where Docker still can: the container's name becomes the
# instance name (the team), and the team-network endpoint's driver options carry the claim's
# started_at / expires_at. :func:`read_claim` folds both back into the labels as read.
LABEL_POOL: Final = "ctf.pool"
# Every instance container's name starts so (an ingress route file is named after it).
CONTAINER_NAME_PREFIX: Final = "ctf-"
# Between a container's name and an endpoint's port in a route file's name (Compose, SPEC §12).
ROUTE_PORT_SEP: Final = "@"
POOL_NAME_PREFIX: Final = "ctfpool-"  # never an instance name, which starts "ctf-"
# -- solver health checks (SPEC §14, celery_app.loops.canary) -----------------------------------
# The team id of the canary instances the solvers prove: no caller may take it.
CANARY_TEAM: Final = "canary"
# Ids no team may take: the global instance's and the canaries' (SPEC §13, §14).
RESERVED_TEAM_IDS: Final = frozenset({GLOBAL_TEAM, CANARY_TEAM})
# What a container is beyond an instance: "solver" on a solver's run (always removed after).
LABEL_ROLE: Final = "ctf.role"
ROLE_SOLVER: Final = "solver"
SOLVER_NAME_PREFIX: Final = "ctfsolve-"  # never an instance name, which starts "ctf-"


def check_team_id(team_id: object, *, reserved: bool = False) -> str:
    """Return ``team_id`` when it is a valid team id.

    Args:
        team_id: what the caller sent.
        reserved: accept the ids the instancer keeps for itself (a container's label, an
            organiser's read): never for what a team or a task by name asks.

    Returns:
        The same id, as a string.

    Raises:
        InvalidTeamId: when it does not match ``^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$``, or is
            one the instancer keeps for itself (:data:`RESERVED_TEAM_IDS`, in any case).
    """
    # fullmatch, not match: "$" would accept a trailing newline.
    if not isinstance(team_id, str) or not TEAM_ID_RE.fullmatch(team_id):
        shown = repr(team_id)[:80]
        raise InvalidTeamId(
            f"team id {shown} is invalid: use 1 to 63 characters, letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    if not reserved and team_id.lower() in RESERVED_TEAM_IDS:
        raise InvalidTeamId(
            f"team id {team_id!r} is reserved: it names the instancer's own instances (a "
            "'share: global' challenge's one instance, the solvers' canaries); give the team "
            "another id"
        )
    return team_id


def container_name(challenge: str, team_id: str) -> str:
    """Return the container name of an instance: ``ctf-<challenge>-<team_id>``."""
    return f"{CONTAINER_NAME_PREFIX}{challenge}-{team_id}"


def network_name(team_id: str) -> str:
    """Return the name of a team's bridge network: ``ctf-team-<team_id>``."""
    return f"ctf-team-{team_id}"


def instance_network_name(challenge: str, team_id: str) -> str:
    """Return the network of one Compose instance (SPEC §12): ``ctf-inst-<challenge>.<team>``.

    Ids never hold a ``.``, so two instances never share the name (unlike a ``-``).
    """
    return f"ctf-inst-{challenge}.{team_id}"


def service_container_name(challenge: str, team_id: str, service: str) -> str:
    """Return the container of a Compose instance's service: ``ctf-<challenge>-<team>.<service>``.

    The primary endpoint's service keeps the instance's name (:func:`container_name`).
    """
    return f"{container_name(challenge, team_id)}.{service}"


def endpoint_route_name(container: str, port: int | None = None) -> str:
    """Return the name of an ingress route (its file's stem) of a container's endpoint.

    An instance's own (primary) endpoint's route is named after its container, as a single
    image's is; every other endpoint of a Compose instance (SPEC §12) is
    ``<container>@<port>`` (no container name holds a ``@``).
    """
    return container if port is None else f"{container}{ROUTE_PORT_SEP}{port}"


def route_container(route: str) -> str:
    """Invert :func:`endpoint_route_name`: the container a route's endpoint belongs to."""
    return route.split(ROUTE_PORT_SEP, 1)[0]


def instance_key(challenge: str, team_id: str) -> str:
    """Return the key naming one instance in Redis sets: ``<challenge>/<team_id>``."""
    return f"{challenge}/{team_id}"


def split_instance_key(key: str) -> tuple[str, str]:
    """Invert :func:`instance_key`: return ``(challenge, team_id)``."""
    challenge, _, team_id = key.partition("/")
    return challenge, team_id


def holding_network_name(host: str, digest: str) -> str:
    """Return the name of a host's warm-pool holding network: ``ctf-pool-<host>-<digest>``.

    ``digest`` tells apart the holding networks of different subnet pools and deployments
    (:func:`celery_app.core.pool.holding_network` computes it).
    """
    return f"ctf-pool-{host}-{digest}"


def pool_container_name(challenge: str, slot: str) -> str:
    """Return the name of an unclaimed pool container: ``ctfpool-<challenge>-<slot>``."""
    return f"{POOL_NAME_PREFIX}{challenge}-{slot}"


def pool_service_container_name(challenge: str, slot: str, service: str) -> str:
    """Return an unclaimed pooled Compose group's service: ``ctfpool-<challenge>-<slot>.<service>``.

    The primary endpoint's service is :func:`pool_container_name`; a claim renames each to
    its instance name (:func:`container_name`, :func:`service_container_name`).
    """
    return f"{pool_container_name(challenge, slot)}.{service}"


def pool_network_name(challenge: str, slot: str) -> str:
    """Return the network of one pooled Compose group: ``ctfpool-<challenge>-<slot>``.

    Made at the group's boot and never renamed: a claim leaves it as it is (no network
    operation), and the claimed instance's network is found by its ``ctf.pool`` label.
    """
    return pool_container_name(challenge, slot)


def read_claim(
    labels: dict[str, str], name: str, endpoint_options: dict[str, str] | None = None
) -> dict[str, str]:
    """Return a container's labels as the instancer reads them (warm pools, issue 14).

    A claimed pool container (``ctf.pool`` label, no ``ctf.team``) is named
    ``ctf-<challenge>-<team>`` (``.<service>`` after it: another service of a pooled Compose
    group, SPEC §12): its team is read from that name, and its claim's
    ``ctf.started_at`` / ``ctf.expires_at`` from its team-network endpoint's driver options.
    Any other container's labels are returned unchanged.
    """
    challenge = labels.get(LABEL_CHALLENGE, "")
    if LABEL_POOL not in labels or LABEL_TEAM in labels or not challenge:
        return labels
    prefix = container_name(challenge, "")
    team = name[len(prefix):] if name.startswith(prefix) else ""
    service = labels.get(LABEL_SERVICE)
    if service and team.endswith(f".{service}"):  # a pooled Compose group's other service
        team = team[: -len(service) - 1]
    if not TEAM_ID_RE.fullmatch(team):
        return labels  # unclaimed (or not a name we gave): no team
    claimed = {**labels, LABEL_TEAM: team}
    for key in (LABEL_STARTED_AT, LABEL_EXPIRES_AT):
        if endpoint_options and endpoint_options.get(key):
            claimed[key] = endpoint_options[key]
    return claimed
