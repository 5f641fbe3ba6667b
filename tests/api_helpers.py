"""Helpers of the API and CLI tests: tokens, headers, this run's containers."""

from __future__ import annotations

from typing import Any

import docker
from conftest import ADMIN_TOKEN, TEST_LABEL

from celery_app.vocab.team_tokens import team_token

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def team_headers(team_id: str) -> dict[str, str]:
    """Return the Authorization header of ``team_id``'s token."""
    return {"Authorization": f"Bearer {team_token(ADMIN_TOKEN, team_id)}"}


def our_containers(client: docker.DockerClient, **labels: str) -> list[Any]:
    """Return the containers of this test run (label ``ctf.test``), filtered by ``labels``."""
    filters = [f"{k}={v}" for k, v in {**TEST_LABEL, **labels}.items()]
    return client.containers.list(all=True, filters={"label": filters}, ignore_removed=True)
