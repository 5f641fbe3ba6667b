"""The instance service on the real Docker engine and a real Redis."""

from __future__ import annotations

import ipaddress
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import TEST_LABEL, TEST_POOL, cleanup_docker, containers_of, private_label
from test_egress import firewall_tools, nft

from celery_app.engine.docker_driver import DockerDriver
from celery_app.engine.firewall import table_name
from celery_app.errors import (
    InvalidRequest,
    InvalidTeamId,
    StartFailed,
    UnknownChallenge,
)
from celery_app.worker.context import Context

pytestmark = [pytest.mark.docker, pytest.mark.redis]

BAD_TEAM_IDS = ["../x", "a b", "", "x" * 64, "--help", "tëam", "team\n", "-lead", "a/b", "a;rm"]


_ours = containers_of

def _reaches(container: Any, ip: str) -> bool:
    """Whether ``container`` gets our stand-in page from ``ip`` (busybox nc, 2 s timeout)."""
    # busybox wget crashes in a scratch image; nc does not. Judge by the page, not the exit
    # code: only our own stand-in serves "hello from ctf".
    _, out = container.exec_run(["/bin/busybox", "sh", "-c",
                                 f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
                                 f"/bin/busybox nc -w 2 {ip} 8080"])
    return b"hello from ctf" in out


def test_start_runs_instance_and_its_url_answers(ctx: Context, docker_client: Any) -> None:
    """A started instance is running, labelled and named per the spec, and its URL answers."""
    inst = ctx.service.start(ctx.service.catalog.key("web", "team1"))
    assert inst.status == "running"
    assert inst.container_name == "ctf-web-team1"
    c = docker_client.containers.get(inst.container_id)
    assert c.labels["ctf.managed"] == "true"
    assert c.labels["ctf.team"] == "team1"
    assert c.labels["ctf.challenge"] == "web"
    port = inst.ports["8080/tcp"]
    assert inst.url == f"http://localhost:{port}"
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
    assert b"hello from ctf" in body
    net = docker_client.networks.get("ctf-team-team1")
    assert net.attrs["Labels"]["ctf.managed"] == "true"
    assert net.attrs["Labels"]["ctf.team"] == "team1"
    assert "ctf.challenge" not in net.attrs["Labels"]
    subnet = ipaddress.ip_network(net.attrs["IPAM"]["Config"][0]["Subnet"])
    assert subnet.subnet_of(ipaddress.ip_network(TEST_POOL))


def test_start_is_idempotent(ctx: Context, docker_client: Any) -> None:
    """Starting an instance that already runs returns it unchanged: same container."""
    first = ctx.service.start(ctx.service.catalog.key("web", "team1"))
    second = ctx.service.start(ctx.service.catalog.key("web", "team1"))
    assert second.container_id == first.container_id
    assert second.expires_at == first.expires_at
    assert len(_ours(docker_client, **{"ctf.team": "team1"})) == 1


def test_concurrent_starts_in_threads_make_one_container(ctx: Context, docker_client: Any) -> None:
    """Twenty concurrent starts of one (challenge, team) create exactly one container."""
    with ThreadPoolExecutor(20) as pool:
        race = ctx.service.catalog.key("web", "race")
        results = list(pool.map(lambda _: ctx.service.start(race), range(20)))
    assert {r.container_id for r in results} == {results[0].container_id}
    assert len(_ours(docker_client, **{"ctf.team": "race"})) == 1


def test_stop_removes_container_and_last_network(ctx: Context, docker_client: Any) -> None:
    """Stop removes the container; the team network goes with the team's last instance."""
    ctx.service.start(ctx.service.catalog.key("web", "t-stop"))
    ctx.service.start(ctx.service.catalog.key("exposed", "t-stop"))
    ctx.service.stop(ctx.service.catalog.key("web", "t-stop"))
    assert [c.name for c in _ours(docker_client, **{"ctf.team": "t-stop"})] == [
        "ctf-exposed-t-stop"
    ]
    assert docker_client.networks.list(names=["ctf-team-t-stop"])
    ctx.service.stop(ctx.service.catalog.key("exposed", "t-stop"))
    assert _ours(docker_client, **{"ctf.team": "t-stop"}) == []
    assert docker_client.networks.list(names=["ctf-team-t-stop"]) == []
    assert ctx.service.status(team_id="t-stop") == []


# The firewall at its default (on), as users run it, on a subnet pool (so an nftables
# table) of this test's own: team isolation rests on it (docs/SECURITY.md, "team from team").
ISOLATION_POOL = "10.229.0.0/16"


@pytest.fixture
def firewalled_ctx(make_ctx: Callable[..., Context]) -> Iterator[Context]:
    """A context with the egress firewall at its default (auto); its table removed after."""
    firewall_tools()
    ctx = make_ctx(team_subnet_pool=ISOLATION_POOL, egress_firewall="auto")
    try:
        yield ctx
    finally:
        nft("delete", "table", "inet", table_name(ipaddress.IPv4Network(ISOLATION_POOL)))


def test_teams_are_isolated_on_the_network(firewalled_ctx: Context, docker_client: Any) -> None:
    """A container of team A cannot reach team B's container; same-team containers can."""
    ctx = firewalled_ctx
    assert ctx.egress is not None and ctx.egress.enforced
    a_web = ctx.service.start(ctx.service.catalog.key("web", "alpha"))
    a_other = ctx.service.start(ctx.service.catalog.key("exposed", "alpha"))
    b_web = ctx.service.start(ctx.service.catalog.key("web", "bravo"))
    ca = docker_client.containers.get(a_web.container_id)

    def ip(inst: Any) -> str:
        c = docker_client.containers.get(inst.container_id)
        return next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]

    assert _reaches(ca, ip(a_other)), "same-team containers must reach each other"
    assert not _reaches(ca, ip(b_web)), "team alpha reached team bravo's container"


