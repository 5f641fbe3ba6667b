"""``share: global`` challenges (SPEC §13) on the real engine, as teams and organisers meet them.

A real worker with default settings (the janitor's default interval: the workers keep the
global instance up on their own), a platform's Celery client sending tasks by name and the
HTTP API, on a Redis and a team subnet pool of this file's own.
"""

from __future__ import annotations

import json  # noqa: F401  # importable from here, as before
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path  # noqa: F401  # importable from here, as before
from typing import Any

import docker
import pytest
import redis
from api_helpers import ADMIN, ADMIN_TOKEN, team_headers
from conftest import (
    RedisServer,
    base_env,
    cleanup_docker,  # noqa: F401  # importable from here, as before
    private_label,
    wait_for,
    worker_and_api,  # noqa: F401  # importable from here, as before
)
from fastapi.testclient import TestClient

from celery_app.core.flags import team_flag
from celery_app.settings import load_settings  # noqa: F401  # importable from here, as before
from celery_app.vocab.models import NEVER_EXPIRES
from ctf_testkit.own_run import own_redis, own_run

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("global")
POOL = "10.202.0.0/16"  # this file's team networks, away from every other file's
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
EXTEND = "celery_app.tasks.extend_container"
STATUS = "celery_app.tasks.get_container_status"
# The janitor's pass (every 5 s by default) starts it; a cold start takes a few seconds.
COMES_UP = 60.0


@dataclass
class Setup:
    """The running worker's platform client, the API and the flag secret."""

    platform: Any
    api: TestClient
    secret: str

    def by_name(self, task: str, challenge: str, team: str, **kwargs: Any) -> Any:
        """Send a task by name, as a platform does; return its result (or raise its error)."""
        return self.platform.send_task(task, args=[challenge, team], kwargs=kwargs).get(
            timeout=120)

    def listing(self, team: str) -> dict[str, dict[str, Any]]:
        """GET the team's instances with its own token, by challenge."""
        r = self.api.get(f"/api/v1/teams/{team}/instances", headers=team_headers(team))
        assert r.status_code == 200, r.text
        return {i["challenge"]: i for i in r.json()["instances"]}

    def running(self, challenge: str, team: str = "gt1", not_id: str = "") -> dict[str, Any]:
        """Wait until ``team``'s listing shows ``challenge`` running (in another container)."""
        def up() -> dict[str, Any] | None:
            inst = self.listing(team).get(challenge)
            ok = inst is not None and inst["status"] == "running" \
                and inst["container_id"] != not_id
            return inst if ok else None
        return dict(wait_for(up, COMES_UP, 0.5, f"the global {challenge} instance running"))


def _catalog(images: dict[str, str]) -> str:
    return f"""
challenges:
  gweb:
    image: {images['http']}
    port: 8080
    share: global
    flag_env: FLAG
    memory: 64m
    start_timeout: 20
  gtcp:
    image: {images['http']}
    port: 8080
    protocol: tcp
    share: global
    memory: 64m
  web:
    image: {images['http']}
    port: 8080
    flag_env: FLAG
    memory: 64m
"""


@pytest.fixture(scope="module")
def global_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with own_redis(tmp_path_factory.mktemp("redis-global")) as server:
        yield server


