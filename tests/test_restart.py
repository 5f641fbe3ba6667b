"""Restart and ``stop_on_solve`` (SPEC §13) on the real engine, as teams and organisers use them.

A real worker (default settings but the run's), a platform's Celery client sending tasks by
name, the HTTP API (default rate limit), ``ctfctl`` and the team dashboard in Chromium, on a
Redis of this file's own. Each test uses teams of its own.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
import uvicorn
from api_helpers import ADMIN, ADMIN_TOKEN, team_headers
from ci import unavailable
from conftest import (
    ROOT,
    RedisServer,
    base_env,
    default_setting,
    free_port,
    private_label,
    wait_for,
)
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from celery_app.api.app import create_app
from celery_app.cli import EXIT_NOT_FOUND
from celery_app.cli import app as ctfctl_app
from celery_app.core.flags import team_flag
from celery_app.settings import load_settings
from celery_app.vocab.team_tokens import team_token
from ctf_testkit.own_run import own_redis, own_run

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("restart")
POOL = "10.201.0.0/16"  # this file's team networks, away from every other file's
RESTART = "celery_app.tasks.restart_container"
START = "celery_app.tasks.start_container"
CHROMIUM = Path("/usr/bin/chromium")


def catalog(images: dict[str, str]) -> str:
    """Stand-in web challenges with per-team flags; ``solve`` stops once solved, ``warm`` pools."""
    entry = f"""
    image: {images['http']}
    port: 8080
    ttl: 600
    max_lifetime: 1800
    memory: 64m
    flag_env: FLAG
    start_timeout: 20"""
    return (f"challenges:\n  web:{entry}\n  solve:{entry}\n    stop_on_solve: true\n"
            f"  warm:{entry}\n    pool: 1\n")


@dataclass
class Setup:
    """The worker's platform client, the API, the Docker client, the flag secret, the env."""

    platform: Any
    api: TestClient
    docker: docker.DockerClient
    secret: str
    env: dict[str, str]

    def start(self, challenge: str, team: str) -> dict[str, Any]:
        """Start through the API as the team, waiting for it; the running instance."""
        r = self.api.put(f"/api/v1/teams/{team}/instances/{challenge}?wait=60",
                         headers=team_headers(team))
        assert r.status_code == 200, r.text
        return dict(r.json())

    def instance(self, challenge: str, team: str) -> dict[str, Any] | None:
        """The instance as the API shows it, or ``None`` (404)."""
        r = self.api.get(f"/api/v1/teams/{team}/instances/{challenge}", headers=ADMIN)
        return dict(r.json()) if r.status_code == 200 else None

    def events(self, **filters: Any) -> list[dict[str, Any]]:
        """The audit trail (admin), newest first, filtered."""
        r = self.api.get("/api/v1/audit", params=filters, headers=ADMIN)
        assert r.status_code == 200, r.text
        return list(r.json()["events"])

    def flag_env(self, container_id: str) -> str:
        """The FLAG variable the container was given."""
        env = self.docker.containers.get(container_id).attrs["Config"]["Env"]
        return next(v.partition("=")[2] for v in env if v.startswith("FLAG="))

    def gone(self, container_id: str) -> bool:
        """Whether the engine no longer has the container."""
        try:
            self.docker.containers.get(container_id)
        except docker.errors.NotFound:
            return True
        return False


@pytest.fixture(scope="module")
def restart_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with own_redis(tmp_path_factory.mktemp("redis-restart")) as server:
        yield server


