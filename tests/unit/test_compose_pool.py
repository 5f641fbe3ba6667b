"""Warm pools of whole Compose groups (SPEC §12) on the fake engine: boot, claim, give way."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from celery_app.core import pool as pool_module
from celery_app.core.pool import flag_held, slot_flag
from celery_app.core.service import InstanceService
from celery_app.engine.driver import ContainerEvent
from celery_app.loops.janitor import Janitor
from celery_app.worker.events import EventFollower, _Pending
from ctf_testkit.fake_driver import FakeDriver
from tests.unit.conftest import CATALOG, LABELS

COMPOSE = """
services:
  web:
    image: ctf-test/shop-web:unit
    ports: ["8080"]
    depends_on: [db]
  db:
    image: ctf-test/shop-db:unit
    environment: {FLAG: "${CTF_FLAG}"}
  bot:
    image: ctf-test/shop-bot:unit
    depends_on: [web]
"""


@pytest.fixture
def pooled(make_service: Callable[..., InstanceService], driver: FakeDriver, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> InstanceService:
    """The unit catalog plus ``shop``: three services, ``pool: 2``; pool probes ask the fake."""
    def probe(host: str, *_args: Any, **_kwargs: Any) -> bool:
        return any(c.ip == host and c.state == "running" for c in driver.list_containers())

    monkeypatch.setattr(pool_module, "probe_once", probe)
    folder = tmp_path / "pooled-shop"
    folder.mkdir()
    (folder / "compose.yaml").write_text(COMPOSE)
    catalog = folder / "challenges.yaml"
    catalog.write_text(CATALOG + "  shop:\n    compose: compose.yaml\n    pool: 2\n"
                                 "    start_timeout: 5\n")
    for service in ("web", "db", "bot"):
        driver.add_image(f"ctf-test/shop-{service}:unit", None)
    return make_service(challenges_file=catalog)


def slots(driver: FakeDriver) -> dict[str, list[Any]]:
    """The run's pooled containers, by slot."""
    found: dict[str, list[Any]] = {}
    for c in driver.list_containers(LABELS):
        if "ctf.pool" in c.labels:
            found.setdefault(c.labels["ctf.pool"], []).append(c)
    return found