@pytest.fixture(scope="module")
def setup(global_redis: RedisServer, images: dict[str, str],
          docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A worker with default settings (but the run's), a platform client and the API."""
    workdir = tmp_path_factory.mktemp("global-run")
    catalog = workdir / "challenges.yaml"
    catalog.write_text(_catalog(images))
    env = base_env(global_redis, catalog, workdir / "data")
    env.pop("CTF_JANITOR_INTERVAL")  # the default: no lowered interval
    with own_run(docker_client, env, catalog, workdir, LABEL, POOL,
                 admin_token=ADMIN_TOKEN) as run:
        yield Setup(run.platform, run.api, run.settings.flag_secret_value())


def _container(docker_client: docker.DockerClient, challenge: str) -> Any:
    found = docker_client.containers.list(ignore_removed=True, all=True, filters={"label": [
        f"{k}={v}" for k, v in {**LABEL, "ctf.team": "global",
                                "ctf.challenge": challenge}.items()]})
    assert len(found) == 1, [c.name for c in found]
    return found[0]


def test_the_workers_start_the_global_instance_by_themselves(
    setup: Setup, docker_client: docker.DockerClient,
) -> None:
    """With nobody asking, the global instances come up with team id ``global``."""
    for challenge in ("gweb", "gtcp"):
        inst = setup.running(challenge)
        assert inst["team_id"] == "global"
        assert inst["container_name"] == f"ctf-{challenge}-global"
        assert _container(docker_client, challenge).id == inst["container_id"]


def test_every_team_sees_the_same_instance(setup: Setup) -> None:
    """Two teams' listings, reads, tasks by name and starts all give the one instance."""
    inst = setup.running("gweb")
    assert setup.listing("gt2")["gweb"]["container_id"] == inst["container_id"]
    one = setup.api.get("/api/v1/teams/gt2/instances/gweb", headers=team_headers("gt2"))
    assert one.status_code == 200 and one.json()["container_id"] == inst["container_id"]
    status = setup.platform.send_task(STATUS, kwargs={"team_id": "gt2", "challenge": "gweb"}
                                      ).get(timeout=30)
    assert [i["container_id"] for i in status["instances"]] == [inst["container_id"]]
    # A team's start is answered with the one instance; nothing more is made.
    started = setup.api.put("/api/v1/teams/gt2/instances/gweb?wait=30",
                            headers=team_headers("gt2"))
    assert started.status_code == 200, started.text
    assert started.json()["container_id"] == inst["container_id"]
    by_name = setup.by_name(START, "gweb", "gt3")
    assert by_name["container_id"] == inst["container_id"]
    assert by_name["team_id"] == "global"
    # No team's quota holds it: each team's own instances are counted alone.
    r = setup.api.get("/api/v1/capacity", headers=ADMIN).json()
    assert r["used"] >= 2  # but the host's capacity counts it


def test_teams_may_not_stop_or_extend_it_the_admin_may_and_it_comes_back(
    setup: Setup, docker_client: docker.DockerClient,
) -> None:
    """A team's stop or extend is 403 shared_instance; the admin's stop works, then it is back."""
    inst = setup.running("gweb")
    url = "/api/v1/teams/gt1/instances/gweb"
    stop = setup.api.delete(url, headers=team_headers("gt1"))
    assert stop.status_code == 403 and stop.json()["error"] == "shared_instance", stop.text
    extend = setup.api.post(f"{url}/extend", headers=team_headers("gt1"))
    assert extend.status_code == 403 and extend.json()["error"] == "shared_instance"
    with pytest.raises(Exception, match="share: global") as info:
        setup.by_name(STOP, "gweb", "gt1")
    assert type(info.value).__name__ == "SharedInstance"
    with pytest.raises(Exception, match="share: global"):
        setup.by_name(EXTEND, "gweb", "gt1")
    assert _container(docker_client, "gweb").id == inst["container_id"]  # untouched

    # The admin's extend answers it as it is (it never expires), the admin's stop removes it.
    ext = setup.api.post("/api/v1/teams/global/instances/gweb/extend", headers=ADMIN)
    assert ext.status_code == 200 and ext.json()["expires_at"] == NEVER_EXPIRES
    stopped = setup.api.delete("/api/v1/teams/global/instances/gweb?wait=60", headers=ADMIN)
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped"
    # ... and the workers start it again, in a new container.
    again = setup.running("gweb", not_id=inst["container_id"])
    assert _container(docker_client, "gweb").id == again["container_id"]
    kinds = {(e["kind"], e["actor"], e["outcome"]) for e in setup.api.get(
        "/api/v1/audit", params={"challenge": "gweb"}, headers=ADMIN).json()["events"]}
    assert ("stop", "admin", "ok") in kinds
    assert ("stop", "team:gt1", "shared_instance") in kinds


def test_a_killed_container_comes_back(setup: Setup, docker_client: docker.DockerClient) -> None:
    """After ``docker kill`` the workers start the global instance again by themselves."""
    inst = setup.running("gweb")
    docker_client.containers.get(inst["container_id"]).kill()
    again = setup.running("gweb", not_id=inst["container_id"])
    assert again["team_id"] == "global"


def test_the_admin_restarts_it_for_everyone_with_the_same_flag(
    setup: Setup, docker_client: docker.DockerClient,
) -> None:
    """The admin's restart of team ``global`` gives every team a fresh container, same flag."""
    inst = setup.running("gweb")
    r = setup.api.post("/api/v1/teams/global/instances/gweb/restart?wait=60", headers=ADMIN)
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert fresh["team_id"] == "global" and fresh["status"] == "running"
    assert fresh["container_id"] != inst["container_id"]
    assert _container(docker_client, "gweb").id == fresh["container_id"]
    assert setup.listing("gt2")["gweb"]["container_id"] == fresh["container_id"]
    env = docker_client.containers.get(fresh["container_id"]).attrs["Config"]["Env"]
    assert f"FLAG={team_flag(setup.secret, 'gweb', 'global')}" in env


def test_it_never_expires(setup: Setup, global_redis: RedisServer) -> None:
    """Its record carries no expiry the janitor acts on."""
    inst = setup.running("gweb")
    assert inst["expires_at"] == NEVER_EXPIRES
    client = redis.Redis.from_url(f"{global_redis.url}/2", decode_responses=True)
    # The expiry index still holds it (capacity counts it), past any moment a pass judges.
    score = client.zscore("ctf:expiry", "gweb/global")
    assert score is not None and score > 250_000_000_000
    client.close()


def test_the_flag_is_one_for_all(setup: Setup, docker_client: docker.DockerClient) -> None:
    """Two teams checking the one flag are both correct; nobody is said to share it."""
    inst = setup.running("gweb")
    flag = team_flag(setup.secret, "gweb", "global")
    env = docker_client.containers.get(inst["container_id"]).attrs["Config"]["Env"]
    assert f"FLAG={flag}" in env
    for team in ("gt1", "gt2"):
        r = setup.api.post(f"/api/v1/teams/{team}/flags/gweb", json={"flag": flag},
                           headers=ADMIN)
        assert r.status_code == 200 and r.json()["correct"] is True, r.text
    shared = setup.api.get("/api/v1/flags/shared", headers=ADMIN).json()["events"]
    assert [e for e in shared if e["challenge"] == "gweb"] == []


def test_global_is_refused_as_a_team_id(setup: Setup) -> None:
    """No team may take the id ``global``: API, tasks by name and token issuance refuse it."""
    r = setup.api.put("/api/v1/teams/global/instances/web", headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"] == "invalid_team_id"
    token = setup.api.get("/api/v1/teams/global/token", headers=ADMIN)
    assert token.status_code == 422 and token.json()["error"] == "invalid_team_id"
    for challenge in ("web", "gweb"):
        with pytest.raises(Exception, match="reserved") as info:
            setup.by_name(START, challenge, "global")
        assert type(info.value).__name__ == "InvalidTeamId"


def test_a_tcp_global_instance_answers_a_plain_socket(setup: Setup) -> None:
    """Its published port answers a plain TCP connection (``nc host port``), no TLS."""
    inst = setup.running("gtcp")
    port = inst["ports"]["8080/tcp"]
    assert inst["url"] == f"tcp://localhost:{port}"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    assert b"hello from ctf" in answer
