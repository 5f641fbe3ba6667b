"""An event's opening with warm pools (issue 27), on the real engine.

A real worker (its beat runs the janitor and the pool pass) on a Redis of its own, with a
``pooled`` challenge (``pool: 2``); starts sent by name through a plain Celery client, pools
read through the HTTP API and ``/metrics``, ``ctfctl`` run as an organiser's shell runs it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import redis
from api_helpers import ADMIN
from conftest import RedisServer, catalog_yaml, private_label, wait_for
from test_pool import STOP, Setup, running_setup
from typer.testing import CliRunner

from celery_app.cli import app
from celery_app.state.pool_keys import PoolKeys

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

POOL = "10.204.0.0/16"  # this file's subnets, away from every other file's
LABEL = private_label("opening")
SIZE = 2
POOLED = """
  pooled:
    image: {image}
    port: 8080
    ttl: 15
    max_lifetime: 1800
    flag_env: FLAG
    start_timeout: 20
    pool: {size}
"""
runner = CliRunner()


@pytest.fixture(scope="module")
def opening(
    docker_client: docker.DockerClient, images: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    """A worker, a platform client and the API, on a Redis of their own."""
    work = tmp_path_factory.mktemp("opening")
    catalog = work / "challenges.yaml"
    catalog.write_text(catalog_yaml(images) + POOLED.format(image=images["http"], size=SIZE))
    server = RedisServer(tmp_path_factory.mktemp("redis-opening"))
    server.start()
    try:
        with running_setup(server, catalog, work, docker_client, label=LABEL,
                           CTF_TEAM_SUBNET_POOL=POOL) as made:
            yield made
    finally:
        server.stop()


def _keys(setup: Setup) -> PoolKeys:
    return PoolKeys(redis.Redis.from_url(setup.env["CTF_REDIS_URL"], decode_responses=True))


def _ready_slots(setup: Setup) -> set[str]:
    keys = _keys(setup)
    return {slot for key in keys.redis.scan_iter(f"{keys.ready_key('*', 'pooled')}")
            for slot in keys.redis.smembers(key)}


def _gauge(setup: Setup) -> float:
    """``ctf_pool_ready`` of ``pooled`` as Prometheus reads it."""
    r = setup.api.get("/metrics", headers=ADMIN)
    assert r.status_code == 200, r.text
    found = re.search(r'^ctf_pool_ready\{[^}]*challenge="pooled"[^}]*\} (\S+)$', r.text,
                      re.MULTILINE)
    assert found, "ctf_pool_ready of pooled is exported"
    return float(found.group(1))


def ctfctl(setup: Setup, *args: str) -> Any:
    """Run ``ctfctl`` in-process with the worker's environment (an organiser's shell)."""
    return runner.invoke(app, list(args), env=setup.env)


def test_ready_containers_removed_while_no_worker_ran_leave_the_ready_gauge(
    opening: Setup,
) -> None:
    """``docker rm`` of a ready pool container with no worker: the next pass stops counting it."""
    opening.full(SIZE)
    opening.worker.stop()
    try:
        gone = opening.unclaimed()[0]
        slot = gone.labels["ctf.pool"]
        gone.remove(force=True)
        assert slot in _ready_slots(opening)  # Redis still offers it: nothing saw it go
    finally:
        opening.worker.start()
    wait_for(lambda: slot not in _ready_slots(opening), 60, 0.2,
             "the pass to drop the removed container's slot")
    alive = {c.labels["ctf.pool"] for c in opening.unclaimed()}
    assert _ready_slots(opening) <= alive  # only containers that exist are offered
    opening.full(SIZE)  # and the pool refills
    # the gauge (collected at most every few seconds) counts the containers that exist
    wait_for(lambda: _gauge(opening) == SIZE, 30, 0.5, "ctf_pool_ready to count the refill")
    assert slot not in _ready_slots(opening)


def test_pool_warm_brings_the_pool_to_n_then_reset_to_the_catalogs(opening: Setup) -> None:
    """``ctfctl pool warm pooled 4`` waits until 4 are ready; a start claims; --reset shrinks."""
    opening.full(SIZE)
    done = ctfctl(opening, "pool", "warm", "pooled", "4", "--timeout", "120", "--json")
    assert done.exit_code == 0, done.output
    answer = json.loads(done.output)
    assert answer["size"] == 4 and answer["warmed"] is True
    assert all(n >= 4 for n in answer["ready"].values())
    row = opening.pools()["pooled"]
    assert row["size"] == 4 and row["warmed"] is True and row["ready"] == 4
    team = "warm1"
    inst = opening.start("pooled", team)
    assert "ctf.pool" in opening.docker.containers.get(inst["container_id"]).labels
    opening.full(4)  # refilled to the warmed size
    done = ctfctl(opening, "pool", "warm", "pooled", "--reset", "--no-wait")
    assert done.exit_code == 0, done.output
    wait_for(lambda: len(opening.unclaimed()) == SIZE and opening.ready() == SIZE, 60, 0.2,
             "the pool to shrink back to the catalog's size")
    assert opening.pools()["pooled"]["warmed"] is False
    opening.client.send_task(STOP, args=["pooled", team]).get(timeout=60)
    bad = ctfctl(opening, "pool", "warm", "pooled")
    assert bad.exit_code == 2 and "SIZE" in bad.output


def test_a_claimed_instance_is_found_by_team_everywhere(opening: Setup) -> None:
    """A claimed container (no ctf.team label) is its team's in the API, ctfctl and at expiry."""
    opening.full(SIZE)
    team = "found1"
    inst = opening.start("pooled", team)
    c = opening.docker.containers.get(inst["container_id"])
    assert "ctf.team" not in c.labels and c.name == f"ctf-pooled-{team}"
    listed = opening.api.get(f"/api/v1/teams/{team}/instances", headers=ADMIN)
    assert listed.status_code == 200, listed.text
    assert [i["container_id"] for i in listed.json()["instances"]] == [inst["container_id"]]
    every = opening.api.get("/api/v1/instances", params={"challenge": "pooled"}, headers=ADMIN)
    assert every.status_code == 200, every.text
    assert {i["team_id"]: i["container_id"] for i in every.json()["instances"]}.get(team) \
        == inst["container_id"]
    shown = ctfctl(opening, "status", "--team", team, "--json")
    assert shown.exit_code == 0, shown.output
    assert inst["container_id"] in shown.output
    # After a Redis loss, reconcile reads the team from the name and lists it again.
    redis.Redis.from_url(opening.env["CTF_REDIS_URL"]).flushdb()
    opening.client.send_task("celery_app.tasks.reconcile").get(timeout=60)
    again = opening.api.get(f"/api/v1/teams/{team}/instances", headers=ADMIN)
    assert [i["container_id"] for i in again.json()["instances"]] == [inst["container_id"]]
    # The janitor expires it as its team's instance (ttl 15 s): the container goes.
    wait_for(lambda: not [x for x in opening.docker.containers.list(ignore_removed=True,
        all=True, filters={"name": f"ctf-pooled-{team}"}) if x.id == c.id], 60, 0.5,
        "the janitor to expire the claimed instance")
    # The record goes last (after the slot network), so it may still read "stopping" here.
    wait_for(lambda: opening.api.get(f"/api/v1/teams/{team}/instances",
                                     headers=ADMIN).json()["instances"] == [], 60, 0.2,
             "the expired instance to leave the team's listing")


