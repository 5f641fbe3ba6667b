"""The organisers' routes: the catalog, flag checks, warm pools, every instance, capacity.

Plain functions: FastAPI runs them in the thread pool (their Redis reads are blocking).
Every one but the catalog listing asks for the admin token.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from celery_app.api.deps import ERRORS, ChallengeId, Disp, TeamId, Who
from celery_app.core.audit import principal_actor
from celery_app.core.flags import check_flag, check_in_app_flag
from celery_app.core.pool import flag_held, pool_status
from celery_app.errors import CTFError, InvalidRequest
from celery_app.vocab.models import Status

log = logging.getLogger(__name__)
router = APIRouter()


class FlagSubmission(BaseModel):
    """A flag a team submitted, to check against its per-team flag."""

    flag: str = Field(min_length=1, max_length=256)
    name: str | None = Field(
        None, min_length=1, max_length=200,
        description="an in-app challenge's name (OWASP Juice Shop's own flags): the flag is "
                    "then the app's HMAC-SHA1 of this name under the team's key",
    )


@router.get("/api/v1/challenges", responses=ERRORS, tags=["challenges"])
def list_challenges(_who: Who, disp: Disp) -> dict[str, Any]:
    """Return the catalog: id, name, protocol, ttl and maximum lifetime of each challenge."""
    return {"challenges": [ch.public_view() for ch in disp.catalog]}


@router.post("/api/v1/teams/{team_id}/flags/{challenge}", responses=ERRORS, tags=["admin"])
def check_team_flag(
    team_id: TeamId, challenge: ChallengeId, body: FlagSubmission, who: Who, disp: Disp
) -> dict[str, Any]:
    """Check a flag a team submitted for a challenge (admin only, constant time).

    With ``name``, the flag is one of the app's own in-app flags (OWASP Juice Shop's):
    the hex HMAC-SHA1 of ``name`` under the key the team's container received in the
    challenge's ``flag_env`` variable (``CTF_KEY`` for juice-shop). A correct flag of a
    challenge with ``stop_on_solve: true`` also sends the stop of the team's instance
    (answered without waiting for it).
    """
    who.require_admin()
    ch = disp.catalog.get(challenge)
    settings = disp.settings
    if body.name is not None and ch.flag_env is None:
        raise InvalidRequest(
            f"challenge {ch.id!r} gives its containers no per-team key (it has no "
            "'flag_env' in the catalog), so it has no in-app flags to check by name; "
            "leave out 'name' or set flag_env (juice-shop: CTF_KEY)")
    disp.key(ch.id, team_id)  # a reserved team id ("global") is no team's
    # A global challenge's flag is one for all: its one instance's (SPEC §13).
    holder = ch.holder(team_id)
    if body.name is None:
        correct = check_flag(settings.flag_secret_value(), ch.id, holder, body.flag,
                             settings.flag_format)
    else:
        correct = check_in_app_flag(settings.flag_secret_value(), ch.id, holder,
                                    body.name, body.flag, settings.flag_format)
    # Warm pools (issue 14): the flags of the pool containers this team has held.
    correct = flag_held(disp.store.pools, settings.flag_secret_value(), ch.id,
                        team_id, body.flag, settings.flag_format, body.name) or correct
    # SPEC §13: recorded; another team's flag is recorded as flag_shared, naming its owner.
    correct = disp.auditor.flag_check(ch.id, team_id, body.flag, body.name, correct,
                                      principal_actor(who))
    if correct and ch.stop_on_solve:
        # SPEC §13: solved, so the instance goes (the normal stop task, not waited for). The
        # check's answer stands whatever the sending does: the stop is the organisers' gain.
        try:
            disp.stop_solved(disp.key(ch.id, team_id), principal_actor(who))
        except CTFError as exc:
            log.warning("stop_on_solve: could not stop %s of team %s: %s", ch.id, team_id,
                        exc.detail)
    return {"team_id": team_id, "challenge": ch.id, "correct": correct}


# -- warm pools (issue 14) --------------------------------------------------------------------


@router.get("/api/v1/pools", responses=ERRORS, tags=["admin"])
def list_pools(who: Who, disp: Disp) -> dict[str, Any]:
    """Each warm pool of each host: size, unclaimed containers, ready, claims, misses."""
    who.require_admin()
    return {"pools": pool_status(disp.store.pools, disp.catalog,
                                 list(disp.hosts))}


@router.post("/api/v1/pools/{challenge}/drain", responses=ERRORS, tags=["admin"])
def drain_pool(challenge: ChallengeId, who: Who, disp: Disp) -> dict[str, Any]:
    """Remove the challenge's unclaimed pool containers (each host's next pass, ≤ 10 s).

    Do it after pulling a new image: the pools then refill from the new one.
    """
    who.require_admin()
    ch = disp.catalog.get(challenge)
    drained_at = disp.store.pools.drain(ch.id)
    disp.auditor.try_record("admin", None, ch.id, principal_actor(who), "ok", action="drain")
    return {"challenge": ch.id, "drained_at": drained_at}


# -- every instance, and the room left --------------------------------------------------------


@router.get("/api/v1/instances", responses=ERRORS, tags=["admin"])
def list_instances(
    who: Who,
    disp: Disp,
    challenge: Annotated[str | None, Query(max_length=200)] = None,
    status: Annotated[Status | None, Query()] = None,
) -> dict[str, Any]:
    """Return every instance (admin only), filtered by ``?challenge=`` and ``?status=``."""
    who.require_admin()
    if challenge is not None:
        disp.catalog.get(challenge)
    found = disp.present(disp.store.list(challenge=challenge))
    return {"instances": [i for i in found if status in (None, i["status"])]}


@router.get("/api/v1/capacity", responses=ERRORS, tags=["admin"])
def capacity(who: Who, disp: Disp) -> dict[str, Any]:
    """Return instances in use against ``CTF_MAX_INSTANCES``, total and per host (admin).

    Each host of ``CTF_HOSTS_FILE`` (SPEC §10) shows ``used``, its ``max`` and ``room``,
    and ``alive``: whether its worker sends heartbeats (new instances go only there).
    """
    who.require_admin()
    per_host: dict[str, int] = {}
    for inst in disp.store.list():
        per_host[inst.host] = per_host.get(inst.host, 0) + inst.containers
    hosts = []
    for load in disp.host_loads():
        per_host.pop(load.name, None)
        hosts.append({"host": load.name, **load.as_dict()})
    # Instances on a host no longer in the hosts file: shown, with no worker of ours.
    hosts += [{"host": h, "used": n, "alive": False} for h, n in sorted(per_host.items())]
    return {
        "used": sum(h["used"] for h in hosts),
        "limit": disp.settings.max_instances,
        "per_team_limit": disp.settings.max_instances_per_team,
        "hosts": hosts,
    }
