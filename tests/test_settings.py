"""Settings refuse unsafe secrets at start-up, and generated ones are kept (issue 17)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from pydantic import ValidationError

from celery_app.settings import MIN_SECRET_LENGTH, load_settings

GOOD = "x" * MIN_SECRET_LENGTH


@pytest.mark.parametrize("env", ["CTF_ADMIN_TOKEN", "CTF_FLAG_SECRET"])
@pytest.mark.parametrize("value", ["", "short-secret-123", "y" * (MIN_SECRET_LENGTH - 1)])
def test_short_secret_from_the_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    """An empty or short admin token or flag secret is refused, saying how to make one."""
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as caught:
        load_settings(data_dir=tmp_path)
    message = str(caught.value)
    assert env in message
    assert "secrets.token_urlsafe(32)" in message
    assert f"at least {MIN_SECRET_LENGTH}" in message
    if value:
        assert value not in message  # the refused secret is not echoed into a log


def test_short_secret_in_the_data_folder_is_refused(tmp_path: Path) -> None:
    """A short secret written by hand into CTF_DATA_DIR/flag_secret is refused too."""
    (tmp_path / "flag_secret").write_text("tiny\n")
    with pytest.raises(ValidationError, match="flag_secret"):
        load_settings(data_dir=tmp_path, admin_token=GOOD)


def test_generated_secrets_are_long_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset secrets are generated (>= 32 characters, mode 0600) and the same on a restart."""
    monkeypatch.delenv("CTF_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CTF_FLAG_SECRET", raising=False)
    first = load_settings(data_dir=tmp_path)
    again = load_settings(data_dir=tmp_path)
    assert len(first.admin_token_value()) >= MIN_SECRET_LENGTH
    assert len(first.flag_secret_value()) >= MIN_SECRET_LENGTH
    assert first.admin_token_value() != first.flag_secret_value()
    assert again.admin_token_value() == first.admin_token_value()
    assert again.flag_secret_value() == first.flag_secret_value()
    assert (tmp_path / "admin_token").stat().st_mode & 0o777 == 0o600


def test_ctfctl_check_refuses_an_empty_admin_token(tmp_path: Path) -> None:
    """``ctfctl check`` (run by run-celery-worker.sh) exits 1 on ``CTF_ADMIN_TOKEN=``."""
    env = {"PATH": "/usr/bin:/bin", "CTF_DATA_DIR": str(tmp_path), "CTF_ADMIN_TOKEN": ""}
    done = subprocess.run([sys.executable, "-m", "celery_app.cli", "check"], env=env,
                          capture_output=True, text=True, cwd=ROOT, check=False, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "CTF_ADMIN_TOKEN" in done.stderr
    assert "token_urlsafe" in done.stderr
