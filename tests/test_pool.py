"""Warm pools (issue 14) on the real engine, as the platform sees them.

A real worker (its beat runs the janitor and the pool pass) on a Redis of its own, a catalog
whose ``pooled`` challenge has ``pool: 3``; starts sent by name through a plain Celery client,
flags checked and pools read through the HTTP API. Everything it makes carries a label of
its own, so the session worker's janitor leaves it alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from api_helpers import ADMIN
from conftest import (
    RedisServer,
    Worker,
    base_env,
    catalog_yaml,
    cleanup_docker,
    containers_of,
    private_label,
    wait_for,
    worker_and_api,
)
from fastapi.testclient import TestClient
from test_egress import gateway_of, listener, nft, nft_root, reaches  # noqa: F401  # a fixture

from celery_app.core.flags import in_app_flag, team_flag
from celery_app.engine.firewall import table_name

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

LABEL = private_label("pool")
POOL = "10.240.0.0/16"
FIREWALL_POOL = "10.242.0.0/16"  # the firewall test's own table
ISOLATION_POOL = "10.253.0.0/17"  # the isolation test's own table
# Without root or nft these skip; on CI they fail (tests/ci.py), like every missing part.
NEEDS_FIREWALL = pytest.mark.usefixtures("nft_root")
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
RECONCILE = "celery_app.tasks.reconcile"
SIZE = 3
POOLED = """
  pooled:
    image: {image}
    port: 8080
    ttl: 600
    max_lifetime: 1800
    flag_env: FLAG
    start_timeout: 20
    pool: {size}
"""
# Never answers on its port (so it stays booting, unoffered, on its own network) but serves on 9000.
SLEEPY = """
  sleepy:
    image: {image}
    port: 8080
    command: ["httpd", "-f", "-p", "9000", "-h", "/www"]
    start_timeout: 120
    pool: 2
