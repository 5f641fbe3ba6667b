"""Fixtures of the unit suite: the real rules on a FakeDriver and an in-memory Redis.

Nothing here needs Docker or a Redis server. Run the suite on its own with
``./run-tests.sh --unit`` (``--confcutdir`` keeps the Docker fixtures of tests/conftest.py
out of it, so it runs where no engine answers); the whole suite runs it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from celery_app.core import specs as specs_module
from celery_app.core.catalog import load_catalog
from celery_app.core.service import InstanceService
from celery_app.loops.janitor import Janitor
from celery_app.settings import Settings, load_settings
from celery_app.state.store import StateStore
from ctf_testkit.fake_driver import FakeDriver

IMAGE = "ctf-test/http:unit"
CRASH = "ctf-test/crash:unit"
LABELS = {"ctf.test": "unit"}
CATALOG = f"""
challenges:
  web:
    image: {IMAGE}
    port: 8080
    ttl: 600
    max_lifetime: 1800
    flag_env: FLAG
  crash:
    image: {CRASH}
    port: 8080
    start_timeout: 5
  missing:
    image: ctf-test/missing:unit
    port: 8080
  scratch:
    image: {IMAGE}
    port: 8080
    read_only: false
    disk: 64m
"""


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build settings for a unit test: defaults, plus its own catalog and data folder."""
    catalog = tmp_path / "challenges.yaml"
    catalog.write_text(CATALOG)

    def make(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "challenges_file": catalog, "data_dir": tmp_path / "data", "extra_labels": LABELS,
            "egress_firewall": "off",
        }
        return load_settings(**{**fields, **overrides})

    return make


@pytest.fixture
def store() -> Iterator[StateStore]:
    """A StateStore on an in-memory Redis (fakeredis; Lua through lupa)."""
    client = fakeredis.FakeRedis(decode_responses=True)
    yield StateStore(client)
    client.close()


@pytest.fixture
def driver() -> FakeDriver:
    """An in-memory engine with the catalog's images; its containers answer probes."""
    fake = FakeDriver()
    fake.add_image(IMAGE, 8080)
    fake.add_image(CRASH, 8080)
    return fake


@pytest.fixture(autouse=True)
def probes_ask_the_fake(monkeypatch: pytest.MonkeyPatch, driver: FakeDriver) -> None:
    """A readiness probe answers when the fake container at that address is running.

    A container of the crash image never answers (it "exits" at once).
    """

    def probe(host: str, port: int, *_args: Any, **_kwargs: Any) -> bool:
        for c in driver.list_containers(LABELS):
            if c.ip == host and c.state == "running":
                if c.labels.get("ctf.challenge") == "crash":
                    driver.exit(c.id, 3, output="boom\n")
                    return False
                return True
        return False

    monkeypatch.setattr(specs_module, "probe_once", probe)


@pytest.fixture
def make_service(make_settings: Callable[..., Settings], driver: FakeDriver,
                 store: StateStore) -> Callable[..., InstanceService]:
    """Build an InstanceService on the fake engine and the in-memory store."""

    def make(host: str = "local", **overrides: Any) -> InstanceService:
        settings = make_settings(**overrides)
        return InstanceService(settings, load_catalog(settings), driver, store, host=host)

    return make


@pytest.fixture
def svc(make_service: Callable[..., InstanceService]) -> InstanceService:
    """The service with default settings."""
    return make_service()


@pytest.fixture
def janitor(svc: InstanceService) -> Janitor:
    """The janitor of ``svc``, after the reconcile a worker runs when it starts."""
    svc.reconcile()
    return Janitor(svc)

