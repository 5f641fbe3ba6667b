"""A Compose challenge (SPEC §12) on the real engine, started as a platform does: by name.

The shipped example (``examples/shop``: web shop, database, admin bot), its images built from
its folder for this run, is a catalog entry beside the test catalog; a real worker serves it.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from conftest import (
    ROOT,
    RUN_ID,
    RedisServer,
    base_env,
    build_image,
    catalog_yaml,
    cleanup_docker,
    private_label,
    wait_for,
    worker_and_api,
)
from test_group_docker import _files

from celery_app.core.flags import team_flag
from celery_app.settings import load_settings

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("compose")
POOL = "10.249.0.0/16"  # this file's team and instance networks, away from every other file's
SHOP = ROOT / "examples" / "shop"
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
STATUS = "celery_app.tasks.get_container_status"
ABSENT = "127.0.0.1:9/ctf-test/absent:1"  # port 9 ("discard"): no registry answers there
BROKEN_CHECK = """["CMD", "/bin/busybox", "false"]"""


@dataclass
class Setup:
    """The running worker, a platform's Celery client, the API and the flag secret."""

    platform: Any
    api: Any
    secret: str
    docker: docker.DockerClient
    redis_url: str

    def start(self, challenge: str, team: str) -> dict[str, Any]:
        """Send start_container by name, as a platform does; return its result."""
        result: dict[str, Any] = self.platform.send_task(START, args=[challenge, team]).get(
            timeout=180)
        return result

    def stop(self, challenge: str, team: str) -> dict[str, Any]:
        """Send stop_container by name; return its result."""
        result: dict[str, Any] = self.platform.send_task(STOP, args=[challenge, team]).get(
            timeout=120)
        return result

    def status(self, team: str) -> list[dict[str, Any]]:
        """The team's instances, as get_container_status sent by name answers."""
        answer = self.platform.send_task(STATUS, kwargs={"team_id": team}).get(timeout=30)
        return list(answer["instances"])

    def containers(self, challenge: str, team: str) -> list[Any]:
        """The run's containers of the team's instance of ``challenge``."""
        labels = {**LABEL, "ctf.team": team, "ctf.challenge": challenge}
        return self.docker.containers.list(ignore_removed=True,
            all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})

    def network(self, challenge: str, team: str) -> Any:
        """The instance's network, or ``None``."""
        found = self.docker.networks.list(names=[f"ctf-inst-{challenge}.{team}"])
        return found[0] if found else None


@pytest.fixture(scope="module")
def shop_images(docker_client: docker.DockerClient) -> dict[str, str]:
    """The example's three images, tagged for this run (the test label: removed after)."""
    return {
        service: build_image(docker_client, f"ctf-test/shop-{service}:{RUN_ID}",
                             (SHOP / service / "Dockerfile").read_text(), _files(SHOP / service))
        for service in ("web", "db", "bot")
    }


