"""A Compose challenge's instance (SPEC §12) on the fake engine: a group on its own network."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from celery_app.cli import _instance_table
from celery_app.core.service import InstanceService
from celery_app.engine.driver import ContainerEvent
from celery_app.errors import ImageNotFound
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
    environment: {TEAM: "${CTF_TEAM}"}
  db:
    image: ctf-test/shop-db:unit
    environment: {FLAG: "${CTF_FLAG}"}
    mem_limit: 32m
  bot:
    image: ctf-test/shop-bot:unit
    depends_on: [web]
    x-ctf-egress: internet
"""


@pytest.fixture
def shop(make_service: Callable[..., InstanceService], driver: FakeDriver,
         tmp_path: Path) -> InstanceService:
    """The service with the unit catalog plus ``shop``, a three-service Compose challenge."""
    folder = tmp_path / "shop-catalog"
    folder.mkdir()
    (folder / "compose.yaml").write_text(COMPOSE)
    catalog = folder / "challenges.yaml"
    catalog.write_text(CATALOG + "  shop:\n    compose: compose.yaml\n    memory: 96m\n"
                                 "    start_timeout: 5\n")
    for service in ("web", "db", "bot"):
        driver.add_image(f"ctf-test/shop-{service}:unit", None)
    return make_service(challenges_file=catalog)


def ours(driver: FakeDriver, **labels: str) -> list[Any]:
    return driver.list_containers({**LABELS, **labels})


def test_a_compose_instance_is_its_services_on_a_network_of_its_own(
        shop: InstanceService, driver: FakeDriver) -> None:
    """Every service runs, named and labelled per SPEC §12, on the instance's network."""
    inst = shop.start(shop.catalog.key("shop", "team1"))
    assert inst.status == "running"
    assert inst.container_name == "ctf-shop-team1"
    found = {c.labels["ctf.service"]: c for c in ours(driver, **{"ctf.team": "team1"})}
    assert {s: c.name for s, c in found.items()} == {
        "web": "ctf-shop-team1", "db": "ctf-shop-team1.db", "bot": "ctf-shop-team1.bot"}
    assert inst.container_id == found["web"].id
    assert [(e.service, e.port, e.protocol) for e in inst.endpoints or []] == [
        ("web", 8080, "http")]
    assert inst.url == f"http://localhost:{found['web'].ports['8080/tcp']}"
    assert inst.public()["endpoints"][0]["url"] == inst.url
    specs = {spec.aliases: spec for spec in driver.specs.values()}
    db, bot, web = specs[("db",)], specs[("bot",)], specs[("web",)]
    assert db.network == "ctf-inst-shop.team1"
    assert db.env["FLAG"] == shop.flag_for(shop.catalog.key("shop", "team1"))
    assert web.env["TEAM"] == "team1"
    assert db.memory_bytes == 32 << 20 and web.memory_bytes == 96 << 20  # own, or default
    assert web.filesystem.read_only and db.cap_add == []
    assert bot.labels["ctf.egress"] == "internet" and web.labels["ctf.egress"] == "none"
    net = driver.get_network("ctf-inst-shop.team1")
    assert net is not None and net.labels["ctf.challenge"] == "shop"
    assert net.labels["ctf.team"] == "team1"


def test_a_single_image_instance_shows_no_endpoints(svc: InstanceService) -> None:
    """One image's instance keeps SPEC §4's shape: no ``endpoints`` key."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    assert "endpoints" not in inst.public()


def test_starting_a_running_group_again_returns_it(shop: InstanceService,
                                                   driver: FakeDriver) -> None:
    """A second start of a running group is the same group (idempotent)."""
    first = shop.start(shop.catalog.key("shop", "team1"))
    second = shop.start(shop.catalog.key("shop", "team1"))
    assert second.container_id == first.container_id
    assert len(ours(driver, **{"ctf.team": "team1"})) == 3


def test_stop_removes_every_service_and_the_network(shop: InstanceService,
                                                    driver: FakeDriver) -> None:
    """Stop leaves no container of the group and no instance network."""
    shop.start(shop.catalog.key("shop", "team1"))
    shop.stop(shop.catalog.key("shop", "team1"))
    assert ours(driver, **{"ctf.team": "team1"}) == []
    assert driver.get_network("ctf-inst-shop.team1") is None
    assert shop.store.get("shop", "team1") is None


def test_a_missing_image_names_the_service_and_leaves_nothing(
        shop: InstanceService, driver: FakeDriver) -> None:
    """A service whose image cannot be had is named; no container, network or record stays."""
    driver.images.pop("ctf-test/shop-bot:unit")
    with pytest.raises(ImageNotFound, match="'bot'"):
        shop.start(shop.catalog.key("shop", "team1"))
    assert ours(driver) == []
    assert driver.get_network("ctf-inst-shop.team1") is None
    assert shop.store.get("shop", "team1") is None


def test_the_janitor_keeps_a_live_groups_services(shop: InstanceService,
                                                  driver: FakeDriver) -> None:
    """A running group's other services are no orphans, past the orphan grace too."""
    shop.start(shop.catalog.key("shop", "team1"))
    shop.reconcile()
    summary = Janitor(shop).run_once()
    assert summary.orphan_containers == []
    assert len(ours(driver, **{"ctf.team": "team1"})) == 3


