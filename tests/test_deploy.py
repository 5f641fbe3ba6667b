"""The deployment organisers run (issue 28): deploy/build-image.sh, then docker-compose.

The image is built by the script (with its debootstrapped base when no registry answers,
kept between runs by tag), the stack comes up from ``deploy/compose.yaml`` under a project
name of this run's, with free ports, a subnet pool of its own and the run's labels, and a
stand-in challenge is started and stopped through the API and reached through Traefik.
Everything it made (containers, networks, volumes, the image, the firewall table) is
removed at the end.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import docker
import httpx
import pytest
import redis
from ci import unavailable
from conftest import ROOT, RUN_ID, TEST_LABEL, free_port, private_label, wait_for

from celery_app.vocab.team_tokens import team_token
from ctf_testkit.docker_sweep import sweep

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DEPLOY = ROOT / "deploy"
POOL = "10.228.0.0/16"  # its own (test_service_docker has 10.229)
TABLE = "ctf_egress_10_228_0_0_16"
TEAM = "deployteam"


def _clean_env() -> dict[str, str]:
    """Our environment without the instancer's settings (they would beat the env file)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CTF_", "CELERY_", "COMPOSE_"))}


@pytest.fixture(scope="module")
def product_image(docker_client: docker.DockerClient) -> Iterator[str]:
    """The product image, built by deploy/build-image.sh and labelled with this run's label."""
    tag = f"ctf-instancer:test-{RUN_ID}"
    label = f"{RUN_ID}-deploy"
    # build-image.sh keeps the base it debootstraps (when no registry answers) for later
    # builds; one this run made is this run's to remove.
    base = "ctf-instancer-base:bookworm-debootstrap"
    had_base = bool(docker_client.images.list(filters={"reference": base}))
    env = {**_clean_env(), "CTF_IMAGE": tag, "CTF_BUILD_LABEL": label,
           "CTF_IMAGE_LABELS": " ".join(f"{k}={v}" for k, v in TEST_LABEL.items())}
    try:
        done = subprocess.run([str(DEPLOY / "build-image.sh")], env=env, capture_output=True,
                              text=True, timeout=1500, check=False)
        assert done.returncode == 0, f"build-image.sh failed:\n{done.stderr[-4000:]}"
        assert "built " + tag in done.stderr
        yield tag
    finally:
        # The image first, then its intermediate stages (same label, untagged).
        for flt in ({"reference": tag}, {"label": f"org.ctf-instancer.build={label}"}):
            for image in docker_client.images.list(filters=flt):
                with contextlib.suppress(docker.errors.APIError):
                    docker_client.images.remove(image.id, force=True)
        if not had_base:
            with contextlib.suppress(docker.errors.APIError):
                docker_client.images.remove(base, force=True)


@dataclass
class Stack:
    """One compose project of this run: how to drive it and where it listens."""

    project: str
    env_file: Path
    values: dict[str, str]
    secrets: dict[str, str]  # CTF_ADMIN_TOKEN, ... -> the value in its file

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``docker-compose -p <project> --env-file <ours> -f deploy/compose.yaml args``."""
        exe = shutil.which("docker-compose")
        assert exe is not None
        done = subprocess.run(
            [exe, "-p", self.project, "--env-file", str(self.env_file),
             "-f", str(DEPLOY / "compose.yaml"), *args],
            env=_clean_env(), capture_output=True, text=True, timeout=timeout, check=False,
            cwd=str(ROOT),
        )
        assert done.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{done.stderr}"
        return done

    @property
    def api(self) -> str:
        """The API's base URL."""
        return f"http://{self.values['CTF_API_PUBLISH']}"

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """GET on the API (no proxy from the environment)."""
        with httpx.Client(trust_env=False, timeout=30) as client:
            return client.get(self.api + path, **kwargs)

    def team_headers(self, team: str = TEAM) -> dict[str, str]:
        """The team's Authorization header."""
        return {"Authorization": f"Bearer {team_token(self.secrets['CTF_ADMIN_TOKEN'], team)}"}

    def web(self, host: str, path: str, cookie: str | None = None) -> httpx.Response:
        """GET through Traefik's HTTP entry point for ``host``."""
        headers = {"Host": host, **({"Cookie": cookie} if cookie else {})}
        with httpx.Client(trust_env=False, timeout=10) as client:
            return client.get(f"http://{self.values['CTF_INGRESS_HTTP_BIND']}{path}",
                              headers=headers)

    def healthy(self) -> bool:
        """Whether /healthz answers 200 with a worker alive."""
        try:
            answer = self.get("/healthz")
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.json().get("workers", 0) >= 1

    def logs(self) -> str:
        """The services' last log lines (for a failing assertion)."""
        with contextlib.suppress(Exception):
            return self.compose("logs", "--tail", "40", "--no-color").stdout[-6000:]
        return ""


