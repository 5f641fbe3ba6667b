"""The HTTP API (SPEC §6) in-process, with a real worker, Redis and Docker behind it."""

from __future__ import annotations

import logging
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from api_helpers import ADMIN, ADMIN_TOKEN, our_containers, team_headers
from conftest import wait_for
from fastapi.testclient import TestClient

from celery_app import errors
from celery_app.api import app as api_module
from celery_app.api.app import create_app
from celery_app.api.client import rebuild_error
from celery_app.api.metrics import STATE_TTL
from celery_app.errors import TaskFailed, Unauthorized
from celery_app.settings import Settings
from celery_app.vocab.models import parse_iso
from celery_app.vocab.team_tokens import principal_for, team_token
from ctf_testkit.support import RedisServer

pytest_plugins = ["api_fixtures"]

SPEC_STATUS = {
    "unauthorized": 401, "forbidden": 403, "invalid_request": 422, "invalid_team_id": 422,
    "unknown_challenge": 404, "instance_not_found": 404, "task_not_found": 404,
    "team_quota_exceeded": 409, "max_lifetime_reached": 409, "rate_limited": 429,
    "capacity_exhausted": 503, "backend_unavailable": 503,
}


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Check the SPEC's error shape ``{"error", "detail"}`` and status; return the body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["detail"]
    if code is not None:
        assert body["error"] == code, body
    if body["error"] in SPEC_STATUS:
        assert SPEC_STATUS[body["error"]] == status
    return dict(body)


# -- without Docker: tokens and error mapping -------------------------------------------------


def test_team_token_is_stateless_and_bound_to_its_team() -> None:
    """A team token names its team, verifies against the admin token and its generation."""
    token = team_token("secret", "team1")
    assert principal_for("secret", token).team_id == "team1"
    assert principal_for("secret", "secret").is_admin
    # A revocation (generation 1) refuses the old token and takes the new one only.
    renewed = team_token("secret", "team1", 1)
    assert renewed != token and principal_for("secret", renewed, 1).team_id == "team1"
    for stale, generation in ((token, 1), (renewed, 0), (renewed, 2)):
        with pytest.raises(Unauthorized):
            principal_for("secret", stale, generation)
    for bad in ("", "team1", token + "0", team_token("other", "team1"),
                token.replace("team1", "team2"), "../x." + token.split(".")[1], "é" * 10):
        with pytest.raises(Unauthorized):
            principal_for("secret", bad)


@pytest.mark.parametrize("name", [n for n in dir(errors) if isinstance(getattr(errors, n), type)
                                  and issubclass(getattr(errors, n), errors.CTFError)])
def test_task_errors_are_rebuilt_by_class_name(name: str) -> None:
    """A task error carried as {exc_type, exc_message} comes back as the same class."""
    cls = getattr(errors, name)
    rebuilt = rebuild_error({"exc_type": name, "exc_message": ["what to do"]})
    assert type(rebuilt) is cls
    assert rebuilt.detail == "what to do"
    assert (rebuilt.code, rebuilt.status) == (cls.code, cls.status)


def test_foreign_task_errors_become_503_task_failed() -> None:
    """An exception that is not ours maps to a 503 error, never a 500."""
    rebuilt = rebuild_error(KeyError("boom"))
    assert isinstance(rebuilt, TaskFailed)
    assert rebuilt.status == 503


