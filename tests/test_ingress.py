"""The ingress (SPEC §11) against a real Traefik, a real worker, the HTTP API and Docker.

One Traefik (``.venv/bin/traefik``, configured by ``celery_app.ingress.setup.prepare`` as
``run-celery-worker.sh`` does) on free ports, the API over real HTTP (its gate is
Traefik's forwardAuth), and a real ``celery worker`` with ``CTF_INGRESS=traefik``, all on a
private Redis. Requests go to Traefik's address with the instance's host name, as a
browser resolving ``*.instances.test`` to this machine would send them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import docker
import pytest
import uvicorn
import yaml
from conftest import ROOT, Worker, build_image, cleanup_docker, private_label

from celery_app.api.app import create_app
from celery_app.engine.firewall import table_name
from celery_app.errors import StartFailed
from celery_app.ingress import probe, routes, tokens
from celery_app.ingress.labels import label_of_host
from celery_app.settings import Settings, load_settings
from celery_app.vocab.team_tokens import team_token
from celery_app.worker.context import build_context
from ctf_testkit.ingress import DOCKERFILES, JUICE_VERSION, Answer, Traefik, get, image_files
from ctf_testkit.support import (
    RedisServer,
    close_platform_client,
    free_port,
    platform_client,
    wait_for,
)

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

ADMIN_TOKEN = "ingress-test-admin-token-0123456789abcdef"
FLAG_SECRET = "ingress-test-flag-secret-0123456789abcdef"
DOMAIN = "instances.test"
POOL = "10.236.0.0/16"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Team networks are named after teams, and other test runs share the engine: our own names.
_RUN = uuid.uuid4().hex[:6]
ALPHA, BRAVO, CHARLIE = (f"{t}-{_RUN}" for t in ("alpha", "bravo", "charlie"))


@dataclass
class Stack:
    """Everything the tests talk to."""

    settings: Settings
    api: str
    http_port: int
    https_port: int
    cert: Path
    label: dict[str, str]
    docker: docker.DockerClient
    env: dict[str, str]

    def call(self, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(self.api + path, method=method, headers=headers or ADMIN)
        try:
            with urllib.request.urlopen(req, timeout=90) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def start(self, team: str, challenge: str) -> dict[str, Any]:
        status, body = self.call("PUT", f"/api/v1/teams/{team}/instances/{challenge}?wait=60")
        assert status == 200 and body["status"] == "running", body
        return dict(body)

    def web(self, host: str, path: str = "/", headers: dict[str, str] | None = None,
            *, tls: bool = False, sni: str | None = None, source: str | None = None) -> Answer:
        # The Host header a browser sends: with the entry point's port (a Host in ``headers``
        # wins: a front proxy sends the public one). ``sni``: another TLS server name.
        if tls:
            return get("127.0.0.1", self.https_port, path,
                       {"Host": f"{host}:{self.https_port}", **(headers or {})},
                       tls_name=sni or host, cafile=self.cert)
        return get("127.0.0.1", self.http_port, path,
                   {"Host": f"{host}:{self.http_port}", **(headers or {})}, source=source)


def host_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]


def path_of(url: str) -> str:
    rest = url.split("://", 1)[1]
    return "/" + rest.split("/", 1)[1] if "/" in rest else "/"


def catalog(images: dict[str, str]) -> str:
    return f"""
challenges:
  echo:
    name: Header echo
    image: {images['echo']}
    port: 8080
    ttl: 600
    start_timeout: 30
  quick:
    name: Header echo that gives up fast
    image: {images['echo']}
    port: 8080
    ttl: 600
    start_timeout: 4
  juice-shop:
    name: Juice Shop stand-in
    image: {images['juice']}
    port: 3000
    health_path: /rest/admin/application-version
    ttl: 600
    start_timeout: 30
  nc:
    name: TCP echo
    image: {images['tcp']}
    port: 9000
    protocol: tcp
    ttl: 600
    start_timeout: 30