def _write_catalog(path: Path, image: str) -> None:
    path.write_text(f"""
challenges:
  web:
    name: Stand-in web challenge
    image: {image}
    port: 8080
    ttl: 600
    memory: 64m
    start_timeout: 30
""")


@pytest.fixture(scope="module")
def stack(
    product_image: str, images: dict[str, str], docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The compose stack of this run, up and healthy; brought down with its volumes after."""
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is missing: apt-get install docker-compose")
    if shutil.which("nft") is None and not Path("/usr/sbin/nft").exists():
        unavailable("nft is missing (the worker's egress firewall): apt-get install nftables")
    work = tmp_path_factory.mktemp("deploy")
    catalog = work / "challenges.yaml"
    _write_catalog(catalog, images["http"])
    label = private_label("deploy")
    api, redis_port = free_port(), free_port()
    # The secrets as organisers make them: files from deploy/make-secrets.sh.
    secrets_dir = work / "secrets"
    made = subprocess.run([str(DEPLOY / "make-secrets.sh")],
                          env={**_clean_env(), "CTF_SECRETS_DIR": str(secrets_dir)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    files = {f"CTF_{name.upper()}": secrets_dir / name
             for name in ("admin_token", "flag_secret", "redis_password")}
    assert all(f.stat().st_mode & 0o777 == 0o440 for f in files.values())
    values = {
        "CTF_IMAGE": product_image,
        "CTF_SECRETS_DIR": str(secrets_dir),
        "CTF_CHALLENGES_FILE": str(catalog),
        "CTF_API_PUBLISH": f"127.0.0.1:{api}",
        "CTF_REDIS_PUBLISH": f"127.0.0.1:{redis_port}",
        "CTF_REDIS_WORKER_ADDR": f"127.0.0.1:{redis_port}",
        "CTF_INGRESS_HTTP_BIND": f"127.0.0.1:{free_port()}",
        "CTF_INGRESS_HTTPS_BIND": f"127.0.0.1:{free_port()}",
        "CTF_INGRESS_STATUS_BIND": f"127.0.0.1:{free_port()}",
        "CTF_INGRESS_GATE_URL": f"http://127.0.0.1:{api}/_ingress/gate",
        "CTF_DASHBOARD_URL": f"http://localhost:{api}/",
        "CTF_TEAM_SUBNET_POOL": POOL,
        "CTF_EXTRA_LABELS": json.dumps(label),
        "CTF_DEPLOY_LABEL": label["ctf.test"],
    }
    env_file = work / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env_file.chmod(0o600)
    s = Stack(f"ctfdeploy{RUN_ID.replace('-', '')}", env_file, values,
              {name: f.read_text().strip() for name, f in files.items()})
    try:
        s.compose("up", "-d")
        try:
            wait_for(s.healthy, 180, 0.5, "the API to answer /healthz with a worker")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{s.logs()}") from None
        yield s
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            s.compose("down", "-v", "--remove-orphans")
        sweep(docker_client, label)
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True,
                       check=False)


def _start(stack: Stack, team: str = TEAM) -> dict[str, Any]:
    answer = httpx.put(f"{stack.api}/api/v1/teams/{team}/instances/web?wait=60",
                       headers=stack.team_headers(team), timeout=90, trust_env=False)
    assert answer.status_code in (200, 202), f"{answer.status_code} {answer.text}\n{stack.logs()}"
    body = answer.json()
    assert body["status"] == "running", f"{body}\n{stack.logs()}"
    return dict(body)


def _instance(stack: Stack) -> dict[str, Any]:
    answer = stack.get(f"/api/v1/teams/{TEAM}/instances/web", headers=stack.team_headers())
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _open(stack: Stack, inst: dict[str, Any]) -> str:
    """Follow the instance's access link through Traefik; return the cookie it sets."""
    host = inst["url"].split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]
    link = "/" + inst["access_url"].split("://", 1)[1].split("/", 1)[1]
    answer = stack.web(host, link)
    assert answer.status_code in (302, 303), f"{answer.status_code} {answer.text}"
    return str(answer.headers["set-cookie"].split(";", 1)[0])


