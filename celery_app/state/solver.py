"""The solvers' outcomes in Redis (SPEC §14): written by the canary loop, read by the API.

One hash per challenge (state, when, the last output lines) and one
for its run-duration histogram (cumulative buckets): :mod:`celery_app.state.keys` spells them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis

from celery_app.state import keys
from celery_app.state.redis_errors import map_redis_errors
from celery_app.vocab.models import iso

# Buckets of the run-duration histogram (``ctf_challenge_solver_seconds``).
BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATES = ("ok", "broken", "unknown")



class SolverResults:
    """The solvers' outcomes in Redis, one hash per challenge (written by the workers).

    Args:
        client: a redis-py client (``decode_responses=True``).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, challenge: str) -> dict[str, str]:
        """Return the challenge's last outcome (empty: never run)."""
        with map_redis_errors("read a solver's result"):
            return dict(self.redis.hgetall(keys.solver(challenge)))

    def save(self, challenge: str, state: str, output: list[str], *, at: float,
             seconds: float | None, canary: str, made_failed: bool = False,
             host: str = "") -> None:
        """Record an outcome (and, for a run, its duration in the histogram).

        ``host``: the Docker host of the canary the run proved (the host whose instances
        the verdict vouches for).
        """
        pipe = self.redis.pipeline()
        pipe.hset(keys.solver(challenge), mapping={
            "state": state, "at": str(at), "output": json.dumps(output), "canary": canary,
            "made_failed": "1" if made_failed else "0", "host": host,
            "seconds": "" if seconds is None else f"{seconds:.3f}",
        })
        if seconds is not None:
            runs = keys.solver_runs(challenge)
            for le in BUCKETS:
                if seconds <= le:
                    pipe.hincrby(runs, str(le), 1)
            pipe.hincrby(runs, "count", 1)
            pipe.hincrbyfloat(runs, "sum", seconds)
        with map_redis_errors("save a solver's result"):
            pipe.execute()

    def report(self, challenges: list[str]) -> list[dict[str, Any]]:
        """Return SPEC §14's rows for ``challenges`` (those with a solver), in that order."""
        rows = []
        for challenge in challenges:
            found = self.get(challenge)
            last_run = None
            if found.get("at"):
                last_run = iso(datetime.fromtimestamp(float(found["at"]), UTC))
            rows.append({"challenge": challenge, "state": found.get("state", "unknown"),
                         "last_run": last_run,
                         "output": json.loads(found.get("output") or "[]"),
                         # the canary's host: the one whose instances the verdict proves
                         "host": found.get("host") or None})
        return rows

    def histogram(self, challenge: str) -> tuple[list[tuple[str, float]], float]:
        """Return the run-duration histogram's cumulative buckets (``+Inf`` last) and sum."""
        with map_redis_errors("read a solver's runs"):
            raw = self.redis.hgetall(keys.solver_runs(challenge))
        counts: dict[str, str] = dict(raw)
        buckets = [(str(le), float(counts.get(str(le), 0))) for le in BUCKETS]
        buckets.append(("+Inf", float(counts.get("count", 0))))
        return buckets, float(counts.get("sum", 0))