"""


@contextlib.contextmanager
def running_stack(
    docker_client: docker.DockerClient, base: Path, label: dict[str, str], catalog_text: str,
    pool: str, **env_overrides: str,
) -> Iterator[Stack]:
    """Private Redis, Traefik, the API and a worker with the ingress on; all stopped after.

    Args:
        docker_client: the engine.
        base: the run's folder (catalog, data, logs).
        label: what everything it makes carries (removed afterwards, pass or fail).
        catalog_text: the challenges file.
        pool: its team subnet pool.
        env_overrides: further worker and API settings (``CTF_*``).
    """
    (base / "challenges.yaml").write_text(catalog_text)
    redis_server = RedisServer(base)
    redis_server.start()
    http_port, https_port, status_port, api_port = (free_port() for _ in range(4))
    env = {
        "CELERY_BROKER_URL": f"{redis_server.url}/0",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/1",
        "CTF_REDIS_URL": f"{redis_server.url}/2",
        "CTF_CHALLENGES_FILE": str(base / "challenges.yaml"),
        "CTF_DATA_DIR": str(base / "data"),
        "CTF_EXTRA_LABELS": json.dumps(label),
        "CTF_TEAM_SUBNET_POOL": pool,
        "CTF_RATE_LIMIT_COUNT": "1000",
        "CTF_MAX_INSTANCES_PER_TEAM": "5",
        "CTF_ADMIN_TOKEN": ADMIN_TOKEN,
        "CTF_FLAG_SECRET": FLAG_SECRET,
        "CTF_API_BIND": f"127.0.0.1:{api_port}",
        "CTF_INGRESS": "traefik",
        "CTF_INGRESS_HTTP_BIND": f"127.0.0.1:{http_port}",
        "CTF_INGRESS_HTTPS_BIND": f"127.0.0.1:{https_port}",
        "CTF_INGRESS_STATUS_BIND": f"127.0.0.1:{status_port}",
        "CTF_INSTANCE_DOMAIN": DOMAIN,
        **env_overrides,
    }
    with mock.patch.dict(os.environ, env):
        settings = load_settings()
    traefik = Traefik(settings, base / "traefik.log")
    worker = Worker(env, base / "worker.log")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1",
                                           port=api_port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="ingress-api", daemon=True)
    try:
        traefik.start()
        thread.start()
        wait_for(lambda: server.started or not thread.is_alive(), 20, message="the API")
        worker.start()
        yield Stack(settings, f"http://127.0.0.1:{api_port}", http_port, https_port,
                    base / "data" / "ingress" / "selfsigned.crt", label, docker_client, env)
    finally:
        worker.stop()
        server.should_exit = True
        thread.join(20)
        traefik.stop()
        cleanup_docker(docker_client, label)
        redis_server.stop()
        # The worker's egress firewall (on by default) outlives it by design: machine-wide
        # kernel state of this run's pool, removed with the rest.
        subprocess.run(["nft", "delete", "table", "inet",
                        table_name(ipaddress.IPv4Network(pool))],
                       capture_output=True, check=False)


def ingress_images(docker_client: docker.DockerClient, label: dict[str, str]) -> dict[str, str]:
    """Build the echo, juice and tcp stand-ins (labelled: removed with the run)."""
    run = label["ctf.test"]
    files = image_files()
    return {name: build_image(docker_client, f"ctf-test/ingress-{name}:{run}",
                              DOCKERFILES[name], files[name]) for name in DOCKERFILES}


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Private Redis, stand-in images, Traefik, the API and a worker with the ingress on."""
    base = tmp_path_factory.mktemp("ingress")
    label = private_label("ingress")
    with running_stack(docker_client, base, label, catalog(ingress_images(docker_client, label)),
                       POOL) as made:
        yield made


def as_team(stack: Stack, team: str, challenge: str) -> dict[str, Any]:
    """The instance as the API shows it to its team now (with a fresh access_url)."""
    status, body = stack.call("GET", f"/api/v1/teams/{team}/instances/{challenge}",
                              {"Authorization": f"Bearer {team_token(ADMIN_TOKEN, team)}"})
    assert status == 200, body
    return dict(body)


@pytest.fixture(scope="module")
def alpha_running(stack: Stack) -> None:
    """Team alpha's echo instance, started once for the module."""
    stack.start(ALPHA, "echo")


@pytest.fixture(scope="module")
def bravo_running(stack: Stack) -> None:
    """Team bravo's echo instance, started once for the module."""
    stack.start(BRAVO, "echo")


@pytest.fixture
def alpha(stack: Stack, alpha_running: None) -> dict[str, Any]:
    """Team alpha's running echo instance, as alpha's API call shows it right now."""
    return as_team(stack, ALPHA, "echo")


@pytest.fixture
def bravo(stack: Stack, bravo_running: None) -> dict[str, Any]:
    """Team bravo's running echo instance, as bravo's API call shows it right now."""
    return as_team(stack, BRAVO, "echo")


def try_link(stack: Stack, inst: dict[str, Any]) -> str | None:
    """The access cookie a fresh access_url sets; ``None`` while Traefik has no route yet."""
    inst = as_team(stack, inst["team_id"], inst["challenge"])
    answer = stack.web(host_of(inst["url"]), path_of(inst["access_url"]))
    if answer.status == 404:
        return None
    assert answer.status == 302, answer.text()
    (cookie,) = answer.set_cookies
    return cookie.split(";", 1)[0]


def open_link(stack: Stack, inst: dict[str, Any], *, tls: bool = False) -> str:
    """Follow a fresh access_url of the instance; return the access cookie it set."""
    inst = as_team(stack, inst["team_id"], inst["challenge"])
    answer = stack.web(host_of(inst["url"]), path_of(inst["access_url"]), tls=tls)
    assert answer.status == 302, answer.text()
    scheme = "https" if tls else "http"
    port = stack.https_port if tls else stack.http_port
    assert answer.headers["location"] == f"{scheme}://{host_of(inst['url'])}:{port}/"
    (cookie,) = answer.set_cookies
    return cookie.split(";", 1)[0]


def test_tasks_by_name_carry_an_access_url_that_opens_the_instance(stack: Stack) -> None:
    """A platform calling the tasks by name gets the same access_url the API gives."""
    env = {k: str(v) for k, v in (("broker", stack.settings.broker_url),
                                  ("backend", stack.settings.result_backend))}
    app = platform_client(env["broker"], env["backend"])
    team = f"byname-{_RUN}"
    try:
        inst = app.send_task("celery_app.tasks.start_container", args=["quick", team]
                             ).get(timeout=90)
        assert inst["status"] == "running"
        answer = stack.web(host_of(inst["url"]), path_of(inst["access_url"]))
        assert answer.status == 302, answer.text()
        (cookie,) = answer.set_cookies
        page = stack.web(host_of(inst["url"]), "/", {"Cookie": cookie.split(";", 1)[0]})
        assert page.status == 200
        listed = app.send_task("celery_app.tasks.get_container_status",
                               kwargs={"team_id": team}).get(timeout=60)
        assert [i["access_url"].startswith(f"http://{host_of(inst['url'])}:")
                for i in listed["instances"]] == [True]
        app.send_task("celery_app.tasks.stop_container", args=["quick", team]).get(timeout=60)
    finally:
        inst = listed = None  # collected (and unsubscribed) before the client closes
        close_platform_client(app)