# -- the lifecycle --------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.slow
def test_full_lifecycle_with_a_team_token(api: TestClient, docker_client: Any) -> None:
    """Token, PUT ?wait → running and its URL answers, GET, extend, DELETE ?wait → gone."""
    token = api.get("/api/v1/teams/alpha/token", headers=ADMIN).json()
    assert token["team_id"] == "alpha"
    team = {"Authorization": f"Bearer {token['token']}"}

    r = api.put("/api/v1/teams/alpha/instances/web?wait=30", headers=team)
    assert r.status_code == 200, r.text
    inst = r.json()
    assert inst["status"] == "running"
    assert inst["container_name"] == "ctf-web-alpha"
    port = inst["ports"]["8080/tcp"]
    assert inst["url"] == f"http://localhost:{port}"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
        assert b"hello from ctf" in page.read()

    again = api.put("/api/v1/teams/alpha/instances/web?wait=30", headers=team).json()
    assert again["container_id"] == inst["container_id"]
    assert api.get("/api/v1/teams/alpha/instances/web", headers=team).json() == inst
    listed = api.get("/api/v1/teams/alpha/instances", headers=team).json()
    assert [i["challenge"] for i in listed["instances"]] == ["web"]
    everything = api.get("/api/v1/instances?status=running", headers=ADMIN).json()
    assert [i["team_id"] for i in everything["instances"]] == ["alpha"]

    r = api.post("/api/v1/teams/alpha/instances/web/extend", headers=team)
    assert r.status_code == 200, r.text
    assert parse_iso(r.json()["expires_at"]) > parse_iso(inst["expires_at"])

    r = api.delete("/api/v1/teams/alpha/instances/web?wait=30", headers=team)
    assert r.status_code == 200, r.text
    assert r.json() == {"team_id": "alpha", "challenge": "web", "status": "stopped"}
    assert_error(api.get("/api/v1/teams/alpha/instances/web", headers=team), 404,
                 "instance_not_found")
    assert our_containers(docker_client, **{"ctf.team": "alpha"}) == []


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.slow
def test_put_without_wait_answers_202_and_the_task_shows_its_outcome(
    api: TestClient, docker_client: Any
) -> None:
    """PUT answers 202 with a task id at once; GET /tasks/{id} ends in SUCCESS with it."""
    r = api.put("/api/v1/teams/beta/instances/slow", headers=team_headers("beta"))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "starting"
    assert (body["team_id"], body["challenge"]) == ("beta", "slow")
    task_url = f"/api/v1/tasks/{body['task_id']}"

    states: set[str] = set()

    def done() -> dict[str, Any] | None:
        view = api.get(task_url, headers=team_headers("beta")).json()
        states.add(view["state"])
        return view if view["state"] in ("SUCCESS", "FAILURE") else None

    view = wait_for(done, 30, 0.1, "the start task to finish")
    assert view["result"]["status"] == "running"
    assert states & {"PENDING", "STARTED", "PROGRESS"}, states
    # Another team may not read it; the admin may.
    assert_error(api.get(task_url, headers=team_headers("gamma")), 403, "forbidden")
    assert api.get(task_url, headers=ADMIN).json()["state"] == "SUCCESS"

    text = api.get("/metrics").text
    assert 'ctf_instances{challenge="slow",status="running"} 1.0' in text
    assert 'ctf_tasks_sent_total{challenge="slow",task="start_container"} 1.0' in text
    api.delete("/api/v1/teams/beta/instances/slow?wait=30", headers=ADMIN)
    assert our_containers(docker_client, **{"ctf.team": "beta"}) == []


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.slow
def test_failed_start_answers_the_task_error(api: TestClient, docker_client: Any) -> None:
    """A start whose container exits answers the task's typed error (503 start_failed)."""
    r = api.put("/api/v1/teams/delta/instances/crash?wait=60", headers=ADMIN)
    body = assert_error(r, 503, "start_failed")
    assert "exited" in body["detail"]
    assert our_containers(docker_client, **{"ctf.team": "delta"}) == []
    assert 'ctf_task_failures_total{code="start_failed",task="start_container"} 1.0' \
        in api.get("/metrics").text


@pytest.mark.docker
@pytest.mark.redis
def test_missing_things_answer_404(api: TestClient) -> None:
    """Stop/extend/get of no instance, unknown challenges and unknown tasks answer 404."""
    assert_error(api.delete("/api/v1/teams/t1/instances/web", headers=ADMIN), 404,
                 "instance_not_found")
    assert_error(api.post("/api/v1/teams/t1/instances/web/extend", headers=ADMIN), 404,
                 "instance_not_found")
    assert_error(api.get("/api/v1/teams/t1/instances/web", headers=ADMIN), 404,
                 "instance_not_found")
    assert_error(api.put("/api/v1/teams/t1/instances/nope", headers=ADMIN), 404,
                 "unknown_challenge")
    assert_error(api.get("/api/v1/instances?challenge=nope", headers=ADMIN), 404,
                 "unknown_challenge")
    assert_error(api.get("/api/v1/tasks/0b5c7f1e-0000-4000-8000-000000000000", headers=ADMIN),
                 404, "task_not_found")


# -- auth matrix ----------------------------------------------------------------------------

TEAM_ROUTES = [
    ("GET", "/api/v1/teams/{team}/instances"),
    ("GET", "/api/v1/teams/{team}/instances/web"),
    ("PUT", "/api/v1/teams/{team}/instances/web"),
    ("DELETE", "/api/v1/teams/{team}/instances/web"),
    ("POST", "/api/v1/teams/{team}/instances/web/extend"),
]
ADMIN_ROUTES = [("GET", "/api/v1/teams/{team}/token"), ("GET", "/api/v1/instances")]
BAD_AUTH = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer nope"},
    {"Authorization": f"Basic {ADMIN_TOKEN}"},
    {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    {"Authorization": f"Bearer {team_token('other-secret', 'teamA')}"},
    {"Authorization": f"Bearer teamA.{'0' * 64}"},
]


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.parametrize(("method", "path"), TEAM_ROUTES + ADMIN_ROUTES
                         + [("GET", "/api/v1/challenges"), ("GET", "/api/v1/tasks/x")])
