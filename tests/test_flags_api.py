"""Checking a team's submitted flag through the API (admin only)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_helpers import ADMIN, team_headers
from fastapi.testclient import TestClient

from celery_app.api import create_app
from celery_app.flags import team_flag
from celery_app.settings import Settings

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.redis]


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as c:
        yield c


def test_flag_check_accepts_only_the_teams_own_flag(
    client: TestClient, api_settings: Settings
) -> None:
    """The team's own flag checks correct; another team's flag for the same challenge does not."""
    secret = api_settings.flag_secret_value()
    own, other = team_flag(secret, "web", "fa"), team_flag(secret, "web", "fb")
    url = "/api/v1/teams/fa/flags/web"
    assert client.post(url, json={"flag": own}, headers=ADMIN).json() == {
        "team_id": "fa", "challenge": "web", "correct": True}
    assert client.post(url, json={"flag": other}, headers=ADMIN).json()["correct"] is False


def test_flag_check_is_admin_only_and_validated(client: TestClient) -> None:
    """A team token may not check flags; bad bodies and unknown challenges are refused."""
    url = "/api/v1/teams/fa/flags/web"
    assert client.post(url, json={"flag": "x"}, headers=team_headers("fa")).status_code == 403
    assert client.post(url, json={"flag": "x" * 300}, headers=ADMIN).json()["error"] == \
        "invalid_request"
    assert client.post(url, content=b"not json", headers=ADMIN).status_code == 422
    unknown = client.post("/api/v1/teams/fa/flags/nope", json={"flag": "x"}, headers=ADMIN)
    assert unknown.json()["error"] == "unknown_challenge"