# -- addresses --------------------------------------------------------------------------------


def test_url_names_an_unguessable_stable_host(stack: Stack, alpha: dict[str, Any],
                                              bravo: dict[str, Any]) -> None:
    """Each instance is at http://<16 base32 chars>.<domain>:<port>/, the same after a restart."""
    host = host_of(alpha["url"])
    label = label_of_host(host)
    assert alpha["url"] == f"http://{label}.{DOMAIN}:{stack.http_port}/"
    assert len(label) == 16 and label.isalnum() and label.islower()  # 80 bits
    assert host_of(bravo["url"]) != host
    assert alpha["access_url"].startswith(f"http://{host}:{stack.http_port}/_ctf/access/")
    # Same (challenge, team), same host: after a stop and a new start.
    stack.call("DELETE", f"/api/v1/teams/{ALPHA}/instances/echo?wait=30")
    again = stack.start(ALPHA, "echo")
    assert again["url"] == alpha["url"]


def test_no_host_port_is_published(stack: Stack, alpha: dict[str, Any]) -> None:
    """With the ingress on, docker inspect shows no port binding and no published port."""
    c = stack.docker.containers.get(alpha["container_name"])
    assert not c.attrs["HostConfig"].get("PortBindings")
    assert all(not bound for bound in (c.attrs["NetworkSettings"]["Ports"] or {}).values())
    assert alpha["ports"] == {}


# -- the gate ---------------------------------------------------------------------------------


def test_no_cookie_gets_401_pointing_to_the_dashboard(stack: Stack, alpha: dict[str, Any]) -> None:
    """Without the access cookie: 401 with a page linking the dashboard, no challenge content."""
    answer = stack.web(host_of(alpha["url"]))
    assert answer.status == 401
    assert "dashboard" in answer.text() and stack.settings.api_bind.split(":")[1] in answer.text()
    assert "echo challenge" not in answer.text()


def test_own_link_sets_cookie_and_opens_the_challenge(stack: Stack,
                                                      alpha: dict[str, Any]) -> None:
    """Following access_url sets an HttpOnly cookie for that host and shows the challenge."""
    answer = stack.web(host_of(alpha["url"]), path_of(alpha["access_url"]))
    assert answer.status == 302 and answer.headers["location"] == alpha["url"]
    (set_cookie,) = answer.set_cookies
    attrs = [a.strip().lower() for a in set_cookie.split(";")]
    assert "httponly" in attrs and "path=/" in attrs and "secure" not in attrs
    assert not any(a.startswith("domain=") for a in attrs)  # this host only
    page = stack.web(host_of(alpha["url"]), headers={"Cookie": set_cookie.split(";", 1)[0]})
    assert page.status == 200 and "hello from the echo challenge" in page.text()


def test_link_over_https_sets_a_secure_cookie(stack: Stack, alpha: dict[str, Any]) -> None:
    """Over HTTPS the cookie is __Host-ctf_ingress_access: Secure, Path=/, no Domain (§11)."""
    host = host_of(alpha["url"])
    answer = stack.web(host, path_of(alpha["access_url"]), tls=True)
    assert answer.status == 302
    (set_cookie,) = answer.set_cookies
    name, attrs = cookie_parts(set_cookie)
    assert name == "__Host-ctf_ingress_access"
    assert {"secure", "path=/", "httponly"} <= set(attrs)
    assert not any(a.startswith("domain=") for a in attrs)
    cookie = set_cookie.split(";", 1)[0]
    page = stack.web(host, headers={"Cookie": cookie}, tls=True)
    assert page.status == 200 and "echo challenge" in page.text()
    # Stripped before the challenge, like the plain one.
    seen = stack.web(host, "/cgi-bin/echo", {"Cookie": f"a=1; {cookie}"}, tls=True)
    assert seen.status == 200 and "HTTP_COOKIE=a=1\n" in seen.text()
    assert cookie.split("=", 1)[1] not in seen.text()


def cookie_parts(set_cookie: str) -> tuple[str, list[str]]:
    """The name of a Set-Cookie header's cookie and its attributes (lower-case)."""
    first, *attrs = set_cookie.split(";")
    return first.split("=", 1)[0].strip(), [a.strip().lower() for a in attrs]


def test_gate_over_https_answers_401_and_403(stack: Stack, alpha: dict[str, Any],
                                             bravo: dict[str, Any]) -> None:
    """Over HTTPS: no cookie 401, another team's cookie (either name) 403, no content."""
    host = host_of(alpha["url"])
    none = stack.web(host, tls=True)
    assert none.status == 401 and "echo challenge" not in none.text()
    bravo_cookie = open_link(stack, bravo, tls=True).split("=", 1)[1]
    for name in tokens.COOKIE_NAMES:
        other = stack.web(host, headers={"Cookie": f"{name}={bravo_cookie}"}, tls=True)
        assert other.status == 403 and "echo challenge" not in other.text()
    forged = stack.web(host, path_of(alpha["access_url"])[:-3] + "AAA", tls=True)
    assert forged.status == 403 and not forged.set_cookies