def test_two_teams_groups_do_not_share_a_network(shop: InstanceService,
                                                 driver: FakeDriver) -> None:
    """Each team's instance has its own network; names never collide across teams."""
    shop.start(shop.catalog.key("shop", "t1"))
    shop.start(shop.catalog.key("shop", "t1-x"))
    assert {s.network for s in driver.specs.values() if s.aliases} == {
        "ctf-inst-shop.t1", "ctf-inst-shop.t1-x"}


def test_the_layout_lists_the_primary_service_first(shop: InstanceService) -> None:
    """The layout names the instance network and every container, the primary one first."""
    layout = shop.specs.layout("shop", "team1", shop.catalog.get("shop").app)
    assert layout.network == "ctf-inst-shop.team1"
    assert layout.containers == ("ctf-shop-team1", "ctf-shop-team1.db", "ctf-shop-team1.bot")
    assert layout.main == "ctf-shop-team1" and layout.of("db") == "ctf-shop-team1.db"
    assert shop.specs.layout("web", "team1").network == "ctf-team-team1"  # one image: as before


def test_a_service_that_dies_makes_the_group_failed(shop: InstanceService,
                                                    driver: FakeDriver) -> None:
    """Db dying (news of its container) makes the instance failed, naming db (SPEC §12)."""
    inst = shop.start(shop.catalog.key("shop", "team1"))
    db = next(c for c in ours(driver, **{"ctf.service": "db"}))
    driver.exit(db.id, 137, output="killed\n")
    assert shop.mark_failed("shop", "team1", db.id) == "marked"
    rec = shop.store.get("shop", "team1")
    assert rec is not None and rec.status == "failed"
    assert rec.error is not None and rec.error.startswith("service db: ")
    assert rec.exit_code == 137 and rec.container_id == inst.container_id


def test_news_of_an_earlier_group_changes_nothing(shop: InstanceService,
                                                  driver: FakeDriver) -> None:
    """A dead service of another instance (not this group's) does not fail this one."""
    shop.start(shop.catalog.key("shop", "team1"))
    shop.start(shop.catalog.key("shop", "team2"))
    other = next(c for c in ours(driver, **{"ctf.service": "db", "ctf.team": "team2"}))
    driver.exit(other.id, 1)
    assert shop.mark_failed("shop", "team1", other.id) == "unchanged"
    rec = shop.store.get("shop", "team1")
    assert rec is not None and rec.status == "running"


def test_the_event_follower_fails_the_group_when_a_service_dies(
        shop: InstanceService, driver: FakeDriver) -> None:
    """A ``die`` of the bot's container reaches the instance through the follower."""
    shop.start(shop.catalog.key("shop", "team1"))
    bot = next(c for c in ours(driver, **{"ctf.service": "bot"}))
    driver.exit(bot.id, 2)
    follower = EventFollower(shop)
    follower._handle(_Pending(ContainerEvent("die", bot.id, bot.name, bot.labels, 2),
                              time.monotonic()))
    rec = shop.store.get("shop", "team1")
    assert rec is not None and rec.status == "failed"
    assert rec.error is not None and "service bot" in rec.error


def test_the_janitor_fails_the_group_whose_service_died(shop: InstanceService,
                                                        driver: FakeDriver) -> None:
    """The janitor's safety net sees a dead service of a running group, as the follower does."""
    shop.start(shop.catalog.key("shop", "team1"))
    shop.reconcile()
    db = next(c for c in ours(driver, **{"ctf.service": "db"}))
    driver.exit(db.id, 1)
    summary = Janitor(shop).run_once()
    assert summary.marked_failed == ["shop/team1"]
    rec = shop.store.get("shop", "team1")
    assert rec is not None and rec.status == "failed" and "service db" in (rec.error or "")


