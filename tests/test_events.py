"""The index follows the engine's events (issue 15), seen as the platform sees it.

A real worker (its janitor every 10 s, the slowest allowed, so what is seen within 2 s is the
event follower's doing) on a Redis of its own; containers killed, OOM-killed and removed
behind its back through the real engine; status read through a plain Celery client sending
``get_container_status`` by name and through the HTTP API. The engine restart uses a second
engine of our own (tests/engines.py), never the machine's.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import docker
import pytest
import redis
from api_helpers import ADMIN
from conftest import (
    BUSYBOX,
    HTTP_DOCKERFILE,
    RUN_ID,
    RedisServer,
    Worker,
    base_env,
    build_image,
    catalog_yaml,
    cleanup_docker,
    private_label,
    wait_for,
    worker_and_api,
)
from engines import second_engine
from fastapi.testclient import TestClient

from celery_app.engine.docker_driver import _container_event
from celery_app.worker.events import MAX_LAG, EventFollower, _Pending

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

LABEL = private_label("events")
POOL = "10.238.0.0/16"
ENGINE_POOL = "10.237.0.0/16"
# What the issue promises: a change is seen through every interface within this long.
SEEN_WITHIN = 2.0
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
STATUS = "celery_app.tasks.get_container_status"
# A challenge that answers, then (once /tmp/boom exists) eats memory past its 16 MiB limit.
HOG = """
  hog:
    image: {image}
    port: 8080
    ttl: 600
    memory: 16m
    command: ["sh", "-c", "httpd -p 8080 -h /www; while [ ! -e /tmp/boom ]; do sleep 0.1; done;
      x=a; while :; do x=$x$x; done"]
"""


@dataclass
class Setup:
    """The worker, a platform's Celery client and the API, all on a Redis of their own."""

    worker: Worker
    client: Any
    api: TestClient
    env: dict[str, str]

    def task_view(self, team: str, challenge: str) -> dict[str, Any] | None:
        """The instance as ``get_container_status`` by name shows it (``None``: none)."""
        found = self.client.send_task(
            STATUS, kwargs={"team_id": team, "challenge": challenge}).get(timeout=10)
        return found["instances"][0] if found["instances"] else None

    def api_view(self, team: str, challenge: str) -> dict[str, Any] | None:
        """The instance as ``GET /api/v1/teams/<team>/instances/<challenge>`` shows it."""
        r = self.api.get(f"/api/v1/teams/{team}/instances/{challenge}", headers=ADMIN)
        if r.status_code == 404:
            return None
        assert r.status_code == 200, r.text
        return dict(r.json())

    def start(self, challenge: str, team: str) -> dict[str, Any]:
        done = self.client.send_task(START, args=[challenge, team]).get(timeout=90)
        assert done["status"] == "running"
        return dict(done)


# A stand-in whose image health check fails once /tmp/sick exists (checked every second).
SICK_DOCKERFILE = HTTP_DOCKERFILE + """HEALTHCHECK --interval=1s --timeout=1s --retries=1 \\
  CMD ["/bin/busybox", "sh", "-c", "test ! -e /tmp/sick"]
"""
SICK = """
  sick:
    image: {image}
    port: 8080
    ttl: 600
"""
HEALTH_CHECK_LATENCY = 2.0  # --interval 1 s x --retries 1, plus the check's own timeout


def _catalog(images: dict[str, str], path: Path, sick_image: str) -> Path:
    path.write_text(catalog_yaml(images) + HOG.format(image=images["http"])
                    + SICK.format(image=sick_image))
    return path


@contextlib.contextmanager
def running_setup(
    server: RedisServer, catalog: Path, workdir: Path, **env_overrides: str
) -> Iterator[Setup]:
    """A worker (janitor every 10 s), a platform client and the API; stopped afterwards."""
    env = {
        **base_env(server, catalog, workdir / "data"),
        "CTF_EXTRA_LABELS": json.dumps(LABEL),
        "CTF_TEAM_SUBNET_POOL": POOL,
        "CTF_JANITOR_INTERVAL": "10",
        **env_overrides,
    }
    with worker_and_api(env, catalog, workdir, ready=lambda worker: wait_for(
            lambda: "events: following host" in worker.log(), 30, 0.1,
            "the worker to follow its engine's events")) as (worker, client, api):
        yield Setup(worker, client, api, env)


@pytest.fixture(scope="module")
def events_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this module's own: its worker's index, broker and results."""
    server = RedisServer(tmp_path_factory.mktemp("redis-events"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def events_catalog(
    images: dict[str, str], docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The test catalog plus ``hog`` (out of memory on demand) and ``sick`` (unhealthy so)."""
    sick = build_image(docker_client, f"ctf-test/sick:{RUN_ID}", SICK_DOCKERFILE,
                       {"busybox": BUSYBOX, "index.html": b"hello from ctf\n"})
    return _catalog(images, tmp_path_factory.mktemp("events") / "challenges.yaml", sick)


@pytest.fixture(scope="module")
def setup(
    events_redis: RedisServer, events_catalog: Path, docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    """One worker on the machine's engine for the module; everything it made is removed."""
    try:
        with running_setup(events_redis, events_catalog,
                           tmp_path_factory.mktemp("events-worker")) as made:
            yield made
    finally:
        cleanup_docker(docker_client, LABEL)


def _team() -> str:
    return f"ev{uuid.uuid4().hex[:8]}"


def _seen_everywhere(
    setup: Setup, team: str, challenge: str, began: float,
    condition: Callable[[dict[str, Any] | None], bool], what: str,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Wait until the task path and the API both show ``condition``; fail past SEEN_WITHIN.

    Returns:
        What the task path and the API showed.
    """
    remaining = SEEN_WITHIN - (time.monotonic() - began)
    by_task = wait_for(lambda: [v] if condition(v := setup.task_view(team, challenge)) else None,
                       remaining, 0.02, f"the task path to show {what}")[0]
    by_api = setup.api_view(team, challenge)
    assert condition(by_api), by_api
    assert time.monotonic() - began <= SEEN_WITHIN, f"{what} took longer than {SEEN_WITHIN} s"
    return by_task, by_api


def _failed(view: dict[str, Any] | None) -> bool:
    return view is not None and view["status"] == "failed"


def test_killed_container_shows_failed_with_exit_code_within_2s(
    setup: Setup, docker_client: docker.DockerClient
) -> None:
    """A `docker kill`: the task path and the API show failed, exit code 137, within 2 s."""
    team = _team()
    inst = setup.start("web", team)
    began = time.monotonic()
    docker_client.containers.get(inst["container_id"]).kill()
    by_task, by_api = _seen_everywhere(setup, team, "web", began, _failed, "failed")
    for view in (by_task, by_api):
        assert view is not None
        assert view["exit_code"] == 137
        assert view["oom"] is False
        assert "exited with code 137" in view["error"]
    # The follower did it, not the janitor (every 10 s here).
    assert f"container=ctf-web-{team} die: marked" in setup.worker.log()


def test_oom_killed_container_shows_failed_with_oom_flag_within_2s(
    setup: Setup, docker_client: docker.DockerClient
) -> None:
    """A container that eats past its 16 MiB limit shows failed with oom true within 2 s."""
    team = _team()
    inst = setup.start("hog", team)
    container = docker_client.containers.get(inst["container_id"])
    began = time.monotonic()
    container.exec_run(["/bin/busybox", "touch", "/tmp/boom"])
    by_task, by_api = _seen_everywhere(setup, team, "hog", began, _failed, "failed")
    for view in (by_task, by_api):
        assert view is not None
        assert view["oom"] is True
        assert view["exit_code"] == 137
        assert "lack of memory" in view["error"]


def test_unhealthy_container_shows_failed_within_2s_of_its_health_check(
    setup: Setup, docker_client: docker.DockerClient
) -> None:
    """A container whose health check starts failing shows failed (still running, unhealthy)."""
    team = _team()
    inst = setup.start("sick", team)
    container = docker_client.containers.get(inst["container_id"])
    container.exec_run(["/bin/busybox", "touch", "/tmp/sick"])
    # The engine's own delay (the next check, then its verdict) is not ours.
    began = time.monotonic() + HEALTH_CHECK_LATENCY
    by_task, _ = _seen_everywhere(setup, team, "sick", began, _failed, "failed")
    assert by_task is not None and "unhealthy" in by_task["error"]
    assert by_task["exit_code"] is None or by_task["exit_code"] == 0
    assert f"container=ctf-sick-{team} health_status: marked" in setup.worker.log()


def test_container_output_is_kept_with_the_flag_masked(
    setup: Setup, docker_client: docker.DockerClient
) -> None:
    """A dead container's last output lines are in its record; the team's flag never is."""
    team = _team()
    inst = setup.start("web", team)
    container = docker_client.containers.get(inst["container_id"])
    # Output on the container's own stdout, as a challenge printing its config would.
    container.exec_run(["/bin/busybox", "sh", "-c",
                        "echo last words: $FLAG > /proc/1/fd/1"])
    began = time.monotonic()
    container.kill()
    by_task, _ = _seen_everywhere(setup, team, "web", began, _failed, "failed")
    assert by_task is not None
    assert "last words: [flag]" in by_task["logs"]
    assert "CTF{" not in by_task["logs"]


def test_container_removed_behind_our_back_vanishes_within_2s(
    setup: Setup, docker_client: docker.DockerClient
) -> None:
    """A `docker rm -f`: the instance vanishes from the task path and the API; its network goes."""
    team = _team()
    inst = setup.start("web", team)
    began = time.monotonic()
    docker_client.containers.get(inst["container_id"]).remove(force=True)
    _seen_everywhere(setup, team, "web", began, lambda v: v is None, "no instance")
    wait_for(lambda: not docker_client.networks.list(names=[f"ctf-team-{team}"]), 10, 0.1,
             "the team network to be removed")


def test_container_started_behind_our_back_is_adopted(
    setup: Setup, docker_client: docker.DockerClient, images: dict[str, str]
) -> None:
    """A container with our labels started by hand is adopted and shown within 2 s."""
    team = _team()
    labels = {**LABEL, "ctf.managed": "true", "ctf.team": team, "ctf.challenge": "web",
              "ctf.host": "local"}
    began = time.monotonic()
    docker_client.containers.run(images["http"], name=f"ctf-web-{team}", labels=labels,
                                 detach=True, ports={"8080/tcp": ("127.0.0.1", None)})
    by_task, _ = _seen_everywhere(setup, team, "web", began, lambda v: v is not None,
                                  "the adopted instance")
    assert by_task is not None
    assert by_task["status"] in ("running", "starting")
    assert by_task["ports"]["8080/tcp"] > 0


def test_our_own_stops_and_failed_starts_leave_no_failed_record(
    setup: Setup, docker_client: docker.DockerClient
) -> None:
    """Stops (whose containers die) leave nothing; a crashing start fails as before."""
    teams = [_team() for _ in range(4)]
    for team in teams:
        setup.start("web", team)
    for team in teams:
        assert setup.client.send_task(STOP, args=["web", team]).get(timeout=60)["status"] \
            == "stopped"
    crash = _team()
    with pytest.raises(Exception, match="exited with code 3"):
        setup.client.send_task(START, args=["crash", crash]).get(timeout=60)
    # Events are handled in order: once a later death is marked, those before it were seen.
    marker = _team()
    docker_client.containers.get(setup.start("web", marker)["container_id"]).kill()
    wait_for(lambda: f"container=ctf-web-{marker} die: marked" in setup.worker.log(), 10,
             0.05, "a later death to be handled")
    for team in teams:
        assert setup.task_view(team, "web") is None
    view = setup.task_view(crash, "crash")
    assert view is not None and view["status"] == "failed"
    assert "exited with code 3" in view["error"]
    assert "die: marked" not in "".join(
        line for line in setup.worker.log().splitlines()
        if any(f"ctf-web-{t} " in line for t in teams) or f"ctf-crash-{crash} " in line
    )


def test_engine_restart_reconnects_and_shows_dead_instances_failed(
    images: dict[str, str], events_redis: RedisServer, events_catalog: Path,
    tmp_path: Path,
) -> None:
    """The engine restarts: the follower reconnects, reconciles, and its dead show failed."""
    label = private_label("events-engine")
    with second_engine(images, label, index=3) as engine, running_setup(
        events_redis, events_catalog, tmp_path,
        DOCKER_HOST=engine.tcp_url, CTF_PUBLIC_HOST=engine.address,
        CTF_PUBLISH_IP=engine.address, CTF_EXTRA_LABELS=json.dumps(label),
        CTF_TEAM_SUBNET_POOL=ENGINE_POOL,
        CELERY_BROKER_URL=f"{events_redis.url}/6",
        CELERY_RESULT_BACKEND=f"{events_redis.url}/7", CTF_REDIS_URL=f"{events_redis.url}/8",
    ) as made:
        teams = [_team() for _ in range(2)]
        for team in teams:
            made.start("web", team)
        engine.stop_daemon()  # its containers die with it
        wait_for(lambda: "stream of host local broken" in made.worker.log(), 30, 0.1,
                 "the follower to notice")
        engine.start_daemon()
        back = time.monotonic()
        wait_for(lambda: "(connection 2)" in made.worker.log(), 10, 0.1,
                 "the follower to reconnect")
        for team in teams:
            view = wait_for(
                lambda t=team: v if _failed(v := made.task_view(t, "web"))
                and "host_up" not in v else None,
                max(0.5, 2 * SEEN_WITHIN - (time.monotonic() - back)), 0.05,
                f"{team} to show failed once the engine is back")
            assert "container" in view["error"]
            api_view = made.api_view(team, "web")
            assert _failed(api_view) and api_view is not None and "host_up" not in api_view


def test_status_results_do_not_pile_up_for_a_day(setup: Setup) -> None:
    """A status read's result lives 10 minutes in the result backend, not a day."""
    team = _team()
    result = setup.client.send_task(STATUS, kwargs={"team_id": team})
    assert result.get(timeout=10) == {"instances": []}
    backend = redis.Redis.from_url(setup.env["CELERY_RESULT_BACKEND"])
    try:
        key = f"celery-task-meta-{result.id}"
        ttl = wait_for(lambda: (t := int(backend.ttl(key))) <= 600 and t, 5, 0.05,
                       "the short expiry")
        assert 0 < ttl <= 600
    finally:
        backend.close()


def test_engine_events_are_read_with_exit_code_health_and_labels() -> None:
    """The engine's event JSON becomes action, id, name, labels, exit code and health."""
    die = _container_event({"Type": "container", "Action": "die", "timeNano": 1_700_000_000e9,
                            "Actor": {"ID": "abc", "Attributes": {
                                "name": "ctf-web-t1", "image": "x", "exitCode": "137",
                                "ctf.team": "t1", "ctf.challenge": "web"}}})
    assert (die.action, die.id, die.name, die.exit_code) == ("die", "abc", "ctf-web-t1", 137)
    assert die.labels == {"ctf.team": "t1", "ctf.challenge": "web"}
    sick = _container_event({"Type": "container", "Action": "health_status: unhealthy",
                             "Actor": {"ID": "abc", "Attributes": {"name": "n"}}})
    assert (sick.action, sick.health, sick.exit_code) == ("health_status", "unhealthy", None)


def test_index_is_not_trusted_alone_while_the_follower_is_away_or_behind() -> None:
    """live() is false before the stream is connected and when an event waits over 1 s."""
    follower = EventFollower(cast(Any, None))
    assert not follower.live()
    follower._connected.set()
    assert follower.live()
    event = _container_event({"Action": "die", "Actor": {"ID": "a", "Attributes": {}}})
    follower._queue.put(_Pending(event, time.monotonic() - 2 * MAX_LAG))
    assert not follower.live()
