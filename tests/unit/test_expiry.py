"""The janitor's pass on the fake engine: expiry, orphans, dead containers."""

from __future__ import annotations

from datetime import datetime, timedelta

from celery_app.core.service import InstanceService
from celery_app.engine.driver import ContainerSpec
from celery_app.loops.janitor import Janitor
from celery_app.vocab.models import utcnow
from celery_app.vocab.naming import LABEL_CHALLENGE, LABEL_MANAGED, LABEL_TEAM, network_name
from ctf_testkit.fake_driver import FakeDriver


def later(seconds: float) -> datetime:
    """The moment ``seconds`` from now."""
    return utcnow() + timedelta(seconds=seconds)


def test_an_expired_instance_is_removed_with_its_network(svc: InstanceService,
                                                         janitor: Janitor,
                                                         driver: FakeDriver) -> None:
    """Past its expiry an instance's container, record and team network are removed."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    summary = janitor.run_once(inst.expires + timedelta(seconds=1))
    assert summary.expired == [inst.key]
    assert driver.get_container(inst.container_name) is None
    assert svc.store.get("web", "team1") is None
    assert driver.get_network(network_name("team1")) is None


def test_an_instance_before_its_expiry_stays(svc: InstanceService, janitor: Janitor,
                                             driver: FakeDriver) -> None:
    """A pass before the expiry removes nothing."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    summary = janitor.run_once(inst.expires - timedelta(seconds=5))
    assert summary.removed == 0
    assert driver.get_container(inst.container_name) is not None


def test_an_old_orphan_container_is_removed_a_young_one_kept(svc: InstanceService,
                                                             janitor: Janitor,
                                                             driver: FakeDriver) -> None:
    """A labelled container with no record goes once older than the orphan grace."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    svc.store.delete("web", "team1", svc.host)
    assert janitor.run_once().orphan_containers == []  # younger than CTF_ORPHAN_GRACE
    summary = janitor.run_once(later(svc.settings.orphan_grace + 5))
    assert summary.orphan_containers == [inst.container_name]
    assert driver.get_container(inst.container_name) is None


def test_a_dead_container_is_marked_failed(svc: InstanceService, janitor: Janitor,
                                           driver: FakeDriver) -> None:
    """A running instance whose container died is marked failed with its exit code and OOM."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    driver.exit(inst.container_id, 137, oom=True, output="killed\n")
    summary = janitor.run_once()
    assert summary.marked_failed == [inst.key]
    record = svc.store.get("web", "team1")
    assert record is not None and record.status == "failed"
    assert record.exit_code == 137 and record.oom is True
    assert "lack of memory" in (record.error or "")


def test_a_flushed_index_is_rebuilt_before_judging_orphans(svc: InstanceService,
                                                           janitor: Janitor,
                                                           driver: FakeDriver) -> None:
    """After Redis lost everything, a pass reconciles first: a running instance is adopted."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    svc.store.redis.flushdb()
    summary = janitor.run_once(later(svc.settings.orphan_grace + 5))
    assert summary.reconciled and summary.orphan_containers == []
    record = svc.store.get("web", "team1")
    assert record is not None and record.container_id == inst.container_id


def test_others_containers_are_never_touched(svc: InstanceService, janitor: Janitor,
                                             driver: FakeDriver) -> None:
    """A container without our scope labels is not the janitor's, however old."""
    team = "stranger"
    theirs = {LABEL_MANAGED: "true", LABEL_TEAM: team, LABEL_CHALLENGE: "web"}
    driver.ensure_network(team, theirs, svc.settings.team_subnet_pool, 24)
    driver.run_container(ContainerSpec(
        name="someone-else", image=svc.catalog.get("web").image, port=8080, team_id=team,
        labels=theirs, env={}, memory_bytes=64 * 1024**2, nano_cpus=10**9, pids=64, cap_add=[],
        publish_ip="127.0.0.1"))
    janitor.run_once(later(svc.settings.orphan_grace + 5))
    assert driver.get_container("someone-else") is not None
    assert driver.get_network(network_name(team)) is not None


def test_an_instance_over_its_disk_bound_is_stopped_and_failed(svc: InstanceService,
                                                               janitor: Janitor,
                                                               driver: FakeDriver) -> None:
    """A writable layer past the catalog's ``disk`` fails its instance; others are untouched."""
    big = svc.start(svc.catalog.key("scratch", "team1"))
    small = svc.start(svc.catalog.key("scratch", "team2"))
    driver.write(big.container_id, 65 * 1024**2)
    driver.write(small.container_id, 64 * 1024**2)  # at the bound, not over it
    summary = janitor.run_once()
    assert summary.over_disk == [big.container_name]
    record = svc.store.get("scratch", "team1")
    assert record is not None and record.status == "failed"
    assert record.error is not None and "over its bound of 64 MiB" in record.error
    container = driver.get_container(big.container_id)
    assert container is not None and container.state == "exited"  # kept, no longer writing
    other = svc.store.get("scratch", "team2")
    assert other is not None and other.status == "running"
    assert janitor.run_once().over_disk == []  # judged once
