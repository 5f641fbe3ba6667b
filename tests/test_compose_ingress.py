"""A Compose challenge behind the ingress (SPEC §11 + §12): a host of its own per endpoint.

The stack of tests/test_ingress.py (a real Traefik, the API as its gate, a real worker with
``CTF_INGRESS=traefik`` on a private Redis) serves a challenge of four services built from the
ingress stand-ins: ``web`` and ``admin`` (HTTP, each answering its own host name with its
environment), ``shell`` (TCP, through TLS with SNI) and ``db`` (no ``ports``: reached by its
instance only). A platform starts and stops it by sending the tasks by name.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest
from conftest import private_label
from test_ingress import (
    DOMAIN,
    FLAG_SECRET,
    Stack,
    host_of,
    ingress_images,
    path_of,
    running_stack,
)

from celery_app.ingress import tokens
from celery_app.ingress.labels import instance_label, label_of_host
from ctf_testkit.support import close_platform_client, platform_client, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

POOL = "10.231.0.0/16"  # this file's team and instance networks, away from every other file's
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
STATUS = "celery_app.tasks.get_container_status"
_RUN = uuid.uuid4().hex[:6]
ALPHA, BRAVO, CHARLIE = (f"{t}-{_RUN}" for t in ("alpha", "bravo", "charlie"))


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
  shell:
    image: {images['tcp']}
    ports: ["9000"]
    x-ctf-protocol: tcp
  db:
    image: {images['tcp']}
    expose: ["9000"]
"""


CATALOG = """
challenges:
  shop:
    name: Shop of four services behind the ingress
    compose: shop.yaml
    ttl: 600
    start_timeout: 60
"""


class Platform:
    """A platform's plain Celery client, sending the tasks by name."""

    def __init__(self, stack: Stack) -> None:
        self.app = platform_client(stack.env["CELERY_BROKER_URL"],
                                   stack.env["CELERY_RESULT_BACKEND"])

    def start(self, team: str) -> dict[str, Any]:
        result: dict[str, Any] = self.app.send_task(START, args=["shop", team]).get(timeout=180)
        assert result["status"] == "running", result
        return result

    def stop(self, team: str) -> dict[str, Any]:
        result: dict[str, Any] = self.app.send_task(STOP, args=["shop", team]).get(timeout=120)
        return result

    def status(self, team: str) -> list[dict[str, Any]]:
        answer = self.app.send_task(STATUS, kwargs={"team_id": team}).get(timeout=60)
        return list(answer["instances"])


@contextlib.contextmanager
def compose_stack(
    docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory, purpose: str,
    compose: Callable[[dict[str, str]], str], catalog: str, pool: str,
) -> Iterator[Stack]:
    """The ingress stack of test_ingress.py serving a ``compose: shop.yaml`` catalog.

    Args:
        docker_client: the engine.
        tmp_path_factory: pytest's, for the run's folder (named ``purpose``).
        purpose: the run's folder and private label (each file its own).
        compose: the Compose file, from the ingress stand-in images.
        catalog: the challenges file.
        pool: the file's team subnet pool.

    """
    base = tmp_path_factory.mktemp(purpose)
    label = private_label(purpose)
    (base / "shop.yaml").write_text(compose(ingress_images(docker_client, label)))
    with running_stack(docker_client, base, label, catalog, pool) as made:
        yield made


@contextlib.contextmanager
def platform_of(stack: Stack) -> Iterator[Platform]:
    """A platform's Celery client on the stack's broker; closed afterwards."""
    client = Platform(stack)
    yield client
    close_platform_client(client.app)


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Private Redis, stand-in images, Traefik, the API and a worker with the ingress on."""
    with compose_stack(docker_client, tmp_path_factory, "compose-ingress", compose_file,
                       CATALOG, POOL) as made:
        yield made


@pytest.fixture(scope="module")
def platform(stack: Stack) -> Iterator[Platform]:
    """A platform's Celery client on the stack's broker."""
    with platform_of(stack) as client:
        yield client


@pytest.fixture(scope="module")
def alpha(platform: Platform) -> dict[str, Any]:
    """Team alpha's instance of shop, started once by a task sent by name."""
    return platform.start(ALPHA)


