"""Hostile requests to the API (issue 17): headers, metric labels, nested bodies."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from api_helpers import ADMIN, team_headers
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from celery_app.api.app import KNOWN_METHODS, create_app
from celery_app.settings import Settings

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.redis]


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    """The API in-process (Redis only: none of these requests reaches a worker)."""
    with TestClient(create_app(api_settings), raise_server_exceptions=False) as c:
        yield c


def request_series(client: TestClient) -> list[dict[str, str]]:
    """The label sets of ``ctf_api_requests_total`` in ``/metrics``."""
    text = client.get("/metrics").text
    return [dict(sample.labels) for family in text_string_to_metric_families(text)
            if family.name == "ctf_api_requests" for sample in family.samples
            if sample.name == "ctf_api_requests_total"]


@pytest.mark.parametrize("path", ["/", "/app.js", "/api/v1/challenges", "/healthz",
                                  "/api/v1/nope", "/openapi.json"])
def test_every_response_carries_the_security_headers(client: TestClient, path: str) -> None:
    """Dashboard and API answers forbid framing and sniffing and send no referrer."""
    r = client.get(path, headers=ADMIN)
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-frame-options"] == "DENY"
    if path.startswith("/api/"):
        assert r.headers["cache-control"] == "no-store"


def test_team_token_answer_is_not_cached(client: TestClient) -> None:
    """The answer that carries a team token is sent with Cache-Control: no-store."""
    r = client.get("/api/v1/teams/t1/token", headers=ADMIN)
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"


def test_made_up_methods_and_paths_add_no_metric_series(client: TestClient) -> None:
    """50 requests with invented methods and paths collapse into known label values."""
    client.get("/healthz")
    before = request_series(client)
    for i in range(50):
        client.request(f"FOO{i}", "/healthz")
        client.get(f"/made/up/{i}")
    after = request_series(client)
    assert {s["method"] for s in after} <= KNOWN_METHODS | {"other"}
    assert not any("made" in s["route"] for s in after)
    assert len(after) - len(before) <= 4, after  # other x (/healthz, unmatched) x statuses


def test_deeply_nested_json_body_is_a_4xx_without_a_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A body nested 30 000 deep answers 422 invalid_request; nothing is logged as an error."""
    body = "[" * 30_000 + "]" * 30_000
    with caplog.at_level(logging.WARNING):
        r = client.post("/api/v1/teams/t1/flags/web", content=body, headers={
            **ADMIN, "Content-Type": "application/json"})
        started = client.put("/api/v1/teams/t1/instances/web", content=body,
                             headers={**team_headers("t1"), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request"
    assert started.status_code == 422
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