def test_auth_missing_or_garbled_token_is_401(
    api: TestClient, docker_client: Any, method: str, path: str
) -> None:
    """No token, a non-bearer scheme or a forged token answers 401 on every protected route."""
    for headers in BAD_AUTH:
        r = api.request(method, path.format(team="teamA") + "?wait=5", headers=headers)
        assert_error(r, 401, "unauthorized")
    assert our_containers(docker_client) == []


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.parametrize(("method", "path"), TEAM_ROUTES)
def test_auth_other_teams_token_is_403(
    api: TestClient, docker_client: Any, method: str, path: str
) -> None:
    """Team A's token on team B's routes answers 403 and starts nothing."""
    r = api.request(method, path.format(team="teamB") + "?wait=5", headers=team_headers("teamA"))
    assert_error(r, 403, "forbidden")
    assert our_containers(docker_client) == []


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_auth_team_token_on_admin_routes_is_403(api: TestClient, method: str, path: str) -> None:
    """A team token may not use admin routes, not even for its own team."""
    r = api.request(method, path.format(team="teamA"), headers=team_headers("teamA"))
    assert_error(r, 403, "forbidden")


@pytest.mark.docker
@pytest.mark.redis
def test_auth_admin_and_own_team_are_allowed(api: TestClient) -> None:
    """The admin and the team itself read the team's routes; both read the catalog."""
    for headers in (ADMIN, team_headers("teamA")):
        assert api.get("/api/v1/teams/teamA/instances", headers=headers).json() == \
            {"instances": []}
        ids = [c["id"] for c in api.get("/api/v1/challenges", headers=headers).json()
               ["challenges"]]
        assert {"web", "slow", "crash"} <= set(ids)
    assert api.get("/api/v1/instances", headers=ADMIN).status_code == 200


# -- bad input ------------------------------------------------------------------------------

BAD_TEAM_PATHS = ["..%2Fx", "a%20b", "x" * 64, "t%C3%ABam", "-lead", "a%3Brm", "team%0A",
                  "%00", "_x", "a.b"]


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.parametrize("team", BAD_TEAM_PATHS)
def test_bad_team_ids_are_refused_before_anything_runs(
    api: TestClient, docker_client: Any, team: str
) -> None:
    """Invalid team ids answer a SPEC 4xx error (422 invalid_team_id when routable)."""
    for method, path in TEAM_ROUTES:
        r = api.request(method, path.format(team=team) + "?wait=5", headers=ADMIN)
        assert 400 <= r.status_code < 500
        body = assert_error(r, r.status_code)
        if "%2F" not in team:
            assert (r.status_code, body["error"]) == (422, "invalid_team_id")
    assert our_containers(docker_client) == []


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.parametrize("wait", ["-1", "0", "abc", "10000", "301", "nan", "inf", "1e999", ""])
def test_bad_wait_values_are_422(api: TestClient, docker_client: Any, wait: str) -> None:
    """``?wait=`` outside 0 < N ≤ 300, or not a number, answers 422 and starts nothing."""
    for method in ("PUT", "DELETE"):
        r = api.request(method, f"/api/v1/teams/t1/instances/web?wait={wait}", headers=ADMIN)
        assert_error(r, 422, "invalid_request")
    assert our_containers(docker_client) == []


@pytest.mark.docker
@pytest.mark.redis
def test_wrong_methods_bodies_and_routes_answer_json(api: TestClient, docker_client: Any) -> None:
    """Wrong methods (405), unknown routes (404), huge (413) and non-JSON (422) bodies."""
    put = "/api/v1/teams/t1/instances/web"
    for method, path in [("POST", put), ("PATCH", put), ("PUT", "/api/v1/challenges"),
                         ("DELETE", "/api/v1/teams/t1/instances"), ("GET", put + "/extend")]:
        r = api.request(method, path, headers=ADMIN)
        assert_error(r, 405, "method_not_allowed")
    assert_error(api.get("/api/v1/nope", headers=ADMIN), 404, "not_found")
    assert_error(api.put(put, headers=ADMIN, content=b"x" * (1 << 20)), 413, "payload_too_large")
    assert_error(api.put(put, headers={**ADMIN, "Content-Type": "application/json"},
                         content=b"{not json"), 422, "invalid_request")
    assert_error(api.put(put, headers=ADMIN, content=b"\xff\xfe\x00"), 422, "invalid_request")

    def chunks() -> Any:
        for _ in range(100):
            yield b"[" * 1024

    assert_error(api.put(put, headers=ADMIN, content=chunks()), 413, "payload_too_large")
    assert our_containers(docker_client) == []


