"""Each start, stop and extend takes effect once, whatever the moment its worker is killed -9.

SPEC §10: a worker that dies (even ``kill -9``) delays the requests it had taken by at most a
minute, and none is done twice. Each test runs its own worker (``test_faults.own_worker``)
under ``ctf_testkit.pause_points``, which hangs the chosen task at a chosen point of its run;
the test kills the worker's process group right there, starts it again as users run it, and
checks what the redelivered requests did and answered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from conftest import Worker, containers_of, wait_for
from test_faults import FAULT_LABEL, PROMISED_DELAY, own_worker

from ctf_testkit.pause_points import PAUSE_APP

__all__ = ["own_worker"]  # the fixture, shared with test_faults

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
EXTEND = "celery_app.tasks.extend_container"
TTL = 600
# Room for six extends of TTL and more: an extend applied twice shows, never capped away.
MAX_LIFETIME = 8 * TTL

MakeWorker = Callable[..., tuple[Worker, Celery, dict[str, str]]]


@pytest.fixture
def long_catalog(images: dict[str, str], tmp_path: Path) -> Path:
    """A catalog whose ``long`` challenge can be extended many times (ttl 600 s, 8 ttls max)."""
    path = tmp_path / "long.yaml"
    path.write_text(
        f"challenges:\n  long:\n    image: {images['http']}\n    port: 8080\n"
        f"    ttl: {TTL}\n    max_lifetime: {MAX_LIFETIME}\n    start_timeout: 20\n"
    )
    return path


def _paused_worker(own_worker: MakeWorker, catalog: Path, pause: str,
                   where: Path) -> tuple[Worker, Celery, dict[str, str]]:
    """A worker that hangs each task named in ``pause`` (``<task>:<point>``) at that point."""
    where.mkdir()
    worker, client, env = own_worker(CTF_CHALLENGES_FILE=str(catalog), CTFTEST_PAUSE=pause,
                                     CTFTEST_PAUSE_DIR=str(where))
    worker.app = PAUSE_APP
    worker.start()
    return worker, client, env


def _kill_when_paused(worker: Worker, where: Path) -> tuple[int, float]:
    """Kill -9 the worker's process group once a task hangs at its pause point; start it again.

    It comes back as users run it: no pause point. Returns where its log stood at the kill,
    and when (``time.monotonic()``) it was back.
    """
    wait_for(lambda: any(where.iterdir()), 60, 0.02, "a task to reach its pause point")
    worker.kill()
    mark = len(worker.log())
    worker.env.pop("CTFTEST_PAUSE")
    worker.start()
    return mark, time.monotonic()


def _finished_again(worker: Worker, restart: tuple[int, float], results: list[Any]) -> None:
    """Wait until each task of ``results`` ran to its end after the restart, within the promise.

    Its stored answer may be the killed worker's: only the redelivery's end says what the
    redelivered copy did. (The killed run never logged an end: it hung before.)
    """
    mark, back = restart

    def ended() -> bool:
        after = worker.log()[mark:]
        return all(f"[{r.id}] succeeded" in after or f"[{r.id}] Task already completed" in after
                   for r in results)

    wait_for(ended, PROMISED_DELAY - (time.monotonic() - back), 0.1,
             "every killed task to be redelivered and run to its end (SPEC §10: within 60 s)")


def _expiry(doc: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(doc["expires_at"]).replace("Z", "+00:00"))


def _record(env: dict[str, str], team: str) -> dict[str, Any] | None:
    state = redis.Redis.from_url(env["CTF_REDIS_URL"], decode_responses=True)
    try:
        raw = state.get(f"ctf:inst:long/{team}")
    finally:
        state.close()
    return json.loads(raw) if raw else None


def _containers(docker_client: Any, team: str) -> list[Any]:
    return containers_of(docker_client, FAULT_LABEL, **{"ctf.team": team})


@pytest.mark.parametrize("point", ["begun", "applied", "answered"])
def test_five_extends_by_name_across_a_kill_move_the_expiry_five_ttls(
    own_worker: MakeWorker, long_catalog: Path, tmp_path: Path, point: str
) -> None:
    """5 extends by name, worker killed -9 at a point of the first: +5 ttl, each answered once."""
    worker, client, env = _paused_worker(own_worker, long_catalog, f"extend_container:{point}",
                                         tmp_path / "paused")
    team = f"x{uuid.uuid4().hex[:6]}"
    first = client.send_task(START, args=["long", team]).get(timeout=60)
    assert first["status"] == "running"
    before = _expiry(first)
    extends = [client.send_task(EXTEND, args=["long", team]) for _ in range(5)]
    restart = _kill_when_paused(worker, tmp_path / "paused")
    if point == "applied":  # the window of the issue: the record written, no answer stored
        record = _record(env, team)
        assert record is not None and _expiry(record) > before
    _finished_again(worker, restart, extends)
    answers = [client.AsyncResult(r.id).get(timeout=10) for r in extends]
    # Each extend answered its own step, once: the five answers are the five successive
    # expiries, and the record holds the fifth.
    assert sorted(_expiry(a) for a in answers) == [
        before + timedelta(seconds=TTL * k) for k in range(1, 6)]
    record = _record(env, team)
    assert record is not None and _expiry(record) == before + timedelta(seconds=5 * TTL)


@pytest.mark.parametrize("point", ["applied", "answered"])
def test_a_start_redelivered_after_its_effect_does_not_undo_a_later_stop(
    own_worker: MakeWorker, long_catalog: Path, tmp_path: Path, docker_client: Any, point: str
) -> None:
    """A start by name killed after it ran, then a stop: the start's redelivery starts nothing."""
    worker, client, env = _paused_worker(own_worker, long_catalog, f"start_container:{point}",
                                         tmp_path / "paused")
    team = f"s{uuid.uuid4().hex[:6]}"
    start = client.send_task(START, args=["long", team])
    restart = _kill_when_paused(worker, tmp_path / "paused")
    [made] = _containers(docker_client, team)  # it ran: its container is up, unacknowledged
    assert start.ready() == (point == "answered")
    stopped = client.send_task(STOP, args=["long", team]).get(timeout=60)
    assert stopped["status"] == "stopped"
    assert _containers(docker_client, team) == []
    # The start comes back within the promise and answers what it did, and only that.
    _finished_again(worker, restart, [start])
    answer = client.AsyncResult(start.id).get(timeout=10)
    assert answer["status"] == "running" and answer["container_id"] == made.id
    assert _containers(docker_client, team) == []
    assert _record(env, team) is None


