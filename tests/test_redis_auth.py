"""The shipped scripts' Redis: a password whenever it listens beyond loopback (issue 16)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from test_egress import host_address

pytestmark = [pytest.mark.redis]


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with the shipped scripts/lib.sh sourced, as the scripts do."""
    # Files, not pipes: the redis-server it starts keeps its parent's output open.
    out, err = (Path(env["CTF_DATA_DIR"]).parent / name for name in ("bash.out", "bash.err"))
    with out.open("w") as stdout, err.open("w") as stderr:
        done = subprocess.run(
            ["bash", "-c", f"set -euo pipefail; source scripts/lib.sh; {script}"],
            # Its own run folder: run-tests.sh exports CTF_RUN_DIR for the whole suite.
            cwd=ROOT, env={**os.environ, "CTF_RUN_DIR": f"{env['CTF_DATA_DIR']}/run", **env},
            stdout=stdout, stderr=stderr, timeout=60,
            check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, out.read_text(),
                                       err.read_text())


def _ping(host: str, port: int, password: str | None = None) -> str:
    env = {**os.environ}
    env.pop("REDISCLI_AUTH", None)
    if password:
        env["REDISCLI_AUTH"] = password
    return subprocess.run(["redis-cli", "-h", host, "-p", str(port), "ping"], env=env,
                          capture_output=True, text=True, timeout=10, check=False).stdout


def test_a_redis_started_beyond_loopback_requires_a_generated_password(tmp_path: Path) -> None:
    """Beyond loopback, Redis gets a generated password kept in the data folder, never in ps."""
    port = free_port()
    address = host_address()
    env = {"CTF_DATA_DIR": str(tmp_path / "data"), "CTF_REDIS_BIND": f"127.0.0.1 {address}",
           "CELERY_BROKER_URL": f"redis://localhost:{port}/0",
           "CELERY_RESULT_BACKEND": f"redis://localhost:{port}/1"}
    # As run-celery-worker.sh does: add the password to the URLs, then start Redis.
    done = _bash('add_redis_password; ensure_redis "$CELERY_BROKER_URL"; '
                 'echo "broker=$CELERY_BROKER_URL"', env)
    try:
        assert done.returncode == 0, done.stderr
        secret = tmp_path / "data" / "redis_password"
        password = secret.read_text().strip()
        assert len(password) >= 32
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert f"broker=redis://:{password}@localhost:{port}/0" in done.stdout
        assert password not in done.stderr  # the banner names the file, not the password
        # Beyond loopback and on loopback alike, nothing without the password.
        assert "NOAUTH" in _ping(address, port)
        assert "NOAUTH" in _ping("127.0.0.1", port)
        assert "PONG" in _ping(address, port, password)
        pid = (tmp_path / "data" / "run" / "redis.pid").read_text().split()[0]
        assert password not in Path(f"/proc/{pid}/cmdline").read_text()
        # A second start keeps the same password (and finds the running Redis).
        again = _bash('add_redis_password; ensure_redis "$CELERY_BROKER_URL"; '
                      'echo "broker=$CELERY_BROKER_URL"', env)
        assert again.returncode == 0 and password in again.stdout
    finally:
        _bash("stop_started redis", env)


def test_a_loopback_redis_stays_as_it_was(tmp_path: Path) -> None:
    """On loopback only (the default), no password is made and the URLs are left alone."""
    port = free_port()
    env = {"CTF_DATA_DIR": str(tmp_path / "data"),
           "CELERY_BROKER_URL": f"redis://localhost:{port}/0"}
    done = _bash('add_redis_password; ensure_redis "$CELERY_BROKER_URL"; '
                 'echo "broker=$CELERY_BROKER_URL"', env)
    try:
        assert done.returncode == 0, done.stderr
        assert f"broker=redis://localhost:{port}/0" in done.stdout
        assert not (tmp_path / "data" / "redis_password").exists()
        assert "PONG" in _ping("127.0.0.1", port)
    finally:
        _bash("stop_started redis", env)


def test_check_warns_about_a_passwordless_broker_off_loopback(tmp_path: Path) -> None:
    """`ctfctl check` (run by run-celery-worker.sh at start-up) warns about such a broker URL."""
    env = {**os.environ, "CTF_DATA_DIR": str(tmp_path), "CTF_EGRESS_FIREWALL": "off",
           "CELERY_BROKER_URL": "redis://10.0.0.5:6379/0"}
    done = subprocess.run([sys.executable, "-m", "celery_app.cli", "check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "10.0.0.5:6379" in done.stderr and "no password" in " ".join(done.stderr.split())
    env["CELERY_BROKER_URL"] = "redis://:secret-password@10.0.0.5:6379/0"
    done = subprocess.run([sys.executable, "-m", "celery_app.cli", "check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert "10.0.0.5" not in done.stderr and "secret-password" not in done.stderr
