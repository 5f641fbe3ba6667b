"""The organisers' CLI ``ctfctl``, against the real worker, Redis and Docker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from api_helpers import ADMIN_TOKEN, our_containers
from conftest import ROOT
from typer.testing import CliRunner

from celery_app.cli import app
from celery_app.vocab.team_tokens import team_token

pytest_plugins = ["api_fixtures"]

runner = CliRunner()


@pytest.fixture
def cli_env(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Return (and set) the environment of the test worker, as an organiser's shell has it."""
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    return worker_env


def ctfctl(*args: str) -> Any:
    """Run ``ctfctl`` in-process and return the click result."""
    return runner.invoke(app, list(args))


def test_queues_prints_the_worker_queues_for_the_script() -> None:
    """``python -m celery_app.cli queues --host local`` prints the comma-joined queues."""
    done = subprocess.run([sys.executable, "-m", "celery_app.cli", "queues", "--host", "local"],
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "celery,ctf.host.local"


@pytest.mark.redis
def test_check_accepts_the_catalog_and_refuses_a_mistake(
    cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check`` exits 0 on a good catalog and 1, naming challenge and field, on a bad one."""
    good = ctfctl("check")
    assert good.exit_code == 0, good.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("challenges:\n  broken:\n    image: x\n    port: 70000\n")
    monkeypatch.setenv("CTF_CHALLENGES_FILE", str(bad))
    result = ctfctl("check")
    assert result.exit_code == 1
    assert "broken" in result.stderr
    assert "port" in result.stderr
    monkeypatch.setenv("CTF_CHALLENGES_FILE", cli_env["CTF_CHALLENGES_FILE"])
    monkeypatch.setenv("CTF_DEFAULT_TTL", "soon")
    assert ctfctl("check").exit_code == 1


@pytest.mark.redis
def test_challenges_and_token_print_json(cli_env: dict[str, str]) -> None:
    """``challenges --json`` lists the catalog; ``token`` prints the team's API token."""
    result = ctfctl("challenges", "--json")
    assert result.exit_code == 0, result.output
    assert "web" in {c["id"] for c in json.loads(result.stdout)["challenges"]}
    result = ctfctl("token", "team1")
    assert result.stdout.strip() == team_token(ADMIN_TOKEN, "team1")
    assert ctfctl("token", "../x").exit_code == 2


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.slow
def test_start_status_extend_stop(
    cli_env: dict[str, str], clean_worker_state: None, docker_client: Any
) -> None:
    """Start waits until running; status lists it; extend moves it; stop removes it."""
    result = ctfctl("start", "web", "cli1", "--json")
    assert result.exit_code == 0, result.output
    inst = json.loads(result.stdout)
    assert inst["status"] == "running"

    table = ctfctl("status", "--team", "cli1")
    assert table.exit_code == 0
    assert "running" in table.stdout
    assert "cli1" in table.stdout
    assert inst["url"] in table.stdout.replace("\n", "").replace("│", "").replace(" ", "")
    listed = json.loads(ctfctl("status", "--team", "cli1", "--json").stdout)
    assert [i["container_id"] for i in listed["instances"]] == [inst["container_id"]]

    extended = ctfctl("extend", "web", "cli1", "--json")
    assert extended.exit_code == 0, extended.output
    assert json.loads(extended.stdout)["expires_at"] > inst["expires_at"]

    stopped = ctfctl("stop", "web", "cli1", "--json")
    assert stopped.exit_code == 0, stopped.output
    assert json.loads(stopped.stdout)["status"] == "stopped"
    assert our_containers(docker_client, **{"ctf.team": "cli1"}) == []
    again = ctfctl("stop", "web", "cli1")
    assert again.exit_code == 3
    assert "instance_not_found" in again.stderr


@pytest.mark.docker
@pytest.mark.redis
def test_bad_input_exit_codes(cli_env: dict[str, str], docker_client: Any, worker: Any) -> None:
    """Unknown challenge exits 3, invalid team id 2, a failed start 1; nothing is left."""
    assert ctfctl("start", "nope", "t1").exit_code == 3
    assert ctfctl("start", "web", "a b").exit_code == 2
    assert ctfctl("status", "--team", "../x").exit_code == 2
    crashed = ctfctl("start", "crash", "clicrash")
    assert crashed.exit_code == 1
    assert "start_failed" in crashed.stderr
    assert our_containers(docker_client, **{"ctf.team": "clicrash"}) == []


@pytest.mark.docker
@pytest.mark.redis
def test_pull_and_janitor_once(cli_env: dict[str, str], worker: Any) -> None:
    """``pull`` has the worker make every catalog image present; ``janitor --once`` runs."""
    pulled = ctfctl("pull", "--json")
    assert pulled.exit_code == 0, pulled.output
    assert json.loads(pulled.stdout)["status"] == "ok"
    swept = ctfctl("janitor", "--once", "--json")
    assert swept.exit_code == 0, swept.output
    assert {"expired", "orphan_containers", "orphan_networks"} <= set(json.loads(swept.stdout))


@pytest.mark.redis
def test_redis_down_exits_5(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """With Redis unreachable, ``status`` says so and exits 5."""
    monkeypatch.setenv("CTF_REDIS_URL", "redis://127.0.0.1:9/2")
    result = ctfctl("status")
    assert result.exit_code == 5
    assert "backend_unavailable" in result.stderr
