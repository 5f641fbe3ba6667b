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


def test_the_pass_drops_ready_slots_whose_container_is_gone(warm: InstanceService,
                                                            driver: FakeDriver) -> None:
    """A ready container removed while no worker ran leaves the ready count at the next pass."""
    warm.pool.run_once()  # boot
    warm.pool.run_once()  # parked and offered
    keys, ch = warm.store.pools, warm.catalog.get("warm")
    (slot,) = keys.ready("local", "warm")
    keys.offer("local", "warm", "0123456789ab")  # a slot whose container never existed
    driver.remove_container(pool_module.pool_container_name("warm", slot))  # docker rm
    warm.pool.run_once()
    assert slot not in keys.ready("local", "warm")
    assert "0123456789ab" not in keys.ready("local", "warm")
    rows = pool_module.pool_status(keys, warm.catalog, ["local"])
    alive = {c.labels["ctf.pool"] for c in driver.list_containers()
             if c.name.startswith("ctfpool-")}
    assert rows[0]["ready"] == len(keys.ready("local", "warm")) <= len(alive)
    assert warm.pool.size(ch) == 1


def test_a_warmed_size_replaces_the_catalogs_until_reset(warm: InstanceService,
                                                         driver: FakeDriver) -> None:
    """``ctfctl pool warm``'s size: the pass fills to it, claims use it, reset shrinks back."""
    keys, ch = warm.store.pools, warm.catalog.get("warm")
    keys.set_size("warm", 3)
    for _ in range(3):
        warm.pool.run_once()
    assert len(keys.ready("local", "warm")) == 3
    assert warm.pool.size(ch) == 3
    row = pool_module.pool_status(keys, warm.catalog, ["local"])[0]
    assert row["size"] == 3 and row["warmed"] is True
    keys.set_size("warm", None)
    warm.pool.run_once()
    assert len(keys.ready("local", "warm")) == 1
    keys.set_size("warm", 0)  # warmed to nothing: no claim, the start goes cold
    warm.pool.run_once()
    warm.pool._sizes = (float("-inf"), {})  # the worker's one-second cache, skipped
    inst = warm.start(warm.catalog.key("warm", "t3"))
    cold = driver.get_container(inst.container_name)
    assert cold is not None and "ctf.pool" not in cold.labels


def test_a_claim_makes_no_network_call_and_a_stop_removes_the_slots_network(
    warm: InstanceService, driver: FakeDriver,
) -> None:
    """A team's first start that claims asks Docker for no network; its stop removes it."""
    warm.pool.run_once()  # boot: the container on a network of its own
    warm.pool.run_once()  # answered: offered
    (slot,) = warm.store.pools.ready("local", "warm")
    own = pool_module.pool_network_name("warm", slot)
    assert driver.get_network(own) is not None
    driver.calls.clear()
    inst = warm.start(warm.catalog.key("warm", "first"))
    assert [c for c in driver.calls if "network" in c] == [], driver.calls
    assert driver.calls.count("rename_container") == 1
    assert driver.get_network("ctf-team-first") is None  # no team network was made
    claimed = driver.get_container(inst.container_name)
    assert claimed is not None and set(claimed.attrs["NetworkSettings"]["Networks"]) == {own}
    warm.stop(warm.catalog.key("warm", "first"))
    assert driver.get_network(own) is None
