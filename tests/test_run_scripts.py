"""The scripts as users run them: run-celery-worker.sh and run-celery-test.sh, end to end.

Each test runs ``./run-celery-worker.sh`` in a data folder of its own, with the broker URL at a
free port, so the script starts its own redis-server there (SPEC §3), on the real Docker engine.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import ADMIN_TOKEN, ROOT, TEST_FIELDS, TEST_LABEL, TEST_POOL

from ctf_testkit.env import RunConfig
from ctf_testkit.support import free_port, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.redis]


def session_processes(sid: int) -> set[int]:
    """The pids of every live process of session ``sid`` (the script and all it started)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Script:
    """A running ``run-celery-worker.sh`` and what it was given."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    data: Path
    log: Path
    api_port: int

    def output(self) -> str:
        """The script's output so far (its last 4000 characters)."""
        return self.log.read_text(errors="replace")[-4000:]

    def request(self, method: str, path: str, timeout: float = 60) -> tuple[int, Any]:
        """One raw HTTP request to the script's API as the admin; (status, JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=timeout)
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def interrupt(self) -> int:
        """Send SIGINT (Ctrl-C) to the script alone; return its exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(90)


def script_env(data: Path, catalog_file: Path, api_port: int) -> dict[str, str]:
    """The environment of a user's run: nothing of the test run's CTF_ or CELERY_ settings."""
    redis_url = f"redis://127.0.0.1:{free_port()}"  # nobody answers: the script starts Redis
    run = RunConfig(redis_url, catalog_file, data, TEST_LABEL, TEST_POOL, TEST_FIELDS)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CTF_", "CELERY_"))}
    return {**clean, **run.env(admin_token=ADMIN_TOKEN, api_bind=f"127.0.0.1:{api_port}"),
            # Its own run folder (pid files): run-tests.sh exports one for the whole suite.
            "CTF_RUN_DIR": str(data / "run")}


def start_script(tmp_path: Path, catalog_file: Path, *args: str) -> Script:
    """Start ``run-celery-worker.sh args`` in a session of its own; wait for its worker."""
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True, exist_ok=True)
    api_port = free_port()
    env = script_env(data, catalog_file, api_port)
    log = tmp_path / "script.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(ROOT / "run-celery-worker.sh"), *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    script = Script(proc, env, data, log, api_port)
    wait_for(lambda: b" ready." in log.read_bytes() or proc.poll() is not None, 120, 0.2,
             "the script's worker to be ready")
    assert proc.poll() is None, script.output()
    return script


@pytest.fixture
def scripts() -> Iterator[list[Script]]:
    """Scripts a test starts; whatever still runs afterwards is killed (its whole session)."""
    started: list[Script] = []
    yield started
    for script in started:
        if script.proc.poll() is None:
            os.killpg(script.proc.pid, signal.SIGKILL)
            script.proc.wait(30)
        for pid in session_processes(script.proc.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def bystanders() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Unrelated processes (``sleep``) a test starts; stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(10)


def test_no_api_leaves_a_process_named_by_a_stale_pid_file_alone(
    tmp_path: Path, catalog_file: Path, docker_client: docker.DockerClient,
    scripts: list[Script], bystanders: list[subprocess.Popen[bytes]],
) -> None:
    """``--no-api`` + SIGINT never kills the processes that stale api/dockerd pid files name."""
    run_dir = tmp_path / "data" / "run"
    run_dir.mkdir(parents=True)
    for _ in range(2):
        bystanders.append(subprocess.Popen(["sleep", "600"]))
    api_stale, dockerd_stale = bystanders
    # An earlier run's api.pid (a bare pid, as the script wrote them), whose pid the kernel has
    # given to another process since; and a dockerd.pid whose recorded start time is not the
    # process's own.
    (run_dir / "api.pid").write_text(f"{api_stale.pid}\n")
    (run_dir / "dockerd.pid").write_text(f"{dockerd_stale.pid} 1\n")
    script = start_script(tmp_path, catalog_file, "--no-api")
    scripts.append(script)
    script.interrupt()
    assert api_stale.poll() is None, "the script killed the process a stale api.pid names"
    assert dockerd_stale.poll() is None, "the script killed the process a stale dockerd.pid names"
    assert docker_client.ping()  # the engine it did not start still runs
    wait_for(lambda: not session_processes(script.proc.pid), 30, 0.1,
             "everything the script started to stop")


def test_default_mode_serves_http_starts_and_sigint_stops_everything(
    tmp_path: Path, catalog_file: Path, docker_client: docker.DockerClient,
    scripts: list[Script],
) -> None:
    """The default mode answers a raw HTTP start at CTF_API_BIND; SIGINT stops all it started."""
    script = start_script(tmp_path, catalog_file)
    scripts.append(script)
    wait_for(lambda: _healthy(script), 60, 0.2, "the script's API to answer /healthz")
    run_dir = script.data / "run"
    started = {name: int((run_dir / f"{name}.pid").read_text().split()[0])
               for name in ("redis", "worker", "api")}
    team = f"script-{os.getpid()}"
    status, body = script.request("PUT", f"/api/v1/teams/{team}/instances/web?wait=60", 90)
    assert status == 200, body
    assert body["status"] == "running"
    port = int(body["url"].rsplit(":", 1)[1])
    page = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    page.request("GET", "/")
    assert page.getresponse().status == 200
    page.close()
    status, body = script.request("DELETE", f"/api/v1/teams/{team}/instances/web?wait=60", 90)
    assert status == 200, body
    assert docker_client.containers.list(
            ignore_removed=True, all=True, filters={"name": f"ctf-web-{team}"}) == []
    # The platform's smoke test, against this running worker.
    smoke = subprocess.run([str(ROOT / "run-celery-test.sh"), "web", f"{team}-smoke"],
                           env=script.env, capture_output=True, text=True, timeout=180,
                           check=False)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "OK" in smoke.stdout
    assert "url:     http://" in smoke.stdout
    unknown = subprocess.run([str(ROOT / "run-celery-test.sh"), "no-such-challenge", team],
                             env=script.env, capture_output=True, text=True, timeout=180,
                             check=False)
    assert unknown.returncode == 1
    assert "no-such-challenge" in unknown.stderr
    every = session_processes(script.proc.pid)
    assert set(started.values()) <= every, (started, every)

    script.interrupt()
    wait_for(lambda: not session_processes(script.proc.pid), 30, 0.1,
             "everything the script started to stop")
    for name, pid in started.items():
        assert not alive(pid), f"{name} (pid {pid}) still runs"
        assert not (run_dir / f"{name}.pid").exists()
    with pytest.raises(OSError):
        script.request("GET", "/healthz", 2)


def _healthy(script: Script) -> bool:
    """Whether the script's API answers /healthz with 200 and a worker."""
    try:
        status, body = script.request("GET", "/healthz", 2)
    except OSError:
        return False
    return status == 200 and body.get("workers", 0) >= 1