@pytest.mark.parametrize("team", BAD_TEAM_IDS)
def test_invalid_team_ids_create_nothing(ctx: Context, docker_client: Any, team: str) -> None:
    """Invalid team ids are refused with InvalidTeamId before Docker is touched."""
    with pytest.raises(InvalidTeamId, match="team id"):
        ctx.service.start(ctx.service.catalog.key("web", team))
    assert _ours(docker_client) == []
    assert docker_client.networks.list(filters={"label": [f"ctf.test={TEST_LABEL['ctf.test']}"]}) \
        == []


def test_a_foreign_container_with_our_name_is_never_adopted_or_removed(
    ctx: Context, docker_client: Any, images: dict[str, str]
) -> None:
    """A container named like an instance but not labelled ours is refused, and left alone."""
    label = private_label("foreign")
    foreign = docker_client.containers.run(images["http"], detach=True, labels=label,
                                           name="ctf-web-squatter")
    try:
        with pytest.raises(InvalidRequest, match="not managed by this instancer"):
            ctx.service.start(ctx.service.catalog.key("web", "squatter"))
        with pytest.raises(InvalidRequest, match="not managed by this instancer"):
            ctx.service.stop(ctx.service.catalog.key("web", "squatter"))
        foreign.reload()
        assert foreign.status == "running"
        assert ctx.service.status(team_id="squatter") == []
    finally:
        cleanup_docker(docker_client, label)


def test_unknown_challenge_creates_nothing(ctx: Context, docker_client: Any) -> None:
    """An unknown challenge is refused with a message listing the known ones."""
    with pytest.raises(UnknownChallenge, match="known challenges: web"):
        ctx.service.start(ctx.service.catalog.key("nope", "team1"))
    assert _ours(docker_client) == []


def test_slow_service_is_running_only_once_it_answers(ctx: Context) -> None:
    """A container whose port answers after 2 s is reported running only after that."""
    began = time.monotonic()
    inst = ctx.service.start(ctx.service.catalog.key("slow", "sloth"))
    assert time.monotonic() - began >= 1.5
    assert inst.status == "running"
    port = inst.ports["8080/tcp"]
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200


def test_crashing_container_fails_clearly_and_leaves_nothing(
    ctx: Context, docker_client: Any
) -> None:
    """A container that exits fails the start with its exit code and output; none is left."""
    with pytest.raises(StartFailed, match=r"exited with code 3.*boom"):
        ctx.service.start(ctx.service.catalog.key("crash", "team1"))
    assert _ours(docker_client, **{"ctf.challenge": "crash"}) == []
    [record] = ctx.service.status(team_id="team1")
    assert record.status == "failed"
    assert "boom" in (record.error or "")


def test_port_comes_from_image_expose_when_catalog_omits_it(ctx: Context) -> None:
    """A challenge without ``port`` uses the image's first EXPOSEd port."""
    inst = ctx.service.start(ctx.service.catalog.key("exposed", "team1"))
    assert list(inst.ports) == ["8080/tcp"]
    assert inst.url is not None
    assert inst.url.startswith("tcp://localhost:")


@pytest.mark.slow
def test_many_team_networks_get_subnets_from_our_pool(ctx: Context, docker_client: Any) -> None:
    """More teams than Docker's default pools allow (~30) each get a distinct pool subnet."""
    # No instance records these networks: a label of their own keeps the session worker's
    # janitor from (rightly) sweeping them as orphans mid-test.
    label = private_label("networks")
    labels = {**label, "ctf.managed": "true"}
    subnets = set()
    try:
        for i in range(60):
            net = ctx.driver.ensure_network(f"many{i}", {**labels, "ctf.team": f"many{i}"},
                                            TEST_POOL, 28)
            subnets.add(net.subnets[0])
    finally:
        cleanup_docker(docker_client, label)
    assert len(subnets) == 60
    pool = ipaddress.ip_network(TEST_POOL)
    assert all(ipaddress.ip_network(s).subnet_of(pool) for s in subnets)


# Issue 27's own subnets: a herd of new team networks made by one driver's threads at once.
HERD_POOL = "10.216.0.0/16"


def test_a_herd_of_new_team_networks_makes_each_with_one_create(docker_client: Any) -> None:
    """16 threads making 32 new team networks at once: distinct subnets, no create refused."""
    label = private_label("herdnets")
    labels = {**label, "ctf.managed": "true"}
    driver = DockerDriver()  # its own subnet bookkeeping, as a fresh worker's
    creates: list[str] = []
    create = driver.client.api.create_network

    def counted(name: str, *args: Any, **kwargs: Any) -> Any:
        creates.append(name)
        return create(name, *args, **kwargs)

    driver.client.api.create_network = counted  # type: ignore[method-assign]
    teams = [f"herd{i}" for i in range(32)]
    try:
        with ThreadPoolExecutor(16) as pool:
            made = list(pool.map(lambda t: driver.ensure_network(
                t, {**labels, "ctf.team": t}, HERD_POOL, 28), teams))
        # What the driver answered without an inspect is what the engine says.
        for net in made:
            seen = driver.get_network(net.name)
            assert seen == net
    finally:
        cleanup_docker(docker_client, label)
        driver.close()
    assert sorted(creates) == sorted(f"ctf-team-{t}" for t in teams)  # none refused, retried
    assert len({net.subnets[0] for net in made}) == 32
    pool_net = ipaddress.ip_network(HERD_POOL)
    assert all(ipaddress.ip_network(net.subnets[0]).subnet_of(pool_net) for net in made)
