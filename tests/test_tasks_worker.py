"""The Celery tasks through a real worker, as a web platform calls them (send_task by name)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from conftest import (
    Worker,
    cleanup_docker,
    close_platform_client,
    containers_of,
    platform_client,
    private_label,
    wait_for,
)

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.usefixtures("clean_worker_state")]

START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
STATUS = "celery_app.tasks.get_container_status"


_containers = containers_of

def test_start_status_stop_through_the_worker(celery_client: Celery, docker_client: Any) -> None:
    """start_container returns the running instance; status lists it; stop removes it."""
    inst = celery_client.send_task(START, args=["web", "wteam"]).get(timeout=60)
    assert inst["status"] == "running"
    assert inst["container_name"] == "ctf-web-wteam"
    assert inst["url"].startswith("http://localhost:")
    status = celery_client.send_task(STATUS, kwargs={"team_id": "wteam"}).get(timeout=30)
    assert [i["container_id"] for i in status["instances"]] == [inst["container_id"]]
    stopped = celery_client.send_task(STOP, args=["web", "wteam"]).get(timeout=60)
    assert stopped == {"team_id": "wteam", "challenge": "web", "status": "stopped"}
    assert _containers(docker_client, **{"ctf.team": "wteam"}) == []


def test_twenty_concurrent_task_starts_make_one_container(
    celery_client: Celery, docker_client: Any
) -> None:
    """Twenty start tasks for one (challenge, team) sent at once end with one container."""
    results = [celery_client.send_task(START, args=["web", "crowd"]) for _ in range(20)]
    ids = {r.get(timeout=120)["container_id"] for r in results}
    assert len(ids) == 1
    assert len(_containers(docker_client, **{"ctf.team": "crowd"})) == 1


@pytest.mark.parametrize("team", ["../x", "a b", "", "x" * 64, "--help", "tëam"])
def test_invalid_team_id_fails_at_once_without_retry(
    celery_client: Celery, docker_client: Any, worker: Worker, team: str
) -> None:
    """A bad team id fails the task at once with InvalidTeamId; nothing is created."""
    result = celery_client.send_task(START, args=["web", team])
    with pytest.raises(Exception, match="team id") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidTeamId"
    assert result.state == "FAILURE"
    assert _containers(docker_client) == []
    assert "Retry in" not in worker.log().split(result.id, 1)[-1][:2000]


def test_unknown_challenge_fails_at_once(celery_client: Celery, docker_client: Any) -> None:
    """An unknown challenge fails the task with UnknownChallenge naming the known ones."""
    result = celery_client.send_task(START, args=["no-such", "team1"])
    with pytest.raises(Exception, match="not in the catalog") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "UnknownChallenge"
    assert _containers(docker_client) == []


def test_worker_logs_team_challenge_container_outcome_duration(
    celery_client: Celery, worker: Worker
) -> None:
    """Every task logs team, challenge, container, outcome and duration."""
    celery_client.send_task(START, args=["web", "logteam"]).get(timeout=60)
    line = wait_for(
        lambda: next((ln for ln in worker.log().splitlines()
                      if "task=start_container team=logteam" in ln), None),
        10, message="the start log line",
    )
    assert "challenge=web container=ctf-web-logteam outcome=running duration_ms=" in line


def _own_worker_env(
    worker_env: dict[str, str], redis_server: Any, tmp_path: Path, label: dict[str, str],
    **overrides: str,
) -> dict[str, str]:
    """A worker environment on Redis databases 3-5 with a label of its own.

    Its own Redis, so its own label: the session worker's janitor must not sweep it.
    """
    return {
        **worker_env,
        "CELERY_BROKER_URL": f"{redis_server.url}/3",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/4",
        "CTF_REDIS_URL": f"{redis_server.url}/5",
        "CTF_DATA_DIR": str(tmp_path / "data"),
        "CTF_EXTRA_LABELS": json.dumps(label),
        **overrides,
    }


def test_transient_docker_failure_is_retried_then_succeeds(
    worker_env: dict[str, str], tmp_path: Path, docker_client: Any, redis_server: Any
) -> None:
    """With Docker unreachable the start is retried with backoff, and succeeds once it is back."""
    sock = tmp_path / "docker.sock"  # does not exist yet: the engine is "down"
    label = private_label("retry")
    env = _own_worker_env(worker_env, redis_server, tmp_path, label,
                          DOCKER_HOST=f"unix://{sock}")
    w = Worker(env, tmp_path / "worker.log")
    w.start()
    client = platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    try:
        team = f"retry{uuid.uuid4().hex[:6]}"
        result = client.send_task(START, args=["web", team])
        wait_for(lambda: "Retry in" in w.log(), 30, message="a first retry")
        assert "cannot reach the Docker engine" in w.log()
        # The engine "comes back": the socket path now leads to the real engine.
        os.symlink("/var/run/docker.sock", sock)
        inst = result.get(timeout=90)
        assert inst["status"] == "running"
        assert _containers(docker_client, label, **{"ctf.team": team})
    finally:
        w.stop()
        close_platform_client(client)
        cleanup_docker(docker_client, label)


def test_unreachable_registry_fails_at_once_and_says_how_to_go_on(
    worker_env: dict[str, str], tmp_path: Path, redis_server: Any
) -> None:
    """A pull the registry cannot serve is a permanent error naming the image, not a retry loop."""
    image = "127.0.0.1:9/ctf-test/absent:1"  # port 9 ("discard"): no registry answers there
    catalog = tmp_path / "unpullable.yaml"
    catalog.write_text(f"challenges:\n  unpullable:\n    image: {image}\n    port: 8080\n")
    env = _own_worker_env(worker_env, redis_server, tmp_path, private_label("pull"),
                          CTF_CHALLENGES_FILE=str(catalog))
    w = Worker(env, tmp_path / "worker.log")
    w.start()
    client = platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    try:
        team = f"pull{uuid.uuid4().hex[:6]}"
        result = client.send_task(START, args=["unpullable", team])
        with pytest.raises(Exception, match="docker load") as failure:
            result.get(timeout=60)
        assert type(failure.value).__name__ == "ImagePullFailed"
        assert image in str(failure.value)
        assert "registry answered" in str(failure.value)
        line = wait_for(lambda: next((ln for ln in w.log().splitlines()
                                      if f"task=start_container team={team}" in ln), None),
                        10, message="the start's log line")
        assert "outcome=image_pull_failed" in line
        assert "Retry in" not in w.log()
    finally:
        w.stop()
        result = None  # collected (and unsubscribed) before the client closes
        close_platform_client(client)
