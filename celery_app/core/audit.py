"""The audit trail's rules (SPEC §13): what each event records, who the actor is, whose flag.

The edges call these small hooks where a request's outcome is known:

- the HTTP API and ``ctfctl`` (the :class:`~celery_app.api.client.Dispatcher`): a start, stop
  or extend refused before any task is sent (rate limit, no such instance, lifetime reached),
  flag checks, admin actions; the task they send carries its ``actor``;
- the tasks (``celery_app.tasks``): the outcome of each start, stop and extend, with the actor
  the sender named (the API's and ``ctfctl``'s: the token's team or ``admin``); a task sent by
  name without one is the platform acting for the team: ``team:<team_id>``;
- the janitor: each expiry (``expire``, actor ``admin``: the organisers' rules, applied).

Each hook is one pipelined Redis write (:meth:`AuditLog.record`); a start also records who
holds the team's flag in it, so a flag check can name the owner of a shared flag with one
``HGET`` (:meth:`Auditor.flag_check`), never a scan of the teams.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from celery_app.core.flags import in_app_flag, team_flag
from celery_app.errors import CTFError, InvalidRequest
from celery_app.settings import Settings
from celery_app.state.audit import KINDS, FlagOwner
from celery_app.state.store import StateStore
from celery_app.vocab.naming import check_team_id
from celery_app.vocab.team_tokens import Principal

log = logging.getLogger(__name__)

ADMIN: Final = "admin"
# The task names whose outcome is an event, by their kind.
TASK_KINDS: Final = {"start_container": "start", "stop_container": "stop",
                     "extend_container": "extend", "restart_container": "restart"}
MAX_LIMIT: Final = 1000


def team_actor(team_id: str) -> str:
    """The actor of a team's own request: ``team:<team_id>``."""
    return f"team:{team_id}"


def principal_actor(who: Principal) -> str:
    """The actor of an API request: ``admin`` for the admin token, else the token's team."""
    return ADMIN if who.team_id is None else team_actor(who.team_id)


def actor_of(actor: str | None, team_id: str) -> str:
    """Validate a task's ``actor`` for an instance of ``team_id``; ``None``: the team's own.

    A task sent by name without ``actor`` is the platform acting for the team.

    Raises:
        InvalidRequest: the actor is neither ``admin`` nor ``team:<team_id>``.
    """
    if actor is None or actor == team_actor(team_id):
        return team_actor(team_id)
    if actor == ADMIN:
        return ADMIN
    raise InvalidRequest(
        f"actor {actor[:80]!r} is neither 'admin' nor 'team:{team_id}' (the team whose "
        "instance this is); leave it out for a request made for the team")


def flag_digest(flag: str) -> str:
    """The SHA-256 (hex) of a flag as submitted (blanks around it ignored)."""
    return hashlib.sha256(flag.strip().encode()).hexdigest()


