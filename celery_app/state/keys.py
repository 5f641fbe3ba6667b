"""Every Redis key of the state database, spelled once.

Only the state package uses these (:mod:`celery_app.state.store`, and
:mod:`celery_app.state.reads` for the API's reads): every other module goes through the
store's methods. Lua scripts get the keys (or, for keys they derive, the prefixes) passed in.
``<instance>`` is ``<challenge>/<team>`` (:func:`celery_app.vocab.naming.instance_key`).

:data:`TABLE` is the keyspace as ARCHITECTURE.md lists it (``tests/test_keys.py`` checks that
the two agree, and that every builder here yields one of its patterns).
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "ctf:"
# Prefixes a Lua script derives keys from (passed in as ARGV).
INSTANCE_PREFIX: Final = f"{PREFIX}inst:"
HOST_PREFIX: Final = f"{PREFIX}host:"
# The warm pools' keys (issue 14), built in celery_app.state.pool_keys.
POOL_PREFIX: Final = f"{PREFIX}pool:"

EXPIRY: Final = f"{PREFIX}expiry"
EXTRA: Final = f"{PREFIX}extra"
INTENT_SEQ: Final = f"{PREFIX}intentseq"
JANITOR_COUNTS: Final = f"{PREFIX}metrics:janitor"
# The audit trail (SPEC §13, celery_app.state.audit).
AUDIT: Final = f"{PREFIX}audit"
AUDIT_SHARED: Final = f"{PREFIX}audit:shared"

# pattern -> what it holds; the order is ARCHITECTURE.md's.
TABLE: Final[dict[str, str]] = {
    "ctf:inst:<instance>": "the instance's JSON record",
    "ctf:expiry": "zset: every instance by expiry (epoch s)",
    "ctf:team:<team>": "set: the team's instances",
    "ctf:host:<host>": "set: the host's instances",
    "ctf:extra": "hash: instance -> its containers beyond the first (Compose instances only)",
    "ctf:hostextra:<host>": "hash: the same, of the host's instances",
    "ctf:lock:<instance>": "lock around start/stop/extend of one instance (30 s, renewed)",
    "ctf:netlock:<team>": "lock around a team's network and container creation",
    "ctf:rate:<team>": "zset: the team's start/stop actions in the sliding window",
    "ctf:intent:<instance>": "`<seq>:start` or `<seq>:stop`: the latest start/stop request",
    "ctf:intentseq": "the counter that orders every start/stop request",
    "ctf:placing:<host>": "zset: starts placed on the host not yet reserved there (30 s)",
    "ctf:pending:<kind>:<instance>": "the latest `run` (start/stop) or `extend` task (10 min)",
    "ctf:task:<task_id>": "who sent a task, for the API's access rule (a day)",
    "ctf:done:<task_id>": "the answer of a start/stop/extend whose effect is applied (a day)",
    "ctf:janitor:<host>": "lock: one janitor pass at a time per host",
    "ctf:hostbeat:<host>": "the host's worker is alive and its engine answers",
    "ctf:epoch:<host>": "set by reconcile: this host's index is complete",
    "ctf:metrics:janitor": "hash: what the janitors removed, by kind",
    "ctf:egresskeeper:<engine>:<pool>": "a firewall keeper's heartbeat: the egress rules hold "
                                        "that engine's containers (30 s or more)",
    "ctf:access:<team>": "the team's access generation: revocations of its token, links, hosts",
    "ctf:audit": "stream: the audit trail, newest last, about `CTF_AUDIT_MAX_EVENTS` kept",
    "ctf:audit:shared": "stream: the `flag_shared` events alone (same bound)",
    "ctf:flagowner:<challenge>": "hash: sha256(flag) -> `<team> <subject>`: who holds each "
                                 "flag handed out (never expires)",
    "ctf:solver:<challenge>": "hash: the solver's last run: state, when, its last output lines",
    "ctf:solverruns:<challenge>": "hash: the solver runs' duration histogram (cumulative buckets)",
    "ctf:canary:<host>": "lock: one canary pass (canaries and solver runs) at a time per host",
}


def instance(instance: str) -> str:
    """The JSON record of an instance."""
    return f"{INSTANCE_PREFIX}{instance}"


def team(team: str) -> str:
    """The set of a team's instances."""
    return f"{PREFIX}team:{team}"


def host(host: str) -> str:
    """The set of a host's instances."""
    return f"{HOST_PREFIX}{host}"


def hostextra(host: str) -> str:
    """The hash of the containers beyond the first of a host's Compose instances."""
    return f"{PREFIX}hostextra:{host}"


def lock(instance: str) -> str:
    """The lock of one instance."""
    return f"{PREFIX}lock:{instance}"


def netlock(team: str) -> str:
    """The lock of a team's network."""
    return f"{PREFIX}netlock:{team}"


def rate(team: str) -> str:
    """The team's sliding rate-limit window."""
    return f"{PREFIX}rate:{team}"


def intent(instance: str) -> str:
    """The latest start/stop request of an instance."""
    return f"{PREFIX}intent:{instance}"


def placing(host: str) -> str:
    """The placements on ``host`` whose start has not reached its worker yet."""
    return f"{PREFIX}placing:{host}"


def pending(kind: str, instance: str) -> str:
    """The latest pending task of an instance (``kind``: ``run`` or ``extend``)."""
    return f"{PREFIX}pending:{kind}:{instance}"


def task(task_id: str) -> str:
    """Who sent a task."""
    return f"{PREFIX}task:{task_id}"


def done(task_id: str) -> str:
    """The answer of a start, stop or extend task whose effect is applied.

    Written in the same step as the effect, so a redelivered copy of the task answers it again
    instead of applying the effect twice.
    """
    return f"{PREFIX}done:{task_id}"


def janitor(host: str) -> str:
    """The lock of a host's janitor pass."""
    return f"{PREFIX}janitor:{host}"


def hostbeat(host: str) -> str:
    """A host's heartbeat."""
    return f"{PREFIX}hostbeat:{host}"


def egresskeeper(engine: str, pool: str) -> str:
    """The heartbeat of the egress firewall keeper of an engine (by its ID) and pool."""
    return f"{PREFIX}egresskeeper:{engine}:{pool}"


def epoch(host: str) -> str:
    """Set by a host's reconcile: its index is complete."""
    return f"{PREFIX}epoch:{host}"


def access(team: str) -> str:
    """A team's access generation (raised by each revocation; absent: 0)."""
    return f"{PREFIX}access:{team}"


def flag_owner(challenge: str) -> str:
    """Who holds each flag of ``challenge`` handed out: SHA-256 of the flag -> team, subject."""
    return f"{PREFIX}flagowner:{challenge}"


def solver(challenge: str) -> str:
    """The last outcome of a challenge's solver (SPEC §14)."""
    return f"{PREFIX}solver:{challenge}"


def solver_runs(challenge: str) -> str:
    """The duration histogram of a challenge's solver runs."""
    return f"{PREFIX}solverruns:{challenge}"


def canary(host: str) -> str:
    """The lock of the canary passes of one host."""
    return f"{PREFIX}canary:{host}"
