"""The audit trail (SPEC §13) in Redis: a bounded stream of events, and the flags' owners.

Redis keys (spelled in :mod:`celery_app.state.keys`, listed in ARCHITECTURE.md):

- ``keys.AUDIT``: a stream of every event, newest last, trimmed to about
  ``CTF_AUDIT_MAX_EVENTS`` (``XADD MAXLEN ~``);
- ``keys.AUDIT_SHARED``: a stream of the ``flag_shared`` events alone (same bound): the
  organisers' list of shared flags without a scan of the trail;
- ``keys.flag_owner(challenge)``: a hash, SHA-256 of a flag handed out -> ``<team> <subject>``
  (who holds it; the subject of its HMAC: the team, or ``pool:<slot>``).

A stream, because an event's volume is append-only and read newest first: ``XADD`` with
approximate trimming is one O(1) write (Redis drops whole blocks of old entries), ``XREVRANGE``
reads the newest N in O(N) however long the trail is, and the entry id is Redis's own clock, so
events of every API, worker and ``ctfctl`` process share one order and one time. An event's
``time`` is read from its id: never two clocks. With AOF on (the deployment's Redis), the trail
survives a restart of every part.

One write per event: :meth:`AuditLog.record` sends the ``XADD`` (and, for a start, the flag
owner's ``HSET``; for ``flag_shared``, the second stream's ``XADD``) in one pipeline, one round
trip. The flag itself is never stored, only its SHA-256.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, cast

from celery_app.state import keys
from celery_app.state.redis_errors import map_redis_errors

if TYPE_CHECKING:
    import redis

# The kinds of SPEC §13, in its order.
KINDS: Final = ("start", "stop", "extend", "restart", "expire", "flag", "flag_shared", "admin")
# The fields every event has (``None`` where it has no team or challenge); the rest are extra.
FIELDS: Final = ("kind", "team_id", "challenge", "actor", "outcome")
# Entries one filtered step reads (in Redis, a few ms: short enough not to hold up other
# clients; a full scan of 100,000 events is 20 such steps).
SCAN_BATCH: Final = 5000

# One step of a filtered read, inside Redis so that only matches cross the wire (decoding every
# entry in Python cost ~14 µs each). KEYS[1] the stream; ARGV: the highest id ('+' or '(<id>'),
# the lowest, the batch, matches still wanted, then team, challenge, kind ('' = any). Returns
# the matches, the last id read, and 1 when the scan is over (enough, or the stream's end).
_SCAN = """
local entries = redis.call('XREVRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local want, team, challenge, kind = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local found = {}
for _, e in ipairs(entries) do
  local f, t, c, k = e[2], nil, nil, nil
  for j = 1, #f, 2 do
    local name = f[j]
    if name == 'team_id' then t = f[j + 1]
    elseif name == 'challenge' then c = f[j + 1]
    elseif name == 'kind' then k = f[j + 1] end
  end
  if (team == '' or t == team) and (challenge == '' or c == challenge)
      and (kind == '' or k == kind) then
    found[#found + 1] = e
    if #found >= want then return {found, e[1], 1} end
  end
end
local last = ''
if #entries > 0 then last = entries[#entries][1] end
if #entries < tonumber(ARGV[3]) then return {found, last, 1} end
return {found, last, 0}
"""


@dataclass(frozen=True)
class FlagOwner:
    """Who holds a flag: written with the event that handed it out (a start, a pool claim).

    Args:
        challenge: the challenge.
        digest: the SHA-256 (hex) of the flag.
        team: the team that holds it.
        subject: what the flag's HMAC is of: the team itself, or ``pool:<slot>``.
    """

    challenge: str
    digest: str
    team: str
    subject: str

    def queue(self, pipe: Any) -> None:
        """Queue the owner's ``HSET`` on a pipeline."""
        pipe.hset(keys.flag_owner(self.challenge), self.digest, f"{self.team} {self.subject}")


def event_time(entry_id: str) -> str:
    """Return the ISO 8601 UTC time (milliseconds) of a stream entry id (``<ms>-<seq>``)."""
    ms = int(entry_id.partition("-")[0])
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _event(entry_id: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """Return an event as the API answers it: ``time`` first, every field, and its ``id``."""
    event: dict[str, Any] = {"time": event_time(entry_id)}
    event |= {name: fields.get(name) or None for name in FIELDS}
    event |= {k: v for k, v in fields.items() if k not in FIELDS}
    event["id"] = entry_id
    return event


class AuditLog:
    """The audit stream and the flag owners (built by the store: ``StateStore.audit``).

    Args:
        client: the state Redis (``decode_responses=True``).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._scan = client.register_script(_SCAN)

    def record(self, event: Mapping[str, str | None], max_events: int,
               owner: FlagOwner | None = None) -> None:
        """Append one event, trimming the trail to about ``max_events``; one round trip.

        Args:
            event: ``kind``, ``team_id``, ``challenge``, ``actor``, ``outcome`` and any extra
                fields (``owner``, ``task_id``, ``action``, …); ``None`` values are left out.
            max_events: the bound (``CTF_AUDIT_MAX_EVENTS``); Redis trims whole blocks of
                about 100 entries, so the stream holds at most about that many more.
            owner: a flag handed out by this event (a start): recorded in the same pipeline.

        Raises:
            RedisUnavailable: Redis cannot be reached.
        """
        fields = {k: str(v) for k, v in event.items() if v is not None and v != ""}
        with map_redis_errors("record audit event"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(keys.AUDIT, fields, maxlen=max_events, approximate=True)
            if fields.get("kind") == "flag_shared":
                pipe.xadd(keys.AUDIT_SHARED, fields, maxlen=max_events, approximate=True)
            if owner is not None:
                owner.queue(pipe)
            pipe.execute()

    def length(self) -> int:
        """Return how many events the trail holds."""
        with map_redis_errors("read audit length"):
            return int(self.redis.xlen(keys.AUDIT))

    def _scan_back(self, stream: str, since_ms: int | None, limit: int,
                   match: tuple[str, str, str]) -> Iterator[tuple[str, dict[str, str]]]:
        """Yield up to ``limit`` matching entries, newest first, down to ``since_ms``."""
        high, low = "+", "-" if since_ms is None else str(since_ms)
        left = limit
        while left > 0:
            with map_redis_errors("read audit trail"):
                found, last, over = self._scan(keys=[stream],
                                               args=[high, low, SCAN_BATCH, left, *match])
            for entry_id, flat in found:
                yield str(entry_id), dict(zip(flat[::2], flat[1::2], strict=True))
            left -= len(found)
            if int(over) or not last:
                return
            high = f"({last}"  # exclusive: the next step starts below the last entry read

    def read(
        self, *, team: str | None = None, challenge: str | None = None,
        kind: str | None = None, since: datetime | None = None, limit: int = 100,
    ) -> builtins.list[dict[str, Any]]:
        """Return up to ``limit`` events, newest first, that match every filter given.

        A read without filters costs one ``XREVRANGE`` of ``limit`` entries; filters scan
        back inside Redis (steps of ``SCAN_BATCH`` entries, only matches returned) until
        ``limit`` matches or the trail, or ``since``, is reached.
        ``kind="flag_shared"`` reads the shared flags' own stream.
        """
        stream = keys.AUDIT_SHARED if kind == "flag_shared" else keys.AUDIT
        # Stream ids start at 0: a time before 1970 means the whole trail.
        since_ms = None if since is None else max(0, int(since.timestamp() * 1000))
        if team is None and challenge is None and kind is None:
            low = "-" if since_ms is None else str(since_ms)
            with map_redis_errors("read audit trail"):
                batch = cast(builtins.list[tuple[str, dict[str, str]]],
                             self.redis.xrevrange(stream, "+", low, count=limit))
            return [_event(i, f) for i, f in batch]
        match = (team or "", challenge or "", kind or "")
        return [_event(i, f) for i, f in self._scan_back(stream, since_ms, limit, match)]

    # -- flag owners --------------------------------------------------------------------------

    def owner(self, challenge: str, digest: str) -> tuple[str, str] | None:
        """Return ``(team, subject)`` holding the flag of SHA-256 ``digest``, or ``None``."""
        with map_redis_errors("read flag owner"):
            raw = self.redis.hget(keys.flag_owner(challenge), digest)
        if not raw:
            return None
        team, _, subject = str(raw).partition(" ")
        return team, subject or team

    def holders(self, challenge: str) -> builtins.list[tuple[str, str]]:
        """Return every ``(team, subject)`` that holds a flag of ``challenge``."""
        with map_redis_errors("read flag owners"):
            raw = cast(builtins.list[str], self.redis.hvals(keys.flag_owner(challenge)))
        pairs = [str(v).partition(" ") for v in raw]
        return [(team, subject or team) for team, _, subject in pairs]

    def add_owner(self, owner: FlagOwner) -> None:
        """Record who holds a flag, alone (a pool claim; a start records it with its event)."""
        with map_redis_errors("record flag owner"):
            pipe = self.redis.pipeline(transaction=False)
            owner.queue(pipe)
            pipe.execute()