@pytest.fixture(scope="module")
def bravo(platform: Platform) -> dict[str, Any]:
    """Team bravo's instance of shop, started once by a task sent by name."""
    return platform.start(BRAVO)


def endpoint(inst: dict[str, Any], service: str) -> dict[str, Any]:
    (found,) = [e for e in inst["endpoints"] if e["service"] == service]
    return dict(found)


def open_link(stack: Stack, ep: dict[str, Any]) -> str:
    """Follow an endpoint's access_url; return the access cookie it set for its host."""
    answer = stack.web(host_of(ep["url"]), path_of(ep["access_url"]))
    assert answer.status == 302, answer.text()
    assert answer.headers["location"] == f"http://{host_of(ep['url'])}:{stack.http_port}/"
    (cookie,) = answer.set_cookies
    return cookie.split(";", 1)[0]


def tls_echo(stack: Stack, host: str, payload: bytes) -> bytes:
    """Send ``payload`` through TLS with SNI ``host`` on the HTTPS entry point; return the echo."""
    context = ssl.create_default_context(cafile=str(stack.cert))  # checks the host name too
    got = b""
    with socket.create_connection(("127.0.0.1", stack.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(payload)
        while not got.endswith(b"\n"):
            chunk = tls.recv(100)
            if not chunk:
                break
            got += chunk
    return got


def mine(stack: Stack, team: str) -> list[str]:
    """Docker label filters of the team's shop containers made by this run."""
    return [f"{k}={v}" for k, v in {**stack.label, "ctf.team": team,
                                    "ctf.challenge": "shop"}.items()]


def route_files(stack: Stack, team: str) -> list[str]:
    """The route files of the team's shop instance in the folder Traefik watches."""
    folder = stack.settings.data_dir / "ingress" / "dynamic"
    return sorted(p.name for p in folder.glob(f"ctf-shop-{team}*.yml"))


def test_every_endpoint_has_a_host_of_its_own_opened_by_the_teams_link(
        stack: Stack, alpha: dict[str, Any]) -> None:
    """Each endpoint is reached at its own host: web and admin with their links, shell by TLS."""
    label = instance_label(FLAG_SECRET, "shop", ALPHA)  # a single image's, for the url
    assert alpha["url"] == f"http://{label}.{DOMAIN}:{stack.http_port}/"
    web, admin, shell = (endpoint(alpha, s) for s in ("web", "admin", "shell"))
    assert [e["service"] for e in alpha["endpoints"]] == ["web", "admin", "shell"]
    assert web["url"] == alpha["url"] and web["access_url"] == alpha["access_url"]
    hosts = {host_of(e["url"]) for e in (web, admin, shell)}
    assert len(hosts) == 3 and all(h.endswith(f".{DOMAIN}") for h in hosts)
    assert all(len(label_of_host(h)) == 16 for h in hosts)  # 80 bits each
    for ep, service in ((web, "web"), (admin, "admin")):
        cookie = open_link(stack, ep)
        page = stack.web(host_of(ep["url"]), "/cgi-bin/echo", {"Cookie": cookie})
        assert page.status == 200, page.text()
        assert f"HOSTNAME={service}" in page.text()  # this host reaches this service
        assert tokens.COOKIE_NAME not in page.text()  # our cookie never reaches the challenge
    assert shell["url"] == f"tls://{host_of(shell['url'])}:{stack.https_port}"
    assert "access_url" not in shell
    assert tls_echo(stack, host_of(shell["url"]), b"ping the shell\n") == b"ping the shell\n"


def test_status_by_name_gives_each_endpoint_a_fresh_link(
        stack: Stack, platform: Platform, alpha: dict[str, Any]) -> None:
    """get_container_status sent by name lists every endpoint, each HTTP one with its link."""
    (shown,) = platform.status(ALPHA)
    for service in ("web", "admin"):
        ep = endpoint(shown, service)
        assert ep["url"] == endpoint(alpha, service)["url"]
        assert ep["access_url"].startswith(ep["url"].rstrip("/") + "/_ctf/access/")
        open_link(stack, ep)


def test_the_gate_guards_every_endpoint(stack: Stack, alpha: dict[str, Any],
                                        bravo: dict[str, Any]) -> None:
    """No cookie 401, another team's cookie or link 403, on web and admin alike."""
    for service in ("web", "admin"):
        mine, theirs = endpoint(alpha, service), endpoint(bravo, service)
        host = host_of(mine["url"])
        none = stack.web(host)
        assert none.status == 401 and "echo challenge" not in none.text()
        bravo_cookie = open_link(stack, theirs)
        assert stack.web(host_of(theirs["url"]), headers={"Cookie": bravo_cookie}).status == 200
        other = stack.web(host, headers={"Cookie": bravo_cookie})
        assert other.status == 403 and "echo challenge" not in other.text()
        link = stack.web(host, path_of(theirs["access_url"]))
        assert link.status == 403 and not link.set_cookies
    # One endpoint's own cookie does not open another endpoint of the same instance either.
    web_cookie = open_link(stack, endpoint(alpha, "web"))
    assert stack.web(host_of(endpoint(alpha, "admin")["url"]),
                     headers={"Cookie": web_cookie}).status == 403


def test_a_service_without_ports_has_no_route_and_nothing_is_published(
        stack: Stack, alpha: dict[str, Any]) -> None:
    """Routes exist for web, admin and shell only; db has none; no container publishes a port."""
    team = ALPHA
    assert route_files(stack, team) == [
        f"ctf-shop-{team}.admin@8080.yml", f"ctf-shop-{team}.shell@9000.yml",
        f"ctf-shop-{team}.yml"]
    containers = {c.labels["ctf.service"]: c for c in stack.docker.containers.list(
        ignore_removed=True, filters={"label": mine(stack, team)})}
    assert set(containers) == {"web", "admin", "shell", "db"}
    for c in containers.values():
        assert not any(c.attrs["HostConfig"].get("PortBindings") or {}), c.name
    db_ip = next(iter(containers["db"].attrs["NetworkSettings"]["Networks"].values()))[
        "IPAddress"]
    folder = stack.settings.data_dir / "ingress" / "dynamic"
    routed = "".join(p.read_text() for p in folder.glob("*.yml"))
    assert db_ip and f"{db_ip}:" not in routed


def test_the_janitor_rebuilds_a_lost_endpoint_route_and_sweeps_a_stale_one(
        stack: Stack, alpha: dict[str, Any]) -> None:
    """A route file a crash lost comes back within a janitor pass; one of no endpoint goes."""
    folder = stack.settings.data_dir / "ingress" / "dynamic"
    lost = folder / f"ctf-shop-{ALPHA}.admin@8080.yml"
    text = lost.read_text()
    lost.unlink()
    stale = folder / f"ctf-shop-{ALPHA}.admin@9999.yml"
    stale.write_text("{}\n")
    old = time.time() - stack.settings.orphan_grace - 5
    os.utime(stale, (old, old))
    host = host_of(endpoint(alpha, "admin")["url"])
    wait_for(lambda: lost.exists() and not stale.exists(), 30, 0.1,
             "the janitor's route repair")
    assert lost.read_text() == text
    wait_for(lambda: stack.web(host).status == 401, 10, 0.05,
             "Traefik to load the rebuilt admin route (its gate answers)")
    cookie = open_link(stack, endpoint(alpha, "admin"))
    assert stack.web(host, "/cgi-bin/echo", {"Cookie": cookie}).status == 200


def test_after_stop_every_host_answers_404_and_no_route_file_remains(
        stack: Stack, platform: Platform) -> None:
    """A stop sent by name removes every endpoint's route: each host answers 404."""
    inst = platform.start(CHARLIE)
    web, admin = endpoint(inst, "web"), endpoint(inst, "admin")
    cookies = {service: open_link(stack, ep) for service, ep in (("web", web), ("admin", admin))}
    assert stack.web(host_of(admin["url"]), headers={"Cookie": cookies["admin"]}).status == 200
    assert platform.stop(CHARLIE)["status"] == "stopped"
    for service, ep in (("web", web), ("admin", admin)):
        wait_for(lambda ep=ep, service=service: stack.web(
            host_of(ep["url"]), headers={"Cookie": cookies[service]}).status == 404,
                 10, 0.05, f"the stopped {service} host to answer 404")
    assert route_files(stack, CHARLIE) == []
    assert not stack.docker.containers.list(
            ignore_removed=True, all=True, filters={"label": mine(stack, CHARLIE)})