@pytest.mark.parametrize("point", ["applied", "answered"])
def test_a_stop_redelivered_after_its_effect_does_not_undo_a_later_start(
    own_worker: MakeWorker, long_catalog: Path, tmp_path: Path, docker_client: Any, point: str
) -> None:
    """A stop by name killed after it ran, then a start: the stop's redelivery leaves it running."""
    worker, client, env = _paused_worker(own_worker, long_catalog, f"stop_container:{point}",
                                         tmp_path / "paused")
    team = f"t{uuid.uuid4().hex[:6]}"
    client.send_task(START, args=["long", team]).get(timeout=60)
    stop = client.send_task(STOP, args=["long", team])
    restart = _kill_when_paused(worker, tmp_path / "paused")
    assert _containers(docker_client, team) == []  # it ran: the container is gone
    assert stop.ready() == (point == "answered")
    again = client.send_task(START, args=["long", team]).get(timeout=60)
    assert again["status"] == "running"
    # The stop comes back within the promise and answers what it did, and only that.
    _finished_again(worker, restart, [stop])
    assert client.AsyncResult(stop.id).get(timeout=10)["status"] == "stopped"
    [running] = _containers(docker_client, team)
    assert running.id == again["container_id"] and running.status == "running"
    record = _record(env, team)
    assert record is not None and record["container_id"] == again["container_id"]
