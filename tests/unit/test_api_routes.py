"""The API's routes as assembled by create_app from its router modules (issue 23), no Redis.

``api_operations.json`` is the table of operations ``/openapi.json`` listed before the routes
moved out of ``create_app``'s closures into ``celery_app/api/routes/``: paths, methods,
operation ids, tags, summaries, documented statuses, parameters, bodies and security. A
route added or changed on purpose updates it in the same commit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from celery_app.api.app import create_app
from celery_app.api.client import Dispatcher
from celery_app.ingress import gate as team_gate
from celery_app.ingress.probe import GATE_HEADER
from celery_app.ingress.routes import GATE_PATH
from celery_app.settings import Settings
from celery_app.state.store import StateStore

OPERATIONS = Path(__file__).with_name("api_operations.json")
POLLS = ("/api/v1/teams/{team_id}/instances", "/api/v1/teams/{team_id}/instances/{challenge}")


def operations(doc: dict[str, Any]) -> dict[str, Any]:
    """The table of ``api_operations.json``, read from an OpenAPI document."""
    return {
        f"{method.upper()} {path}": {
            "operationId": op.get("operationId"), "tags": op.get("tags", []),
            "summary": op.get("summary"), "responses": sorted(op.get("responses", {})),
            "parameters": [[p["name"], p["in"], p.get("required", False)]
                           for p in op.get("parameters", [])],
            "body": "requestBody" in op, "security": op.get("security", []),
        }
        for path, methods in doc["paths"].items()
        for method, op in methods.items()
    }


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Default settings with the unit suite's catalog."""
    return make_settings()


@pytest.fixture
def app(settings: Settings, store: StateStore) -> FastAPI:
    """The API on an in-memory Redis (its lifespan not run: reads go through the store)."""
    return create_app(settings, Dispatcher(settings, store=store))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A client of the app that never runs its lifespan (no Redis server to open)."""
    client = TestClient(app)
    yield client
    client.close()


def test_openapi_lists_the_operations_it_listed_before(app: FastAPI) -> None:
    """Every path and method keeps its operation id, tags, summary, statuses and parameters."""
    assert operations(app.openapi()) == json.loads(OPERATIONS.read_text())


def test_the_routes_are_the_apps_own_and_polls_solve_only_the_caller(app: FastAPI) -> None:
    """No included-router layer is matched per request, and a poll depends on its token only."""
    routes = [r for r in app.router.routes if isinstance(r, APIRoute)]
    assert {(r.path, m) for r in routes for m in r.methods} >= {
        (p, "GET") for p in POLLS}
    assert all(type(r).__name__ in {"APIRoute", "Route", "DashboardMount"}
               for r in app.router.routes)
    for route in routes:
        if route.path in POLLS and "GET" in route.methods:
            assert [d.call.__name__ for d in route.dependant.dependencies
                    if d.call is not None] == ["who"]


def test_routes_reach_the_dispatcher_given_to_create_app(
    client: TestClient, settings: Settings
) -> None:
    """The catalog, a team's instances and one instance are read from the app's Dispatcher."""
    admin = {"Authorization": f"Bearer {settings.admin_token_value()}"}
    listed = client.get("/api/v1/challenges", headers=admin)
    assert listed.status_code == 200
    assert "web" in {c["id"] for c in listed.json()["challenges"]}
    assert client.get("/api/v1/teams/t1/instances", headers=admin).json() == {"instances": []}
    missing = client.get("/api/v1/teams/t1/instances/web", headers=admin)
    assert (missing.status_code, missing.json()["error"]) == (404, "instance_not_found")
    assert client.get("/api/v1/challenges").status_code == 401


def test_the_gate_router_answers_as_the_gate_decides(settings: Settings) -> None:
    """Without the fast path, the gate's router finds the app's Gate and gives its answer."""
    gate = team_gate.Gate(settings, settings.admin_token_value())
    app = FastAPI()
    app.state.gate = gate
    app.include_router(team_gate.router)
    forwarded = {"X-Forwarded-Host": "web-abc.ctf.localhost", "X-Forwarded-Uri": "/"}
    status, headers, body = gate.decide([(k.lower().encode(), v.encode())
                                         for k, v in forwarded.items()])
    with TestClient(app) as client:
        answer = client.get(GATE_PATH, headers=forwarded)
    assert answer.status_code == status == 401
    assert answer.content == body
    assert answer.headers[GATE_HEADER] == dict(headers)[GATE_HEADER.lower().encode()].decode()
