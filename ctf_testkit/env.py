"""One description of a test or benchmark run's instancer, as Settings and as a worker's env.

:meth:`RunConfig.settings` (an in-process service) and :meth:`RunConfig.env` (a worker or API
subprocess) are built from the same field values, so the two cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, SecretStr

from celery_app.settings import Settings, load_settings


def env_name(name: str) -> str:
    """The environment variable of the Settings field ``name`` (its alias, or ``CTF_<NAME>``)."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"CTF_{name.upper()}"


def env_value(value: Any) -> str:
    """A field value as the environment spells it."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class RunConfig:
    """Where one run's instancer lives and how it is set up.

    Args:
        redis_url: the run's private Redis (``redis://127.0.0.1:<port>``).
        catalog_file: its challenges.
        data_dir: its data folder.
        labels: ``CTF_EXTRA_LABELS``: every container and network it makes carries them.
        pool: its team subnet pool (each test file or bench has its own).
        fields: further Settings fields, for in-process services and subprocesses alike.
        dbs: the Redis databases of broker, results and state.
    """

    redis_url: str
    catalog_file: Path
    data_dir: Path
    labels: dict[str, str]
    pool: str
    fields: dict[str, Any] = field(default_factory=dict)
    dbs: tuple[int, int, int] = (0, 1, 2)

    def values(self, **overrides: Any) -> dict[str, Any]:
        """The Settings field values of this run (``overrides`` win)."""
        broker, backend, state = self.dbs
        return {
            "broker_url": f"{self.redis_url}/{broker}",
            "result_backend": f"{self.redis_url}/{backend}",
            "redis_url": f"{self.redis_url}/{state}",
            "challenges_file": self.catalog_file,
            "data_dir": self.data_dir,
            "extra_labels": self.labels,
            "team_subnet_pool": self.pool,
            **self.fields,
            **overrides,
        }

    def settings(self, **overrides: Any) -> Settings:
        """The settings of an in-process service (missing secrets filled from ``data_dir``)."""
        return load_settings(**self.values(**overrides))

    def env(self, **overrides: Any) -> dict[str, str]:
        """The environment of a worker or API subprocess (``overrides``: field names)."""
        return {env_name(k): env_value(v) for k, v in self.values(**overrides).items()}