def _follow(shop: InstanceService, action: str, c: Any) -> None:
    """Hand the follower one engine event about ``c`` (as the stream would)."""
    EventFollower(shop)._handle(_Pending(ContainerEvent(action, c.id, c.name, c.labels),
                                         time.monotonic()))


@pytest.mark.parametrize("action", ["destroy", "die"])
def test_a_service_removed_by_hand_fails_the_group_through_the_follower(
        shop: InstanceService, driver: FakeDriver, action: str) -> None:
    """``docker rm -f`` of db: its destroy, or a die handled after it, fails the group (db)."""
    inst = shop.start(shop.catalog.key("shop", "team1"))
    db = next(c for c in ours(driver, **{"ctf.service": "db"}))
    driver.remove_container(db.id)
    _follow(shop, action, db)
    rec = shop.store.get("shop", "team1")
    assert rec is not None and rec.status == "failed", rec
    assert rec.error == "service db: the container is gone"
    assert rec.container_id == inst.container_id  # still the instance's: stop removes the rest


def test_the_janitor_fails_the_group_whose_service_was_removed(
        shop: InstanceService, driver: FakeDriver) -> None:
    """A removal the follower missed: the janitor's pass fails the group, naming db."""
    shop.start(shop.catalog.key("shop", "team1"))
    driver.remove_container(next(c for c in ours(driver, **{"ctf.service": "db"})).id)
    summary = Janitor(shop).run_once()
    assert summary.marked_failed == ["shop/team1"]
    rec = shop.store.get("shop", "team1")
    assert rec is not None and rec.status == "failed"
    assert rec.error == "service db: the container is gone"


def test_removal_news_of_an_earlier_group_or_of_a_stop_changes_nothing(
        shop: InstanceService, driver: FakeDriver) -> None:
    """A stop's destroys, and an old group's destroy seen after a new start, fail nothing."""
    key = shop.catalog.key("shop", "team1")
    shop.start(key)
    old = next(c for c in ours(driver, **{"ctf.service": "db"}))
    shop.stop(key)
    _follow(shop, "destroy", old)  # our own stop: the record is gone already
    assert shop.store.get("shop", "team1") is None
    shop.start(key)
    _follow(shop, "destroy", old)  # news of the earlier group, late
    rec = shop.store.get("shop", "team1")
    assert rec is not None and rec.status == "running"
    assert Janitor(shop).run_once().marked_failed == []


def test_reconcile_after_a_redis_loss_adopts_the_group_with_its_endpoints(
        shop: InstanceService, driver: FakeDriver) -> None:
    """After the index is lost, the janitor's reconcile adopts the group and keeps its services."""
    inst = shop.start(shop.catalog.key("shop", "team1"))
    shop.store.redis.flushdb()
    summary = Janitor(shop).run_once(datetime.now(UTC) + timedelta(seconds=30))
    assert summary.reconciled and summary.orphan_containers == []
    rec = shop.store.get("shop", "team1")
    assert rec is not None and rec.status == "running"
    assert rec.container_id == inst.container_id and rec.endpoints == inst.endpoints
    assert len(ours(driver, **{"ctf.team": "team1"})) == 3


def test_the_janitor_removes_a_half_group_and_its_network(
        shop: InstanceService, driver: FakeDriver) -> None:
    """A group without a record (a killed start) goes whole, network too, team's others stay."""
    shop.start(shop.catalog.key("web", "team1"))
    shop.start(shop.catalog.key("shop", "team1"))
    shop.reconcile()
    main = shop.specs.layout("shop", "team1", shop.catalog.get("shop").app).main
    driver.remove_container(main)
    shop.store.delete("shop", "team1", shop.host)
    Janitor(shop).run_once(datetime.now(UTC) + timedelta(seconds=30))
    assert ours(driver, **{"ctf.challenge": "shop"}) == []
    assert driver.get_network("ctf-inst-shop.team1") is None
    assert driver.get_network("ctf-team-team1") is not None  # web's, still in use


