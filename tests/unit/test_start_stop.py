"""Start, stop and extend rules on the fake engine: what a team gets, and what is left."""

from __future__ import annotations

from datetime import timedelta

import pytest

from celery_app.core.service import InstanceService
from celery_app.errors import (
    ImageNotFound,
    InstanceNotFound,
    InvalidTeamId,
    MaxLifetimeReached,
    StartFailed,
    Superseded,
    TeamQuotaExceeded,
    UnknownChallenge,
)
from celery_app.state.store import StateStore
from celery_app.vocab.models import iso, utcnow
from celery_app.vocab.naming import network_name
from celery_app.vocab.signals import OnOtherHost
from ctf_testkit.fake_driver import FakeDriver


def test_start_runs_a_container_on_the_team_network(svc: InstanceService,
                                                    driver: FakeDriver) -> None:
    """A start gives a running record with the container's id, port and URL."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    assert inst.status == "running"
    container = driver.get_container("ctf-web-team1")
    assert container is not None and container.id == inst.container_id
    assert inst.url == f"http://{svc.public_host}:{container.ports['8080/tcp']}"
    assert driver.get_network(network_name("team1")) is not None
    assert svc.store.get("web", "team1") == inst


def test_start_is_idempotent(svc: InstanceService, driver: FakeDriver) -> None:
    """A second start of a running instance returns it unchanged, with no second container."""
    first = svc.start(svc.catalog.key("web", "team1"))
    again = svc.start(svc.catalog.key("web", "team1"))
    assert again == first
    assert len(driver.list_containers({"ctf.team": "team1"})) == 1


def test_the_flag_reaches_the_container_and_is_the_teams(svc: InstanceService) -> None:
    """Two teams get different flags for one challenge, each stable across calls."""
    key = svc.catalog.key
    assert svc.flag_for(key("web", "team1")) == svc.flag_for(key("web", "team1"))
    assert svc.flag_for(key("web", "team1")) != svc.flag_for(key("web", "team2"))


def test_bad_input_touches_nothing(svc: InstanceService, driver: FakeDriver) -> None:
    """A bad team id or an unknown challenge is refused before Docker is asked anything."""
    with pytest.raises(InvalidTeamId):
        svc.start(svc.catalog.key("web", "bad team!"))
    with pytest.raises(UnknownChallenge):
        svc.start(svc.catalog.key("nope", "team1"))
    assert driver.calls == []


def test_the_team_quota_leaves_nothing_half_made(make_service, driver: FakeDriver) -> None:
    """Past the per-team maximum a start is refused and no container or record is added."""
    svc = make_service(max_instances_per_team=1)
    svc.start(svc.catalog.key("web", "team1"))
    with pytest.raises(TeamQuotaExceeded):
        svc.start(svc.catalog.key("crash", "team1"))
    assert driver.get_container("ctf-crash-team1") is None
    assert svc.store.get("crash", "team1") is None


def test_a_container_that_exits_fails_the_start(svc: InstanceService,
                                                 driver: FakeDriver) -> None:
    """A crashing container fails the start with its exit code; it is removed, a record stays."""
    with pytest.raises(StartFailed, match="exited with code 3"):
        svc.start(svc.catalog.key("crash", "team1"))
    assert driver.get_container("ctf-crash-team1") is None
    record = svc.store.get("crash", "team1")
    assert record is not None and record.status == "failed"
    assert record.expires <= utcnow() + timedelta(seconds=121)


def test_a_missing_image_is_a_clear_error(svc: InstanceService, driver: FakeDriver) -> None:
    """A challenge whose image no registry has fails with ImageNotFound and leaves nothing."""
    with pytest.raises(ImageNotFound):
        svc.start(svc.catalog.key("missing", "team1"))
    assert svc.store.get("missing", "team1") is None
    assert driver.list_containers() == []


def test_stop_removes_container_record_and_network(svc: InstanceService,
                                                    driver: FakeDriver) -> None:
    """Stopping a team's last instance removes its container, its record and its network."""
    svc.start(svc.catalog.key("web", "team1"))
    assert svc.stop(svc.catalog.key("web", "team1"))["status"] == "stopped"
    assert driver.get_container("ctf-web-team1") is None
    assert svc.store.get("web", "team1") is None
    assert driver.get_network(network_name("team1")) is None


