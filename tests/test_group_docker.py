"""A group of services on the real engine: order, health, names on the network, all or nothing.

The shipped example (``examples/shop``: a web shop, its database and an admin bot) is built
from its own folder and started as one instance's group on a network of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import BUSYBOX, ROOT, RUN_ID, build_image, private_label

from celery_app.core.group import Condition, Member, start_group
from celery_app.engine.docker_driver import DockerDriver
from celery_app.engine.driver import ContainerSpec, Healthcheck
from celery_app.errors import StartFailed

pytestmark = pytest.mark.docker

POOL = "10.230.0.0/16"  # this file's networks, away from every other test file's pool
SHOP = ROOT / "examples" / "shop"
LABEL = private_label("group")


def _files(folder: Path) -> dict[str, bytes | Path]:
    """A build context: the service's folder, with the static busybox beside it."""
    found: dict[str, bytes | Path] = {"busybox": BUSYBOX}
    for path in folder.rglob("*"):
        if path.is_file() and path.name != "Dockerfile":
            found[str(path.relative_to(folder))] = path
    return found


@pytest.fixture(scope="module")
def shop(docker_client: docker.DockerClient) -> dict[str, str]:
    """The example's three images, tagged for this run."""
    return {
        service: build_image(docker_client, f"ctf-test/shop-{service}:{RUN_ID}",
                             (SHOP / service / "Dockerfile").read_text(), _files(SHOP / service))
        for service in ("web", "db", "bot")
    }


@pytest.fixture
def driver() -> Iterator[DockerDriver]:
    """The real driver; what a test made under this file's label is removed after."""
    real = DockerDriver()
    yield real
    for c in real.list_containers(LABEL):
        real.remove_container(c.id)
    for n in real.list_networks(LABEL):
        real.remove_network(n.id)
    real.close()


def member(network: str, service: str, image: str, *, env: dict[str, str] | None = None,
           port: int | None = None, healthcheck: Healthcheck | None = None,
           **depends_on: Condition) -> Member:
    """One service of a team's shop: hardened as every instance, reached by its name."""
    spec = ContainerSpec(
        name=f"{network}-{service}", image=image, port=port, team_id="t1",
        labels={**LABEL, "ctf.managed": "true", "ctf.service": service}, env=env or {},
        memory_bytes=64 << 20, nano_cpus=500_000_000, pids=64, cap_add=[],
        publish_ip="127.0.0.1", network=network, aliases=(service,), healthcheck=healthcheck,
    )
    return Member(service, spec, depends_on)


def shop_members(network: str, images: dict[str, str], flag: str,
                 db_check: Healthcheck) -> list[Member]:
    """The example's services, as its compose.yaml describes them, in depends_on order."""
    return [
        member(network, "db", images["db"], env={"FLAG": flag}, healthcheck=db_check),
        member(network, "web", images["web"], port=8080, db="service_healthy"),
        member(network, "bot", images["bot"], env={"TEAM": "t1"}, web="service_started"),
    ]


DB_CHECK = Healthcheck(test=("CMD", "/bin/busybox", "nc", "-w", "1", "127.0.0.1", "5432"),
                       interval=1, timeout=2, retries=30)


def test_the_shop_starts_in_order_and_its_services_reach_each_other_by_name(
    driver: DockerDriver, shop: dict[str, str], docker_client: Any,
) -> None:
    """Db is healthy before web runs; web reaches db by its service name; bot runs too."""
    network = f"ctf-group-{uuid.uuid4().hex[:8]}"
    driver.ensure_named_network(network, {**LABEL, "ctf.managed": "true"}, POOL, 28)
    flag = f"CTF{{{uuid.uuid4().hex}}}"
    made = start_group(driver, shop_members(network, shop, flag, DB_CHECK), timeout=60,
                       what="shop for team t1")
    assert list(made) == ["db", "web", "bot"]
    assert all(info.state == "running" for info in made.values())
    assert made["db"].health == "healthy"
    web = docker_client.containers.get(made["web"].id)
    assert web.attrs["State"]["StartedAt"] > docker_client.containers.get(
        made["db"].id).attrs["State"]["StartedAt"]
    code, out = web.exec_run(["/bin/busybox", "nc", "-w", "2", "db", "5432"])
    assert code == 0 and flag.encode() in out, out


def test_a_service_that_never_gets_healthy_leaves_nothing_behind(
    driver: DockerDriver, shop: dict[str, str],
) -> None:
    """Db's healthcheck failing: StartFailed names db and why; no container of it is left."""
    network = f"ctf-group-{uuid.uuid4().hex[:8]}"
    driver.ensure_named_network(network, {**LABEL, "ctf.managed": "true"}, POOL, 28)
    broken = Healthcheck(test=("CMD", "/bin/busybox", "false"), interval=1, timeout=1,
                         retries=1)
    with pytest.raises(StartFailed, match=r"shop for team t1: service db is unhealthy"):
        start_group(driver, shop_members(network, shop, "CTF{x}", broken), timeout=60,
                    what="shop for team t1")
    assert [c.name for c in driver.list_containers(LABEL)] == []
