"""The audit trail's read with a full trail (issue 25): ``GET /api/v1/audit?limit=50``.

Records ``--events`` events (100,000 by default: issue 25's figure) in a private
``redis-server``, as the hooks write them (team, challenge, actor, outcome, task id), then times
the organisers' reads through the API in-process (FastAPI's ``TestClient``, so the figure
includes the framework, not a network): the newest 50 (the dashboard's read), one team's
newest 50 (a filter that scans back), and a kind absent from the trail (a full scan, the worst
case). Also the cost of one
record (the hot path's one pipelined write). Needs no Docker.

    .venv/bin/python bench/bench_audit.py            # --events 100000 -n 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import redis
from _common import ADMIN_TOKEN, RedisServer, emit, machine, summary_ms
from fastapi.testclient import TestClient

from celery_app.api.app import create_app
from celery_app.core.audit import Auditor
from celery_app.settings import load_settings
from celery_app.state import keys
from celery_app.state.store import StateStore

TEAMS = 1000
CHALLENGES = ("web", "pwn", "crypto", "juice-shop", "todo-app")
KINDS = ("start", "stop", "extend", "flag", "flag", "flag")


def fill(client: redis.Redis, events: int, bound: int) -> None:
    """Record ``events`` events in pipelines of 1,000 (as the hooks write each one)."""
    store = StateStore(client)
    for base in range(0, events, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(base, min(events, base + 1000)):
            kind = KINDS[i % len(KINDS)]
            team = f"team{i % TEAMS}"
            outcome = "wrong" if kind == "flag" else "ok"
            pipe.xadd(keys.AUDIT, {"kind": kind, "team_id": team,
                                    "challenge": CHALLENGES[i % len(CHALLENGES)],
                                    "actor": f"team:{team}", "outcome": outcome,
                                    "task_id": f"{i:036d}"},
                      maxlen=bound, approximate=True)
        pipe.execute()
    assert store.audit.length() >= min(events, bound)


def timed(api: TestClient, path: str, n: int) -> dict[str, float]:
    """Time ``n`` GETs of ``path`` (admin) after 5 unmeasured ones."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    durations = []
    for i in range(n + 5):
        began = time.perf_counter()
        r = api.get(path, headers=headers)
        took = time.perf_counter() - began
        assert r.status_code == 200, r.text
        if i >= 5:
            durations.append(took)
    return summary_ms(durations)


def main() -> None:
    """Run the benchmark and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            settings = load_settings(redis_url=f"{server.url}/2", broker_url=f"{server.url}/0",
                                     result_backend=f"{server.url}/1", data_dir=Path(tmp),
                                     admin_token=ADMIN_TOKEN)
            client = redis.Redis.from_url(f"{server.url}/2", decode_responses=True)
            began = time.perf_counter()
            fill(client, args.events, settings.audit_max_events)
            filled = time.perf_counter() - began
            auditor = Auditor(settings, StateStore(client))
            records = []
            for i in range(args.n):
                t0 = time.perf_counter()
                auditor.record("admin", None, "web", "admin", "ok", action=f"bench{i}")
                records.append(time.perf_counter() - t0)
            with TestClient(create_app(settings)) as api:
                result = {
                    "machine": machine(),
                    "events": auditor.log.length(),
                    "fill_s": round(filled, 1),
                    "record_one": summary_ms(records),
                    "newest_50": timed(api, "/api/v1/audit?limit=50", args.n),
                    "team_newest_50": timed(api, "/api/v1/audit?team=team7&limit=50",
                                            max(20, args.n // 10)),
                    # no expire in the trail: the read scans all of it (the worst case)
                    "kind_absent_full_scan": timed(api, "/api/v1/audit?kind=expire", 5),
                }
            client.close()
        finally:
            server.stop()
    emit(result, args.json)


if __name__ == "__main__":
    main()