def test_a_pass_boots_whole_groups_each_on_its_own_network_with_its_slot_flag(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """Two groups of three services, each on its slot's network, offered once they answer."""
    summary = pooled.pool.run_once()
    assert len(summary.booted) == 2 and sorted(summary.ready) == sorted(summary.booted)
    groups = slots(driver)
    assert len(groups) == 2 and all(len(g) == 3 for g in groups.values())
    for slot, members in groups.items():
        specs = {driver.specs[c.id].aliases[0]: driver.specs[c.id] for c in members}
        assert {s.network for s in specs.values()} == {f"ctfpool-shop-{slot}"}
        assert specs["db"].env["FLAG"] == slot_flag(
            pooled.settings.flag_secret_value(), "shop", slot, pooled.settings.flag_format)
        assert all("ctf.team" not in c.labels for c in members)
    assert pooled.store.pools.ready_count("local", "shop") == 2


def test_a_claim_renames_the_group_and_makes_no_network_call(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """The start takes a whole group: renamed for the team, flags bound, no network call."""
    pooled.pool.run_once()
    driver.calls.clear()
    inst = pooled.start(pooled.catalog.key("shop", "t1"))
    assert inst.status == "running" and inst.container_name == "ctf-shop-t1"
    assert not [c for c in driver.calls if "network" in c or c == "free_address"], driver.calls
    assert "run_container" not in driver.calls and "image_present" not in driver.calls
    (slot, members), = [(s, m) for s, m in slots(driver).items()
                        if any(c.name == "ctf-shop-t1" for c in m)]
    assert sorted(c.name for c in members) == ["ctf-shop-t1", "ctf-shop-t1.bot",
                                               "ctf-shop-t1.db"]
    secret, fmt = pooled.settings.flag_secret_value(), pooled.settings.flag_format
    flag = slot_flag(secret, "shop", slot, fmt)
    assert flag_held(pooled.store.pools, secret, "shop", "t1", flag, fmt)
    assert not flag_held(pooled.store.pools, secret, "shop", "t2", flag, fmt)
    assert pooled.store.pools.ready_count("local", "shop") == 1


def test_a_claimed_group_reads_as_its_teams_as_the_engine_then_shows_it(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """A claim returns each service under its new name, with the team read from that name."""
    pooled.pool.run_once()
    record = pooled.specs.new_instance(pooled.catalog.get("shop"), "t1")
    made = pooled.pool.claim_group(pooled.catalog.get("shop"), "t1", record)
    assert made is not None
    for service, info in made.items():
        seen = driver.get_container(info.id)
        assert seen is not None and info.name == seen.name
        assert info.team_id == "t1" == seen.team_id, service  # no ctf.team label: the name's


def test_stop_of_a_claimed_group_removes_its_containers_and_its_network(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """Stop removes every service of the claimed group and the slot's network."""
    pooled.pool.run_once()
    pooled.start(pooled.catalog.key("shop", "t1"))
    slot = driver.get_container("ctf-shop-t1").labels["ctf.pool"]  # type: ignore[union-attr]
    pooled.stop(pooled.catalog.key("shop", "t1"))
    assert slot not in slots(driver)
    assert driver.get_network(f"ctfpool-shop-{slot}") is None


def test_drain_removes_unclaimed_groups_whole_and_leaves_claimed_ones(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """A drain removes the unclaimed groups (containers and networks); the claimed one stays."""
    pooled.pool.run_once()
    pooled.start(pooled.catalog.key("shop", "t1"))
    before = set(slots(driver))
    pooled.store.pools.drain("shop")
    summary = pooled.pool.run_once()
    assert summary.removed  # the unclaimed group went
    claimed = driver.get_container("ctf-shop-t1")
    assert claimed is not None and claimed.labels["ctf.pool"] in slots(driver)
    gone = before - set(slots(driver))
    assert gone and all(driver.get_network(f"ctfpool-shop-{s}") is None for s in gone)


def test_a_group_with_a_dead_service_is_removed_whole(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """A pooled group whose db died goes whole at the next pass, and is replaced."""
    pooled.pool.run_once()
    victim, members = next(iter(slots(driver).items()))
    db = next(c for c in members if c.labels["ctf.service"] == "db")
    driver.exit(db.id, 1)
    pooled.pool.run_once()
    assert victim not in slots(driver)
    assert driver.get_network(f"ctfpool-shop-{victim}") is None


def test_a_boot_that_fails_leaves_no_container_and_no_network(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """The bot's image is missing: no group is half made, nothing is left, the error says why."""
    del driver.images["ctf-test/shop-bot:unit"]
    pooled.settings.pull_policy = "never"
    summary = pooled.pool.run_once()
    assert summary.errors and "bot" in summary.errors[0]
    assert slots(driver) == {}
    assert not [n for n in driver.networks.values() if n.name.startswith("ctfpool-shop-")]
    assert pooled.store.pools.members("local") == {}


def test_make_room_removes_a_whole_unclaimed_group(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """A full host: a cold start makes the pool give one group way, all of its services."""
    pooled.pool.run_once()
    pooled.settings.max_instances = 6  # the two unclaimed groups (3 containers each) fill it
    pooled.start(pooled.catalog.key("web", "t9"))  # a cold single-image start
    assert len(slots(driver)) == 1 and all(len(m) == 3 for m in slots(driver).values())


def test_a_pooled_group_weighs_its_containers_when_the_pools_give_way(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """Two groups (6 containers), max 5: each cold start of 1 frees a group only when needed."""
    pooled.pool.run_once()
    assert len(slots(driver)) == 2
    pooled.settings.max_instances = 5
    pooled.start(pooled.catalog.key("web", "t9"))  # 1 + 6 > 5: one group (3) gives way
    assert len(slots(driver)) == 1 and len(driver.list_containers(LABELS)) == 4
    pooled.start(pooled.catalog.key("web", "t8"))  # 2 + 3 = 5: fits, nothing goes
    assert len(slots(driver)) == 1 and len(driver.list_containers(LABELS)) == 5
    pooled.start(pooled.catalog.key("web", "t7"))  # 3 + 3 > 5: the last group goes
    assert slots(driver) == {} and pooled.store.pools.members("local") == {}
    assert len(driver.list_containers(LABELS)) == 3
    pooled.pool.run_once()  # no refill: a group of 3 beside 3 instances would pass 5
    assert slots(driver) == {}


def test_the_refill_boots_a_group_only_where_all_its_containers_fit(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """With a limit of 5, a pool of two 3-service groups boots one; at 6, the second."""
    pooled.settings.max_instances = 5
    summary = pooled.pool.run_once()
    assert len(summary.booted) == 1 and len(slots(driver)) == 1
    pooled.settings.max_instances = 6
    pooled.pool.run_once()
    assert len(slots(driver)) == 2 and len(driver.list_containers(LABELS)) == 6


def test_a_dead_service_of_a_claimed_group_fails_the_instance_through_the_follower(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """The db of a claimed group dies: the follower's news marks the instance failed (db)."""
    pooled.pool.run_once()
    pooled.start(pooled.catalog.key("shop", "t1"))
    db = driver.get_container("ctf-shop-t1.db")
    assert db is not None and db.team_id == "t1"  # read from its name: no team label
    driver.exit(db.id, 137)
    follower = EventFollower(pooled)
    follower._handle(_Pending(ContainerEvent("die", db.id, db.name, db.labels, 137),
                              time.monotonic()))
    rec = pooled.store.get("shop", "t1")
    assert rec is not None and rec.status == "failed"
    assert rec.error is not None and rec.error.startswith("service db: ")


def test_a_redis_loss_adopts_the_claimed_group_and_the_janitor_keeps_it(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """After a flush the janitor's reconcile adopts the claimed group whole; nothing is orphaned."""
    pooled.pool.run_once()
    inst = pooled.start(pooled.catalog.key("shop", "t1"))
    pooled.store.redis.flushdb()
    summary = Janitor(pooled).run_once(datetime.now(UTC) + timedelta(seconds=60))
    assert summary.reconciled and summary.orphan_containers == []
    assert summary.orphan_networks == []
    rec = pooled.store.get("shop", "t1")
    assert rec is not None and rec.status == "running"
    assert rec.container_id == inst.container_id and rec.endpoints == inst.endpoints
    assert rec.started <= inst.started  # counted from the boot: never later than the claim
    pooled.pool.run_once()  # the pass re-binds the slot's flag to the team
    slot = driver.get_container("ctf-shop-t1").labels["ctf.pool"]  # type: ignore[union-attr]
    assert slot in pooled.store.pools.held("shop", "t1")


def test_a_boot_killed_half_way_leaves_nothing_after_the_next_pass(
        pooled: InstanceService, driver: FakeDriver) -> None:
    """A worker killed mid-boot left a slot network and its db alone: the next pass removes both."""
    labels = {**LABELS, "ctf.managed": "true", "ctf.host": "local", "ctf.challenge": "shop"}
    settings = pooled.settings
    driver.ensure_named_network("ctfpool-shop-dead00000001", {**labels, "ctf.pool": "dead00000001"},
                                settings.team_subnet_pool, settings.team_subnet_prefix)
    driver.ensure_named_network("ctfpool-shop-dead00000002", {**labels, "ctf.pool": "dead00000002"},
                                settings.team_subnet_pool, settings.team_subnet_prefix)
    layout = pooled.specs.pool_layout(pooled.catalog.get("shop"), "dead00000002")
    members = pooled.specs.members_of(pooled.catalog.get("shop"), layout,
                                      {**labels, "ctf.pool": "dead00000002"}, "CTF{x}", "")
    driver.run_container(members[0].spec)  # db only: the boot died before web and bot
    summary = pooled.pool.run_once()
    assert "ctfpool-shop-dead00000002" in summary.removed
    assert not {"dead00000001", "dead00000002"} & set(slots(driver))
    assert driver.get_network("ctfpool-shop-dead00000001") is None
    assert driver.get_network("ctfpool-shop-dead00000002") is None
    assert len(slots(driver)) == 2  # and the pool refilled with whole groups
