"""The audit trail and caught flag sharing (SPEC §13) on the real engine, as organisers use them.

A real worker (default settings but the run's), a platform's Celery client sending tasks by
name, the HTTP API and ``ctfctl``, on a Redis of this file's own. Each test uses teams of its
own, so it reads only its own events (``?team=``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import pytest
from api_helpers import ADMIN, ADMIN_TOKEN, team_headers
from conftest import (
    RedisServer,
    base_env,
    cleanup_docker,
    private_label,
    wait_for,
    worker_and_api,
)
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from celery_app.api.app import create_app
from celery_app.cli import app as ctfctl_app
from celery_app.core.flags import in_app_flag, team_flag
from celery_app.settings import load_settings
from ctf_testkit.own_run import own_redis, own_run

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("audit")
# This file's team networks (10.252.0.0/16), away from every other file's: one half for the
# module's worker, one for the restart test's own.
POOL = "10.252.0.0/17"
RESTART_POOL = "10.252.128.0/17"
RESTART_LABEL = private_label("audit-restart")
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
EXTEND = "celery_app.tasks.extend_container"


@dataclass
class Setup:
    """The running worker's platform client, the API, the flag secret and the environment."""

    platform: Any
    api: TestClient
    secret: str
    env: dict[str, str]

    def by_name(self, task: str, challenge: str, team: str, **kwargs: Any) -> Any:
        """Send a task by name, as a platform does; return its result."""
        return self.platform.send_task(task, args=[challenge, team], kwargs=kwargs).get(
            timeout=120)

    def events(self, **filters: Any) -> list[dict[str, Any]]:
        """GET /api/v1/audit with ``filters`` (admin); the events."""
        r = self.api.get("/api/v1/audit", params=filters, headers=ADMIN)
        assert r.status_code == 200, r.text
        return list(r.json()["events"])


@pytest.fixture(scope="module")
def audit_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with own_redis(tmp_path_factory.mktemp("redis-audit")) as server:
        yield server


