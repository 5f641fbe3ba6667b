"""Schema-driven fuzzing of the API from its own /openapi.json (schemathesis + hypothesis).

Whatever schemathesis generates (valid and invalid parameters, positive and negative modes),
the API answers no 5xx other than 503, every error has the SPEC's shape, and no container is
left behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from api_helpers import ADMIN, our_containers, team_headers
from conftest import RUN_ID, wait_for
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from celery_app.api.app import create_app
from celery_app.settings import Settings

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

FUZZ = settings(
    max_examples=30, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.filter_too_much],
)


@pytest.fixture
def fuzz_app(worker: Any, clean_worker_state: None, api_settings: Settings,
             docker_client: Any) -> Iterator[FastAPI]:
    """Yield the app to fuzz; after the run, check that no container of this run exists."""
    app = create_app(api_settings)
    with TestClient(app):  # runs the lifespan (and closes its connections afterwards)
        yield app
    assert our_containers(docker_client) == []


def check_response(response: Any) -> None:
    """No 5xx but 503; JSON errors in the SPEC's shape."""
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.status_code >= 400:
        try:
            body = json.loads(response.content)
        except ValueError:
            return  # /metrics and the like are not JSON
        if isinstance(body, dict) and "error" in body:
            assert set(body) == {"error", "detail"}, body


# The test catalog's challenges (tests/conftest.py): valid requests name these, so that the
# fuzz run reaches real starts, stops and extends, not only the unknown-challenge refusal.
REAL = ["web", "exposed", "slow", "crash", "short"]
FUZZ_TEAM = "fuzzteam"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("who", ["admin", "team"])
def test_fuzz_every_operation(fuzz_app: FastAPI, who: str, mode: GenerationMode,
                              docker_client: Any) -> None:
    """Generated requests to every operation never get a 5xx other than 503."""
    headers = ADMIN if who == "admin" else team_headers(FUZZ_TEAM)
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    task_ids: set[str] = set()
    starts: list[int] = []
    # One client (one event loop) for the whole run, as a server has: schemathesis's own
    # case.call() runs a fresh app lifespan for each request.
    with TestClient(fuzz_app) as client:
        for operation in operations:
            if mode is GenerationMode.NEGATIVE and not operation.path_parameters \
                    and not operation.query:
                continue  # nothing to make invalid

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
            def run(case: Any, data: st.DataObject) -> None:
                if mode is GenerationMode.POSITIVE:
                    name_real_ones(case, data)
                response = send(client, case, headers)
                check_response(response)
                body = response.json() if response.content[:1] == b"{" else None
                if isinstance(body, dict) and "task_id" in body:
                    task_ids.add(body["task_id"])
                    if case.method.upper() == "PUT":
                        starts.append(response.status_code)

            run()
        if mode is GenerationMode.POSITIVE:
            # Valid requests reached real starts (a task sent to the worker), not only refusals.
            assert starts, "no generated start reached the worker"
        if task_ids:
            _drain(client, task_ids, docker_client)


def name_real_ones(case: Any, data: st.DataObject) -> None:
    """Make a valid case name a real challenge and the fuzzing team, mostly.

    The schema's random ids would only ever meet 404 (no such challenge) and 403 (another
    team); a start with ``?wait`` is bounded to 2 s so that the run keeps its time.
    """
    params = case.path_parameters or {}
    if "challenge" in params:
        params["challenge"] = data.draw(st.sampled_from([*REAL, params["challenge"]]))
    if "team_id" in params:
        params["team_id"] = data.draw(st.sampled_from([FUZZ_TEAM, params["team_id"]]))
    if case.query and isinstance(case.query.get("wait"), int | float):
        case.query["wait"] = min(case.query["wait"], 2)


def send(client: TestClient, case: Any, headers: dict[str, str]) -> Any:
    """Send a generated case through ``client`` (body, query and headers as generated)."""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url), headers=headers)
    sent = dict(kwargs["headers"])
    if kwargs.get("cookies"):
        sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in kwargs["cookies"].items())
    extra: dict[str, Any] = {}
    if "json" in kwargs:
        extra["json"] = kwargs["json"]
    if "data" in kwargs:
        extra["content"] = kwargs["data"]
    return client.request(kwargs["method"], kwargs["url"], headers=sent,
                          params=kwargs.get("params") or None, **extra)


