"""Restart (SPEC §13) on the fake engine: a fresh instance in place, the same flag, one count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_app.core import pool as pool_module
from celery_app.core.catalog import load_catalog
from celery_app.core.service import InstanceService
from celery_app.errors import CatalogError, RateLimited, Superseded
from celery_app.vocab.naming import network_name
from ctf_testkit.fake_driver import FakeDriver
from tests.unit.conftest import CATALOG, IMAGE

COMPOSE = """
services:
  web:
    image: ctf-test/shop-web:unit
    ports: ["8080"]
    depends_on: [db]
  db:
    image: ctf-test/shop-db:unit
    environment: {FLAG: "${CTF_FLAG}"}
"""


def test_restart_replaces_the_container_and_keeps_the_flag(svc: InstanceService,
                                                           driver: FakeDriver) -> None:
    """A new container from the image, the same FLAG, a new expiry, the network kept."""
    key = svc.catalog.key("web", "team1")
    first = svc.start(key)
    again = svc.restart(key)
    assert again.status == "running" and again.container_id != first.container_id
    assert driver.get_container(first.container_id) is None
    assert driver.specs[again.container_id].env["FLAG"] == svc.flag_for(key)
    assert driver.specs[first.container_id].env["FLAG"] == svc.flag_for(key)
    assert again.expires >= first.expires and again.started >= first.started
    assert svc.store.get("web", "team1") == again
    assert driver.get_network(network_name("team1")) is not None
    assert len(driver.list_containers({"ctf.team": "team1"})) == 1


def test_restart_of_nothing_is_a_start(svc: InstanceService, driver: FakeDriver) -> None:
    """With no instance (a copy redelivered after its stop, say), a restart starts one."""
    inst = svc.restart(svc.catalog.key("web", "team2"))
    assert inst.status == "running" and driver.get_container(inst.container_id) is not None


def test_restart_counts_one_action_and_a_copy_does_nothing_twice(
    make_service: Callable[..., InstanceService], driver: FakeDriver,
) -> None:
    """One rate-limit count per restart; a redelivered copy answers as the first did."""
    svc = make_service(rate_limit_count=2)
    key = svc.catalog.key("web", "team3")
    svc.start(key)  # 1
    done = svc.restart(key, task_id="t-1")  # 2
    assert svc.restart(key, task_id="t-1") == done  # the copy: no count, no new container
    with pytest.raises(RateLimited):
        svc.restart(key)
    assert svc.store.get("web", "team3") == done


def test_a_stop_requested_after_the_restart_wins(svc: InstanceService) -> None:
    """The restart's place in line is a start's: a later stop supersedes it."""
    key = svc.catalog.key("web", "team4")
    svc.start(key)
    intent = svc.store.register_intent("web", "team4", "start")
    svc.store.register_intent("web", "team4", "stop")
    with pytest.raises(Superseded):
        svc.restart(key, intent=intent)


def test_restart_of_a_compose_instance_makes_every_service_again(
    make_service: Callable[..., InstanceService], driver: FakeDriver, tmp_path: Path,
) -> None:
    """Every service is new; the flag the services get is the team's, as before."""
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "compose.yaml").write_text(COMPOSE)
    (folder / "challenges.yaml").write_text(CATALOG + "  shop:\n    compose: compose.yaml\n"
                                                      "    start_timeout: 5\n")
    for service in ("web", "db"):
        driver.add_image(f"ctf-test/shop-{service}:unit", None)
    svc = make_service(challenges_file=folder / "challenges.yaml")
    key = svc.catalog.key("shop", "team5")
    svc.start(key)
    before = {c.id for c in driver.list_containers({"ctf.team": "team5"})}
    again = svc.restart(key)
    after = driver.list_containers({"ctf.team": "team5"})
    assert again.status == "running" and len(after) == 2
    assert before.isdisjoint({c.id for c in after})
    db = next(c for c in after if c.name.endswith(".db"))
    assert driver.specs[db.id].env["FLAG"] == svc.flag_for(key)


def test_restart_of_a_pooled_instance_gives_a_fresh_container(
    make_service: Callable[..., InstanceService], driver: FakeDriver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claimed pool container is replaced; every flag the team held stays the team's."""
    def probe(host: str, *_args: Any, **_kwargs: Any) -> bool:
        return any(c.ip == host and c.state == "running" for c in driver.list_containers())

    monkeypatch.setattr(pool_module, "probe_once", probe)
    catalog = tmp_path / "pooled.yaml"
    catalog.write_text(f"challenges:\n  warm:\n    image: {IMAGE}\n    port: 8080\n"
                       "    flag_env: FLAG\n    pool: 1\n")
    svc = make_service(challenges_file=catalog)
    svc.pool.run_once()
    svc.pool.run_once()
    key = svc.catalog.key("warm", "team6")
    first = svc.start(key)
    claimed = driver.get_container(first.container_id)
    assert claimed is not None and "ctf.pool" in claimed.labels
    again = svc.restart(key)
    assert again.status == "running" and again.container_id != first.container_id
    assert driver.get_container(first.container_id) is None
    held = svc.store.pools.held("warm", "team6")
    assert claimed.labels["ctf.pool"] in held


def test_stop_on_solve_is_a_catalog_boolean(make_settings: Callable[..., Any],
                                            tmp_path: Path) -> None:
    """``stop_on_solve`` defaults to false, reads true, and refuses a non-boolean."""
    catalog = tmp_path / "solve.yaml"
    catalog.write_text(CATALOG + "    stop_on_solve: true\n")  # on ``scratch``, the last
    chosen = load_catalog(make_settings(challenges_file=catalog))
    assert chosen.get("scratch").stop_on_solve and not chosen.get("web").stop_on_solve
    catalog.write_text(CATALOG + "    stop_on_solve: sometimes\n")
    with pytest.raises(CatalogError, match="stop_on_solve"):
        load_catalog(make_settings(challenges_file=catalog))
