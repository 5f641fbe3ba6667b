"""Fixtures of the API and CLI tests: the app in-process, built like the test worker's.

Loaded by the API test modules through ``pytest_plugins = ["api_fixtures"]`` (pytest only
auto-loads conftest.py, which another engineer owns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from api_helpers import ADMIN_TOKEN
from fastapi.testclient import TestClient

from celery_app.api.app import create_app
from celery_app.settings import Settings


@pytest.fixture
def api_settings(make_settings: Callable[..., Settings]) -> Settings:
    """Return settings that reach the same Redis, catalog and labels as the test worker."""
    return make_settings(admin_token=ADMIN_TOKEN, max_instances_per_team=5)


@pytest.fixture
def api(worker: Any, clean_worker_state: None, api_settings: Settings) -> Iterator[TestClient]:
    """Yield the API in-process, with a real worker behind it and no instance left afterwards."""
    with TestClient(create_app(api_settings)) as client:
        yield client


@pytest.fixture
def down_api(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """Yield the API with Redis (state, broker and backend) pointing at a closed port."""
    closed = "redis://127.0.0.1:9"
    settings = make_settings(
        admin_token=ADMIN_TOKEN, broker_url=f"{closed}/0", result_backend=f"{closed}/1",
        redis_url=f"{closed}/2",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client
