"""A writable instance's disk is bounded on every engine; ``user:`` runs its process as that user.

A real worker with the default janitor interval (5 s) on Redis databases of its own, driven by
name as a platform would drive it, on the real Docker engine (whatever its storage driver:
the bound is the janitor's measure of each writable layer, not ``storage_opt``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from conftest import ADMIN_TOKEN, cleanup_docker, private_label

from celery_app.settings import Settings
from ctf_testkit.env import RunConfig
from ctf_testkit.support import (
    RedisServer,
    close_platform_client,
    platform_client,
    wait_for,
)
from ctf_testkit.worker import Worker

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("disk")
POOL = "10.229.0.0/16"  # a team-subnet pool of its own
DBS = (13, 14, 15)
# Serve at once, then write ``{count}`` MiB to the root filesystem two seconds later.
WRITER = ('["sh", "-c", "/bin/busybox httpd -p 8080 -h /www && /bin/busybox sleep 2 && '
          '/bin/busybox dd if=/dev/zero of=/fill bs=1M count={count} && '
          'exec /bin/busybox sleep 3600"]')


def disk_catalog(images: dict[str, str]) -> str:
    """Two writable challenges bounded to 64m (one writes 200 MiB, one 8) and one as uid 1234."""
    return f"""
challenges:
  filler:
    image: {images['http']}
    port: 8080
    read_only: false
    disk: 64m
    command: {WRITER.format(count=200)}
  modest:
    image: {images['http']}
    port: 8080
    read_only: false
    disk: 64m
    command: {WRITER.format(count=8)}
  asuser:
    image: {images['http']}
    port: 8080
    user: "1234:1234"
"""


@pytest.fixture(scope="module")
def named(
    redis_server: RedisServer, images: dict[str, str], docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    """A platform's Celery client of a worker with default settings (janitor every 5 s)."""
    workdir = tmp_path_factory.mktemp("disk")
    catalog = workdir / "challenges.yaml"
    catalog.write_text(disk_catalog(images))
    run = RunConfig(redis_server.url, catalog, workdir / "data", LABEL, POOL,
                    {"egress_firewall": "off"}, dbs=DBS)
    env = run.env(admin_token=ADMIN_TOKEN)
    assert "CTF_JANITOR_INTERVAL" not in env  # the default interval is what is promised
    for db in DBS:
        redis.Redis.from_url(f"{redis_server.url}/{db}").flushdb()
    worker = Worker(env, workdir / "worker.log")
    worker.start()
    client = platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    try:
        yield client
    finally:
        close_platform_client(client)
        worker.stop()
        cleanup_docker(docker_client, LABEL)
        for db in DBS:
            redis.Redis.from_url(f"{redis_server.url}/{db}").flushdb()


def call(client: Any, task: str, *args: str, **kwargs: str) -> Any:
    """Send ``celery_app.tasks.<task>`` by name and wait for its answer."""
    return client.send_task(f"celery_app.tasks.{task}", args=list(args),
                            kwargs=kwargs).get(timeout=120)


def status(client: Any, challenge: str, team: str) -> dict[str, Any]:
    """The instance as get_container_status answers it."""
    (inst,) = call(client, "get_container_status", team_id=team, challenge=challenge)["instances"]
    return dict(inst)


def test_an_instance_writing_past_its_disk_bound_is_stopped_and_others_are_not(
    named: Any, docker_client: docker.DockerClient
) -> None:
    """200 MiB written under a 64m bound: failed within 20 s; the others keep running."""
    interval = Settings.model_fields["janitor_interval"].default
    assert interval == 5.0
    filler = call(named, "start_container", "filler", "disk-a")
    began = time.monotonic()
    modest = call(named, "start_container", "modest", "disk-b")
    assert filler["status"] == modest["status"] == "running"
    # It starts writing 2 s after it runs; the janitor measures every 5 s: stopped within
    # 2 s + the write + one interval + the pass's own time.
    failed = wait_for(lambda: (s := status(named, "filler", "disk-a"))["status"] == "failed"
                      and s, 30, 0.2, "the instance over its disk bound to be stopped")
    took = time.monotonic() - began
    print(f"\nDISK an instance over its 64m bound stopped {took:.1f} s after it ran")
    assert took <= 20, f"stopped only after {took:.1f} s"
    assert "over its bound of 64 MiB" in failed["error"]
    assert "disk" in failed["error"]
    container = docker_client.containers.get(filler["container_name"])
    assert container.status == "exited"  # stopped: its layer no longer grows
    # The other writable instance, under its bound, is untouched.
    time.sleep(interval + 1)  # one more janitor pass (what is asserted is that nothing moved)
    assert status(named, "modest", "disk-b")["status"] == "running"
    assert docker_client.containers.get(modest["container_name"]).status == "running"
    # Its team starts it again: a fresh container, running.
    again = call(named, "start_container", "filler", "disk-a")
    assert again["status"] == "running"
    assert again["container_id"] != filler["container_id"]


def test_catalog_user_runs_the_process_as_that_uid(
    named: Any, docker_client: docker.DockerClient
) -> None:
    """``user: "1234:1234"``: the instance's process runs with uid and gid 1234."""
    inst = call(named, "start_container", "asuser", "disk-c")
    assert inst["status"] == "running"
    container = docker_client.containers.get(inst["container_name"])
    assert container.attrs["Config"]["User"] == "1234:1234"
    pid = container.attrs["State"]["Pid"]
    ids = {line.split(":")[0]: line.split()[1:3]
           for line in Path(f"/proc/{pid}/status").read_text().splitlines()
           if line.startswith(("Uid:", "Gid:"))}
    assert ids == {"Uid": ["1234", "1234"], "Gid": ["1234", "1234"]}