# -- operations -----------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.redis
def test_healthz_and_openapi(api: TestClient) -> None:
    """/healthz is 200 with Redis, Docker and a worker up; /openapi.json lists the routes."""
    r = api.get("/healthz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["redis"] is True
    assert body["docker"] is True
    assert body["workers"] >= 1
    paths = api.get("/openapi.json").json()["paths"]
    assert "/api/v1/teams/{team_id}/instances/{challenge}" in paths
    assert {"put", "get", "delete"} <= set(paths["/api/v1/teams/{team_id}/instances/{challenge}"])


@pytest.mark.redis
def test_redis_down_answers_503_never_500(down_api: TestClient) -> None:
    """With Redis unreachable every route answers 503 backend_unavailable (or works)."""
    for method, path in TEAM_ROUTES + ADMIN_ROUTES[1:]:
        r = down_api.request(method, path.format(team="t1"), headers=ADMIN)
        assert_error(r, 503, "backend_unavailable")
    r = down_api.get("/healthz")
    assert r.status_code == 503
    assert r.json()["redis"] is False
    assert r.json()["workers"] == 0
    metrics = down_api.get("/metrics")
    assert metrics.status_code == 200
    assert "ctf_state_up 0.0" in metrics.text
    # Stateless routes still work (a team token depends on the team's generation, in Redis).
    assert down_api.get("/api/v1/challenges", headers=ADMIN).status_code == 200
    assert_error(down_api.get("/api/v1/teams/t1/token", headers=ADMIN), 503,
                 "backend_unavailable")


@pytest.mark.redis
def test_redis_down_answers_name_no_address(down_api: TestClient,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Teams' 503 details never name Redis's host:port; the API's log does."""
    caplog.set_level(logging.WARNING)
    for method, path in TEAM_ROUTES + ADMIN_ROUTES:
        for headers in (ADMIN, team_headers("t1")):
            r = down_api.request(method, path.format(team="t1"), headers=headers)
            body = assert_error(r, 503, "backend_unavailable")
            assert not re.search(r"127\.0\.0\.1|:9\b|Errno|Error \d+", body["detail"]), body
    assert "127.0.0.1:9" in caplog.text


METRICS_TOKEN = "metrics-scraper-token-0123456789abcdef"


@pytest.mark.redis
def test_metrics_token_when_set(make_settings: Any) -> None:
    """With CTF_METRICS_TOKEN, /metrics needs it (or the admin token): 401 otherwise."""
    settings = make_settings(admin_token=ADMIN_TOKEN, metrics_token=METRICS_TOKEN)
    with TestClient(create_app(settings)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, team_headers("t1")):
            assert_error(client.get("/metrics", headers=headers), 401, "unauthorized")
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.status_code == 200 and "ctf_instances" in scraped.text
        assert client.get("/metrics", headers=ADMIN).status_code == 200


@pytest.mark.redis
def test_metrics_scrapes_read_redis_at_most_every_two_seconds(
    make_settings: Any, tmp_path: Path
) -> None:
    """Scraping /metrics over and over reads the instance state once per two seconds at most."""
    server = RedisServer(tmp_path)  # its own Redis: only this API's commands are counted
    server.start()
    try:
        settings = make_settings(admin_token=ADMIN_TOKEN, redis_url=f"{server.url}/2",
                                 broker_url=f"{server.url}/0",
                                 result_backend=f"{server.url}/1")
        counter = redis.Redis.from_url(server.url)

        def processed() -> int:
            return int(counter.info("stats")["total_commands_processed"])

        with TestClient(create_app(settings)) as client:
            before = processed()
            assert client.get("/metrics").status_code == 200
            one = processed() - before - 1  # one scrape's commands (INFO itself not counted)
            assert one > 0
            before, began = processed(), time.monotonic()
            for _ in range(40):
                assert client.get("/metrics").status_code == 200
            spent = processed() - before - 1
            collections = int((time.monotonic() - began) // STATE_TTL) + 1
        assert spent <= one * collections, (spent, one, collections)
    finally:
        server.stop()


@pytest.mark.redis
def test_dashboard_is_served_at_root_without_hiding_the_api(
    api_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With celery_app/api/static present, / serves index.html and the API routes still win."""
    (tmp_path / "index.html").write_text("<h1>dashboard</h1>")
    monkeypatch.setattr(api_module, "STATIC_DIR", tmp_path)
    with TestClient(create_app(api_settings)) as client:
        assert "dashboard" in client.get("/").text
        assert client.get("/api/v1/challenges", headers=ADMIN).status_code == 200
        assert "/healthz" in client.get("/openapi.json").json()["paths"]
        assert client.get("/metrics").status_code == 200
        assert_error(client.get("/api/v1/nope"), 404, "not_found")
        assert_error(client.post("/"), 405, "method_not_allowed")