def _host_of(inst: dict[str, Any]) -> str:
    return str(inst["url"].split("://", 1)[1].split("/", 1)[0].split(":", 1)[0])


def _secret_forms(stack: Stack) -> list[str]:
    """Every secret value, and the Redis password as it appears in a URL."""
    values = list(stack.secrets.values())
    return [*values, urllib.parse.quote(stack.secrets["CTF_REDIS_PASSWORD"], safe="")]


def test_image_is_non_root_and_holds_no_secret(stack: Stack,
                                              docker_client: docker.DockerClient) -> None:
    """The built image runs as a non-root user and no secret is in its history or config."""
    image = docker_client.images.get(stack.values["CTF_IMAGE"])
    assert image.attrs["Config"]["User"] == "ctf"
    history = subprocess.run(["docker", "history", "--no-trunc", stack.values["CTF_IMAGE"]],
                             capture_output=True, text=True, check=True).stdout
    config = json.dumps(image.attrs)
    for value in _secret_forms(stack):
        assert value not in history
        assert value not in config
    # The API container runs as that user; the worker keeps NET_ADMIN alone.
    api = docker_client.containers.get(f"{stack.project}_api_1")
    assert api.attrs["Config"]["User"] in ("", "ctf")
    worker = docker_client.containers.get(f"{stack.project}_worker_1")
    assert worker.attrs["HostConfig"]["CapAdd"] == ["NET_ADMIN"]
    assert worker.attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert not worker.attrs["HostConfig"]["Privileged"]


def test_no_secret_in_docker_inspect_of_any_container(
    stack: Stack, docker_client: docker.DockerClient,
) -> None:
    """No container of the stack shows a secret in ``docker inspect``; the secrets are in use."""
    project = {"label": [f"com.docker.compose.project={stack.project}"]}
    containers = docker_client.containers.list(ignore_removed=True, all=True, filters=project)
    assert {c.labels["com.docker.compose.service"] for c in containers} == {
        "redis", "api", "worker", "traefik"}
    for container in containers:
        inspected = subprocess.run(["docker", "inspect", container.id], capture_output=True,
                                   text=True, check=True).stdout
        config = json.loads(inspected)[0]["Config"]
        parts = {key: json.dumps(config.get(key)) for key in ("Env", "Cmd", "Entrypoint", "Labels")}
        for value in _secret_forms(stack):
            assert value not in inspected, f"a secret in docker inspect of {container.name}"
            assert all(value not in part for part in parts.values())
    # The files are what the stack runs with: Redis wants their password, and a team token
    # made from the admin token's file is accepted (the other tests start instances with it).
    redis_url = f"redis://{stack.values['CTF_REDIS_PUBLISH']}/0"
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(redis_url, socket_timeout=5).ping()
    client = redis.Redis.from_url(redis_url, password=stack.secrets["CTF_REDIS_PASSWORD"],
                                  socket_timeout=5)
    assert client.ping()
    client.close()
    answer = stack.get(f"/api/v1/teams/{TEAM}/instances", headers=stack.team_headers())
    assert answer.status_code == 200, answer.text


