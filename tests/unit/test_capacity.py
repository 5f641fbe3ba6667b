"""Capacity counts containers: a Compose instance of k services uses k (fake engine).

``CTF_MAX_INSTANCES``, a host's ``max_instances``, placement and the warm pools' ``make_room``
all count the same thing: the containers of the recorded instances (one per single-image
instance), so a host sized for N containers never runs more because some are groups.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_app.core import pool as pool_module
from celery_app.core.catalog import load_catalog
from celery_app.core.service import InstanceService
from celery_app.errors import CapacityExhausted
from celery_app.hosts.hostsfile import load_hosts
from celery_app.hosts.placement import host_loads, pick_host
from celery_app.settings import Settings
from celery_app.state.store import StateStore
from celery_app.worker.heartbeat import Heartbeat
from ctf_testkit.fake_driver import FakeDriver
from tests.unit.conftest import CATALOG, IMAGE, LABELS
from tests.unit.test_compose_start import COMPOSE


@pytest.fixture
def catalog_file(tmp_path: Path, driver: FakeDriver) -> Path:
    """The unit catalog plus ``shop`` (three services) and ``warm`` (one image, pool: 2)."""
    folder = tmp_path / "capacity"
    folder.mkdir()
    (folder / "compose.yaml").write_text(COMPOSE)
    path = folder / "challenges.yaml"
    path.write_text(CATALOG + "  shop:\n    compose: compose.yaml\n    start_timeout: 5\n"
                    f"  warm:\n    image: {IMAGE}\n    port: 8080\n    pool: 2\n")
    for service in ("web", "db", "bot"):
        driver.add_image(f"ctf-test/shop-{service}:unit", None)
    return path


@pytest.fixture
def build(make_settings: Callable[..., Settings], driver: FakeDriver, store: StateStore,
          catalog_file: Path) -> Callable[..., InstanceService]:
    """An InstanceService of ``host`` with its ``host_max`` and settings' overrides."""

    def make(host_max: int = 0, **overrides: Any) -> InstanceService:
        settings = make_settings(challenges_file=catalog_file, **overrides)
        return InstanceService(settings, load_catalog(settings), driver, store,
                               host_max=host_max)

    return make


def ours(driver: FakeDriver) -> int:
    return len(driver.list_containers(LABELS))


def test_a_group_of_three_counts_three_against_ctf_max_instances(
        build: Callable[..., InstanceService], driver: FakeDriver) -> None:
    """With CTF_MAX_INSTANCES=4 a shop (3) and a web (1) fit; a second shop is refused."""
    svc = build(max_instances=4)
    assert svc.catalog.get("shop").containers == 3 and svc.catalog.get("web").containers == 1
    svc.start(svc.catalog.key("shop", "t1"))
    assert svc.store.count() == 3 and svc.store.count("local") == 3
    svc.start(svc.catalog.key("web", "t1"))
    assert svc.store.count() == 4
    with pytest.raises(CapacityExhausted, match=r"runs 4 of its 4 containers.*3 containers"):
        svc.start(svc.catalog.key("shop", "t2"))
    assert svc.store.get("shop", "t2") is None and ours(driver) == 4
    # The record's count is internal: SPEC §4's shape is unchanged.
    assert "containers" not in svc.store.get("shop", "t1").public()  # type: ignore[union-attr]


def test_a_hosts_max_instances_counts_containers_and_stop_frees_them(
        build: Callable[..., InstanceService]) -> None:
    """A host max_instances of 4: one shop fits, a second is refused; after a stop it fits."""
    svc = build(host_max=4)
    svc.start(svc.catalog.key("shop", "t1"))
    with pytest.raises(CapacityExhausted, match=r"host local runs 3 of its 4 containers"):
        svc.start(svc.catalog.key("shop", "t2"))
    svc.start(svc.catalog.key("web", "t2"))  # one container still fits
    svc.stop(svc.catalog.key("shop", "t1"))
    assert svc.store.count("local") == 1
    assert svc.start(svc.catalog.key("shop", "t2")).status == "running"
    assert svc.store.count("local") == 4


def test_after_a_redis_loss_reconcile_counts_the_group_again(
        build: Callable[..., InstanceService]) -> None:
    """The index rebuilt from Docker's labels counts the group's three containers."""
    svc = build()
    svc.start(svc.catalog.key("shop", "t1"))
    svc.start(svc.catalog.key("web", "t1"))
    svc.store.redis.flushdb()
    assert svc.store.count() == 0
    svc.reconcile()
    assert svc.store.count() == 4 and svc.store.count("local") == 4


def test_placement_puts_a_group_where_its_containers_fit(
        make_settings: Callable[..., Settings], store: StateStore, tmp_path: Path) -> None:
    """A host with room for 2 takes no group of 3: the group goes where 3 fit, else refused."""
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts:\n"
                    "  alpha: {public_host: 10.0.0.5, max_instances: 2}\n"
                    "  beta: {public_host: 10.0.0.6, max_instances: 4}\n")
    hosts = load_hosts(make_settings(hosts_file=path))
    for name in ("alpha", "beta"):
        Heartbeat(store, name, ttl=30, worker=f"w-{name}").beat(True)
    assert pick_host(hosts, store, "shop/t1", containers=3) == "beta"
    with pytest.raises(CapacityExhausted):
        pick_host(hosts, store, "shop/t2", containers=3)  # beta: 1 left, alpha: 2
    assert pick_host(hosts, store, "web/t3") == "alpha"  # one container fits still


def test_host_loads_show_the_containers_in_use(
        build: Callable[..., InstanceService], make_settings: Callable[..., Settings],
        store: StateStore, tmp_path: Path) -> None:
    """The hosts' used (API, ctfctl, placement) counts a group's containers."""
    svc = build()
    svc.start(svc.catalog.key("shop", "t1"))
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts:\n  local: {public_host: localhost, max_instances: 10}\n")
    loads = host_loads(load_hosts(make_settings(hosts_file=path)), store)
    assert [(h.name, h.used, h.room) for h in loads] == [("local", 3, 7)]


def test_the_pools_give_way_to_a_group_start(
        build: Callable[..., InstanceService], driver: FakeDriver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full host (2 pool containers, 1 instance, max 5): a shop start removes 1 pool one."""
    def probe(host: str, *_args: Any, **_kwargs: Any) -> bool:
        return any(c.ip == host and c.state == "running" for c in driver.list_containers())

    monkeypatch.setattr(pool_module, "probe_once", probe)
    svc = build(host_max=5)
    svc.pool.run_once()  # boot
    svc.pool.run_once()  # parked and offered
    assert len(svc.store.pools.members("local")) == 2
    svc.start(svc.catalog.key("web", "t1"))
    assert svc.start(svc.catalog.key("shop", "t1")).status == "running"
    # 4 instance containers and what is left of the pool: never more than max_instances.
    assert svc.store.count("local") == 4
    assert len(svc.store.pools.members("local")) == 1
    assert ours(driver) == 5
