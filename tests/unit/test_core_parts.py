"""The core's parts, each built from what it uses (issue 23): no service needed below it."""

from __future__ import annotations

from celery_app.core.reconcile import Reconciler
from celery_app.core.service import InstanceService
from celery_app.core.specs import InstanceLayout
from celery_app.engine.driver import ContainerInfo, ContainerSpec, NetworkInfo
from celery_app.state.store import StateStore
from ctf_testkit.fake_driver import FakeDriver


def test_the_layout_names_an_instance_and_its_network(svc: InstanceService,
                                                      driver: FakeDriver) -> None:
    """An instance is a group (of one) on a network: its record and container follow the layout."""
    layout = svc.specs.layout("web", "team1")
    assert layout == InstanceLayout(network="ctf-team-team1", containers=("ctf-web-team1",))
    assert layout.main == "ctf-web-team1"
    inst = svc.start(svc.catalog.key("web", "team1"))
    assert inst.container_name == layout.main
    net = driver.get_network(layout.network)
    assert net is not None and net.containers == 1


def test_a_creation_makes_the_container_the_service_chose(svc: InstanceService,
                                                         driver: FakeDriver) -> None:
    """``InstanceSpecs.create`` hands the team network and the cold spec to the given maker."""
    ch = svc.catalog.get("web")
    inst = svc.specs.new_instance(ch, "team1")
    asked: list[str] = []

    def make(net: NetworkInfo, spec: ContainerSpec) -> ContainerInfo:
        asked.append(f"{spec.name} on {net.name}")
        return driver.run_container(spec)

    info = svc.specs.create(ch, "team1", 8080, inst, svc.egress, make)
    assert info.name == "ctf-web-team1" and info.state == "running"
    assert asked == ["ctf-web-team1 on ctf-team-team1"]


def test_a_reconciler_is_built_from_parts(svc: InstanceService, store: StateStore,
                                          driver: FakeDriver) -> None:
    """A Reconciler made of settings, catalog, driver, store and specs adopts a lost record."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    store.delete("web", "team1", svc.host)
    reconciler = Reconciler(svc.settings, svc.catalog, driver, store, svc.specs, svc.host)
    assert reconciler.run().adopted == [inst.key]
    record = store.get("web", "team1")
    assert record is not None and record.container_id == inst.container_id
