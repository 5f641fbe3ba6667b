"""How many requests may wait for their task at once (``?wait`` and extend), per team and in all."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from celery_app.errors import BackendUnavailable, RateLimited


class WaitSlots:
    """Bounds the requests that wait for their task at once, per team and in all.

    Used on the event loop only (no lock needed). A request over a bound is refused before
    anything is sent, so a refused ``?wait`` leaves nothing behind.
    """

    def __init__(self, per_team: int, total: int) -> None:
        self.per_team = per_team
        self.total = total
        self.used: dict[str, int] = {}
        self.used_total = 0

    def take(self, team_id: str) -> None:
        """Take a slot for ``team_id``'s waiting request.

        Raises:
            RateLimited: the team already has ``per_team`` requests waiting.
            BackendUnavailable: the API already holds ``total`` waiting requests.

        """
        if self.used.get(team_id, 0) >= self.per_team:
            raise RateLimited(
                f"team {team_id} already has {self.per_team} requests waiting for their task "
                "(CTF_API_MAX_WAITS_PER_TEAM); send it without ?wait and follow "
                "GET /api/v1/tasks/{task_id}, or wait for one to finish"
            )
        if self.used_total >= self.total:
            raise BackendUnavailable(
                f"the API already holds {self.total} requests waiting for their task "
                "(CTF_API_MAX_WAITS); send it without ?wait and follow "
                "GET /api/v1/tasks/{task_id}, or try again shortly"
            )
        self.used[team_id] = self.used.get(team_id, 0) + 1
        self.used_total += 1

    def give_back(self, team_id: str) -> None:
        """Return the slot taken by :meth:`take`."""
        self.used_total -= 1
        left = self.used.get(team_id, 1) - 1
        if left > 0:
            self.used[team_id] = left
        else:
            self.used.pop(team_id, None)

    @contextlib.contextmanager
    def held(self, team_id: str) -> Iterator[None]:
        """Hold a slot for the block (see :meth:`take`)."""
        self.take(team_id)
        try:
            yield
        finally:
            self.give_back(team_id)