@pytest.fixture(scope="module")
def setup(audit_redis: RedisServer, catalog_file: Path, docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A worker (default settings but the test run's), a platform client and the API."""
    workdir = tmp_path_factory.mktemp("audit-run")
    env = base_env(audit_redis, catalog_file, workdir / "data")
    with own_run(docker_client, env, catalog_file, workdir, LABEL, POOL,
                 admin_token=ADMIN_TOKEN) as run:
        yield Setup(run.platform, run.api, run.settings.flag_secret_value(), run.env)


def _rows(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["kind"], e["actor"], e["outcome"]) for e in events]


def test_api_requests_are_recorded_with_who_asked_newest_first(setup: Setup) -> None:
    """Start, extend, flag checks and stops through the API appear with actor and outcome."""
    api, team = setup.api, "au1"
    url = f"/api/v1/teams/{team}/instances/web"
    assert api.put(f"{url}?wait=60", headers=team_headers(team)).status_code == 200
    assert api.post(f"{url}/extend", headers=team_headers(team)).status_code == 200
    flag_url = f"/api/v1/teams/{team}/flags/web"
    own = team_flag(setup.secret, "web", team)
    assert api.post(flag_url, json={"flag": own}, headers=ADMIN).json()["correct"] is True
    assert api.post(flag_url, json={"flag": "CTF{guess}"}, headers=ADMIN).json()["correct"] \
        is False
    assert api.delete(f"{url}?wait=60", headers=ADMIN).status_code == 200
    assert api.delete(url, headers=team_headers(team)).json()["error"] == "instance_not_found"

    events = setup.events(team=team)
    assert _rows(events) == [
        ("stop", f"team:{team}", "instance_not_found"),
        ("stop", "admin", "ok"),
        ("flag", "admin", "wrong"),
        ("flag", "admin", "correct"),
        ("extend", f"team:{team}", "ok"),
        ("start", f"team:{team}", "ok"),
    ]
    assert all(e["team_id"] == team and e["challenge"] == "web" for e in events)
    times = [datetime.fromisoformat(e["time"].replace("Z", "+00:00")) for e in events]
    assert all(t.utcoffset() is not None and t.utcoffset().total_seconds() == 0 for t in times)
    assert times == sorted(times, reverse=True)
    assert events[-1]["task_id"]  # the worker recorded the start with its task
    assert "CTF{" not in json.dumps(events)  # no flag is ever stored

    # The filters
    assert _rows(setup.events(team=team, kind="flag")) == [
        ("flag", "admin", "wrong"), ("flag", "admin", "correct")]
    assert setup.events(team=team, challenge="web", limit=2) == events[:2]
    assert setup.events(team=team, challenge="exposed") == []
    since = setup.events(team=team, since=events[4]["time"])
    assert since[-1]["kind"] == "extend" and len(since) == 5
    assert setup.events(team=team, since="2999-01-01T00:00:00Z") == []


def test_the_audit_routes_are_for_organisers_and_refuse_bad_filters(setup: Setup) -> None:
    """A team token gets 403; a bad kind, time, team or limit gets a typed 422."""
    api = setup.api
    for path in ("/api/v1/audit", "/api/v1/flags/shared"):
        r = api.get(path, headers=team_headers("au1"))
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    for bad in ({"kind": "reboot"}, {"since": "yesterday"}, {"limit": 1001}, {"limit": 0},
                {"team": "../x"}):
        r = api.get("/api/v1/audit", params=bad, headers=ADMIN)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"] in ("invalid_request", "invalid_team_id"), r.text
    assert "ISO 8601" in api.get("/api/v1/audit", params={"since": "yesterday"},
                                 headers=ADMIN).json()["detail"]


def test_tasks_sent_by_name_are_recorded_as_the_platform_acting_for_the_team(
    setup: Setup,
) -> None:
    """By name, a request is the team's own (team:<id>), unless the sender names the admin."""
    team = "au2"
    assert setup.by_name(START, "web", team)["status"] == "running"
    setup.by_name(EXTEND, "web", team)
    setup.by_name(STOP, "web", team, actor="admin")
    with pytest.raises(Exception, match="actor"):  # neither admin nor this team: refused
        setup.by_name(START, "web", team, actor="team:someone-else")
    events = setup.events(team=team)
    assert _rows(events) == [
        ("stop", "admin", "ok"),
        ("extend", f"team:{team}", "ok"),
        ("start", f"team:{team}", "ok"),
    ]
    assert all(e["task_id"] for e in events)


def test_a_flag_of_another_teams_instance_is_wrong_and_recorded_as_shared(
    setup: Setup,
) -> None:
    """Team X submitting team Y's flag (own or in-app) is wrong and listed with owner Y."""
    api, thief, owner = setup.api, "au3", "au4"
    setup.by_name(START, "web", thief)
    setup.by_name(START, "web", owner)
    url = f"/api/v1/teams/{thief}/flags/web"
    theirs = team_flag(setup.secret, "web", owner)
    assert api.post(url, json={"flag": theirs}, headers=ADMIN).json()["correct"] is False
    in_app = in_app_flag(theirs, "Score Board")
    r = api.post(url, json={"flag": in_app, "name": "Score Board"}, headers=ADMIN)
    assert r.json()["correct"] is False
    # The owner's own flag stays correct for the owner, and is no sharing.
    own = api.post(f"/api/v1/teams/{owner}/flags/web", json={"flag": theirs}, headers=ADMIN)
    assert own.json()["correct"] is True

    shared = api.get("/api/v1/flags/shared", params={"team": thief}, headers=ADMIN)
    assert shared.status_code == 200, shared.text
    events = shared.json()["events"]
    assert [(e["kind"], e["team_id"], e["owner"], e["outcome"], e.get("name"))
            for e in events] == [
        ("flag_shared", thief, owner, "wrong", "Score Board"),
        ("flag_shared", thief, owner, "wrong", None),
    ]
    assert setup.events(team=thief, kind="flag_shared") == events
    assert setup.events(team=owner, kind="flag_shared") == []
    assert _rows(setup.events(team=owner, kind="flag")) == [("flag", "admin", "correct")]
    for team in (thief, owner):
        setup.by_name(STOP, "web", team)


def test_the_janitor_records_each_expiry(setup: Setup) -> None:
    """An instance removed at its expiry is an ``expire`` event by the admin (the platform)."""
    team = "au5"
    setup.by_name(START, "short", team)  # ttl 3 s; the janitor passes every second

    def expired() -> list[dict[str, Any]] | None:
        return setup.events(team=team, kind="expire") or None

    events = wait_for(expired, 60, 0.5, "the expiry of short/au5 in the audit trail")
    assert _rows(events) == [("expire", "admin", "ok")]
    assert events[0]["challenge"] == "short"


def test_ctfctl_audit_prints_the_events(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ctfctl start`` is recorded as the admin's; ``ctfctl audit`` prints it, as JSON too."""
    for key, value in setup.env.items():
        monkeypatch.setenv(key, value)
    runner, team = CliRunner(), "au6"
    started = runner.invoke(ctfctl_app, ["start", "web", team])
    assert started.exit_code == 0, started.output
    stopped = runner.invoke(ctfctl_app, ["stop", "web", team])
    assert stopped.exit_code == 0, stopped.output
    table = runner.invoke(ctfctl_app, ["audit", "--team", team])
    assert table.exit_code == 0, table.output
    lines = [line for line in table.stdout.splitlines() if team in line]
    assert len(lines) == 2 and "stop" in lines[0] and "start" in lines[1]
    assert all("admin" in line and "ok" in line for line in lines)
    as_json = runner.invoke(ctfctl_app, ["audit", "--team", team, "--kind", "start", "--json"])
    assert as_json.exit_code == 0, as_json.output
    (event,) = json.loads(as_json.stdout)["events"]
    assert (event["kind"], event["actor"], event["outcome"]) == ("start", "admin", "ok")
    assert runner.invoke(ctfctl_app, ["audit", "--kind", "reboot"]).exit_code == 2


def test_the_trail_keeps_the_newest_within_its_bound(setup: Setup) -> None:
    """With CTF_AUDIT_MAX_EVENTS=100 the trail stays near 100 events and keeps the newest."""
    settings = load_settings(
        broker_url=setup.env["CELERY_BROKER_URL"],
        result_backend=setup.env["CELERY_RESULT_BACKEND"], redis_url=setup.env["CTF_REDIS_URL"],
        challenges_file=setup.env["CTF_CHALLENGES_FILE"],
        data_dir=Path(setup.env["CTF_DATA_DIR"]), admin_token=setup.env["CTF_ADMIN_TOKEN"],
        audit_max_events=100,
    )
    with TestClient(create_app(settings)) as api:
        url = "/api/v1/teams/au7/flags/web"
        for _ in range(400):
            api.post(url, json={"flag": "CTF{guess}"}, headers=ADMIN)
        last = team_flag(setup.secret, "web", "au7")
        assert api.post(url, json={"flag": last}, headers=ADMIN).json()["correct"] is True
        events = api.get("/api/v1/audit", params={"limit": 1000}, headers=ADMIN).json()["events"]
    # Redis trims whole blocks of about 100 entries: never more than the bound and one block.
    assert 100 <= len(events) <= 200
    assert (events[0]["team_id"], events[0]["outcome"]) == ("au7", "correct")


def test_the_trail_survives_a_restart_of_every_part(
    catalog_file: Path, docker_client: docker.DockerClient, tmp_path: Path,
) -> None:
    """Redis (with AOF, as deployed), the worker and the API restarted: the events are there."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    env = {
        **base_env(server, catalog_file, tmp_path / "data"),
        "CTF_EXTRA_LABELS": json.dumps(RESTART_LABEL),
        "CTF_TEAM_SUBNET_POOL": RESTART_POOL,
    }
    team = "au8"
    try:
        with worker_and_api(env, catalog_file, tmp_path) as (_worker, platform, api):
            platform.send_task(START, args=["web", team]).get(timeout=120)
            platform.send_task(STOP, args=["web", team]).get(timeout=120)
            before = api.get("/api/v1/audit", params={"team": team}, headers=ADMIN).json()
        assert _rows(before["events"]) == [("stop", f"team:{team}", "ok"),
                                           ("start", f"team:{team}", "ok")]
        server.stop()
        server.start()
        with worker_and_api(env, catalog_file, tmp_path) as (_worker, platform, api):
            after = api.get("/api/v1/audit", params={"team": team}, headers=ADMIN).json()
            assert after == before
            # ... and it goes on recording after the restart
            platform.send_task(START, args=["web", team]).get(timeout=120)
            platform.send_task(STOP, args=["web", team]).get(timeout=120)
            events = api.get("/api/v1/audit", params={"team": team}, headers=ADMIN).json()
        assert len(events["events"]) == 4 and events["events"][2:] == before["events"]
    finally:
        server.stop()
        cleanup_docker(docker_client, RESTART_LABEL)