@FUZZ
@given(header=st.text(max_size=200), path=st.sampled_from([
    "/api/v1/challenges", "/api/v1/instances", "/api/v1/teams/t1/instances",
    "/api/v1/teams/t1/token", "/api/v1/tasks/abc",
]))
def test_fuzz_authorization_header(fuzz_app: FastAPI, header: str, path: str) -> None:
    """Any Authorization header that is not a valid token answers 401, never a 5xx."""
    encoded = header.encode("utf-8")  # raw bytes, as a hostile client may send them
    with TestClient(fuzz_app) as client:
        response = client.get(path, headers={"Authorization": encoded})
    check_response(response)
    assert response.status_code == 401


TEAMS = ["fuzz-a", "fuzz-b"]
OPS = st.tuples(
    st.sampled_from(["start", "stop", "extend", "get", "task"]),
    st.sampled_from(["web", "exposed", "slow", "crash", "short"]),
    st.sampled_from(TEAMS),
    st.sampled_from([None, 0.5, 5.0]),
)


def _drain(client: TestClient, task_ids: set[str], docker_client: Any) -> None:
    """Let every task sent finish, stop every instance, and check nothing is left."""
    def finished() -> bool:
        states = [client.get(f"/api/v1/tasks/{t}", headers=ADMIN).json().get("state")
                  for t in task_ids]
        return all(state in ("SUCCESS", "FAILURE", "REVOKED") for state in states)

    wait_for(finished, 120, 0.2, "every task the fuzz run sent to finish")
    # Every team's: the fuzz run's random team ids start instances too.
    for inst in client.get("/api/v1/instances", headers=ADMIN).json()["instances"]:
        path = f"/api/v1/teams/{inst['team_id']}/instances/{inst['challenge']}?wait=60"
        r = client.delete(path, headers=ADMIN)
        assert r.status_code in (200, 404), r.text
    try:
        wait_for(lambda: our_containers(docker_client) == [], 60, 0.2,
                 "no container of the fuzz run left")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {[c.name for c in our_containers(docker_client)]}, "
                             f"instances {client.get('/api/v1/instances', headers=ADMIN).text}"
                             ) from None
    nets = docker_client.networks.list(filters={"label": [f"ctf.test={RUN_ID}"]})
    assert [n.name for n in nets if n.name.startswith("ctf-team-fuzz-")] == []


def test_fuzz_real_starts_and_stops_leave_nothing(fuzz_app: FastAPI, docker_client: Any) -> None:
    """Random real starts, stops and extends answer no 5xx but 503 and leave nothing behind."""
    task_ids: set[str] = set()
    with TestClient(fuzz_app) as client:

        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])
        @given(ops=st.lists(OPS, min_size=1, max_size=6))
        def run(ops: list[tuple[str, str, str, float | None]]) -> None:
            for op, challenge, team, wait in ops:
                headers = team_headers(team)
                path = f"/api/v1/teams/{team}/instances/{challenge}"
                query = f"?wait={wait}" if wait is not None else ""
                if op == "start":
                    r = client.put(path + query, headers=headers)
                elif op == "stop":
                    r = client.delete(path + query, headers=headers)
                elif op == "extend":
                    r = client.post(path + "/extend", headers=headers)
                elif op == "get":
                    r = client.get(path, headers=headers)
                else:
                    r = client.get(f"/api/v1/teams/{team}/instances", headers=headers)
                check_response(r)
                body = r.json()
                if isinstance(body, dict) and "task_id" in body:
                    task_ids.add(body["task_id"])
                    own = client.get(f"/api/v1/tasks/{body['task_id']}", headers=headers)
                    assert own.status_code == 200, own.text  # the team may follow its task

        run()
        assert task_ids  # real work was sent, so "nothing left" means something
        _drain(client, task_ids, docker_client)