"""


@dataclass
class Setup:
    """The worker, a platform's Celery client and the API, on a Redis of their own."""

    worker: Worker
    client: Any
    api: TestClient
    env: dict[str, str]
    docker: docker.DockerClient
    label: dict[str, str]

    def start(self, challenge: str, team: str) -> dict[str, Any]:
        done = self.client.send_task(START, args=[challenge, team]).get(timeout=90)
        assert done["status"] == "running"
        return dict(done)

    def pools(self) -> dict[str, dict[str, Any]]:
        r = self.api.get("/api/v1/pools", headers=ADMIN)
        assert r.status_code == 200, r.text
        return {row["challenge"]: row for row in r.json()["pools"]}

    def ready(self, challenge: str = "pooled") -> int:
        return int(self.pools().get(challenge, {}).get("ready", 0))

    def unclaimed(self, challenge: str = "pooled") -> list[Any]:
        """The pool containers no team holds (Docker's view)."""
        # containers_of skips any removed while it lists them (a drain or a refill at work)
        return [c for c in containers_of(self.docker, self.label,
                                         **{"ctf.challenge": challenge})
                if c.name.startswith("ctfpool-")]

    def full(self, size: int = SIZE) -> list[str]:
        """Wait until the pool has ``size`` ready containers; return their ids."""
        wait_for(lambda: self.ready() == size and len(self.unclaimed()) == size, 90, 0.2,
                 f"the pool to hold {size} ready containers")
        return sorted(c.id for c in self.unclaimed())

    def flag_ok(self, team: str, flag: str, name: str | None = None) -> bool:
        body: dict[str, str] = {"flag": flag}
        if name is not None:
            body["name"] = name
        r = self.api.post(f"/api/v1/teams/{team}/flags/pooled", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        return bool(r.json()["correct"])


@contextlib.contextmanager
def running_setup(
    server: RedisServer, catalog: Path, workdir: Path, client: docker.DockerClient,
    label: dict[str, str] = LABEL, defaults: tuple[str, ...] = (), **env_overrides: str,
) -> Iterator[Setup]:
    """A worker, a platform client and the API on ``server``; stopped, cleaned afterwards.

    ``defaults`` names settings left at the product's default (the test environment's
    value removed).
    """
    env = {
        **base_env(server, catalog, workdir / "data"),
        "CTF_EXTRA_LABELS": json.dumps(label),
        "CTF_TEAM_SUBNET_POOL": POOL,
        **env_overrides,
    }
    for name in defaults:
        env.pop(name, None)
    redis.Redis.from_url(env["CTF_REDIS_URL"]).flushdb()
    try:
        with worker_and_api(env, catalog, workdir) as (worker, platform, api):
            yield Setup(worker, platform, api, env, client, label)
    finally:
        cleanup_docker(client, label)


@pytest.fixture(scope="module")
def pool_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-pool"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pool_catalog(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test catalog plus ``pooled`` (pool: 3)."""
    path = tmp_path_factory.mktemp("pool") / "challenges.yaml"
    path.write_text(catalog_yaml(images) + POOLED.format(image=images["http"], size=SIZE))
    return path


@pytest.fixture(scope="module")
def sleepy_catalog(pool_catalog: Path, images: dict[str, str]) -> Path:
    """``pool_catalog`` plus ``sleepy`` (pool: 2, never ready)."""
    path = pool_catalog.with_name("sleepy.yaml")
    path.write_text(pool_catalog.read_text() + SLEEPY.format(image=images["http"]))
    return path


@pytest.fixture(scope="module")
def setup(
    pool_redis: RedisServer, sleepy_catalog: Path, docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    with running_setup(pool_redis, sleepy_catalog, tmp_path_factory.mktemp("pool-worker"),
                       docker_client) as made:
        yield made


@contextlib.contextmanager
def firewalled(
    setup: Setup, server: RedisServer, catalog: Path, client: docker.DockerClient,
    workdir: Path, subnets: str, purpose: str,
) -> Iterator[Setup]:
    """The module's worker swapped for one with the egress firewall on (the default).

    The firewall's table is machine-wide kernel state: each test that turns it on has a
    subnet pool (so a table) of its own, deleted afterwards.
    """
    setup.worker.stop()  # one worker of this module at a time (same Redis)
    cleanup_docker(client, LABEL)
    try:
        with running_setup(server, catalog, workdir, client, label=private_label(purpose),
                           defaults=("CTF_EGRESS_FIREWALL",),
                           CTF_TEAM_SUBNET_POOL=subnets) as guarded:
            yield guarded
    finally:
        nft("delete", "table", "inet", table_name(ipaddress.IPv4Network(subnets)))
        setup.worker.start()


def _team() -> str:
    return f"pl{uuid.uuid4().hex[:8]}"


def _networks(c: Any) -> set[str]:
    c.reload()
    return set(c.attrs["NetworkSettings"]["Networks"])


def _reach(from_container: Any, ip: str) -> bool:
    """Whether ``from_container`` gets an HTTP answer from ``ip``:8080."""
    code, out = from_container.exec_run(
        ["/bin/busybox", "sh", "-c",
         f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 2 {ip} 8080"])
    return code == 0 and b"200 OK" in out


def _ip(c: Any) -> str:
    c.reload()
    return str(next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"])


def test_start_claims_a_ready_pool_container_that_looks_like_a_cold_start(setup: Setup) -> None:
    """A start takes a ready pool container: its own name, its own network, url, fresh expiry."""
    ready = setup.full()
    team = _team()
    before = datetime.now().astimezone()
    inst = setup.start("pooled", team)
    assert inst["container_id"] in ready
    assert inst["container_name"] == f"ctf-pooled-{team}"
    started = datetime.fromisoformat(inst["started_at"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(inst["expires_at"].replace("Z", "+00:00"))
    assert started >= before.replace(microsecond=0) - timedelta(seconds=1)
    assert expires - started == timedelta(seconds=600)
    c = setup.docker.containers.get(inst["container_id"])
    assert c.name == f"ctf-pooled-{team}"
    # the network it booted on, its own (issue 27: a claim makes no network call)
    assert _networks(c) == {f"ctfpool-pooled-{c.labels['ctf.pool']}"}
    port = inst["ports"]["8080/tcp"]
    assert inst["url"] == f"http://localhost:{port}"
    with urllib.request.urlopen(inst["url"], timeout=5) as answer:
        assert answer.read() == b"hello from ctf\n"
    row = setup.pools()["pooled"]
    assert row["claims"] >= 1
    setup.client.send_task(STOP, args=["pooled", team]).get(timeout=60)


def test_pool_refills_after_claims(setup: Setup) -> None:
    """Claimed containers are replaced in the background until the pool is full again."""
    first = set(setup.full())
    teams = [_team() for _ in range(2)]
    claimed = {setup.start("pooled", t)["container_id"] for t in teams}
    assert claimed <= first
    again = set(setup.full())
    assert len(again - first) == 2
    for t in teams:
        setup.client.send_task(STOP, args=["pooled", t]).get(timeout=60)


def test_a_claim_that_died_half_way_is_removed_not_offered(setup: Setup) -> None:
    """A pool container found on a team network yet unclaimed (Redis lost the claim) goes."""
    setup.full()
    team = _team()
    setup.start("web", team)
    victim = setup.unclaimed()[0]
    slot = victim.labels["ctf.pool"]
    state = redis.Redis.from_url(setup.env["CTF_REDIS_URL"], decode_responses=True)
    state.srem("ctf:pool:ready:local:pooled", slot)
    setup.docker.networks.get(f"ctf-team-{team}").connect(victim)
    wait_for(lambda: victim.id not in {c.id for c in setup.unclaimed()}, 30, 0.2,
             "the half-claimed container to be removed")
    assert setup.docker.containers.list(
            ignore_removed=True, all=True, filters={"id": victim.id}) == []
    setup.full()
    setup.client.send_task(STOP, args=["web", team]).get(timeout=60)


def test_flags_of_a_claimed_container_are_the_claiming_teams_only(setup: Setup) -> None:
    """The flag a pool container booted with is accepted for its claimer, no other team."""
    setup.full()
    team, rival = _team(), _team()
    inst = setup.start("pooled", team)
    c = setup.docker.containers.get(inst["container_id"])
    env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
    booted = env["FLAG"]
    assert setup.flag_ok(team, booted)
    assert not setup.flag_ok(rival, booted)
    assert not setup.flag_ok(team, "CTF{not-the-flag}")
    # Juice Shop style in-app flags (CTF_KEY): keyed by what the container booted with
    assert setup.flag_ok(team, in_app_flag(booted, "Score Board"), name="Score Board")
    assert not setup.flag_ok(rival, in_app_flag(booted, "Score Board"), name="Score Board")
    # the team's own (cold) flag stays valid; the rival's is still only the rival's
    secret = (Path(setup.env["CTF_DATA_DIR"]) / "flag_secret").read_text().strip()
    assert setup.flag_ok(team, team_flag(secret, "pooled", team))
    assert not setup.flag_ok(team, team_flag(secret, "pooled", rival))
    # after the instance is gone the team keeps the flag it earned
    setup.client.send_task(STOP, args=["pooled", team]).get(timeout=60)
    assert setup.flag_ok(team, booted)


def test_a_pooled_flag_submitted_by_another_team_is_recorded_as_shared(setup: Setup) -> None:
    """A claimed pool container's flag (and in-app flag) from a rival: wrong, flag_shared."""
    setup.full()
    team, rival = _team(), _team()
    inst = setup.start("pooled", team)
    c = setup.docker.containers.get(inst["container_id"])
    booted = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])["FLAG"]
    assert not setup.flag_ok(rival, booted)
    assert not setup.flag_ok(rival, in_app_flag(booted, "Score Board"), name="Score Board")
    r = setup.api.get("/api/v1/flags/shared", params={"team": rival}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert [(e["team_id"], e["owner"], e["challenge"]) for e in r.json()["events"]] == \
        [(rival, team, "pooled")] * 2
    setup.client.send_task(STOP, args=["pooled", team]).get(timeout=60)


def test_twenty_concurrent_starts_of_one_instance_claim_one_container(setup: Setup) -> None:
    """Twenty start tasks of one (challenge, team) at once end with one claimed container."""
    setup.full()
    team = _team()
    results = [setup.client.send_task(START, args=["pooled", team]) for _ in range(20)]
    ids = {r.get(timeout=120)["container_id"] for r in results}
    assert len(ids) == 1
    mine = setup.docker.containers.list(
            ignore_removed=True, all=True, filters={"name": f"ctf-pooled-{team}"})
    assert [c.id for c in mine] == list(ids)
    assert "ctf.pool" in mine[0].labels
    held = redis.Redis.from_url(setup.env["CTF_REDIS_URL"], decode_responses=True).smembers(
        f"ctf:pool:held:pooled/{team}")
    assert held == {mine[0].labels["ctf.pool"]}
    setup.client.send_task(STOP, args=["pooled", team]).get(timeout=60)


def test_teams_starting_at_once_never_claim_the_same_container(setup: Setup) -> None:
    """Teams starting together each get a container of their own (pooled or cold)."""
    setup.full()
    teams = [_team() for _ in range(SIZE + 2)]
    with ThreadPoolExecutor(len(teams)) as pool:
        insts = list(pool.map(lambda t: setup.start("pooled", t), teams))
    ids = [i["container_id"] for i in insts]
    assert len(set(ids)) == len(teams)
    slots = []
    for t, inst in zip(teams, insts, strict=True):
        c = setup.docker.containers.get(inst["container_id"])
        assert c.name == f"ctf-pooled-{t}"
        # pooled: the network it booted on, its own (issue 27); cold: the team's
        assert _networks(c) == ({f"ctfpool-pooled-{c.labels['ctf.pool']}"}
                                if "ctf.pool" in c.labels else {f"ctf-team-{t}"})
        if "ctf.pool" in c.labels:
            slots.append(c.labels["ctf.pool"])
    assert len(slots) == len(set(slots)) >= 1
    for t in teams:
        setup.client.send_task(STOP, args=["pooled", t]).get(timeout=60)


def test_redis_loss_keeps_claimed_and_unclaimed_pool_containers(setup: Setup) -> None:
    """After a Redis flush the claimed one is its team's (same expiry, flag); the pool is intact."""
    setup.full()
    team = _team()
    inst = setup.start("pooled", team)
    c = setup.docker.containers.get(inst["container_id"])
    booted = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])["FLAG"]
    waiting = set(setup.full())
    redis.Redis.from_url(setup.env["CTF_REDIS_URL"]).flushdb()
    setup.client.send_task(RECONCILE).get(timeout=60)
    r = setup.api.get(f"/api/v1/teams/{team}/instances/pooled", headers=ADMIN)
    assert r.status_code == 200, r.text
    back = r.json()
    assert back["container_id"] == inst["container_id"]
    assert back["status"] == "running"
    # No Docker object holds the claim's times (a claim makes no network call, issue 27):
    # it counts from its boot, never later than the claim, as a pooled group does.
    assert back["started_at"] <= inst["started_at"]
    started = datetime.fromisoformat(back["started_at"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(back["expires_at"].replace("Z", "+00:00"))
    assert expires <= started + timedelta(seconds=1800)  # the lifetime ceiling holds
    wait_for(lambda: setup.flag_ok(team, booted), 30, 0.5, "the flag binding to come back")
    wait_for(lambda: setup.ready() == SIZE, 30, 0.2, "the pool to be ready again")
    assert set(setup.full()) == waiting  # the same containers, none replaced
    # a start after the loss still claims, and never the claimed one again
    other = setup.start("pooled", _team())
    assert other["container_id"] in waiting
    setup.client.send_task(STOP, args=["pooled", team]).get(timeout=60)
    setup.client.send_task(STOP, args=["pooled", other["team_id"]]).get(timeout=60)


def test_dead_pool_container_is_replaced_and_drain_empties_the_pool(setup: Setup) -> None:
    """A pool container that dies is replaced; a drain replaces every unclaimed one."""
    first = setup.full()
    setup.docker.containers.get(first[0]).kill()
    wait_for(lambda: first[0] not in {c.id for c in setup.unclaimed()}
             and setup.ready() == SIZE, 90, 0.2, "the dead pool container to be replaced")
    before = set(setup.full())
    r = setup.api.post("/api/v1/pools/pooled/drain", headers=ADMIN)
    assert r.status_code == 200, r.text
    wait_for(lambda: not before & {c.id for c in setup.unclaimed()}, 60, 0.2,
             "the drained containers to go")
    assert not before & set(setup.full())


@pytest.fixture
def tight(
    pool_redis: RedisServer, pool_catalog: Path, docker_client: docker.DockerClient,
    tmp_path: Path, setup: Setup,
) -> Iterator[Setup]:
    """A worker whose service may run 3 instances in all (CTF_MAX_INSTANCES=3)."""
    setup.worker.stop()  # one worker of this module at a time (same Redis)
    cleanup_docker(docker_client, LABEL)
    try:
        with running_setup(pool_redis, pool_catalog, tmp_path, docker_client,
                           CTF_MAX_INSTANCES="3") as made:
            yield made
    finally:
        setup.worker.start()


def test_pool_gives_way_under_capacity_pressure(tight: Setup) -> None:
    """With room for 3, the pool shrinks for cold starts; only a 4th instance is refused."""
    tight.full()  # 3 pool containers: the whole capacity
    teams = [_team() for _ in range(3)]
    for t in teams:
        tight.start("web", t)  # cold: each one takes a pool container's place
    assert tight.unclaimed() == []
    refused = tight.client.send_task(START, args=["web", _team()])
    with pytest.raises(Exception, match="CTF_MAX_INSTANCES") as info:
        refused.get(timeout=60)
    assert type(info.value).__name__ == "CapacityExhausted"
    tight.client.send_task(STOP, args=["web", teams[0]]).get(timeout=60)
    wait_for(lambda: tight.ready() == 1, 60, 0.2, "the pool to refill into the freed room")
    for t in teams[1:]:
        tight.client.send_task(STOP, args=["web", t]).get(timeout=60)


@NEEDS_FIREWALL
def test_booting_pool_containers_are_behind_the_egress_firewall(
    setup: Setup, pool_redis: RedisServer, sleepy_catalog: Path,
    docker_client: docker.DockerClient, tmp_path: Path,
) -> None:
    """Without the firewall a booting pool container reaches the host; with it (default), not."""
    def booting(s: Setup) -> Any:
        found = wait_for(lambda: [c for c in s.unclaimed("sleepy") if _networks(c)], 60, 0.2,
                         "a booting pool container")
        return found[0]

    with listener("pool-host") as port:
        plain = booting(setup)  # CTF_EGRESS_FIREWALL=off: the control
        assert reaches(plain, gateway_of(plain), port, "pool-host")
        with firewalled(setup, pool_redis, sleepy_catalog, docker_client, tmp_path,
                        FIREWALL_POOL, "pool-fw") as guarded:
            sleeper = booting(guarded)
            assert sleeper.attrs["NetworkSettings"]["Networks"]
            assert not reaches(sleeper, gateway_of(sleeper), port, "pool-host")
            guarded.full()
            inst = guarded.start("pooled", _team())  # claimed under the firewall
            claimed = guarded.docker.containers.get(inst["container_id"])
            assert "ctf.pool" in claimed.labels
            assert not reaches(claimed, gateway_of(claimed), port, "pool-host")


# Last in the module with the firewall test: swapping the module's worker for a guarded one
# flushes the module's Redis, which the tests above share.
@pytest.fixture
def guarded(
    setup: Setup, pool_redis: RedisServer, sleepy_catalog: Path,
    docker_client: docker.DockerClient, tmp_path: Path,
) -> Iterator[Setup]:
    """The module's stack with the egress firewall on, on a subnet pool of its own."""
    with firewalled(setup, pool_redis, sleepy_catalog, docker_client, tmp_path,
                    ISOLATION_POOL, "pool-isolation") as made:
        yield made


# Team isolation is the egress firewall's (on by default): with it off only Docker's own
# FORWARD chains separate team networks, and Docker 20.10 deletes and re-inserts their jump
# to DOCKER-ISOLATION-STAGE-1 whenever any network is created on the engine, so for that
# moment (seconds, under iptables contention) containers of two bridges reach each other.
@NEEDS_FIREWALL
def test_isolation_before_and_after_the_claim(guarded: Setup) -> None:
    """Unclaimed and claimed: on its own network only; no other team's reach, nor it theirs."""
    setup = guarded
    setup.full()
    waiting = setup.unclaimed()
    for c in waiting:
        assert _networks(c) == {f"ctfpool-pooled-{c.labels['ctf.pool']}"}
        assert "ctf.team" not in c.labels
    team_a, team_b = _team(), _team()
    a = setup.docker.containers.get(setup.start("pooled", team_a)["container_id"])
    b = setup.docker.containers.get(setup.start("web", team_b)["container_id"])  # a cold one
    other = setup.docker.containers.get(setup.start("pooled", team_b)["container_id"])
    # the network each booted on, which it keeps (issue 27: no network call at the claim)
    assert _networks(a) == {f"ctfpool-pooled-{a.labels['ctf.pool']}"}
    assert _networks(other) == {f"ctfpool-pooled-{other.labels['ctf.pool']}"}
    assert not setup.docker.networks.list(names=[f"ctf-team-{team_a}"])
    # one network per pooled instance (SPEC §4, §12): team B's cold and pooled instances
    # do not share one; team A never reaches B's (nor B A's)
    assert not _reach(b, _ip(other))
    assert not _reach(b, _ip(a))
    assert not _reach(a, _ip(other))
    assert not _reach(a, _ip(b)), (_ip(a), _ip(b), a.attrs["NetworkSettings"]["Networks"],
                                   b.attrs["NetworkSettings"]["Networks"])
    # a container still waiting in the pool is on its own network, reached by no team
    setup.full()
    for waiting_one in setup.unclaimed():
        assert _networks(waiting_one) == {f"ctfpool-pooled-{waiting_one.labels['ctf.pool']}"}
        assert not _reach(a, _ip(waiting_one)) and not _reach(b, _ip(waiting_one))
        assert not _reach(waiting_one, _ip(a)) and not _reach(waiting_one, _ip(b))
    for t, ch in ((team_a, "pooled"), (team_b, "pooled"), (team_b, "web")):
        setup.client.send_task(STOP, args=[ch, t]).get(timeout=60)


@NEEDS_FIREWALL
def test_booting_pool_containers_reach_no_one_and_no_one_reaches_them(guarded: Setup) -> None:
    """Each on its own network: not one another, no team, and no team reaches them."""
    setup = guarded
    sleepers = wait_for(lambda: (found := setup.unclaimed("sleepy")) and len(found) == 2
                        and all(_networks(c) for c in found) and found, 60, 0.2,
                        "two booting pool containers")
    first, second = sleepers
    for one in (first, second):
        assert _networks(one) == {f"ctfpool-sleepy-{one.labels['ctf.pool']}"}
    team = _team()
    cold = setup.docker.containers.get(setup.start("web", team)["container_id"])

    def serves(ip: str) -> bool:  # from the host, as the readiness probe reaches it
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://{ip}:9000/", timeout=2) as answer:
            return bool(answer.status == 200)
        return False

    assert serves(_ip(first)) and serves(_ip(second))  # they do listen
    def reach9000(src: Any, ip: str) -> bool:
        code, out = src.exec_run(["/bin/busybox", "sh", "-c",
                                  f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
                                  f"/bin/busybox nc -w 2 {ip} 9000"])
        return code == 0 and b"200 OK" in out

    assert not reach9000(first, _ip(second))
    assert not reach9000(cold, _ip(first))
    assert not _reach(first, _ip(cold))
    setup.client.send_task(STOP, args=["web", team]).get(timeout=60)