def test_start_is_served_through_the_ingress_to_its_team_only(stack: Stack) -> None:
    """A start through the API runs; Traefik serves it with the team's link, 401 without."""
    inst = _start(stack)
    assert inst["url"].startswith("http://") and "access_url" in inst
    host = _host_of(inst)
    assert stack.web(host, "/").status_code == 401
    cookie = _open(stack, inst)
    page = stack.web(host, "/", cookie)
    assert page.status_code == 200 and "hello from ctf" in page.text
    # Another team's cookie (from its own instance's link) does not open it.
    theirs = _start(stack, "otherteam")
    their_cookie = _open(stack, theirs)
    assert stack.web(_host_of(theirs), "/", their_cookie).status_code == 200
    assert stack.web(host, "/", their_cookie).status_code == 403
    gone = httpx.delete(f"{stack.api}/api/v1/teams/otherteam/instances/web?wait=60",
                        headers=stack.team_headers("otherteam"), timeout=90, trust_env=False)
    assert gone.status_code in (200, 202, 204), gone.text
    dashboard = stack.get("/")
    assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()


class _Listener(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host service\n")

    def log_message(self, *args: Any) -> None:
        pass


def test_egress_firewall_is_in_force(stack: Stack, docker_client: docker.DockerClient) -> None:
    """The worker installed the nftables table; the instance cannot reach a host service."""
    listed = subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True,
                            text=True, check=False)
    assert listed.returncode == 0, f"no table {TABLE}: {listed.stderr}\n{stack.logs()}"
    inst = _instance(stack)
    container = docker_client.containers.get(inst["container_name"])
    net = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))
    gateway = net["Gateway"]
    port = free_port()
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), _Listener)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # The host answers itself on the gateway address (the rule is what stops it).
        with httpx.Client(trust_env=False, timeout=5) as client:
            assert client.get(f"http://{gateway}:{port}/from-host").status_code == 200
        code, out = container.exec_run(
            ["/bin/busybox", "wget", "-q", "-T", "3", "-O", "-", f"http://{gateway}:{port}/x"])
        assert code != 0, out
        assert "/x" not in _Listener.hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("service", ["redis", "worker", "api", "traefik"])
def test_restarting_a_service_loses_nothing(stack: Stack, service: str) -> None:
    """After a restart of any one service the instance is still recorded, running and served."""
    before = _instance(stack)
    stack.compose("restart", service)
    wait_for(stack.healthy, 120, 0.5, f"the stack to be healthy after restarting {service}")
    after = wait_for(lambda: (i := _instance(stack))["status"] == "running" and i, 60, 0.5,
                     "the instance to show running")
    assert after["container_id"] == before["container_id"]
    assert after["expires_at"] == before["expires_at"]
    cookie = wait_for(lambda: _try_open(stack), 60, 0.5, "the access link to work")
    page = wait_for(lambda: (p := stack.web(_host_of(after), "/", cookie)).status_code == 200
                    and p, 60, 0.5, "the page through Traefik")
    assert "hello from ctf" in page.text


def _try_open(stack: Stack) -> str | None:
    try:
        return _open(stack, _instance(stack))
    except (AssertionError, KeyError, httpx.HTTPError):
        return None


def test_down_then_up_adopts_then_stop_and_down_remove_everything(
    stack: Stack, docker_client: docker.DockerClient,
) -> None:
    """``down``/``up`` keeps the instance; a stop removes it; ``down -v`` leaves nothing."""
    before = _instance(stack)
    stack.compose("down")
    # The instance outlives the stack (it is the engine's); the volumes keep its record.
    assert docker_client.containers.get(before["container_name"]).status == "running"
    stack.compose("up", "-d")
    wait_for(stack.healthy, 180, 0.5, "the stack to come back")
    after = _instance(stack)
    assert after["status"] == "running" and after["container_id"] == before["container_id"]

    answer = httpx.delete(f"{stack.api}/api/v1/teams/{TEAM}/instances/web?wait=60",
                          headers=stack.team_headers(), timeout=90, trust_env=False)
    assert answer.status_code in (200, 202, 204), answer.text

    def gone() -> bool:
        try:
            docker_client.containers.get(before["container_name"])
        except docker.errors.NotFound:
            return True
        return False

    wait_for(gone, 60, 0.5, "the instance's container to be removed")

    stack.compose("down", "-v", "--remove-orphans")
    project = {"label": [f"com.docker.compose.project={stack.project}"]}
    assert docker_client.containers.list(ignore_removed=True, all=True, filters=project) == []
    assert docker_client.volumes.list(filters=project) == []
    assert docker_client.networks.list(filters=project) == []
