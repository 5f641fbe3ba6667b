"""A pooled Compose group behind the ingress (SPEC §11 + §12, ``pool:`` + ``compose:``), for real.

The stack of tests/test_ingress.py (a real Traefik, the API as its gate, a real worker with
``CTF_INGRESS=traefik`` on a private Redis) serves ``shop`` kept at ``pool: 1``: ``web`` and
``admin`` (HTTP, each answering with its environment) and ``db`` (no ``ports``). A platform
starts and stops it by sending the tasks by name; the start must claim the booted group and
route every endpoint as a cold start does, behind the team gate.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import docker
import pytest
from test_compose_ingress import (
    Platform,
    compose_stack,
    endpoint,
    mine,
    open_link,
    platform_of,
    route_files,
)
from test_ingress import ADMIN, Stack, host_of, path_of

from ctf_testkit.support import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

POOL = "10.200.0.0/16"  # this file's team and instance networks, away from every other file's
_RUN = uuid.uuid4().hex[:6]
ALPHA, BRAVO = (f"{t}-{_RUN}" for t in ("alpha", "bravo"))

CATALOG = """
challenges:
  shop:
    name: Shop of three services, booted ahead behind the ingress
    compose: shop.yaml
    ttl: 600
    start_timeout: 60
    pool: 1
"""


def compose_file(images: dict[str, str]) -> str:
    return f"""
services:
  web:
    image: {images['echo']}
    ports: ["8080"]
    depends_on: [db]
  admin:
    image: {images['echo']}
    ports: ["8080"]
  db:
    image: {images['tcp']}
    expose: ["9000"]
"""


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Private Redis, stand-in images, Traefik, the API and a worker that keeps shop's pool."""
    with compose_stack(docker_client, tmp_path_factory, "compose-pool-ingress", compose_file,
                       CATALOG, POOL) as made:
        yield made


@pytest.fixture(scope="module")
def platform(stack: Stack) -> Iterator[Platform]:
    """A platform's Celery client on the stack's broker."""
    with platform_of(stack) as client:
        yield client


def ready_group(stack: Stack) -> str:
    """Wait until shop's pool offers its group; return the id of its primary (web) container."""
    def ready() -> str | None:
        status, body = stack.call("GET", "/api/v1/pools", ADMIN)
        assert status == 200, body
        rows = {row["challenge"]: row for row in body["pools"]}
        if rows.get("shop", {}).get("ready") != 1:
            return None
        filters = [f"{k}={v}" for k, v in {**stack.label, "ctf.challenge": "shop",
                                            "ctf.service": "web"}.items()]
        waiting = [c for c in stack.docker.containers.list(
                ignore_removed=True, filters={"label": filters})
                   if c.name.startswith("ctfpool-shop-")]
        return waiting[0].id if len(waiting) == 1 else None

    return str(wait_for(ready, 120, 0.2, "shop's pooled group to be ready"))


def test_a_pooled_group_is_claimed_routed_gated_and_stopped_behind_the_ingress(
        stack: Stack, platform: Platform) -> None:
    """A start by name claims the group; each host opens with the team's link only; stop: 404."""
    pooled = ready_group(stack)
    alpha = platform.start(ALPHA)
    assert alpha["container_id"] == pooled  # claimed, not booted cold
    claimed = stack.docker.containers.get(pooled)
    assert claimed.name == f"ctf-shop-{ALPHA}" and "ctf.pool" in claimed.labels
    assert [e["service"] for e in alpha["endpoints"]] == ["web", "admin"]
    slot = {**stack.label, "ctf.pool": claimed.labels["ctf.pool"]}
    group = stack.docker.containers.list(
            ignore_removed=True, filters={"label": [f"{k}={v}" for k, v in slot.items()]})
    assert len(group) == 3
    for c in group:  # behind the ingress nothing is published, from its boot on
        assert not any(c.attrs["HostConfig"].get("PortBindings") or {}), c.name
    web, admin = endpoint(alpha, "web"), endpoint(alpha, "admin")
    assert host_of(web["url"]) != host_of(admin["url"])
    cookies = {}
    for ep, service in ((web, "web"), (admin, "admin")):
        assert stack.web(host_of(ep["url"])).status == 401  # no cookie, no challenge
        cookies[service] = open_link(stack, ep)
        page = stack.web(host_of(ep["url"]), "/cgi-bin/echo", {"Cookie": cookies[service]})
        assert page.status == 200, page.text()
        assert f"HOSTNAME={service}" in page.text()  # this host reaches this service
    # Another team's cookie and link are refused at every host of alpha's claimed group.
    bravo = platform.start(BRAVO)
    for service in ("web", "admin"):
        theirs = endpoint(bravo, service)
        bravo_cookie = open_link(stack, theirs)
        host = host_of(endpoint(alpha, service)["url"])
        other = stack.web(host, headers={"Cookie": bravo_cookie})
        assert other.status == 403 and "echo challenge" not in other.text()
        link = stack.web(host, path_of(theirs["access_url"]))
        assert link.status == 403 and not link.set_cookies
    # A stop sent by name leaves every host of the claimed group answering 404.
    assert platform.stop(ALPHA)["status"] == "stopped"
    for service, ep in (("web", web), ("admin", admin)):
        wait_for(lambda ep=ep, service=service: stack.web(
            host_of(ep["url"]), headers={"Cookie": cookies[service]}).status == 404,
                 10, 0.05, f"the stopped {service} host to answer 404")
    assert route_files(stack, ALPHA) == []
    left = stack.docker.containers.list(ignore_removed=True, all=True, filters={"label": [
        f"{k}={v}" for k, v in {**stack.label, "ctf.challenge": "shop"}.items()]})
    assert not [c.name for c in left if c.name.startswith(f"ctf-shop-{ALPHA}")]
    assert not stack.docker.containers.list(
            ignore_removed=True, all=True, filters={"label": mine(stack, ALPHA)})
    assert platform.stop(BRAVO)["status"] == "stopped"