def parse_since(text: str) -> datetime:
    """Parse an ISO 8601 time (UTC when it names no zone) for the ``since`` filter.

    Raises:
        InvalidRequest: it is not an ISO 8601 time.
    """
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"since {text[:60]!r} is not an ISO 8601 time; write e.g. 2026-12-03T18:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Auditor:
    """Records and reads the audit trail.

    Args:
        settings: the settings (``CTF_AUDIT_MAX_EVENTS``, the flag secret and format).
        store: the Redis state store.
    """

    def __init__(self, settings: Settings, store: StateStore) -> None:
        self.settings = settings
        self.log = store.audit

    # -- recording ----------------------------------------------------------------------------

    def record(self, kind: str, team_id: str | None, challenge: str | None, actor: str,
               outcome: str, *, holder: FlagOwner | None = None, **extra: str | None) -> None:
        """Append one event (one pipelined write); ``extra``: further fields, e.g. ``owner``.

        ``holder``: a flag this event handed out, recorded in the same write.
        """
        assert kind in KINDS, kind
        self.log.record({"kind": kind, "team_id": team_id, "challenge": challenge,
                         "actor": actor, "outcome": outcome, **extra},
                        self.settings.audit_max_events, holder)

    def try_record(self, kind: str, team_id: str | None, challenge: str | None, actor: str,
                   outcome: str, **extra: str | None) -> None:
        """:meth:`record`, logging (not raising) a Redis failure: the request's answer wins."""
        try:
            self.record(kind, team_id, challenge, actor, outcome, holder=None, **extra)
        except CTFError as exc:
            log.warning("audit: could not record %s of %s/%s by %s (%s): %s", kind, challenge,
                        team_id, actor, outcome, exc.detail)

    def own_flag(self, challenge: str, team_id: str) -> FlagOwner:
        """The team's own flag of ``challenge`` as an owner entry (written with its start)."""
        flag = team_flag(self.settings.flag_secret_value(), challenge, team_id,
                         self.settings.flag_format)
        return FlagOwner(challenge, flag_digest(flag), team_id, team_id)

    def task_outcome(self, task: str, challenge: str, team_id: str, actor: str | None,
                     outcome: str, task_id: str | None) -> None:
        """Record a start, stop or extend task's outcome (``ok`` or the error code).

        A start records the team's flag as the team's in the same write, whatever its
        outcome: the mapping is true either way, and a container may have shown the flag
        before failing.
        """
        kind = TASK_KINDS[task]
        holder = self.own_flag(challenge, team_id) if kind in ("start", "restart") else None
        try:
            self.record(kind, team_id, challenge, actor_of(actor, team_id), outcome,
                        holder=holder, task_id=task_id)
        except CTFError as exc:
            log.warning("audit: could not record %s of %s/%s (%s): %s", kind, challenge,
                        team_id, outcome, exc.detail)

    def refused(self, kind: str, challenge: str, team_id: str, actor: str,
                act: Callable[[], Any]) -> Any:
        """Run ``act`` (an edge's send); an error it raises is recorded as the outcome."""
        try:
            return act()
        except CTFError as exc:
            self.try_record(kind, team_id, challenge, actor, exc.code)
            raise

    # -- flags --------------------------------------------------------------------------------

    def flag_check(self, challenge: str, team_id: str, submitted: str, name: str | None,
                   correct: bool, actor: str) -> bool:
        """Record a flag check; a wrong flag that another team holds is ``flag_shared``.

        The owner of a plain flag is one ``HGET`` of its SHA-256 (every start and pool claim
        recorded its flag's); an in-app flag (``name``, Juice Shop's) is the app's HMAC under
        a team's key, so it is compared with each holder's in-app flag of that name: a few
        µs per team of the challenge, and only for a wrong in-app flag.

        Returns:
            Whether the check stays correct: a shared flag never is.
        """
        if correct:
            self.try_record("flag", team_id, challenge, actor, "correct", name=name)
            return True
        owner = self._owner(challenge, team_id, submitted, name)
        if owner is None:
            self.try_record("flag", team_id, challenge, actor, "wrong", name=name)
        else:
            log.warning("flag sharing: team %s submitted the %s flag of team %s", team_id,
                        challenge, owner)
            self.try_record("flag_shared", team_id, challenge, actor, "wrong", owner=owner,
                            name=name)
        return False

    def _owner(self, challenge: str, team_id: str, submitted: str,
               name: str | None) -> str | None:
        """The other team that holds ``submitted`` (see :meth:`flag_check`), or ``None``."""
        if name is None:
            found = self.log.owner(challenge, flag_digest(submitted))
            team = found[0] if found else None
            return team if team != team_id else None
        wanted = submitted.strip().lower().encode()
        secret, fmt = self.settings.flag_secret_value(), self.settings.flag_format
        for team, subject in self.log.holders(challenge):
            if team == team_id:
                continue
            key = team_flag(secret, challenge, subject, fmt)
            if hmac.compare_digest(in_app_flag(key, name).encode(), wanted):
                return team
        return None

    # -- reading ------------------------------------------------------------------------------

    def read(self, *, team: str | None = None, challenge: str | None = None,
             kind: str | None = None, since: str | None = None,
             limit: int = 100) -> list[dict[str, Any]]:
        """Return the events, newest first, filtered (SPEC §13).

        Raises:
            InvalidRequest: an unknown kind, a bad time, a limit outside 1..1000.
            InvalidTeamId: the team filter is not a valid team id.
        """
        if kind is not None and kind not in KINDS:
            raise InvalidRequest(f"kind {kind[:40]!r} is not one of {', '.join(KINDS)}")
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"limit {limit} is outside 1..{MAX_LIMIT}")
        if team is not None:
            check_team_id(team, reserved=True)  # the organisers may read the global one's
        moment = parse_since(since) if since is not None else None
        return self.log.read(team=team, challenge=challenge, kind=kind, since=moment,
                             limit=limit)