@pytest.fixture(scope="module")
def compose_catalog(images: dict[str, str], shop_images: dict[str, str],
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test catalog, ``shop`` (the example as shipped) and ``broken`` (db never healthy)."""
    folder = tmp_path_factory.mktemp("compose")
    text = (SHOP / "compose.yaml").read_text()
    for service, tag in shop_images.items():
        text = text.replace(f"ctf-example/shop-{service}:1", tag)
    (folder / "shop").mkdir()
    (folder / "shop" / "compose.yaml").write_text(text)
    start = text.index('test: ["CMD"')
    broken = text[:start] + f"test: {BROKEN_CHECK}" + text[text.index("\n", start):]
    broken = broken.replace("retries: 30", "retries: 1")  # unhealthy at its first failure
    (folder / "broken.yaml").write_text(broken)
    (folder / "ghost.yaml").write_text(text.replace(shop_images["bot"], ABSENT))
    path = folder / "challenges.yaml"
    path.write_text(catalog_yaml(images) + """
  shop:
    name: Shop with a database
    compose: shop/compose.yaml
    ttl: 600
    memory: 64m
    start_timeout: 60
  broken:
    compose: broken.yaml
    start_timeout: 60
  ghost:
    compose: ghost.yaml
""")
    return path


@pytest.fixture(scope="module")
def compose_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-compose"))
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def compose_world(redis_server: RedisServer, catalog: Path, client: docker.DockerClient,
                  workdir: Path, label: dict[str, str], pool: str,
                  kind: type[Setup] = Setup) -> Iterator[Setup]:
    """A worker (default settings but the test run's), a platform client and the API.

    Its objects carry ``label`` and its networks come from ``pool``; they are removed on the
    way out, pass or fail.
    """
    env = {
        **base_env(redis_server, catalog, workdir / "data"),
        "CTF_EXTRA_LABELS": json.dumps(label),
        "CTF_TEAM_SUBNET_POOL": pool,
    }
    redis.Redis.from_url(env["CTF_REDIS_URL"]).flushdb()
    try:
        with worker_and_api(env, catalog, workdir) as (_worker, platform, api):
            settings = load_settings(data_dir=Path(env["CTF_DATA_DIR"]))
            yield kind(platform, api, settings.flag_secret_value(), client,
                       env["CTF_REDIS_URL"])
    finally:
        cleanup_docker(client, label)


@pytest.fixture(scope="module")
def setup(compose_redis: RedisServer, compose_catalog: Path, docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A worker (default settings but the test run's), a platform client and the API."""
    with compose_world(compose_redis, compose_catalog, docker_client,
                       tmp_path_factory.mktemp("compose-run"), LABEL, POOL) as world:
        yield world


def _ask(container: Any, target: str) -> bytes:
    """What ``container`` gets from ``target``'s port 5432 (busybox nc, 2 s timeout)."""
    _, out = container.exec_run(["/bin/busybox", "nc", "-w", "2", target, "5432"])
    return bytes(out)


def test_a_compose_challenge_runs_its_services_and_shows_the_teams_flag(setup: Setup) -> None:
    """Started by name: running, three labelled services, the web endpoint shows the flag."""
    inst = setup.start("shop", "ca")
    assert inst["status"] == "running", inst
    assert inst["container_name"] == "ctf-shop-ca"
    services = {c.labels["ctf.service"]: c for c in setup.containers("shop", "ca")}
    assert set(services) == {"web", "db", "bot"}
    assert all(c.status == "running" for c in services.values())
    assert services["web"].name == "ctf-shop-ca" and services["db"].name == "ctf-shop-ca.db"
    assert inst["container_id"] == services["web"].id
    port = inst["ports"]["8080/tcp"]
    assert inst["url"] == f"http://localhost:{port}"
    assert inst["endpoints"] == [
        {"service": "web", "port": 8080, "protocol": "http", "url": inst["url"]}]
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/stock", timeout=10).read()
    assert team_flag(setup.secret, "shop", "ca").encode() in page
    assert team_flag(setup.secret, "shop", "cb").encode() not in page
    host = services["db"].attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and host["Memory"] == 64 * 1024**2
    assert host["ReadonlyRootfs"] is True
    assert services["db"].attrs["HostConfig"]["PortBindings"] in (None, {})  # no endpoint
    net = setup.network("shop", "ca")
    assert net is not None
    assert net.attrs["Labels"]["ctf.challenge"] == "shop"
    assert net.attrs["Labels"]["ctf.team"] == "ca"


def test_another_teams_instance_cannot_reach_this_ones_db(setup: Setup) -> None:
    """Each team's web reaches its own db by name, and nothing of the other team's."""
    setup.start("shop", "ca")
    setup.start("shop", "cb")
    web_b = next(c for c in setup.containers("shop", "cb") if c.labels["ctf.service"] == "web")
    db_a = next(c for c in setup.containers("shop", "ca") if c.labels["ctf.service"] == "db")
    assert team_flag(setup.secret, "shop", "cb").encode() in _ask(web_b, "db")
    ip_a = next(iter(db_a.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    assert ip_a
    assert team_flag(setup.secret, "shop", "ca").encode() not in _ask(web_b, ip_a)
    assert b"flag" not in _ask(web_b, "ctf-shop-ca.db")  # not even by name


def test_stop_leaves_no_container_or_network_of_the_instance(setup: Setup) -> None:
    """stop_container removes every service and the instance's network."""
    setup.start("shop", "cc")
    assert setup.stop("shop", "cc")["status"] == "stopped"
    assert setup.containers("shop", "cc") == []
    assert setup.network("shop", "cc") is None


def test_a_service_never_healthy_leaves_nothing_and_is_named(setup: Setup) -> None:
    """A db whose healthcheck never passes fails the start, naming db; nothing is left."""
    with pytest.raises(Exception, match="service db is unhealthy") as failure:
        setup.start("broken", "cd")
    assert type(failure.value).__name__ == "StartFailed"
    assert setup.containers("broken", "cd") == []
    assert setup.network("broken", "cd") is None


def test_a_killed_service_makes_the_instance_failed(setup: Setup) -> None:
    """Db killed behind our back: the worker's event follower marks the instance failed."""
    setup.start("shop", "ce")
    db = next(c for c in setup.containers("shop", "ce") if c.labels["ctf.service"] == "db")
    db.kill()
    failed = wait_for(lambda: next((i for i in setup.status("ce") if i["status"] == "failed"),
                                   None), timeout=30, message="the instance failed")
    assert failed["error"].startswith("service db: "), failed
    setup.stop("shop", "ce")
    assert setup.containers("shop", "ce") == []


def test_a_service_removed_by_hand_makes_the_instance_failed(setup: Setup) -> None:
    """``docker rm -f`` of db: the worker marks the instance failed, naming db; stop clears it."""
    inst = setup.start("shop", "ch")
    assert inst["status"] == "running", inst
    db = next(c for c in setup.containers("shop", "ch") if c.labels["ctf.service"] == "db")
    db.remove(force=True)
    failed = wait_for(lambda: next((i for i in setup.status("ch") if i["status"] == "failed"),
                                   None), timeout=30, message="the instance failed")
    assert failed["error"].startswith("service db: "), failed
    assert failed["container_id"] == inst["container_id"]
    setup.stop("shop", "ch")
    assert setup.containers("shop", "ch") == [] and setup.network("shop", "ch") is None


def test_a_redis_loss_is_reconciled_with_the_whole_group(setup: Setup) -> None:
    """After the index is flushed the janitor adopts the group: running, endpoints, 3 services."""
    inst = setup.start("shop", "cf")
    redis.Redis.from_url(setup.redis_url).flushdb()
    adopted = wait_for(lambda: next((i for i in setup.status("cf") if i["status"] == "running"),
                                    None), timeout=30, message="the instance adopted")
    assert adopted["container_id"] == inst["container_id"]
    assert adopted["endpoints"] == inst["endpoints"]
    assert len(setup.containers("shop", "cf")) == 3


def test_a_missing_image_names_its_service_and_leaves_nothing(setup: Setup) -> None:
    """A service whose image no registry serves: the error names the service and the image."""
    with pytest.raises(Exception, match="service 'bot'") as failure:
        setup.start("ghost", "cg")
    assert type(failure.value).__name__ == "ImagePullFailed"
    assert ABSENT in str(failure.value)
    assert setup.containers("ghost", "cg") == []
    assert setup.network("ghost", "cg") is None
    assert setup.status("cg") == []
