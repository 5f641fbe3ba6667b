"""Warm pools of whole Compose groups (SPEC §12, issue 24) on the real engine, by name.

The shipped example (``examples/shop``: web shop, database, admin bot), its images built for
this run and its bot's ``${CTF_TEAM}`` written out (a pooled group cannot know its team), is
``gshop`` with ``pool: 2``; a real worker (its beat runs the pool pass) serves it. Starts and
stops are sent by name through a plain Celery client, flags checked and pools read through the
HTTP API.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from api_helpers import ADMIN
from conftest import (
    ROOT,
    RUN_ID,
    RedisServer,
    base_env,
    build_image,
    catalog_yaml,
    cleanup_docker,
    containers_of,
    private_label,
    wait_for,
    worker_and_api,
)
from test_group_docker import _files

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

LABEL = private_label("gpool")
POOL = "10.232.0.0/16"  # this file's subnets, away from every other file's
SHOP = ROOT / "examples" / "shop"
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
STATUS = "celery_app.tasks.get_container_status"
SIZE = 2


@dataclass
class Setup:
    """The running worker's platform client, the API, the engine and the Redis URL."""

    platform: Any
    api: Any
    docker: docker.DockerClient
    redis_url: str

    def start(self, team: str) -> dict[str, Any]:
        """Send start_container by name, as a platform does; return its result."""
        result: dict[str, Any] = self.platform.send_task(START, args=["gshop", team]).get(
            timeout=180)
        return result

    def stop(self, team: str) -> dict[str, Any]:
        """Send stop_container by name; return its result."""
        result: dict[str, Any] = self.platform.send_task(STOP, args=["gshop", team]).get(
            timeout=120)
        return result

    def status(self, team: str) -> list[dict[str, Any]]:
        """The team's instances, as get_container_status sent by name answers."""
        answer = self.platform.send_task(STATUS, kwargs={"team_id": team}).get(timeout=30)
        return list(answer["instances"])

    def pool(self) -> dict[str, Any]:
        """The gshop pool row of ``GET /api/v1/pools``."""
        r = self.api.get("/api/v1/pools", headers=ADMIN)
        assert r.status_code == 200, r.text
        return next((row for row in r.json()["pools"] if row["challenge"] == "gshop"), {})

    def unclaimed(self) -> dict[str, list[Any]]:
        """The unclaimed pooled groups (Docker's view): their containers by slot."""
        groups: dict[str, list[Any]] = {}
        for c in containers_of(self.docker, LABEL, **{"ctf.challenge": "gshop"}):
            if c.name.startswith("ctfpool-"):
                groups.setdefault(c.labels["ctf.pool"], []).append(c)
        return groups

    def full(self) -> dict[str, list[Any]]:
        """Wait until ``SIZE`` whole groups are ready; return them."""
        wait_for(lambda: self.pool().get("ready") == SIZE and len(self.unclaimed()) == SIZE
                 and all(len(g) == 3 for g in self.unclaimed().values()), 120, 0.3,
                 f"the pool to hold {SIZE} ready groups")
        return self.unclaimed()

    def group(self, team: str) -> list[Any]:
        """The containers named for the team's instance (a claimed group has no team label)."""
        return [c for c in containers_of(self.docker, LABEL, **{"ctf.challenge": "gshop"})
                if c.name == f"ctf-gshop-{team}" or c.name.startswith(f"ctf-gshop-{team}.")]

    def network(self, slot: str) -> Any:
        """The slot's network, or ``None``."""
        found = self.docker.networks.list(names=[f"ctfpool-gshop-{slot}"])
        return found[0] if found else None

    def flag_ok(self, team: str, flag: str) -> bool:
        """Whether the API's flag check says ``flag`` is the team's."""
        r = self.api.post(f"/api/v1/teams/{team}/flags/gshop", json={"flag": flag},
                          headers=ADMIN)
        assert r.status_code == 200, r.text
        return bool(r.json()["correct"])


@pytest.fixture(scope="module")
def gshop_catalog(images: dict[str, str], docker_client: docker.DockerClient,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test catalog plus ``gshop``: the example, its images built here, ``pool: 2``."""
    folder = tmp_path_factory.mktemp("gpool")
    text = (SHOP / "compose.yaml").read_text().replace("TEAM: ${CTF_TEAM}", "TEAM: pooled")
    for service in ("web", "db", "bot"):
        tag = build_image(docker_client, f"ctf-test/shop-{service}:{RUN_ID}",
                          (SHOP / service / "Dockerfile").read_text(), _files(SHOP / service))
        text = text.replace(f"ctf-example/shop-{service}:1", tag)
    (folder / "compose.yaml").write_text(text)
    path = folder / "challenges.yaml"
    path.write_text(catalog_yaml(images) + f"""
  gshop:
    compose: compose.yaml
    ttl: 600
    memory: 64m
    start_timeout: 60
    pool: {SIZE}
""")
    return path


@pytest.fixture(scope="module")
def setup(gshop_catalog: Path, docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A worker (default settings but the run's labels and subnets), a client and the API."""
    server = RedisServer(tmp_path_factory.mktemp("redis-gpool"))
    server.start()
    workdir = tmp_path_factory.mktemp("gpool-run")
    env = {**base_env(server, gshop_catalog, workdir / "data"),
           "CTF_EXTRA_LABELS": json.dumps(LABEL), "CTF_TEAM_SUBNET_POOL": POOL}
    try:
        with worker_and_api(env, gshop_catalog, workdir) as (_worker, platform, api):
            yield Setup(platform, api, docker_client, env["CTF_REDIS_URL"])
    finally:
        cleanup_docker(docker_client, LABEL)
        server.stop()


def _stock(inst: dict[str, Any]) -> str:
    """The web shop's stock page: the web service asks ``db`` by name for its flag."""
    port = inst["ports"]["8080/tcp"]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/stock",
                                  timeout=10).read().decode()


