"""One contract, two engines: the in-memory FakeDriver answers as the real DockerDriver does.

Every test runs twice, against the fake and against the real engine, so the fake that the
unit tests rely on cannot drift from Docker's behaviour.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import private_label

from celery_app.engine.docker_driver import DockerDriver
from celery_app.engine.driver import ContainerEvent, ContainerSpec, Driver
from celery_app.errors import ImageNotFound, InvalidRequest
from celery_app.vocab.naming import LABEL_CHALLENGE, LABEL_MANAGED, LABEL_TEAM, network_name
from ctf_testkit.fake_driver import FakeDriver
from ctf_testkit.support import wait_for

# Team networks of this file come from a pool of their own.
POOL = "10.251.0.0/16"
FAKE_IMAGE = "ctf-test/http:fake"


@dataclass
class Engine:
    """A driver under test, the image it can run and the labels of what the test makes."""

    driver: Driver
    image: str
    labels: dict[str, str]

    def team(self) -> str:
        """A team id no other test uses."""
        return f"contract-{uuid.uuid4().hex[:8]}"

    def spec(self, team: str, ip: str | None = None, image: str | None = None) -> ContainerSpec:
        """A small container of the engine's image on the team's network."""
        return ContainerSpec(
            name=f"ctf-contract-{team}", image=image or self.image, port=8080, team_id=team,
            labels={**self.labels, LABEL_TEAM: team, LABEL_CHALLENGE: "contract"}, env={},
            memory_bytes=64 * 1024**2, nano_cpus=250_000_000, pids=64, cap_add=[],
            publish_ip="127.0.0.1", ip=ip,
        )

    def network(self, team: str) -> Any:
        """The team's network, made from this file's pool."""
        return self.driver.ensure_network(team, {**self.labels, LABEL_TEAM: team}, POOL, 24)


@pytest.fixture(params=["fake", "docker"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    labels = {LABEL_MANAGED: "true", **private_label("contract")}
    driver: Any
    if request.param == "fake":
        driver = FakeDriver()
        driver.add_image(FAKE_IMAGE, 8080)
        image = FAKE_IMAGE
    else:
        image = request.getfixturevalue("images")["http"]
        driver = DockerDriver()
    yield Engine(driver, image, labels)
    for c in driver.list_containers(labels):
        driver.remove_container(c.id)
    for n in driver.list_networks(labels):
        driver.remove_network(n.id)
    driver.close()


def test_missing_things_are_none_or_false(engine: Engine) -> None:
    """What does not exist is None, False or empty output, never an error."""
    d = engine.driver
    ghost = f"ctf-contract-ghost-{uuid.uuid4().hex[:8]}"
    assert d.get_container(ghost) is None
    assert d.remove_container(ghost) is False
    assert d.container_logs(ghost) == ""
    assert d.get_network(ghost) is None
    assert d.remove_network(ghost) is False
    assert d.free_address(ghost) is None
    assert d.ping() is True


def test_images_present_exposed_and_missing(engine: Engine) -> None:
    """A present image reports its EXPOSEd port; a missing one is absent and cannot run."""
    d = engine.driver
    missing = f"ctf-test/missing:{uuid.uuid4().hex[:8]}"
    assert d.image_present(engine.image) is True
    assert d.image_exposed_port(engine.image) == 8080
    assert d.image_present(missing) is False
    with pytest.raises(ImageNotFound):
        d.image_volumes(missing)
    team = engine.team()
    engine.network(team)
    with pytest.raises(InvalidRequest):
        d.run_container(engine.spec(team, image=missing))
    assert d.get_container(engine.spec(team).name) is None


def test_ensure_network_makes_one_network_from_the_pool(engine: Engine) -> None:
    """A team's network gets a subnet of the pool once; a foreign one of that name is refused."""
    d = engine.driver
    team = engine.team()
    net = engine.network(team)
    assert net.name == network_name(team)
    assert net.containers == 0
    assert ipaddress.ip_network(net.subnets[0]).subnet_of(ipaddress.ip_network(POOL))
    assert engine.network(team).id == net.id
    with pytest.raises(InvalidRequest):
        d.ensure_network(team, {**engine.labels, LABEL_TEAM: team, "ctf.other": "x"}, POOL, 24)
    other = engine.network(engine.team())
    assert other.subnets != net.subnets
    assert {n.id for n in d.list_networks(engine.labels)} >= {net.id, other.id}


