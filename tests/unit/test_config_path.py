"""Celery's settings come from the one Settings class: no second read of the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_config(**env: str) -> subprocess.CompletedProcess[str]:
    """Import celery_config in a fresh interpreter with ``env`` added; print what it chose."""
    code = ("from celery_app import celery_config as c; "
            "print(c.beat_schedule['reap-expired']['schedule'], "
            "c.broker_transport_options['visibility_timeout'], c.broker_url)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CTF_", "CELERY_"))}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_celery_config_takes_settings_values() -> None:
    """CTF_JANITOR_INTERVAL, CTF_VISIBILITY_TIMEOUT and CELERY_BROKER_URL reach Celery's config."""
    done = load_config(CTF_JANITOR_INTERVAL="7", CTF_VISIBILITY_TIMEOUT="45",
                       CELERY_BROKER_URL="redis://127.0.0.1:6399/0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7.0", "45.0", "redis://127.0.0.1:6399/0"]


def test_celery_config_without_the_variables_holds_the_defaults() -> None:
    """With nothing set, Celery gets the defaults users run with (5 s janitor, 30 s visibility)."""
    from celery_app.settings import Settings  # noqa: PLC0415  # only the defaults are needed

    fields = Settings.model_fields
    done = load_config()
    assert done.returncode == 0, done.stderr
    janitor, visibility, _url = done.stdout.split()
    assert float(janitor) == fields["janitor_interval"].default == 5.0
    assert float(visibility) == fields["visibility_timeout"].default == 30.0


def test_celery_config_refuses_what_settings_refuse() -> None:
    """A janitor interval Settings rejects is refused by name, not clamped into range."""
    done = load_config(CTF_JANITOR_INTERVAL="30")
    assert done.returncode != 0
    assert "CTF_JANITOR_INTERVAL" in done.stderr or "janitor_interval" in done.stderr


def test_celery_config_holds_the_spec_section_2_values() -> None:
    """SPEC §2: Redis db 0 and 1 on localhost, JSON only, results kept one day; URLs overridable."""
    code = ("import json; from celery_app import celery_config as c; print(json.dumps("
            "[c.broker_url, c.result_backend, c.task_serializer, c.result_serializer, "
            "c.accept_content, c.result_accept_content, c.result_expires]))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CTF_", "CELERY_"))}

    def values(**env: str) -> list[object]:
        done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    assert values() == ["redis://localhost:6379/0", "redis://localhost:6379/1", "json", "json",
                        ["json"], ["json"], 86400]
    broker, backend = "redis://10.0.0.5:6390/3", "redis://10.0.0.6:6391/4"
    assert values(CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=backend)[:2] == [broker,
                                                                                  backend]
