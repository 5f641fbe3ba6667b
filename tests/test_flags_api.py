"""Checking a team's submitted flag through the API (admin only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from api_helpers import ADMIN, ADMIN_TOKEN, our_containers, team_headers
from fastapi.testclient import TestClient

from celery_app.api.app import create_app
from celery_app.core.flags import in_app_flag, team_flag
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


# -- in-app flags (OWASP Juice Shop's own, keyed per team by flag_env) ------------------------


def test_in_app_flag_is_juice_shops_hmac_sha1_of_the_name() -> None:
    """in_app_flag matches Juice Shop's own test vector for its hex HMAC-SHA1 flags."""
    assert in_app_flag("ZJnHOTckstBeJP!QC2T", "text") == \
        "5188938396d17832dd26fbabd5ac4d79518a87da"
    assert in_app_flag("", "text") == "f3f276f5001644013dbd202f1854bd61f9123d0f"


def test_in_app_flag_is_checked_under_the_teams_own_key(
    client: TestClient, api_settings: Settings
) -> None:
    """With "name", only the team's own key's HMAC of that name checks correct."""
    secret = api_settings.flag_secret_value()
    key_a, key_b = team_flag(secret, "web", "fa"), team_flag(secret, "web", "fb")
    own = in_app_flag(key_a, "Score Board")
    url = "/api/v1/teams/fa/flags/web"

    def correct(flag: str, name: str = "Score Board") -> bool:
        r = client.post(url, json={"flag": flag, "name": name}, headers=ADMIN)
        assert r.status_code == 200, r.text
        return bool(r.json()["correct"])

    assert correct(own)
    assert correct(f" {own.upper()}\n")  # hex case and surrounding blanks do not matter
    assert not correct(in_app_flag(key_b, "Score Board"))  # another team's: flag sharing
    assert not correct(own, name="DOM XSS")  # the flag of another in-app challenge
    assert not correct(key_a)  # the key itself is not a flag of any in-app challenge
    # Without "name" the same route still checks the flag_env flag itself.
    assert client.post(url, json={"flag": key_a}, headers=ADMIN).json()["correct"] is True


def test_in_app_flag_needs_a_challenge_with_a_per_team_key(client: TestClient) -> None:
    """A challenge without flag_env has no in-app flags: 422 that says to set flag_env."""
    r = client.post("/api/v1/teams/fa/flags/exposed", json={"flag": "0" * 40, "name": "X"},
                    headers=ADMIN)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"
    assert "flag_env" in r.json()["detail"]
    too_long = client.post("/api/v1/teams/fa/flags/web", json={"flag": "x", "name": "n" * 201},
                           headers=ADMIN)
    assert too_long.json()["error"] == "invalid_request"


@pytest.fixture
def worker_api(
    worker: Any, clean_worker_state: None, worker_env: dict[str, str],
    make_settings: Callable[..., Settings],
) -> Iterator[TestClient]:
    """The API sharing the test worker's data folder (so its flag secret), as deployed."""
    settings = make_settings(admin_token=ADMIN_TOKEN, max_instances_per_team=5,
                             data_dir=Path(worker_env["CTF_DATA_DIR"]))
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.docker
def test_in_app_flag_uses_the_key_the_teams_container_received(
    worker_api: TestClient, docker_client: docker.DockerClient
) -> None:
    """The key in a running container's flag_env variable is the one the route checks under."""
    api = worker_api
    started = api.put("/api/v1/teams/fa/instances/web?wait=60", headers=ADMIN)
    assert started.status_code == 200, started.text
    (container,) = our_containers(docker_client, **{"ctf.team": "fa", "ctf.challenge": "web"})
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    app_flag = in_app_flag(env["FLAG"], "Login Admin")  # what the app would show team fa
    url = "/api/v1/teams/{team}/flags/web"
    body = {"flag": app_flag, "name": "Login Admin"}
    assert api.post(url.format(team="fa"), json=body, headers=ADMIN).json()["correct"] is True
    assert api.post(url.format(team="fb"), json=body, headers=ADMIN).json()["correct"] is False