@pytest.fixture(scope="module")
def setup(restart_redis: RedisServer, images: dict[str, str],
          docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A worker (default settings but the test run's), a platform client and the API."""
    workdir = tmp_path_factory.mktemp("restart-run")
    catalog_file = workdir / "challenges.yaml"
    catalog_file.write_text(catalog(images))
    env = base_env(restart_redis, catalog_file, workdir / "data")
    with own_run(docker_client, env, catalog_file, workdir, LABEL, POOL,
                 admin_token=ADMIN_TOKEN) as run:
        yield Setup(run.platform, run.api, docker_client, run.settings.flag_secret_value(),
                    run.env)


def _wrote_file(setup: Setup, container_id: str) -> bool:
    """Write /tmp/mine in the container, as a team's shell would; whether it is there."""
    box = setup.docker.containers.get(container_id)
    box.exec_run(["/bin/busybox", "sh", "-c", "echo pwned > /tmp/mine"])
    return box.exec_run(["/bin/busybox", "test", "-e", "/tmp/mine"]).exit_code == 0


def test_restart_gives_fresh_containers_with_the_same_flag_and_a_later_expiry(
    setup: Setup,
) -> None:
    """A restart: new container, what the team wrote is gone, the same flag, a new expiry."""
    team, api = "rs1", setup.api
    before = setup.start("web", team)
    assert _wrote_file(setup, before["container_id"])
    flag = setup.flag_env(before["container_id"])
    assert flag == team_flag(setup.secret, "web", team)
    # Expiries are written to the second: let one pass, so "later" is measurable.
    started = datetime.fromisoformat(before["started_at"].replace("Z", "+00:00"))
    wait_for(lambda: datetime.now(UTC) >= started + timedelta(seconds=1.1), 5, 0.05,
             "a second to pass")

    r = api.post(f"/api/v1/teams/{team}/instances/web/restart?wait=60",
                 headers=team_headers(team))
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["status"] == "running"
    assert after["container_id"] != before["container_id"]
    assert after["container_name"] == before["container_name"]
    assert after["expires_at"] > before["expires_at"]
    assert after["started_at"] > before["started_at"]
    assert setup.gone(before["container_id"])
    fresh = setup.docker.containers.get(after["container_id"])
    assert fresh.exec_run(["/bin/busybox", "test", "-e", "/tmp/mine"]).exit_code == 1
    assert setup.flag_env(after["container_id"]) == flag
    check = api.post(f"/api/v1/teams/{team}/flags/web", json={"flag": flag}, headers=ADMIN)
    assert check.json()["correct"] is True
    assert setup.instance("web", team)["container_id"] == after["container_id"]

    restarts = setup.events(team=team, kind="restart")
    assert [(e["actor"], e["outcome"]) for e in restarts] == [(f"team:{team}", "ok")]
    api.delete(f"/api/v1/teams/{team}/instances/web?wait=60", headers=ADMIN)


def test_a_pooled_instance_restarts_fresh_and_every_flag_it_held_stays_correct(
    setup: Setup,
) -> None:
    """A claimed pool container is replaced by a fresh one; the team's flags all still score."""
    team, api = "rs8", setup.api

    def ready() -> bool:
        rows = api.get("/api/v1/pools", headers=ADMIN).json()["pools"]
        return any(r["challenge"] == "warm" and r["ready"] >= 1 for r in rows)

    wait_for(ready, 90, 0.5, "a ready pool container of warm")
    before = setup.start("warm", team)
    assert "ctf.pool" in setup.docker.containers.get(before["container_id"]).labels
    assert _wrote_file(setup, before["container_id"])
    held = setup.flag_env(before["container_id"])  # the slot's flag, now the team's

    r = api.post(f"/api/v1/teams/{team}/instances/warm/restart?wait=60",
                 headers=team_headers(team))
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["container_id"] != before["container_id"]
    assert setup.gone(before["container_id"])
    fresh = setup.docker.containers.get(after["container_id"])
    assert fresh.exec_run(["/bin/busybox", "test", "-e", "/tmp/mine"]).exit_code == 1
    # The fresh one is cold (the team's flag) or another pool container (its slot's flag):
    # the flag found before the restart and the one shown now both score, for this team only.
    url = f"/api/v1/teams/{team}/flags/warm"
    for flag in (held, setup.flag_env(after["container_id"])):
        assert api.post(url, json={"flag": flag}, headers=ADMIN).json()["correct"] is True
    other = api.post("/api/v1/teams/rs8x/flags/warm", json={"flag": held}, headers=ADMIN)
    assert other.json()["correct"] is False
    api.delete(f"/api/v1/teams/{team}/instances/warm?wait=60", headers=ADMIN)


def test_restart_answers_like_a_start_and_404_without_an_instance(setup: Setup) -> None:
    """Without ``wait`` a restart answers 202 with its task; with no instance, 404."""
    team, api = "rs2", setup.api
    url = f"/api/v1/teams/{team}/instances/web/restart"
    missing = api.post(url, headers=team_headers(team))
    assert missing.status_code == 404 and missing.json()["error"] == "instance_not_found"
    # another team's token is refused
    before = setup.start("web", team)
    assert api.post(url, headers=team_headers("rs2x")).status_code == 403
    r = api.post(url, headers=ADMIN)
    assert r.status_code == 202, r.text
    task = r.json()["task_id"]

    def done() -> dict[str, Any] | None:
        view = api.get(f"/api/v1/tasks/{task}", headers=team_headers(team)).json()
        return view if view["state"] == "SUCCESS" else None

    result = wait_for(done, 60, 0.2, "the restart task")["result"]
    assert result["container_id"] != before["container_id"]
    assert [(e["actor"], e["outcome"]) for e in setup.events(team=team, kind="restart")] == [
        ("admin", "ok"), ("team:rs2", "instance_not_found")]
    api.delete(f"/api/v1/teams/{team}/instances/web?wait=60", headers=ADMIN)


def test_a_restart_counts_as_one_action_for_the_rate_limit(setup: Setup) -> None:
    """With the default limit, a start and limit-1 restarts pass; the next is 429."""
    team, api = "rs3", setup.api
    limit = int(default_setting("rate_limit_count"))
    first = setup.start("web", team)  # one action
    url = f"/api/v1/teams/{team}/instances/web/restart?wait=60"
    ids = {first["container_id"]}
    for _ in range(limit - 1):
        r = api.post(url, headers=team_headers(team))
        assert r.status_code == 200, r.text
        ids.add(r.json()["container_id"])
    assert len(ids) == limit  # every restart made a new container
    refused = api.post(url, headers=team_headers(team))
    assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
    assert setup.instance("web", team)["status"] == "running"  # nothing was sent
    assert setup.events(team=team, kind="restart")[0]["outcome"] == "rate_limited"
    api.delete(f"/api/v1/teams/{team}/instances/web?wait=60", headers=ADMIN)


def test_a_restart_task_sent_by_name_restarts_or_starts(setup: Setup) -> None:
    """By name: a running instance is replaced; with none, the restart starts one."""
    team = "rs4"

    def by_name(task: str) -> dict[str, Any]:
        return dict(setup.platform.send_task(task, args=["web", team]).get(timeout=120))

    started = by_name(RESTART)  # nothing to restart: a start
    assert started["status"] == "running"
    again = by_name(RESTART)
    assert again["status"] == "running"
    assert again["container_id"] != started["container_id"]
    assert setup.gone(started["container_id"])
    assert setup.flag_env(again["container_id"]) == team_flag(setup.secret, "web", team)
    assert [(e["actor"], e["outcome"]) for e in setup.events(team=team, kind="restart")] == [
        (f"team:{team}", "ok"), (f"team:{team}", "ok")]
    setup.api.delete(f"/api/v1/teams/{team}/instances/web?wait=60", headers=ADMIN)


def test_ctfctl_restart(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ctfctl restart web TEAM`` replaces the instance and prints it; none: an error."""
    for key, value in setup.env.items():
        monkeypatch.setenv(key, value)
    team, runner = "rs5", CliRunner()
    missing = runner.invoke(ctfctl_app, ["restart", "web", team])
    assert missing.exit_code == EXIT_NOT_FOUND and "no instance" in missing.stderr
    before = setup.start("web", team)
    done = runner.invoke(ctfctl_app, ["restart", "web", team, "--json"])
    assert done.exit_code == 0, done.output
    after = json.loads(done.stdout)
    assert after["status"] == "running"
    assert after["container_id"] != before["container_id"]
    assert [(e["actor"], e["outcome"]) for e in setup.events(team=team, kind="restart")] == [
        ("admin", "ok"), ("admin", "instance_not_found")]
    setup.api.delete(f"/api/v1/teams/{team}/instances/web?wait=60", headers=ADMIN)


def test_a_correct_flag_stops_a_stop_on_solve_instance_and_a_wrong_one_does_not(
    setup: Setup,
) -> None:
    """stop_on_solve: a wrong flag leaves the instance; the correct one stops it (audited)."""
    team, api = "rs6", setup.api
    url = f"/api/v1/teams/{team}/flags/solve"
    inst = setup.start("solve", team)
    web = setup.start("web", team)
    wrong = api.post(url, json={"flag": "CTF{nope}"}, headers=ADMIN)
    assert wrong.json() == {"team_id": team, "challenge": "solve", "correct": False}
    # A correct flag of a challenge without stop_on_solve stops nothing either.
    own_web = team_flag(setup.secret, "web", team)
    assert api.post(f"/api/v1/teams/{team}/flags/web", json={"flag": own_web},
                    headers=ADMIN).json()["correct"] is True
    assert setup.events(team=team, kind="stop") == []
    assert setup.instance("solve", team)["container_id"] == inst["container_id"]

    right = api.post(url, json={"flag": team_flag(setup.secret, "solve", team)},
                     headers=ADMIN)
    assert right.json() == {"team_id": team, "challenge": "solve", "correct": True}
    wait_for(lambda: setup.instance("solve", team) is None and setup.gone(inst["container_id"]),
             60, 0.2, "the solved instance to be stopped")
    stops = setup.events(team=team, kind="stop")
    assert [(e["challenge"], e["actor"], e["outcome"]) for e in stops] == [
        ("solve", "admin", "ok")]
    assert setup.instance("web", team)["container_id"] == web["container_id"]
    # Solved again with no instance: correct, and nothing to stop.
    again = api.post(url, json={"flag": team_flag(setup.secret, "solve", team)},
                     headers=ADMIN)
    assert again.json()["correct"] is True
    api.delete(f"/api/v1/teams/{team}/instances/web?wait=60", headers=ADMIN)


# -- the team dashboard ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_api(setup: Setup) -> Iterator[str]:
    """The API of ``setup``'s settings over real HTTP (uvicorn in a thread); its base URL."""
    env = setup.env
    settings = load_settings(
        broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
        redis_url=env["CTF_REDIS_URL"], challenges_file=Path(env["CTF_CHALLENGES_FILE"]),
        data_dir=Path(env["CTF_DATA_DIR"]), admin_token=ADMIN_TOKEN)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="restart-uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 20, message="uvicorn to start")
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(20)


@pytest.mark.browser
@pytest.mark.slow
def test_the_dashboards_restart_button_gives_a_fresh_instance(
    setup: Setup, live_api: str,
) -> None:
    """A team clicks Restart, confirms, and gets a new running container of web."""
    if not CHROMIUM.exists():
        unavailable("chromium is missing: run ./setup-celery.sh --dev (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright  # noqa: PLC0415

    team = "rs7"
    before = setup.start("web", team)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(base_url=live_api)
            page.on("dialog", lambda dialog: dialog.accept())  # "Restart web? …"
            page.goto(f"/#token={team_token(ADMIN_TOKEN, team)}")
            card = page.locator('article[data-challenge="web"]')
            expect(card.locator(".badge")).to_have_text("Running", timeout=20_000)
            card.get_by_role("button", name="Restart", exact=True).click()
            expect(page.locator("#announce")).to_contain_text("was restarted", timeout=60_000)
            expect(card.locator(".badge")).to_have_text("Running", timeout=20_000)
            expect(card.get_by_role("button", name="Restart", exact=True)).to_be_enabled()
        finally:
            browser.close()
    after = setup.instance("web", team)
    assert after is not None and after["status"] == "running"
    assert after["container_id"] != before["container_id"]
    assert setup.gone(before["container_id"])
    setup.api.delete(f"/api/v1/teams/{team}/instances/web?wait=60", headers=ADMIN)


def _plugin_client() -> Any:
    """The CTFd plugin's server-side client module (it needs no CTFd), loaded on its own."""
    path = ROOT / "integrations" / "ctfd" / "ctf_instancer" / "client.py"
    spec = importlib.util.spec_from_file_location("ctf_instancer_client_restart", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_ctfd_plugins_restart_call_gives_a_fresh_instance(
    setup: Setup, live_api: str,
) -> None:
    """What the modal's Restart route calls (the plugin's client, a team token) restarts."""
    plugin = _plugin_client()
    conn = plugin.Connection(url=live_api, admin_token=ADMIN_TOKEN, prefix="ctfd",
                             url_source="test", token_source="test", prefix_source="test")
    api = plugin.InstancerClient(conn)
    team = plugin.team_id_for("ctfd", "t", 77)
    before = setup.start("web", team)
    answer = api.restart(team, "web")
    assert answer["task_id"] and answer["team_id"] == team

    def fresh() -> dict[str, Any] | None:
        task = api.task(team, answer["task_id"])
        return task if task["state"] == "SUCCESS" else None

    result = wait_for(fresh, 60, 0.2, "the plugin's restart task")["result"]
    assert result["container_id"] != before["container_id"]
    assert api.instance(team, "web")["container_id"] == result["container_id"]
    assert [e["actor"] for e in setup.events(team=team, kind="restart")] == [f"team:{team}"]
    setup.api.delete(f"/api/v1/teams/{team}/instances/web?wait=60", headers=ADMIN)
