"""Reconcile's decisions on the fake engine: Docker labels are the truth, Redis the index."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from celery_app.core.service import InstanceService
from celery_app.state.store import StateStore
from celery_app.vocab.models import iso, utcnow
from ctf_testkit.fake_driver import FakeDriver


def test_a_lost_record_is_adopted_from_labels(svc: InstanceService, store: StateStore) -> None:
    """A running container whose record Redis lost is recorded again, with its label expiry."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    store.delete("web", "team1", svc.host)
    summary = svc.reconcile()
    assert summary.adopted == [inst.key]
    record = store.get("web", "team1")
    assert record is not None and record.status == "running"
    assert record.container_id == inst.container_id and record.expires_at == inst.expires_at


def test_a_record_without_container_is_forgotten(svc: InstanceService, store: StateStore,
                                                 driver: FakeDriver) -> None:
    """A running record whose container is gone from the engine is dropped."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    driver.remove_container(inst.container_id)
    assert svc.reconcile().forgotten == [inst.key]
    assert store.get("web", "team1") is None


def test_a_young_start_is_left_alone(svc: InstanceService, store: StateStore) -> None:
    """A "starting" record younger than the orphan grace may not have its container yet."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    driver_less = inst.model_copy(update={"status": "starting", "container_id": "",
                                          "container_name": "ctf-web-team9", "team_id": "team9"})
    store.put(driver_less)
    summary = svc.reconcile()
    assert summary.forgotten == [] and store.get("web", "team9") is not None


def test_a_stopped_container_marks_its_record_failed(svc: InstanceService,
                                                     store: StateStore,
                                                     driver: FakeDriver) -> None:
    """A record saying running for a container that exited becomes failed, with the exit code."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    driver.exit(inst.container_id, 2, output="bye\n")
    assert svc.reconcile().marked_failed == [inst.key]
    record = store.get("web", "team1")
    assert record is not None and record.status == "failed" and record.exit_code == 2
    assert record.logs == "bye"


def test_an_adopted_instance_past_expiry_gets_a_grace(svc: InstanceService,
                                                      store: StateStore,
                                                      driver: FakeDriver) -> None:
    """Adopting a container whose label expiry has passed gives it a minute, not a kill."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    container = driver.containers[inst.container_id]
    past = utcnow() - timedelta(seconds=10)
    driver.containers[inst.container_id] = replace(
        container, labels={**container.labels, "ctf.expires_at": iso(past)})
    store.delete("web", "team1", svc.host)
    svc.reconcile()
    record = store.get("web", "team1")
    assert record is not None
    assert utcnow() < record.expires <= utcnow() + timedelta(seconds=61)


def test_events_mark_a_death_and_forget_a_removal(svc: InstanceService, store: StateStore,
                                                  driver: FakeDriver) -> None:
    """mark_failed records a death; forget_removed drops the record once the container is gone."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    assert svc.mark_failed("web", "team1", inst.container_id) == "unchanged"  # still running
    driver.exit(inst.container_id, 1)
    assert svc.mark_failed("web", "team1", inst.container_id) == "marked"
    driver.remove_container(inst.container_id)
    assert svc.forget_removed("web", "team1", inst.container_id) == "forgotten"
    assert store.get("web", "team1") is None


def test_news_of_an_old_container_changes_nothing(svc: InstanceService,
                                                  driver: FakeDriver) -> None:
    """A death reported for a container the instance no longer uses is ignored."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    assert svc.mark_failed("web", "team1", "0" * 64) == "unchanged"
    record = svc.store.get("web", "team1")
    assert record is not None and record.status == "running"
    assert driver.get_container(inst.container_id) is not None
