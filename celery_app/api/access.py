"""Teams' access generations as the API checks team tokens against them (issue 22)."""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool

from celery_app.api.client import Dispatcher

# Seconds an API process trusts a team's access generation it read (the process that
# revokes knows the new one at once; others within this long).
GENERATION_TTL = 1.0


class AccessGenerations:
    """Teams' access generations, as team tokens are checked against them (issue 22).

    One Redis read per team and ``GENERATION_TTL`` at most, on the event loop.

    Args:
        disp: the dispatcher (its index, or its store before the index is open).
        ttl: seconds a generation read is trusted.
    """

    MAX_TEAMS = 10_000

    def __init__(self, disp: Dispatcher, ttl: float = GENERATION_TTL) -> None:
        self.disp = disp
        self.ttl = ttl
        self._seen: dict[str, tuple[float, int]] = {}

    async def get(self, team_id: str) -> int:
        """Return the team's access generation (read again after ``ttl`` seconds)."""
        now = time.monotonic()
        hit = self._seen.get(team_id)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        if self.disp.index.is_open:
            generation = await self.disp.index.access_generation(team_id)
        else:
            generation = await run_in_threadpool(self.disp.store.access_generation, team_id)
        self.note(team_id, generation, now)
        return generation

    def note(self, team_id: str, generation: int, now: float | None = None) -> None:
        """Remember a generation just read or just raised (a revocation here)."""
        now = time.monotonic() if now is None else now
        known = self._seen.get(team_id)
        if known is not None and now - known[0] < self.ttl:
            # Generations only go up: a read that started before a revocation here must not
            # bring the old one back.
            generation = max(generation, known[1])
        if len(self._seen) >= self.MAX_TEAMS:
            self._seen.clear()  # tokens naming made-up teams must not grow it without end
        self._seen[team_id] = (now, generation)