def test_a_teams_first_claim_makes_no_network_call(opening: Setup) -> None:
    """By the engine's own events, a first start by name claims with one rename, no network."""
    opening.full(SIZE)
    team, rival = "first1", "rival1"
    began = time.time()
    inst = opening.start("pooled", team)
    until = int(time.time()) + 1
    c = opening.docker.containers.get(inst["container_id"])
    slot = c.labels["ctf.pool"]
    assert c.name == f"ctf-pooled-{team}" and set(c.attrs["NetworkSettings"]["Networks"]) == {
        f"ctfpool-pooled-{slot}"}
    seen = [e for e in opening.docker.api.events(since=int(began) - 1, until=until,
                                                 decode=True)
            if e["timeNano"] >= began * 1e9]
    # the claimed container: renamed, nothing else; no network made, connected or cut
    assert [e["Action"] for e in seen if e.get("Type") == "container"
            and e["Actor"]["ID"] == c.id] == ["rename"]
    # (the refill may boot the next slot meanwhile, on its own network: not the claim's path)
    ours = {c.id, f"ctf-team-{team}", f"ctfpool-pooled-{slot}"}
    assert [e for e in seen if e.get("Type") == "network"
            and ours & {e["Actor"]["Attributes"].get("container"),
                        e["Actor"]["Attributes"].get("name")}] == []
    assert not opening.docker.networks.list(names=[f"ctf-team-{team}"])
    # its flag is the slot's, bound to the team at the claim: the team's, no other's
    booted = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])["FLAG"]
    assert opening.flag_ok(team, booted) and not opening.flag_ok(rival, booted)
    opening.client.send_task(STOP, args=["pooled", team]).get(timeout=60)
    # the stop removes the instance's network with it
    assert not opening.docker.networks.list(names=[f"ctfpool-pooled-{slot}"])