def test_wrong_or_unknown_sni_reaches_no_challenge(stack: Stack, alpha: dict[str, Any],
                                                  bravo: dict[str, Any]) -> None:
    """An unknown host name is 404; a wrong SNI still meets the gate of the Host it names."""
    unknown = f"nothing{_RUN}.{DOMAIN}"
    answer = stack.web(unknown, tls=True)
    assert answer.status == 404 and "echo challenge" not in answer.text()
    # SNI of bravo's host, Host header of alpha's: alpha's gate decides (bravo's cookie: 403).
    host = host_of(alpha["url"])
    bravo_cookie = open_link(stack, bravo, tls=True)
    assert stack.web(host, tls=True, sni=host_of(bravo["url"])).status == 401
    crossed = stack.web(host, headers={"Cookie": bravo_cookie}, tls=True,
                        sni=host_of(bravo["url"]))
    assert crossed.status == 403 and "echo challenge" not in crossed.text()
    # A TCP route is only reached with its own SNI: an unknown one gets no echo.
    assert tls_echo(stack, unknown, b"ping\n") != b"ping\n"


def tls_echo(stack: Stack, sni: str, data: bytes) -> bytes:
    """Send ``data`` over TLS with ``sni`` to the HTTPS entry point; return the first answer."""
    context = ssl.create_default_context(cafile=str(stack.cert))
    context.check_hostname = False  # an unknown name gets Traefik's default certificate
    got = b""
    with socket.create_connection(("127.0.0.1", stack.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(data)
        with contextlib.suppress(OSError):
            while not got.endswith(b"\n"):
                chunk = tls.recv(100)
                if not chunk:
                    break
                got += chunk
    return got


def test_another_teams_cookie_gets_403(stack: Stack, alpha: dict[str, Any],
                                       bravo: dict[str, Any]) -> None:
    """Bravo's valid cookie (for bravo's host) does not open alpha's instance: 403."""
    bravo_cookie = open_link(stack, bravo)
    assert stack.web(host_of(bravo["url"]), headers={"Cookie": bravo_cookie}).status == 200
    answer = stack.web(host_of(alpha["url"]), headers={"Cookie": bravo_cookie})
    assert answer.status == 403
    assert "echo challenge" not in answer.text()


def test_another_teams_link_gets_403(stack: Stack, alpha: dict[str, Any],
                                     bravo: dict[str, Any]) -> None:
    """Bravo's access link used on alpha's host sets nothing: 403."""
    answer = stack.web(host_of(alpha["url"]), path_of(bravo["access_url"]))
    assert answer.status == 403 and not answer.set_cookies


def test_organiser_opens_any_instance(stack: Stack, alpha: dict[str, Any],
                                      bravo: dict[str, Any]) -> None:
    """The admin's listing carries an access_url for every team's instance, and each opens."""
    status, body = stack.call("GET", "/api/v1/instances?challenge=echo")
    assert status == 200
    shown = {i["team_id"]: i for i in body["instances"]}
    for team in (ALPHA, BRAVO):
        host = host_of(shown[team]["url"])
        answer = stack.web(host, path_of(shown[team]["access_url"]))  # the organiser's link
        assert answer.status == 302
        cookie = answer.set_cookies[0].split(";", 1)[0]
        assert stack.web(host, headers={"Cookie": cookie}).status == 200


def test_forged_link_and_cookie_get_403(stack: Stack, alpha: dict[str, Any]) -> None:
    """A link or cookie with a changed signature or principal is refused with 403."""
    host = host_of(alpha["url"])
    link = path_of(alpha["access_url"])
    principal, expiry, signature = link.rsplit("/", 1)[1].split(".")
    forged = f"{tokens.LINK_PREFIX}{principal}.{expiry}.{signature[:-2]}AA"
    assert stack.web(host, forged).status == 403
    renamed = f"{tokens.LINK_PREFIX}{BRAVO}.{expiry}.{signature}"
    assert stack.web(host, renamed).status == 403
    cookie = f"{tokens.COOKIE_NAME}={ALPHA}.{int(expiry) + 9999}.{signature}"
    assert stack.web(host, headers={"Cookie": cookie}).status == 403


def test_expired_link_gets_403(stack: Stack, alpha: dict[str, Any]) -> None:
    """A correctly signed link past its expiry is refused with 403 and sets no cookie."""
    host = host_of(alpha["url"])
    key = tokens.gate_key(FLAG_SECRET)
    old = tokens.issue(key, "link", label_of_host(host), ALPHA, ttl=-1)
    answer = stack.web(host, f"{tokens.LINK_PREFIX}{old}")
    assert answer.status == 403 and not answer.set_cookies
    assert answer.headers.get("x-ctf-gate") == "link-expired"


# -- what the challenge sees ------------------------------------------------------------------


def test_our_cookie_and_tokens_are_stripped_other_headers_pass(
    stack: Stack, alpha: dict[str, Any]
) -> None:
    """The challenge sees its own cookies and Authorization unchanged, never ours."""
    host = host_of(alpha["url"])
    ours = open_link(stack, alpha)
    jwt = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdGF0dXMiOiJzdWNjZXNzIn0.c2lnbmF0dXJl"
    answer = stack.web(host, "/cgi-bin/echo", {
        "Cookie": f"language=en; {ours}; token=abc%20def",
        "Authorization": jwt,
        "X-Custom-Header": "kept  as\tis",
    })
    assert answer.status == 200, answer.text()
    seen = dict(line.split("=", 1) for line in answer.text().splitlines() if "=" in line)
    assert seen["HTTP_COOKIE"] == "language=en; token=abc%20def"
    assert seen["HTTP_AUTHORIZATION"] == jwt
    assert seen["HTTP_X_CUSTOM_HEADER"] == "kept  as\tis"
    assert tokens.COOKIE_NAME not in answer.text()
    assert ours.split("=", 1)[1] not in answer.text()
    # Only our cookie: no Cookie header at all. Our bearer token: no Authorization header.
    bare = stack.web(host, "/cgi-bin/echo", {
        "Cookie": ours, "Authorization": f"Bearer {team_token(ADMIN_TOKEN, ALPHA)}"})
    assert "HTTP_COOKIE=" not in bare.text() and "HTTP_AUTHORIZATION=" not in bare.text()
    assert ADMIN_TOKEN not in bare.text()


# -- where the gate runs: the plugin in Traefik, the forwardAuth fallback ---------------------


def sign_cookie(key: bytes, label: str, principal: str, expiry: int) -> str:
    """An access cookie made from a host key alone (as whoever holds a route file could)."""
    mac = hmac.new(key, f"cookie|{label}|{principal}|{expiry}".encode(), hashlib.sha256)
    signature = base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")
    return f"{tokens.COOKIE_NAME}={principal}.{expiry}.{signature}"


@contextlib.contextmanager
def extra_route(stack: Stack, inst: dict[str, Any], label: str,
                settings: Settings | None) -> Iterator[str]:
    """One more route to the instance's container, on host ``<label>.<domain>``.

    ``settings`` give the plugin's configuration (its gate URL); ``None``: the forwardAuth gate.
    """
    c = stack.docker.containers.get(inst["container_name"])
    (net,) = c.attrs["NetworkSettings"]["Networks"].values()
    plugin = routes.plugin_config(settings, label) if settings is not None else None
    path = stack.settings.data_dir / "ingress" / "dynamic" / f"extra-{label}.yml"
    routes.write_atomically(path, routes.route_config(
        label, f"{label}.{DOMAIN}", "http", net["IPAddress"], 8080, True, plugin))
    status_host, status_port = routes.bind_parts(stack.settings.ingress_status_bind)
    try:
        wait_for(lambda: probe.route_loaded(status_host, status_port, routes.router_name(label),
                                            "http"), 10, 0.05, f"Traefik to load {path.name}")
        yield f"{label}.{DOMAIN}"
    finally:
        routes.remove(path)


def test_route_files_are_private_and_carry_only_their_hosts_key(
    stack: Stack, alpha: dict[str, Any], bravo: dict[str, Any]
) -> None:
    """A route file (mode 0600) holds a key that opens its own host and no other."""
    dynamic = stack.settings.data_dir / "ingress" / "dynamic"
    route = dynamic / f"{alpha['container_name']}.yml"
    assert route.stat().st_mode & 0o777 == 0o600 and dynamic.stat().st_mode & 0o777 == 0o700
    text = route.read_text()
    assert FLAG_SECRET not in text and ADMIN_TOKEN not in text
    assert tokens.encode_key(tokens.gate_key(FLAG_SECRET)) not in text
    (gate,) = yaml.safe_load(text)["http"]["middlewares"].values()
    key = base64.urlsafe_b64decode(gate["plugin"]["ctfgate"]["key"] + "=")
    expiry = int(time.time()) + 600
    alpha_host, bravo_host = host_of(alpha["url"]), host_of(bravo["url"])
    mine = sign_cookie(key, label_of_host(alpha_host), ALPHA, expiry)
    assert stack.web(alpha_host, headers={"Cookie": mine}).status == 200
    # The same key cannot make a cookie for bravo's host, whatever the principal.
    for principal in (BRAVO, tokens.ORGANISER):
        forged = sign_cookie(key, label_of_host(bravo_host), principal, expiry)
        assert stack.web(bravo_host, headers={"Cookie": forged}).status == 403


def test_plugin_admits_a_cookie_without_asking_the_api(stack: Stack,
                                                       alpha: dict[str, Any]) -> None:
    """With the API's gate unreachable a valid cookie still gets in; no cookie gets 503."""
    dead = stack.settings.model_copy(
        update={"ingress_gate_url": f"http://127.0.0.1:{free_port()}/_ingress/gate"})
    label = f"deadgate{_RUN}"
    with extra_route(stack, alpha, label, dead) as host:
        cookie = tokens.issue(tokens.gate_key(FLAG_SECRET), "cookie", label, ALPHA, 600)
        page = stack.web(host, "/cgi-bin/echo", {"Cookie": f"{tokens.COOKIE_NAME}={cookie}; a=1"})
        assert page.status == 200 and "HTTP_COOKIE=a=1\n" in page.text()
        refused = stack.web(host)
        assert refused.status == 503 and "echo challenge" not in refused.text()


def test_forwardauth_fallback_keeps_the_gate_matrix(stack: Stack, alpha: dict[str, Any]) -> None:
    """CTF_INGRESS_GATE=forwardauth: the same answers, the API asked about every request."""
    label = f"fallback{_RUN}"
    with extra_route(stack, alpha, label, None) as host:
        key = tokens.gate_key(FLAG_SECRET)
        assert stack.web(host).status == 401
        link = stack.web(host, tokens.LINK_PREFIX + tokens.issue(key, "link", label, ALPHA, 60))
        assert link.status == 302 and link.headers["location"] == f"http://{host}:{stack.http_port}/"
        cookie = link.set_cookies[0].split(";", 1)[0]
        jwt = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdGF0dXMiOiJzdWNjZXNzIn0.c2lnbmF0dXJl"
        page = stack.web(host, "/cgi-bin/echo", {"Cookie": f"a=1; {cookie}", "Authorization": jwt})
        assert page.status == 200 and "HTTP_COOKIE=a=1\n" in page.text()
        assert f"HTTP_AUTHORIZATION={jwt}" in page.text() and tokens.COOKIE_NAME not in page.text()
        other = tokens.issue(key, "cookie", label_of_host(host_of(alpha["url"])), ALPHA, 60)
        assert stack.web(host, headers={"Cookie": f"{tokens.COOKIE_NAME}={other}"}).status == 403
        expired = stack.web(host, tokens.LINK_PREFIX + tokens.issue(key, "link", label, ALPHA, -1))
        assert expired.status == 403 and not expired.set_cookies


def test_juice_shop_health_route_through_the_proxy(stack: Stack) -> None:
    """Juice Shop's /rest/admin/application-version answers through route and gate."""
    inst = stack.start(ALPHA, "juice-shop")
    cookie = open_link(stack, inst)
    answer = stack.web(host_of(inst["url"]), "/rest/admin/application-version",
                       {"Cookie": cookie})
    assert answer.status == 200 and answer.body == JUICE_VERSION


def test_tcp_challenge_through_tls_with_sni(stack: Stack) -> None:
    """A TCP instance is tls://<host>:<https port>; TLS with SNI reaches it, echoing."""
    inst = stack.start(ALPHA, "nc")
    host = host_of(inst["url"])
    assert inst["url"] == f"tls://{host}:{stack.https_port}"
    assert "access_url" not in inst
    context = ssl.create_default_context(cafile=str(stack.cert))  # checks the host name too
    with socket.create_connection(("127.0.0.1", stack.https_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(b"ping over tls\n")
        got = b""
        while not got.endswith(b"\n"):
            chunk = tls.recv(100)
            assert chunk, "the connection closed before the echo came back"
            got += chunk
    assert got == b"ping over tls\n"


# -- stop -------------------------------------------------------------------------------------


def test_host_answers_404_after_stop(stack: Stack) -> None:
    """Once the instance is stopped, its host answers 404 (even with a valid cookie)."""
    inst = stack.start(CHARLIE, "echo")
    host = host_of(inst["url"])
    cookie = open_link(stack, inst)
    assert stack.web(host, headers={"Cookie": cookie}).status == 200
    status, _ = stack.call("DELETE", f"/api/v1/teams/{CHARLIE}/instances/echo?wait=30")
    assert status == 200
    wait_for(lambda: stack.web(host, headers={"Cookie": cookie}).status == 404, 10, 0.05,
             "the stopped instance's host to answer 404")
    assert not (stack.settings.data_dir / "ingress" / "dynamic"
                / f"{inst['container_name']}.yml").exists()


# -- the dashboard ----------------------------------------------------------------------------


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.browser
def test_dashboard_open_flow_in_chromium(stack: Stack) -> None:
    """In Chromium (*.instances.test mapped to this machine) Start then Open shows the challenge."""
    # The organiser's dashboard opens another team's instance the same way; with no access,
    # the instance's host shows the 401 page pointing back to the dashboard.
    if not CHROMIUM.exists():
        pytest.skip("chromium is missing: run ./setup-celery.sh --dev")
    from playwright.sync_api import expect, sync_playwright  # noqa: PLC0415  # browser only

    team = f"delta-{_RUN}"
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            context = browser.new_context(base_url=stack.api)
            context.set_default_timeout(60_000)
            page = context.new_page()
            page.goto(f"/#token={team_token(ADMIN_TOKEN, team)}")
            card = page.locator('article[data-challenge="echo"]')
            card.get_by_role("button", name="Start", exact=True).click()
            link = card.get_by_role("link")
            expect(link).to_have_attribute("href", re.compile(
                rf"^http://[a-z2-7]{{16}}\.{re.escape(DOMAIN)}:{stack.http_port}/_ctf/access/"),
                timeout=60_000)
            with context.expect_page() as opened:
                link.click()
            challenge = opened.value
            expect(challenge.locator("body")).to_contain_text("hello from the echo challenge")
            assert challenge.url == f"{host_url(link.get_attribute('href'))}/"
            # A TCP instance shows the command that reaches it over TLS with SNI.
            tcp = stack.start(team, "nc")
            host = host_of(tcp["url"])
            page.reload()
            expect(page.locator('article[data-challenge="nc"] code.addr')).to_contain_text(
                f"openssl s_client -quiet -connect {host}:{stack.https_port} -servername {host}")
            # ... and every line to copy: ncat --ssl, openssl s_client, pwntools (issue 25).
            lines = page.locator('article[data-challenge="nc"] .fact-connect li')
            expect(lines.locator("code")).to_have_text([
                f"ncat --ssl {host} {stack.https_port}",
                f"openssl s_client -quiet -connect {host}:{stack.https_port} -servername {host}",
                f'remote("{host}", {stack.https_port}, ssl=True, sni="{host}")'])
            expect(lines.get_by_role("button", name="Copy the pwntools line")).to_be_visible()
            # A browser without the cookie (another person) gets the 401 page, no content.
            stranger = browser.new_context()
            other = stranger.new_page()
            response = other.goto(challenge.url)
            assert response is not None and response.status == 401
            expect(other.get_by_role("link", name="Open the instances dashboard")).to_be_visible()
            assert "echo challenge" not in other.content()
            # The organiser's dashboard opens the team's instance too.
            admin = stranger.new_page()
            admin.goto(f"{stack.api}/#token={ADMIN_TOKEN}")
            row_link = admin.locator("tr", has_text=team).get_by_role("link")
            with stranger.expect_page() as opened_by_admin:
                row_link.click()
            expect(opened_by_admin.value.locator("body")).to_contain_text("echo challenge")
            stranger.close()
            context.close()
        finally:
            browser.close()


def host_url(link: str | None) -> str:
    """The scheme, host and port of a link."""
    assert link is not None
    scheme, rest = link.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


# -- the script -------------------------------------------------------------------------------


def test_run_script_starts_traefik_and_stops_it_with_everything(
    stack: Stack, tmp_path: Path
) -> None:
    """CTF_INGRESS=traefik ./run-celery-worker.sh runs Traefik; SIGTERM stops it with the rest."""
    http_port, https_port, status_port = (free_port() for _ in range(3))
    data = tmp_path / "data"
    broker = stack.settings.broker_url.rsplit("/", 1)[0]
    env = {
        **os.environ,
        # Its own Redis databases: this worker must not take the stack worker's tasks.
        "CELERY_BROKER_URL": f"{broker}/5", "CELERY_RESULT_BACKEND": f"{broker}/6",
        "CTF_DATA_DIR": str(data), "CTF_CHALLENGES_FILE": str(stack.settings.challenges_file),
        # Its own run folder (pid files): run-tests.sh exports CTF_RUN_DIR for the whole suite.
        "CTF_RUN_DIR": str(data / "run"),
        "CTF_EXTRA_LABELS": json.dumps(stack.label), "CTF_TEAM_SUBNET_POOL": POOL,
        "CTF_INGRESS": "traefik", "CTF_INSTANCE_DOMAIN": DOMAIN,
        "CTF_INGRESS_HTTP_BIND": f"127.0.0.1:{http_port}",
        "CTF_INGRESS_HTTPS_BIND": f"127.0.0.1:{https_port}",
        "CTF_INGRESS_STATUS_BIND": f"127.0.0.1:{status_port}",
        "CTF_HOST": "local",
    }
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(ROOT / "run-celery-worker.sh"), "--no-api"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pidfile = data / "run" / "traefik.pid"
    try:
        wait_for(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 120, 0.2,
                 "the worker to be ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        traefik_pid = int(pidfile.read_text().split()[0])
        answer = get("127.0.0.1", http_port, "/", {"Host": f"nothing.{DOMAIN}"})
        assert answer.status == 404  # Traefik answers: no such instance
        assert (data / "ingress" / "selfsigned.crt").is_file()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert not pidfile.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(traefik_pid, 0)
    with pytest.raises(OSError):
        get("127.0.0.1", http_port, "/", {"Host": f"nothing.{DOMAIN}"}, timeout=2)


def test_janitor_repairs_routes_a_crash_left_behind(stack: Stack, alpha: dict[str, Any]) -> None:
    """A lost route of a running instance comes back; a route without a container goes."""
    dynamic = stack.settings.data_dir / "ingress" / "dynamic"
    own = dynamic / f"{alpha['container_name']}.yml"
    ghost = dynamic / f"ctf-echo-ghost-{_RUN}.yml"
    ghost.write_text(own.read_text())
    old = time.time() - 3600  # written long ago: not a start in progress
    os.utime(ghost, (old, old))
    own.unlink()
    wait_for(lambda: own.exists() and not ghost.exists(), 30, 0.2,
             "the janitor to rewrite the lost route and drop the stale one")
    # Traefik reads the rewritten file a moment later (its file watcher): poll for the route.
    cookie = wait_for(lambda: try_link(stack, alpha), 10, 0.1,
                      "Traefik to serve the rewritten route")
    wait_for(lambda: stack.web(host_of(alpha["url"]), headers={"Cookie": cookie}).status == 200,
             10, 0.05, "the rewritten route to serve the instance")


def test_readiness_goes_through_the_proxy(stack: Stack) -> None:
    """With no Traefik where the entry point should be, an answering container never runs."""
    settings = stack.settings.model_copy(
        update={"ingress_http_bind": f"127.0.0.1:{free_port()}"})
    ctx = build_context(settings)
    team = f"echo-{_RUN}"
    try:
        with pytest.raises(StartFailed, match="through the ingress"):
            ctx.service.start(ctx.service.catalog.key("quick", team))
        assert not (settings.data_dir / "ingress" / "dynamic" / f"ctf-quick-{team}.yml").exists()
        assert stack.docker.containers.list(
                ignore_removed=True, all=True, filters={"name": f"ctf-quick-{team}"}) == []
    finally:
        ctx.driver.close()


# -- revocation, TCP host rotation, front proxies (issue 22) ----------------------------------


def team_call(stack: Stack, team: str, token: str, challenge: str = "echo") -> tuple[int, Any]:
    """GET the team's instance with ``token``."""
    return stack.call("GET", f"/api/v1/teams/{team}/instances/{challenge}",
                      {"Authorization": f"Bearer {token}"})


def moved(stack: Stack, team: str, token: str, old_url: str,
          challenge: str = "echo") -> dict[str, Any] | None:
    """The instance once its ``url`` no longer is ``old_url`` (``None`` before)."""
    status, body = team_call(stack, team, token, challenge)
    assert status == 200, body
    return dict(body) if body["url"] != old_url else None


def test_revocation_refuses_old_token_link_and_cookie(stack: Stack) -> None:
    """After a revocation the old token is 401, old cookie and link 404/403; new ones work."""
    team = f"delta-{_RUN}"
    inst = stack.start(team, "echo")
    old_token = team_token(ADMIN_TOKEN, team)
    status, before = team_call(stack, team, old_token)
    assert status == 200
    old_host, old_link = host_of(before["url"]), path_of(before["access_url"])
    old_cookie = open_link(stack, inst)
    assert stack.web(old_host, headers={"Cookie": old_cookie}).status == 200
    # Only the admin may revoke.
    refused, _ = stack.call("POST", f"/api/v1/teams/{team}/revoke",
                            {"Authorization": f"Bearer {old_token}"})
    assert refused == 403
    status, revoked = stack.call("POST", f"/api/v1/teams/{team}/revoke")
    assert status == 200 and revoked["team_id"] == team and revoked["generation"] == 1
    new_token = revoked["token"]
    assert new_token != old_token
    # The token: refused at once; the new one works, and is what the token route gives now.
    assert team_call(stack, team, old_token)[0] == 401
    assert team_call(stack, team, new_token)[0] == 200
    assert stack.call("GET", f"/api/v1/teams/{team}/token")[1]["token"] == new_token
    # The host: the instance moves (its next janitor pass), the old name answers nothing.
    after = wait_for(lambda: moved(stack, team, new_token, before["url"]), 30, 0.2,
                     "the instance to move to a new host")
    new_host = host_of(after["url"])
    wait_for(lambda: stack.web(old_host, headers={"Cookie": old_cookie}).status == 404, 10,
             0.05, "the old host to answer 404")
    assert stack.web(old_host, old_link).status == 404
    # The old cookie and link mean nothing on the new host either.
    wait_for(lambda: stack.web(new_host).status == 401, 10, 0.05, "Traefik to serve the new host")
    assert stack.web(new_host, headers={"Cookie": old_cookie}).status == 403
    assert stack.web(new_host, old_link).status == 403
    # A fresh access_url opens it.
    opened = stack.web(new_host, path_of(after["access_url"]))
    assert opened.status == 302, opened.text()
    page = stack.web(new_host, headers={"Cookie": opened.set_cookies[0].split(";", 1)[0]})
    assert page.status == 200 and "echo challenge" in page.text()
    stack.call("DELETE", f"/api/v1/teams/{team}/instances/echo?wait=30")


def test_tcp_instance_gets_a_new_host_each_time_and_on_revocation(stack: Stack) -> None:
    """A TCP instance's SNI name changes with each new instance and with ctfctl revoke."""
    team = f"echo-tcp-{_RUN}"
    first = stack.start(team, "nc")
    assert tls_echo(stack, host_of(first["url"]), b"one\n") == b"one\n"
    stack.call("DELETE", f"/api/v1/teams/{team}/instances/nc?wait=30")
    # The name's nonce is the instance's started_at, in whole seconds (SPEC's label format): a
    # start in the same second as the last one, by the same team, may get the same name.
    wait_for(lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) != first["started_at"],
             5, 0.05, "the next second")
    second = stack.start(team, "nc")
    assert host_of(second["url"]) != host_of(first["url"])
    assert tls_echo(stack, host_of(second["url"]), b"two\n") == b"two\n"
    assert tls_echo(stack, host_of(first["url"]), b"old\n") != b"old\n"
    # The organisers' command line revokes too (and prints the new token).
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "ctfctl"), "revoke", team, "--json"],
                          env={**os.environ, **stack.env}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    new_token = json.loads(done.stdout)["token"]
    third = wait_for(lambda: moved(stack, team, new_token, second["url"], "nc"), 30, 0.2,
                     "the TCP instance to move to a new host")
    wait_for(lambda: tls_echo(stack, host_of(third["url"]), b"three\n") == b"three\n", 10, 0.1,
             "the new host to reach the instance")
    assert tls_echo(stack, host_of(second["url"]), b"old\n") != b"old\n"
    stack.call("DELETE", f"/api/v1/teams/{team}/instances/nc?wait=30")


def test_forwarded_proto_is_ignored_without_trusted_proxies(stack: Stack,
                                                            alpha: dict[str, Any]) -> None:
    """By default a client's X-Forwarded-Proto: https changes nothing: http://, plain cookie."""
    answer = stack.web(host_of(alpha["url"]), path_of(alpha["access_url"]),
                       {"X-Forwarded-Proto": "https"})
    assert answer.status == 302 and answer.headers["location"].startswith("http://")
    name, attrs = cookie_parts(answer.set_cookies[0])
    assert name == tokens.COOKIE_NAME and "secure" not in attrs


PROXIED_POOL = "10.235.0.0/16"


def test_trusted_front_proxy_gets_https_redirect_and_host_cookie(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """Behind a trusted TLS proxy: https:// and a Secure __Host- cookie; others' header ignored."""
    label = private_label("ingress-proxy")
    # The front proxy is 127.0.0.1; any other loopback address (127.0.0.2) is a stranger.
    with running_stack(docker_client, tmp_path, label, catalog(ingress_images(docker_client,
                                                                              label)),
                       PROXIED_POOL, CTF_INGRESS_TRUSTED_PROXIES="127.0.0.1/32") as proxied:
        team = f"proxied-{_RUN}"
        proxied.start(team, "quick")
        inst = as_team(proxied, team, "quick")
        host = host_of(inst["url"])
        forwarded = {"Host": host, "X-Forwarded-Proto": "https"}  # as the proxy sends it
        via_proxy = proxied.web(host, path_of(inst["access_url"]), forwarded)
        assert via_proxy.status == 302, via_proxy.text()
        assert via_proxy.headers["location"] == f"https://{host}/"
        name, attrs = cookie_parts(via_proxy.set_cookies[0])
        assert name == "__Host-ctf_ingress_access" and {"secure", "path=/"} <= set(attrs)
        cookie = via_proxy.set_cookies[0].split(";", 1)[0]
        page = proxied.web(host, "/cgi-bin/echo", {**forwarded, "Cookie": f"a=1; {cookie}"})
        assert page.status == 200 and "HTTP_COOKIE=a=1\n" in page.text()
        # The same header from a client that is not the proxy: plain HTTP's answer.
        stranger = proxied.web(host, path_of(as_team(proxied, team, "quick")["access_url"]),
                               forwarded, source="127.0.0.2")
        assert stranger.status == 302
        assert stranger.headers["location"] == f"http://{host}/"
        name, attrs = cookie_parts(stranger.set_cookies[0])
        assert name == tokens.COOKIE_NAME and "secure" not in attrs
