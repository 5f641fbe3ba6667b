"""Warm-pool claims on the fake engine: what a start that claims asks of the engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_app.core import pool as pool_module
from celery_app.core.service import InstanceService
from ctf_testkit.fake_driver import FakeDriver
from tests.unit.conftest import IMAGE

POOLED = f"""
challenges:
  warm:
    image: {IMAGE}
    port: 8080
    ttl: 600
    pool: 1
"""


@pytest.fixture
def warm(make_service: Callable[..., InstanceService], tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch, driver: FakeDriver) -> InstanceService:
    """A service whose catalog has ``warm`` (pool: 1); pool probes ask the fake too."""
    def probe(host: str, *_args: Any, **_kwargs: Any) -> bool:
        return any(c.ip == host and c.state == "running" for c in driver.list_containers())

    monkeypatch.setattr(pool_module, "probe_once", probe)
    catalog = tmp_path / "pooled.yaml"
    catalog.write_text(POOLED)
    return make_service(challenges_file=catalog)


def test_a_start_that_claims_asks_no_image_check(warm: InstanceService,
                                                 driver: FakeDriver) -> None:
    """With a container ready, the start claims it without looking at the image."""
    warm.pool.run_once()  # boot
    warm.pool.run_once()  # answered: parked and offered
    assert warm.pool.has_ready(warm.catalog.get("warm"))
    driver.calls.clear()
    inst = warm.start(warm.catalog.key("warm", "t1"))
    claimed = driver.get_container(inst.container_name)
    assert claimed is not None and "ctf.pool" in claimed.labels
    assert "image_present" not in driver.calls and "pull" not in driver.calls


def test_a_claim_that_misses_checks_the_image_before_the_cold_start(
    warm: InstanceService, driver: FakeDriver,
) -> None:
    """A ready slot whose container is gone: the start goes cold, image checked first."""
    warm.store.pools.offer("local", "warm", "0123456789ab")  # no such container
    driver.calls.clear()
    inst = warm.start(warm.catalog.key("warm", "t2"))
    cold = driver.get_container(inst.container_name)
    assert inst.status == "running" and cold is not None and "ctf.pool" not in cold.labels
    assert driver.calls.count("image_present") == 1
    assert driver.calls.index("image_present") < driver.calls.index("run_container")
