"""scripts/lib.sh's Redis functions: the URL's password is used, the index is never evicted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import ROOT

from ctf_testkit.support import free_port, wait_for

pytestmark = [pytest.mark.redis]

PASSWORD = "s3cret pass/with:odd@chars"  # percent-encoded in the URL
ENCODED = "s3cret%20pass%2Fwith%3Aodd%40chars"


def lib(command: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in bash after sourcing scripts/lib.sh, with a data folder of its own."""
    env = {**os.environ, "CTF_DATA_DIR": str(tmp_path / "data"),
           "CTF_RUN_DIR": str(tmp_path / "run")}
    # Files, not pipes: a redis-server the script starts keeps its output open.
    (tmp_path / "data").mkdir(exist_ok=True)
    with (tmp_path / "out").open("w+") as out, (tmp_path / "err").open("w+") as err:
        done = subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/lib.sh"; {command}'],
                              env=env, stdout=out, stderr=err, text=True, timeout=60,
                              check=False)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(done.args, done.returncode, out.read(), err.read())


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server on a free port that requires PASSWORD; yield its port."""
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--requirepass", PASSWORD,
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=PASSWORD)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    try:
        wait_for(answers, 10, 0.05, "the password-protected Redis")
        yield port
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def test_redis_up_uses_the_urls_password(locked_redis: int, tmp_path: Path) -> None:
    """With the URL's password Redis is up; a wrong or missing one stops with a clear message."""
    url = f"redis://:{ENCODED}@127.0.0.1:{locked_redis}/0"
    assert lib(f'redis_up "{url}"', tmp_path).returncode == 0
    wrong = lib(f'redis_up "redis://:nope@127.0.0.1:{locked_redis}/0"', tmp_path)
    assert wrong.returncode != 0
    assert "password" in wrong.stderr
    assert "nope" not in wrong.stderr  # the password is not repeated
    missing = lib(f'redis_up "redis://127.0.0.1:{locked_redis}/0"', tmp_path)
    assert missing.returncode != 0
    assert "password" in missing.stderr
    # the password is handed over in the environment, not on redis-cli's command line
    script = (ROOT / "scripts/lib.sh").read_text()
    assert "REDISCLI_AUTH" in script
    assert " -a " not in script


def test_shipped_redis_never_evicts(tmp_path: Path) -> None:
    """The Redis that ensure_redis starts refuses writes when full instead of evicting keys."""
    port = free_port()
    pidfile = tmp_path / "run" / "redis.pid"
    try:
        started = lib(f'ensure_redis "redis://127.0.0.1:{port}/0"', tmp_path)
        assert started.returncode == 0, started.stderr
        client = redis.Redis(port=port, decode_responses=True)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert int(client.config_get("maxmemory")["maxmemory"]) == 1024**3
        client.close()
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not Path(f"/proc/{pid}").exists()
                     or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(),
                     20, 0.1, "the script's redis-server to stop")
