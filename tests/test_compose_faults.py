"""A worker killed -9 while a Compose instance (SPEC §12) starts leaves no half group.

A real worker process, started as ``./run-celery-worker.sh`` starts one, with the janitor's
interval and orphan grace a user gets, takes a start by name of a three-service challenge whose
database takes a few seconds to be healthy; it is killed -9 once the database's container
exists and before the web's does (between services). The worker is started again: the start
comes back to it (SPEC §10), the half group of the killed one is removed and a whole group is
made, never patched up; the janitor's passes leave it whole; a stop leaves nothing of it and a
new start of the same team succeeds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from celery import Celery
from conftest import (
    RedisServer,
    Worker,
    base_env,
    cleanup_docker,
    close_platform_client,
    default_setting,
    janitor_pass,
    platform_client,
    private_label,
    run_config,
    wait_for,
)
from test_compose_docker import SHOP, shop_images  # noqa: F401  # a module fixture

from celery_app.vocab.models import utcnow
from celery_app.worker.context import build_context

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

LABEL = private_label("compose-faults")
POOL = "10.247.128.0/17"  # this file's instance networks (test_compose_teams has the other half)
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
# SPEC §10: a killed worker's requests are done within a minute of a worker for its host
# being back, with default settings.
PROMISED_DELAY = 60.0
# The database is healthy only this long after it starts: the window the kill falls in.
DB_DELAY = 6


@pytest.fixture(scope="module")
def slow_catalog(shop_images: dict[str, str],  # noqa: F811
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slowshop``: the shipped shop whose database answers (so is healthy) after a delay."""
    folder = tmp_path_factory.mktemp("compose-faults")
    text = (SHOP / "compose.yaml").read_text()
    for service, tag in shop_images.items():
        text = text.replace(f"ctf-example/shop-{service}:1", tag)
    slow_db = (f"    entrypoint: [\"/bin/busybox\", \"sh\", \"-c\", "
               f"\"/bin/busybox sleep {DB_DELAY}; exec /bin/busybox sh /serve\"]\n")
    text = text.replace("    expose: [\"5432\"]\n", slow_db + "    expose: [\"5432\"]\n")
    assert "sleep" in text
    (folder / "compose.yaml").write_text(text)
    path = folder / "challenges.yaml"
    path.write_text("challenges:\n  slowshop:\n    compose: compose.yaml\n"
                    "    start_timeout: 90\n")
    return path


Killable = tuple[Worker, Celery, RedisServer, Path]


@pytest.fixture
def killable(slow_catalog: Path, docker_client: docker.DockerClient,
             tmp_path: Path) -> Iterator[Killable]:
    """A worker on a Redis of its own (so it can be killed without harm), and a platform."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    env = {
        **base_env(server, slow_catalog, tmp_path / "data"),
        "CTF_EXTRA_LABELS": json.dumps(LABEL),
        "CTF_TEAM_SUBNET_POOL": POOL,
        # What a user gets (the suite's are 1 s and 2 s): the promise must not lean on a
        # janitor that sweeps half-made containers within seconds.
        "CTF_JANITOR_INTERVAL": default_setting("janitor_interval"),
        "CTF_ORPHAN_GRACE": default_setting("orphan_grace"),
    }
    worker = Worker(env, tmp_path / "worker.log")
    client = platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    try:
        yield worker, client, server, tmp_path / "data"
    finally:
        worker.stop()
        close_platform_client(client)
        cleanup_docker(docker_client, LABEL)
        server.stop()


def _group(docker_client: docker.DockerClient, team: str) -> dict[str, Any]:
    """The team's slowshop containers, by service."""
    labels = {**LABEL, "ctf.team": team, "ctf.challenge": "slowshop"}
    found = docker_client.containers.list(ignore_removed=True,
        all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})
    return {c.labels["ctf.service"]: c for c in found}


def _network(docker_client: docker.DockerClient, team: str) -> list[Any]:
    return docker_client.networks.list(names=[f"ctf-inst-slowshop.{team}"])