def _flag_in(page: str) -> str:
    """The ``CTF{…}`` flag a page shows."""
    start = page.index("CTF{")
    return page[start:page.index("}", start) + 1]


def test_the_pool_refills_to_whole_groups_each_on_a_network_of_its_own(setup: Setup) -> None:
    """The pass boots two groups of three running services, each on its slot's network."""
    groups = setup.full()
    for slot, members in groups.items():
        assert sorted(c.labels["ctf.service"] for c in members) == ["bot", "db", "web"]
        assert all(c.status == "running" and "ctf.team" not in c.labels for c in members)
        net = setup.network(slot)
        assert net is not None and net.attrs["Labels"]["ctf.pool"] == slot
        assert {n for c in members for n in c.attrs["NetworkSettings"]["Networks"]} == {
            net.name}


def test_a_start_by_name_claims_a_whole_group_with_the_teams_flag(setup: Setup) -> None:
    """Claimed: every service runs under the team's names, db answers by name, flags bound."""
    groups = setup.full()
    claims = int(setup.pool().get("claims", 0))
    began = time.time()
    inst = setup.start("ga")
    until = int(time.time()) + 1
    assert inst["status"] == "running" and inst["container_name"] == "ctf-gshop-ga"
    members = {c.labels["ctf.service"]: c for c in setup.group("ga")}
    assert {s: c.name for s, c in members.items()} == {
        "web": "ctf-gshop-ga", "db": "ctf-gshop-ga.db", "bot": "ctf-gshop-ga.bot"}
    assert all(c.status == "running" for c in members.values())
    slot = members["web"].labels["ctf.pool"]
    assert slot in groups and inst["container_id"] == members["web"].id  # claimed, not cold
    # No network operation on the claim: the engine's own events say none touched its
    # containers, and no network was made for the team or the instance.
    ids = {c.id for c in members.values()}
    network_events = [e for e in setup.docker.api.events(
        since=int(began) - 1, until=until, decode=True, filters={"type": "network"})
        if e["timeNano"] >= began * 1e9]
    assert not [e for e in network_events if e["Actor"]["Attributes"].get("container") in ids]
    at_boot = [e for e in setup.docker.api.events(
        since=int(began) - 600, until=int(began), decode=True, filters={"type": "network"})
        if e["Actor"]["Attributes"].get("container") in ids]
    assert {e["Action"] for e in at_boot} == {"connect"}  # the engine does report them
    assert not [e for e in network_events if e["Action"] == "create"
                and e["Actor"]["Attributes"].get("name", "").endswith(("-ga", ".ga"))]
    assert not setup.docker.networks.list(names=["ctf-team-ga", "ctf-inst-gshop.ga"])
    assert int(setup.pool()["claims"]) == claims + 1
    assert inst["endpoints"][0]["url"] == inst["url"]
    flag = _flag_in(_stock(inst))  # web reached db by its service name
    assert setup.flag_ok("ga", flag)
    assert not setup.flag_ok("gb", flag)
    assert any(i["status"] == "running" for i in setup.status("ga"))


def test_stop_removes_every_service_and_the_groups_network(setup: Setup) -> None:
    """stop_container of a claimed group leaves no container of it and no network."""
    setup.full()
    setup.start("gc")
    slot = setup.group("gc")[0].labels["ctf.pool"]
    assert setup.stop("gc")["status"] == "stopped"
    assert setup.group("gc") == []
    assert setup.network(slot) is None


def test_drain_removes_the_unclaimed_groups_whole(setup: Setup) -> None:
    """After a drain the groups booted before it are gone, containers and networks."""
    before = set(setup.full())
    r = setup.api.post("/api/v1/pools/gshop/drain", headers=ADMIN)
    assert r.status_code == 200, r.text
    wait_for(lambda: not before & set(setup.unclaimed()), 60, 0.3, "the drained groups gone")
    assert all(setup.network(slot) is None for slot in before)
    assert not before & set(setup.full())  # refilled with new groups


def test_a_redis_flush_is_reconciled_with_the_claimed_group(setup: Setup) -> None:
    """After the index is lost the claimed group is adopted whole and its flag stays bound."""
    setup.full()
    inst = setup.start("gd")
    flag = _flag_in(_stock(inst))
    redis.Redis.from_url(setup.redis_url).flushdb()
    adopted = wait_for(lambda: next((i for i in setup.status("gd") if i["status"] == "running"),
                                    None), timeout=60, message="the claimed group adopted")
    assert adopted["container_id"] == inst["container_id"]
    assert adopted["endpoints"] == inst["endpoints"]
    assert len(setup.group("gd")) == 3
    wait_for(lambda: setup.flag_ok("gd", flag), 30, 0.5, "the pool pass to re-bind the flag")
    assert not setup.flag_ok("ge", flag)
    assert setup.stop("gd")["status"] == "stopped"
    assert setup.group("gd") == []