def test_stop_keeps_the_network_of_a_team_still_running(svc: InstanceService,
                                                        driver: FakeDriver) -> None:
    """A team's network stays while another of its instances runs on it."""
    svc.start(svc.catalog.key("web", "team1"))
    svc.start(svc.catalog.key("web", "team2"))
    svc.stop(svc.catalog.key("web", "team2"))
    assert driver.get_network(network_name("team1")) is not None


def test_stop_of_nothing_is_not_found(svc: InstanceService) -> None:
    """Stopping an instance that does not exist says so."""
    with pytest.raises(InstanceNotFound):
        svc.stop(svc.catalog.key("web", "team1"))


def test_the_latest_request_wins(svc: InstanceService, store: StateStore) -> None:
    """A start outrun by a later stop request does nothing and answers Superseded."""
    seq = store.register_intent("web", "team1", "start")
    store.register_intent("web", "team1", "stop")
    with pytest.raises(Superseded):
        svc.start(svc.catalog.key("web", "team1"), intent=seq)
    assert store.get("web", "team1") is None


def test_another_hosts_instance_is_handed_over(make_service) -> None:
    """An instance recorded on another host is that host's: this one raises OnOtherHost."""
    alpha, beta = make_service(host="alpha"), make_service(host="beta")
    alpha.start(alpha.catalog.key("web", "team1"))
    with pytest.raises(OnOtherHost) as raised:
        beta.stop(beta.catalog.key("web", "team1"))
    assert raised.value.host == "alpha"


def test_extend_pushes_expiry_up_to_the_maximum_lifetime(svc: InstanceService,
                                                         store: StateStore) -> None:
    """Extend adds the ttl from now; at started_at + max_lifetime it is refused."""
    inst = svc.start(svc.catalog.key("web", "team1"))
    extended = svc.extend(svc.catalog.key("web", "team1"))
    assert extended.expires > inst.expires - timedelta(seconds=1)
    started = utcnow() - timedelta(seconds=1790)
    store.put(extended.model_copy(update={"started_at": iso(started),
                                          "expires_at": iso(started + timedelta(seconds=1800))}))
    with pytest.raises(MaxLifetimeReached):
        svc.extend(svc.catalog.key("web", "team1"))


def test_a_task_id_takes_effect_once(svc: InstanceService, driver: FakeDriver) -> None:
    """A start, extend or stop run again under its task id answers as before and does nothing."""
    first = svc.start(svc.catalog.key("web", "team1"), task_id="t-start")
    grown = svc.extend(svc.catalog.key("web", "team1"), task_id="t-extend")
    # not extended twice
    assert svc.extend(svc.catalog.key("web", "team1"), task_id="t-extend") == grown
    assert svc.store.get("web", "team1") == grown
    assert svc.stop(svc.catalog.key("web", "team1"), task_id="t-stop")["status"] == "stopped"
    # A copy of the start after the stop starts nothing; it answers what it did.
    assert svc.start(svc.catalog.key("web", "team1"), task_id="t-start") == first
    assert svc.store.get("web", "team1") is None
    assert driver.get_container(first.container_name) is None
    # A copy of the stop after a later start leaves that instance running.
    again = svc.start(svc.catalog.key("web", "team1"), task_id="t-start-2")
    assert svc.stop(svc.catalog.key("web", "team1"), task_id="t-stop")["status"] == "stopped"
    assert svc.store.get("web", "team1") == again
    assert driver.get_container(again.container_name) is not None
