"""Egress per service of a Compose challenge (SPEC §12) on the real engine and nft firewall.

``x-ctf-egress: internet`` on one service opens the internet to that service's container
alone: its sibling in the same instance stays firewalled, and a stop takes the service's
address out of the firewall's internet set. The "internet" is a network-namespace host in
203.0.113.0/24, as in ``tests/test_egress.py`` (whose helpers this file uses); this file's
subnet pool, and so its nftables table, is its own and removed at the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import cleanup_docker, private_label
from test_egress import (
    TAG,
    bridge_of,
    gateway_of,
    ip_of,
    listener,
    needs_root,
    netns_host,
    nft,
    nft_root,  # noqa: F401  # the fixture behind needs_root
    reaches,
)

from celery_app.engine.firewall import table_name
from celery_app.worker.context import Context

pytestmark = [pytest.mark.docker, pytest.mark.redis]

POOL = "10.245.0.0/16"  # this file's instance networks, away from every other file's
LABEL = private_label("compose-egress")
SCOPE = [f"{name}={value}" for name, value in LABEL.items()]

# The fetcher (an admin bot that loads a page off the internet, say) has the internet; web,
# its sibling, does not. The fetcher's healthcheck fetches from the stand-in internet and web
# waits for it: the start itself proves the fetcher has the internet while the group starts.
COMPOSE = """
services:
  web:
    image: {image}
    ports: ["8080"]
    depends_on:
      fetcher: {{condition: service_healthy}}
  fetcher:
    image: {image}
    expose: ["8080"]
    x-ctf-egress: internet
    healthcheck:
      test: ["CMD", "/bin/busybox", "sh", "-c",
             "printf x | /bin/busybox nc -w 2 {address} {port} | /bin/busybox grep -q internet-"]
      interval: 1s
      timeout: 4s
      retries: 20
"""


@contextlib.contextmanager
def compose_egress_ctx(make_ctx: Callable[..., Context], image: str, folder: Path,
                       address: str, port: int) -> Iterator[Context]:
    """A context with the firewall at its default (auto) for POOL and the ``mixed`` challenge.

    Everything it made (containers, networks under this file's label, the nft table) goes
    afterwards, pass or fail.
    """
    (folder / "compose.yaml").write_text(COMPOSE.format(image=image, address=address, port=port))
    catalog = folder / "challenges.yaml"
    catalog.write_text("challenges:\n  mixed:\n    compose: compose.yaml\n"
                       "    start_timeout: 60\n")
    ctx = make_ctx(challenges_file=catalog, team_subnet_pool=POOL, egress_firewall="auto",
                   extra_labels=LABEL, publish_ip="0.0.0.0")
    try:
        yield ctx
    finally:
        with contextlib.suppress(Exception):
            ctx.service.stop(ctx.service.catalog.key("mixed", "ce1"), count_rate=False)
        with contextlib.closing(docker.from_env()) as client:
            cleanup_docker(client, LABEL)
        nft("delete", "table", "inet", table_name(ipaddress.IPv4Network(POOL)))


@needs_root
def test_x_ctf_egress_opens_the_internet_to_one_service_of_the_group_alone(
    make_ctx: Callable[..., Context], images: dict[str, str], tmp_path: Path,
    docker_client: Any,
) -> None:
    """The service with x-ctf-egress: internet reaches the internet, its sibling does not."""
    marker = f"ours-{TAG}-{random.randint(0, 10**6)}"
    k = random.randint(1, 62)
    with contextlib.ExitStack() as stack:
        internet = stack.enter_context(
            netns_host(f"ctfce{TAG}i", f"203.0.113.{4 * k + 1}", f"203.0.113.{4 * k + 2}"))
        net_port = stack.enter_context(listener(f"internet-{marker}", netns=internet.name))
        host_port = stack.enter_context(listener(marker))
        ctx = stack.enter_context(compose_egress_ctx(make_ctx, images["http"], tmp_path,
                                                     internet.peer_ip, net_port))
        # The fetcher's healthcheck reached the internet during the start: else no "running".
        inst = ctx.service.start(ctx.service.catalog.key("mixed", "ce1"))
        assert inst.status == "running", inst

        found = {c.labels["ctf.service"]: c
                 for c in docker_client.containers.list(
                         ignore_removed=True, filters={"label": SCOPE})}
        web, fetcher = found["web"], found["fetcher"]
        assert fetcher.labels["ctf.egress"] == "internet" and web.labels["ctf.egress"] == "none"
        assert reaches(fetcher, internet.peer_ip, net_port, "internet-"), \
            "x-ctf-egress: internet must reach the internet"
        assert not reaches(web, internet.peer_ip, net_port, "internet-"), \
            "the sibling of an internet service reached the internet"
        # The internet service is still held by the rest of the policy: not the host.
        assert not reaches(fetcher, gateway_of(fetcher), host_port, marker)
        # Inside the instance both still reach each other, by service name.
        assert reaches(web, "fetcher", 8080, "hello from ctf")
        assert reaches(fetcher, "web", 8080, "hello from ctf")

        assert ctx.egress is not None and ctx.egress.firewall is not None
        state = ctx.egress.firewall.state()
        assert state.current
        assert state.internet == {(bridge_of(docker_client, fetcher), ip_of(fetcher))}

        # Stop takes the fetcher's address out of the internet set with its group.
        ctx.service.stop(ctx.service.catalog.key("mixed", "ce1"))
        assert ctx.egress.firewall.state().internet == set()
        assert docker_client.containers.list(
                ignore_removed=True, all=True, filters={"label": SCOPE}) == []