def test_the_catalogs_env_and_flag_env_reach_every_service(
        make_service: Callable[..., InstanceService], driver: FakeDriver,
        tmp_path: Path) -> None:
    """Section 8's env and flag_env apply to the instance as a whole: every service gets them."""
    (tmp_path / "compose.yaml").write_text(COMPOSE)
    catalog = tmp_path / "challenges.yaml"
    catalog.write_text(CATALOG + "  shop:\n    compose: compose.yaml\n    flag_env: KEY\n"
                                 "    env: {MODE: ctf}\n")
    for service in ("web", "db", "bot"):
        driver.add_image(f"ctf-test/shop-{service}:unit", None)
    svc = make_service(challenges_file=catalog)
    svc.start(svc.catalog.key("shop", "team1"))
    flag = svc.flag_for(svc.catalog.key("shop", "team1"))
    envs = [spec.env for spec in driver.specs.values() if spec.aliases]
    assert len(envs) == 3
    assert all(env["KEY"] == flag and env["MODE"] == "ctf" for env in envs)


ONE_SHOT = """
services:
  migrate:
    image: ctf-test/shop-db:unit
  web:
    image: ctf-test/shop-web:unit
    ports: ["8080"]
    depends_on:
      migrate: {condition: service_completed_successfully}
"""


def test_a_one_shot_service_that_exits_0_is_done_not_dead(
        make_service: Callable[..., InstanceService], driver: FakeDriver,
        tmp_path: Path) -> None:
    """A service others wait to complete: its exit 0 neither fails the start nor the group."""
    (tmp_path / "compose.yaml").write_text(ONE_SHOT)
    catalog = tmp_path / "challenges.yaml"
    catalog.write_text(CATALOG + "  setup:\n    compose: compose.yaml\n    start_timeout: 10\n")
    for service in ("web", "db"):
        driver.add_image(f"ctf-test/shop-{service}:unit", None)
    svc = make_service(challenges_file=catalog)

    def finish_migrate() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = ours(driver, **{"ctf.service": "migrate"})
            if found:
                driver.exit(found[0].id, 0)
                return
            time.sleep(0.01)

    helper = threading.Thread(target=finish_migrate)
    helper.start()
    inst = svc.start(svc.catalog.key("setup", "team1"))
    helper.join()
    assert inst.status == "running"
    migrate = ours(driver, **{"ctf.service": "migrate"})[0]
    assert migrate.state == "exited"
    assert svc.mark_failed("setup", "team1", migrate.id) == "unchanged"
    svc.reconcile()
    assert Janitor(svc).run_once().marked_failed == []
    rec = svc.store.get("setup", "team1")
    assert rec is not None and rec.status == "running"


def test_ctfctl_lists_every_endpoint_of_a_compose_instance() -> None:
    """Ctfctl's table shows each endpoint with its service when there are several."""
    console = Console(record=True, width=200)
    console.print(_instance_table([{
        "team_id": "t1", "challenge": "shop", "status": "running", "host": "local",
        "url": "http://localhost:1", "endpoints": [
            {"service": "web", "port": 8080, "protocol": "http", "url": "http://localhost:1"},
            {"service": "admin", "port": 1337, "protocol": "tcp", "url": "tcp://localhost:2"}],
    }, {"team_id": "t1", "challenge": "web", "status": "running", "host": "local",
        "url": "http://localhost:3"}]))
    text = console.export_text()
    assert "web:8080 http://localhost:1" in text and "admin:1337 tcp://localhost:2" in text
    assert "http://localhost:3" in text


def test_a_redelivered_start_adopts_a_whole_group(shop: InstanceService,
                                                  driver: FakeDriver) -> None:
    """A start finding the whole group up (its worker died, or the record was lost) adopts it."""
    first = shop.start(shop.catalog.key("shop", "team1"))
    ids = {c.id for c in ours(driver, **{"ctf.team": "team1"})}
    shop.store.put(first.model_copy(update={"status": "starting"}))  # died while it waited
    again = shop.start(shop.catalog.key("shop", "team1"))
    assert again.status == "running" and again.container_id == first.container_id
    shop.store.delete("shop", "team1", shop.host)  # the record lost
    adopted = shop.start(shop.catalog.key("shop", "team1"))
    assert adopted.status == "running" and adopted.endpoints == first.endpoints
    assert {c.id for c in ours(driver, **{"ctf.team": "team1"})} == ids


def test_a_start_finding_half_a_group_makes_it_again(shop: InstanceService,
                                                     driver: FakeDriver) -> None:
    """A group with a service missing is removed and made whole again."""
    first = shop.start(shop.catalog.key("shop", "team1"))
    bot = ours(driver, **{"ctf.service": "bot"})[0]
    driver.remove_container(bot.id)
    shop.store.put(first.model_copy(update={"status": "starting"}))
    again = shop.start(shop.catalog.key("shop", "team1"))
    assert again.status == "running" and again.container_id != first.container_id
    assert len(ours(driver, **{"ctf.team": "team1"})) == 3
