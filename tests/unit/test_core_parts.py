"""The core's parts, each built from what it uses (issue 23): no service needed below it."""

from __future__ import annotations

from celery_app.core.catalog import Challenge
from celery_app.core.reconcile import Reconciler
from celery_app.core.service import InstanceService
from celery_app.core.specs import InstanceLayout
from celery_app.engine.driver import ContainerInfo, ContainerSpec, NetworkInfo
from celery_app.state.store import StateStore
from celery_app.vocab.models import Instance
from ctf_testkit.fake_driver import FakeDriver


class MissingPool:
    """A warm pool with nothing ready: it notes what the creation asked of it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def claim(self, ch: Challenge, team: str, net: NetworkInfo, spec: ContainerSpec,
              inst: Instance) -> ContainerInfo | None:
        """Miss, noting the network and name the claim was offered."""
        self.asked.append(f"claim {spec.name} on {net.name}")
        return None

    def make_room(self) -> list[str]:
        """Remove nothing."""
        self.asked.append("make_room")
        return []


def test_the_layout_names_an_instance_and_its_network(svc: InstanceService,
                                                      driver: FakeDriver) -> None:
    """An instance is a group (of one) on a network: its record and container follow the layout."""
    layout = svc.specs.layout("web", "team1")
    assert layout == InstanceLayout(network="ctf-team-team1", containers=("ctf-web-team1",))
    assert layout.main == "ctf-web-team1"
    inst = svc.start("web", "team1")
    assert inst.container_name == layout.main
    net = driver.get_network(layout.network)
    assert net is not None and net.containers == 1


def test_a_creation_asks_the_warm_pool_it_is_handed(svc: InstanceService) -> None:
    """``InstanceSpecs.create`` takes any ``WarmPool``: a miss makes room, then a cold start."""
    ch = svc.catalog.get("web").model_copy(update={"pool": 1})
    inst = svc.specs.new_instance(ch, "team1")
    pool = MissingPool()
    info = svc.specs.create(ch, "team1", 8080, inst, svc.egress, pool)
    assert info.name == "ctf-web-team1" and info.state == "running"
    assert pool.asked == ["claim ctf-web-team1 on ctf-team-team1", "make_room"]


def test_a_reconciler_is_built_from_parts(svc: InstanceService, store: StateStore,
                                          driver: FakeDriver) -> None:
    """A Reconciler made of settings, catalog, driver, store and specs adopts a lost record."""
    inst = svc.start("web", "team1")
    store.delete("web", "team1", svc.host)
    reconciler = Reconciler(svc.settings, svc.catalog, driver, store, svc.specs, svc.host)
    assert reconciler.run().adopted == [inst.key]
    record = store.get("web", "team1")
    assert record is not None and record.container_id == inst.container_id