def test_run_find_list_and_remove_a_container(engine: Engine) -> None:
    """A run container is found by name and id, listed by label, counted on its network."""
    d = engine.driver
    team = engine.team()
    net = engine.network(team)
    info = d.run_container(engine.spec(team))
    assert info.state == "running"
    assert info.team_id == team and info.challenge == "contract"
    assert info.ports.get("8080/tcp")
    assert info.ip and ipaddress.ip_address(info.ip) in ipaddress.ip_network(net.subnets[0])
    by_name, by_id = d.get_container(info.name), d.get_container(info.id)
    assert by_name is not None and by_id is not None and by_name.id == by_id.id == info.id
    assert info.id in {c.id for c in d.list_containers({**engine.labels, LABEL_TEAM: team})}
    assert info.id not in {c.id for c in d.list_containers({**engine.labels,
                                                           LABEL_TEAM: "nobody"})}
    with pytest.raises(InvalidRequest):
        d.run_container(engine.spec(team))  # the name is taken
    counted = d.get_network(net.name)
    assert counted is not None and counted.containers == 1
    assert d.remove_network(net.id) is False  # still in use
    assert d.remove_container(info.id) is True
    assert d.remove_container(info.id) is False
    assert d.get_container(info.name) is None
    emptied = d.get_network(net.name)
    assert emptied is not None and emptied.containers == 0
    assert d.remove_network(net.id) is True
    assert d.get_network(net.name) is None


def test_free_address_is_the_lowest_unused(engine: Engine) -> None:
    """free_address skips the gateway and every container's address; a spec's ip is honoured."""
    d = engine.driver
    team = engine.team()
    net = engine.network(team)
    hosts = list(ipaddress.ip_network(net.subnets[0]).hosts())
    first = d.free_address(net.name)
    assert first == str(hosts[1])  # hosts[0] is the gateway
    info = d.run_container(engine.spec(team, ip=first))
    assert info.ip == first
    assert d.free_address(net.name) == str(hosts[2])


def test_events_report_start_and_destroy(engine: Engine) -> None:
    """The event stream of our labels reports a container's start and its removal."""
    d = engine.driver
    team = engine.team()
    engine.network(team)
    seen: list[ContainerEvent] = []
    stream = d.events(engine.labels)
    reader = threading.Thread(target=lambda: seen.extend(stream), daemon=True)
    reader.start()
    try:
        info = d.run_container(engine.spec(team))
        wait_for(lambda: any(e.action == "start" and e.id == info.id for e in seen), 30, 0.05,
                 "the start event")
        d.remove_container(info.id)
        wait_for(lambda: any(e.action == "destroy" and e.id == info.id for e in seen), 30,
                 0.05, "the destroy event")
        started = next(e for e in seen if e.action == "start")
        assert started.name == info.name and started.labels[LABEL_TEAM] == team
    finally:
        stream.close()
        reader.join(10)
    assert not reader.is_alive()


def test_engine_id_is_the_engines_own_and_stable(engine: Engine) -> None:
    """engine_id names the engine (the egress keepers' heartbeats are keyed by it), always alike."""
    first = engine.driver.engine_id()
    assert first and engine.driver.engine_id() == first
    if isinstance(engine.driver, DockerDriver):
        assert first == engine.driver.client.info()["ID"]


def test_a_group_service_publishes_each_port_and_one_without_ports_none(engine: Engine) -> None:
    """extra_ports are published beside the port; a service with no port gets no host port."""
    d = engine.driver
    team = engine.team()
    engine.network(team)
    both = d.run_container(dataclasses.replace(engine.spec(team), extra_ports=(9090,),
                                               aliases=("web",)))
    assert set(both.ports) == {"8080/tcp", "9090/tcp"} and all(both.ports.values())
    hidden = d.run_container(dataclasses.replace(engine.spec(team), name=f"{both.name}-db",
                                                 port=None, aliases=("db",)))
    assert hidden.state == "running" and hidden.ports == {}
