"""Warm pools (issue 14) behind the ingress (SPEC §11, ``CTF_INGRESS=traefik``), for real.

The stack of tests/test_ingress.py (a real Traefik, the API over HTTP, a real worker, a
private Redis) with one more challenge, ``warm``, kept at ``pool: 2``. A claim must route the
instance as a cold start does: the same host name scheme, the same team gate; a container
still in the pool must be routed nowhere.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from conftest import private_label, wait_for
from test_ingress import (
    ADMIN,
    DOMAIN,
    FLAG_SECRET,
    Stack,
    catalog,
    host_of,
    ingress_images,
    open_link,
    running_stack,
)

from celery_app.ingress.labels import instance_label
from celery_app.ingress.routes import bind_parts

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

POOL = "10.221.0.0/16"
SIZE = 2
WARM = """
  warm:
    name: Header echo, booted ahead
    image: {image}
    port: 8080
    ttl: 600
    start_timeout: 30
    pool: {size}
"""
_RUN = uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def warm_stack(docker_client: docker.DockerClient,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The ingress stack with ``warm`` (pool: 2) in its catalog."""
    label = private_label("pool-ingress")
    images = ingress_images(docker_client, label)
    text = catalog(images) + WARM.format(image=images["echo"], size=SIZE)
    with running_stack(docker_client, tmp_path_factory.mktemp("pool-ingress"), label, text,
                       POOL) as made:
        yield made


def _unclaimed(stack: Stack) -> list[Any]:
    filters = [f"{k}={v}" for k, v in {**stack.label, "ctf.challenge": "warm"}.items()]
    return [c for c in stack.docker.containers.list(all=True, filters={"label": filters},
                                                    ignore_removed=True)
            if c.name.startswith("ctfpool-")]


def _full(stack: Stack) -> set[str]:
    """Wait until ``warm`` has its ready containers; return their ids."""
    def ready() -> bool:
        status, body = stack.call("GET", "/api/v1/pools", ADMIN)
        assert status == 200, body
        rows = {row["challenge"]: row for row in body["pools"]}
        return rows.get("warm", {}).get("ready") == SIZE and len(_unclaimed(stack)) == SIZE

    wait_for(ready, 90, 0.2, "the warm pool to be ready")
    return {c.id for c in _unclaimed(stack)}


def _traefik_backends(stack: Stack) -> set[str]:
    """The address:port of every server behind a router Traefik loaded from our files."""
    host, port = bind_parts(stack.settings.ingress_status_bind)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/api/http/services")
        services = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {server["url"].split("://", 1)[1].rstrip("/")
            for s in services if s.get("provider") == "file"
            for server in (s.get("loadBalancer") or {}).get("servers") or []}


def _address(c: Any) -> str:
    c.reload()
    (net,) = c.attrs["NetworkSettings"]["Networks"].values()
    return str(net["IPAddress"])


def test_a_claim_is_routed_like_a_cold_start_and_the_pool_is_routed_nowhere(
    warm_stack: Stack,
) -> None:
    """A claimed pool container opens at the cold URL scheme, through the team gate only."""
    stack = warm_stack
    ready = _full(stack)
    team, rival = f"warm-{_RUN}", f"rival-{_RUN}"
    inst = stack.start(team, "warm")
    assert inst["container_id"] in ready  # claimed, not booted cold
    claimed = stack.docker.containers.get(inst["container_id"])
    assert claimed.name == f"ctf-warm-{team}" and "ctf.pool" in claimed.labels
    # The URL a cold start gets: http://<the pair's label>.<domain>:<entry port>/, no port
    cold = stack.start(team, "echo")
    for one, challenge in ((inst, "warm"), (cold, "echo")):
        label = instance_label(FLAG_SECRET, challenge, team)
        assert one["url"] == f"http://{label}.{DOMAIN}:{stack.http_port}/"
        assert one["ports"] == {}
    assert not any((claimed.attrs["NetworkSettings"]["Ports"] or {}).values())
    # The team gate: nothing without the cookie, the page with the team's own link
    host = host_of(inst["url"])
    assert stack.web(host).status == 401
    cookie = open_link(stack, inst)
    page = stack.web(host, headers={"Cookie": cookie})
    assert page.status == 200 and "hello from the echo challenge" in page.text()
    # another team's claim of the same challenge: each cookie opens its own host only
    other = stack.start(rival, "warm")
    assert other["container_id"] in ready
    rival_cookie = open_link(stack, other)
    assert stack.web(host_of(other["url"]), headers={"Cookie": rival_cookie}).status == 200
    assert stack.web(host, headers={"Cookie": rival_cookie}).status == 403
    assert stack.web(host_of(other["url"]), headers={"Cookie": cookie}).status == 403
    # The pool refilled: its containers sit on their own networks (issue 27) with no host
    # port and no route; Traefik routes to the three instances and nothing else
    waiting = _full(stack)
    assert not waiting & {inst["container_id"], other["container_id"]}
    names = {c.name for c in _unclaimed(stack)}
    for c in _unclaimed(stack):
        assert set(c.attrs["NetworkSettings"]["Networks"]) == {
            f"ctfpool-warm-{c.labels['ctf.pool']}"}
        assert not any((c.attrs["NetworkSettings"]["Ports"] or {}).values())
    dynamic = stack.settings.data_dir / "ingress" / "dynamic"
    routes = {p.stem for p in dynamic.glob("*.yml")} - {"_common"}  # shared middlewares
    instances = [stack.docker.containers.get(i["container_id"]) for i in (inst, cold, other)]
    assert routes == {c.name for c in instances}
    assert not any(name in p.read_text() for p in dynamic.glob("*.yml") for name in names)
    wait_for(lambda: _traefik_backends(stack) == {f"{_address(c)}:8080" for c in instances},
             30, 0.2, "Traefik to route to the three instances only")
    for t, ch in ((team, "warm"), (team, "echo"), (rival, "warm")):
        status, body = stack.call("DELETE", f"/api/v1/teams/{t}/instances/{ch}?wait=30")
        assert status == 200, body