def test_a_worker_killed_between_services_leaves_no_half_group(
    killable: Killable, slow_catalog: Path, docker_client: docker.DockerClient,
) -> None:
    """Kill -9 after db, before web: back, the start makes a whole group; stop leaves nothing."""
    worker, client, server, data_dir = killable
    team = "kf1"
    worker.start()
    pending = client.send_task(START, args=["slowshop", team])
    # Between services: the database's container exists (not healthy yet), the web's not.
    half = wait_for(lambda: (g := _group(docker_client, team)) and set(g) == {"db"} and g,
                    90, 0.02, "the database's container, before the web's")
    worker.kill()
    first_db = half["db"].id
    assert set(_group(docker_client, team)) == {"db"}, "the kill came after the web started"

    worker.start()
    # The start comes back to the worker and makes the group whole: the killed one's half is
    # removed (not patched up), and all three services are of one start.
    result = pending.get(timeout=PROMISED_DELAY)
    assert result["status"] == "running", result
    group = _group(docker_client, team)
    assert set(group) == {"web", "db", "bot"}
    assert group["db"].id != first_db, "the killed start's database was kept"
    assert len({c.labels["ctf.started_at"] for c in group.values()}) == 1
    assert all(c.status == "running" for c in group.values())
    assert len(_network(docker_client, team)) == 1

    # A janitor pass with default settings, judged past the orphan grace of every container
    # made, keeps the whole group (and finds nothing of the killed start to remove).
    settings = run_config(server, slow_catalog, data_dir).settings(
        extra_labels=LABEL, team_subnet_pool=POOL,
        orphan_grace=float(default_setting("orphan_grace")),
        janitor_interval=float(default_setting("janitor_interval")))
    ctx = build_context(settings)
    try:
        later = utcnow() + timedelta(seconds=settings.orphan_grace + 1)
        summary = janitor_pass(ctx, later)
    finally:
        ctx.driver.close()
        ctx.store.close()
    assert not summary.errors, summary
    assert {c.id for c in _group(docker_client, team).values()} == {
        c.id for c in group.values()}

    assert client.send_task(STOP, args=["slowshop", team]).get(timeout=60)["status"] \
        == "stopped"
    assert _group(docker_client, team) == {} and _network(docker_client, team) == []
    again = client.send_task(START, args=["slowshop", team]).get(timeout=120)
    assert again["status"] == "running", again
    assert set(_group(docker_client, team)) == {"web", "db", "bot"}


def test_a_half_group_whose_start_is_lost_with_redis_is_removed_by_the_janitor(
    killable: Killable, slow_catalog: Path, docker_client: docker.DockerClient,
) -> None:
    """Kill -9 between services and Redis lost: the janitor's pass removes the half group."""
    worker, client, server, data_dir = killable
    team = "kf2"
    worker.start()
    client.send_task(START, args=["slowshop", team])
    wait_for(lambda: set(_group(docker_client, team)) == {"db"}, 90, 0.02,
             "the database's container, before the web's")
    worker.kill()
    assert set(_group(docker_client, team)) == {"db"}, "the kill came after the web started"
    # Redis restarted empty (no persistence): the start's message and its record are gone,
    # so no start comes back to finish the group.
    for db in range(3):
        redis.Redis.from_url(f"{server.url}/{db}").flushdb()
    worker.start()

    # A janitor pass with default settings, judged past the orphan grace: the half group
    # goes whole, its network too.
    settings = run_config(server, slow_catalog, data_dir).settings(
        extra_labels=LABEL, team_subnet_pool=POOL,
        orphan_grace=float(default_setting("orphan_grace")),
        janitor_interval=float(default_setting("janitor_interval")))
    ctx = build_context(settings)
    try:
        later = utcnow() + timedelta(seconds=settings.orphan_grace + 1)
        janitor_pass(ctx, later)
    finally:
        ctx.driver.close()
        ctx.store.close()
    assert _group(docker_client, team) == {} and _network(docker_client, team) == []

    again = client.send_task(START, args=["slowshop", team]).get(timeout=120)
    assert again["status"] == "running", again
    assert set(_group(docker_client, team)) == {"web", "db", "bot"}
