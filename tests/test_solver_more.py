"""Solver health checks, continued (SPEC §14, issue 26), on the real engine with the firewall on.

A real worker with default settings (the egress firewall at its default ``auto``: on, as root)
on a Redis of its own, and the API on the same Redis, served over real HTTP too (the
organiser dashboard in headless Chromium). Four challenges have solvers:

- ``shop`` and ``shopless``: the shipped Compose example (``examples/shop``: web, db, bot);
  their solver reads the flag from the ``db`` service by its name, not from the primary
  endpoint. ``shopless``'s db holds no flag: its solver finds none and the challenge is broken;
- ``probe``: a one-image stand-in whose solver tries the host (its gateway and another of the
  host's addresses, on a port this test opens), a stand-in internet host, and every address
  of the first subnets of this file's pool, where another team's instance of ``victim`` runs;
- ``victim``: a one-image stand-in whose page carries a marker; its canary, on the canary
  network beside ``probe``'s, is what the probe can reach (the scan's proof that it works).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest
import uvicorn
import yaml
from api_helpers import ADMIN
from ci import unavailable
from conftest import (
    ADMIN_TOKEN,
    BUSYBOX,
    ROOT,
    RUN_ID,
    base_env,
    build_image,
    cleanup_docker,
    containers_of,
    free_port,
    private_label,
    worker_and_api,
)
from playwright.sync_api import Browser, expect, sync_playwright
from test_compose_docker import SHOP, shop_images  # noqa: F401  # a module fixture
from test_egress import listener, netns_host
from test_solver import FETCH, SOLVER_DOCKERFILE

from celery_app.api.app import create_app
from celery_app.engine.firewall import table_name
from celery_app.settings import load_settings
from ctf_testkit.support import RedisServer, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("solver-more")
POOL = "10.209.0.0/16"  # this file's team-subnet pool (and its own firewall table)
PREFIX = 28  # CTF_TEAM_SUBNET_PREFIX's default: the subnets the scan walks
INTERNET = ("ctfsolvmore", "203.0.113.57", "203.0.113.58")  # a stand-in internet host
MARK = "solver-more-marker"
START = "celery_app.tasks.start_container"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# The one-image challenges: a page holding the instance's flag (and, for victim, the marker).
SERVE = ("/bin/busybox mkdir -p /tmp/www && echo \"{prefix}the flag is $CTF_FLAG\" > "
         "/tmp/www/index.html && exec /bin/busybox httpd -f -p 8080 -h /tmp/www")
GATEWAY = "$(/bin/busybox ip route | /bin/busybox awk '/default/ {print $3}')"
# The Compose solver: the primary endpoint is named to it, the flag is in the db service.
FROM_DB = ("echo \"solving $CTF_TARGET_URL\" && /bin/busybox nc -w 5 db 5432 </dev/null")


def probe(address: str, port: int, what: str) -> str:
    """Shell that prints ``<what>-reached`` or ``<what>-blocked`` for a TCP connection."""
    return (f"if /bin/busybox nc -w 3 {address} {port} </dev/null | /bin/busybox grep -q "
            f"{MARK}; then echo {what}-reached; else echo {what}-blocked; fi")


def scanned() -> list[str]:
    """The addresses the probe's scan tries: the first hosts of the pool's first subnets.

    Subnets are handed out in order from the pool; this file's four networks (the canary
    team's, two Compose canaries', team t1's) are among the first eight.
    """
    found = []
    for subnet in list(ipaddress.IPv4Network(POOL).subnets(new_prefix=PREFIX))[:8]:
        found += [str(subnet.network_address + n) for n in range(2, 6)]
    return found


def scan() -> str:
    """Shell that asks every scanned address for a page at once; prints ``mark-at <ip>``."""
    addresses = " ".join(scanned())
    return ("printf 'GET / HTTP/1.0\\r\\n\\r\\n' > /tmp/req; "
            f"for a in {addresses}; do /bin/busybox nc -w 3 $a 8080 </tmp/req >/tmp/o.$a "
            "2>/dev/null & done; wait; "
            f"for a in {addresses}; do /bin/busybox grep -q {MARK} /tmp/o.$a "
            "&& echo mark-at $a; done; echo scanned")


@dataclass
class Setup:
    """The running instancer of this file."""

    api: Any
    platform: Any
    url: str
    env: dict[str, str]


def catalog(image: str, solver: str, host_port: int, host_address: str,
            internet_port: int) -> dict[str, Any]:
    """The four challenges (see the module's docstring)."""
    probing = " ; ".join([probe(GATEWAY, host_port, "host"),
                          probe(host_address, host_port, "hostaddr"),
                          probe(INTERNET[2], internet_port, "internet"), scan(), FETCH])
    fenced = " ; ".join([probe(GATEWAY, host_port, "host"),
                         probe(INTERNET[2], internet_port, "internet"), FROM_DB])

    def one(script: str, prefix: str = "") -> dict[str, Any]:
        return {"image": image, "port": 8080, "flag_env": "CTF_FLAG", "ttl": 600,
                "command": ["sh", "-c", SERVE.format(prefix=prefix)],
                "solver": {"image": solver, "command": [script], "interval": 10}}

    def compose(path: str, script: str) -> dict[str, Any]:
        return {"compose": path, "ttl": 600, "memory": "64m", "start_timeout": 60,
                "solver": {"image": solver, "command": [script]}}

    return {"challenges": {
        "probe": one(probing),
        "victim": one(f"echo solving && {FETCH}", prefix=f"{MARK} "),
        "shop": {"name": "Shop with a database", **compose("shop/compose.yaml", fenced)},
        "shopless": compose("shopless.yaml", FROM_DB),
    }}


@pytest.fixture(scope="module")
def setup(images: dict[str, str], shop_images: dict[str, str],  # noqa: F811
          docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A worker with default settings and the firewall on, its API (also over HTTP)."""
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("nsenter"):
        unavailable("the solvers' egress test needs root, nft and nsenter")
    workdir = tmp_path_factory.mktemp("solver-more")
    solver = build_image(docker_client, f"ctf-test/solver-more:{RUN_ID}", SOLVER_DOCKERFILE,
                         {"busybox": BUSYBOX})
    text = (SHOP / "compose.yaml").read_text()
    for service, tag in shop_images.items():
        text = text.replace(f"ctf-example/shop-{service}:1", tag)
    (workdir / "shop").mkdir()
    (workdir / "shop" / "compose.yaml").write_text(text)
    assert "FLAG: ${CTF_FLAG}" in text
    (workdir / "shopless.yaml").write_text(text.replace("FLAG: ${CTF_FLAG}", "FLAG: no-flag"))
    server = RedisServer(tmp_path_factory.mktemp("solver-more-redis"))
    server.start()
    table = table_name(ipaddress.IPv4Network(POOL))
    try:
        with listener(MARK) as host_port, \
                netns_host(*INTERNET) as internet, \
                listener(MARK, netns=INTERNET[0]) as internet_port:
            path = workdir / "challenges.yaml"
            path.write_text(yaml.safe_dump(catalog(images["http"], solver, host_port,
                                                   internet.host_ip, internet_port)))
            env = {**base_env(server, path, workdir / "data"),
                   "CTF_EXTRA_LABELS": json.dumps(LABEL),
                   "CTF_TEAM_SUBNET_POOL": POOL}
            for name in ("CTF_EGRESS_FIREWALL", "CTF_JANITOR_INTERVAL", "CTF_ORPHAN_GRACE",
                         "CTF_TEAM_SUBNET_PREFIX"):
                env.pop(name, None)  # what users get: the firewall on, default intervals
            with worker_and_api(env, path, workdir) as (_worker, platform, api), \
                    live(env, path) as url:
                yield Setup(api, platform, url, env)
    finally:
        cleanup_docker(docker_client, LABEL)
        subprocess.run(["nft", "delete", "table", "inet", table], check=False,
                       capture_output=True)
        server.stop()


class live:  # noqa: N801  # used as a context manager, like open()
    """The API over real HTTP (uvicorn in a thread), for the browser."""

    def __init__(self, env: dict[str, str], catalog_path: Path) -> None:
        settings = load_settings(
            broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
            redis_url=env["CTF_REDIS_URL"], challenges_file=catalog_path,
            data_dir=Path(env["CTF_DATA_DIR"]), admin_token=ADMIN_TOKEN)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
            lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="solver-more-uvicorn",
                                       daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 20, 0.1,
                 "uvicorn to start")
        assert self.server.started, "uvicorn did not start"
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def health(setup: Setup) -> dict[str, dict[str, Any]]:
    """``GET /api/v1/health/challenges`` by challenge."""
    r = setup.api.get("/api/v1/health/challenges", headers=ADMIN)
    assert r.status_code == 200, r.text
    return {row["challenge"]: row for row in r.json()["challenges"]}


def settled(setup: Setup, challenge: str, after: str = "", timeout: float = 240,
            ) -> dict[str, Any]:
    """The challenge's row once it has a verdict from a run after ``after`` (ISO time)."""
    found: dict[str, Any] = {}

    def ready() -> bool:
        found.update(health(setup)[challenge])
        return found["state"] != "unknown" and (found["last_run"] or "") > after

    wait_for(ready, timeout, 0.5, f"a verdict on {challenge}")
    return found


def test_a_compose_solver_reaches_a_service_by_name_and_turns_ok(
        setup: Setup, docker_client: docker.DockerClient) -> None:
    """A Compose canary is proven by a solver that reads the flag from its db by name."""
    row = settled(setup, "shop")
    assert row["state"] == "ok", row
    assert "flag [flag]" in row["output"], row  # db's answer, the flag masked
    (target,) = [line for line in row["output"] if line.startswith("solving ")]
    web = [c for c in containers_of(docker_client, LABEL, **{
        "ctf.team": "canary", "ctf.challenge": "shop", "ctf.service": "web"})
        if c.status == "running"]
    assert len(web) == 1
    address = next(iter(web[0].attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    assert target == f"solving http://{address}:8080/"  # the primary endpoint
    # a canary is the whole group: every service of it, for team canary
    services = {c.labels["ctf.service"] for c in containers_of(
        docker_client, LABEL, **{"ctf.team": "canary", "ctf.challenge": "shop"})}
    assert services == {"web", "db", "bot"}


def _group(docker_client: docker.DockerClient, challenge: str) -> dict[str, str]:
    """The running containers of the challenge's canary: service -> container id."""
    return {c.labels["ctf.service"]: c.id for c in containers_of(
        docker_client, LABEL, **{"ctf.team": "canary", "ctf.challenge": challenge})
        if c.status == "running"}


def test_a_compose_canary_whose_db_dies_is_made_again_and_proven_again(
        setup: Setup, docker_client: docker.DockerClient) -> None:
    """Killing one service of a Compose canary makes the whole group again, proven ok."""
    before = settled(setup, "shop")
    old = _group(docker_client, "shop")
    assert set(old) == {"web", "db", "bot"}
    time.sleep(1.1)  # last_run has whole seconds: the next run's must be a later one
    docker_client.containers.get(old["db"]).kill()
    row = settled(setup, "shop", after=before["last_run"])
    assert row["state"] == "ok", row
    assert "flag [flag]" in row["output"], row
    new = _group(docker_client, "shop")
    assert set(new) == {"web", "db", "bot"} and not set(new.values()) & set(old.values())


def test_a_pool_drain_makes_the_compose_canary_again_and_proves_it_at_once(
        setup: Setup, docker_client: docker.DockerClient) -> None:
    """After a drain (an image update) every service of the canary is new, proven at once."""
    before = settled(setup, "shop")
    old = _group(docker_client, "shop")
    time.sleep(1.1)  # last_run has whole seconds: the next run's must be a later one
    r = setup.api.post("/api/v1/pools/shop/drain", headers=ADMIN)
    assert r.status_code == 200, r.text
    row = settled(setup, "shop", after=before["last_run"])
    assert row["state"] == "ok", row  # well before the 300 s interval
    new = _group(docker_client, "shop")
    assert set(new) == {"web", "db", "bot"} and not set(new.values()) & set(old.values())


def test_a_compose_solver_that_finds_no_flag_turns_broken_with_its_output(
        setup: Setup) -> None:
    """A Compose canary whose db holds no flag is broken; the solver's output is kept."""
    row = settled(setup, "shopless")
    assert row["state"] == "broken", row
    assert "flag no-flag" in row["output"], row
    assert row["output"][0].startswith("solving http://"), row
    metrics = setup.api.get("/metrics", headers=ADMIN).text
    assert 'ctf_challenge_healthy{challenge="shopless"} 0.0' in metrics
    assert 'ctf_challenge_healthy{challenge="shop"} 1.0' in metrics


def test_a_compose_solver_reaches_neither_the_host_nor_the_internet(setup: Setup) -> None:
    """From a Compose canary's own network the solver reaches its services, nothing else."""
    row = settled(setup, "shop")
    assert "host-blocked" in row["output"], row
    assert "internet-blocked" in row["output"], row
    assert row["state"] == "ok", row


def test_the_solver_cannot_reach_the_host_other_teams_or_the_internet(
        setup: Setup, docker_client: docker.DockerClient) -> None:
    """The solver reaches its canary, not the host, another team's instance or the internet."""
    settled(setup, "victim")  # its canary is up: what the probe's scan must reach
    result = setup.platform.send_task(START, args=["victim", "t1"]).get(timeout=180)
    assert result["status"] == "running", result
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    (theirs,) = containers_of(docker_client, LABEL, **{"ctf.team": "t1",
                                                       "ctf.challenge": "victim"})
    other = next(iter(theirs.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    assert other in scanned(), (other, "is outside the scan: more networks than expected")
    (canary,) = [c for c in containers_of(docker_client, LABEL, **{"ctf.team": "canary",
                                                                    "ctf.challenge": "victim"})
                 if c.status == "running"]
    ours = next(iter(canary.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    row = settled(setup, "probe", after=since)
    out = row["output"]
    assert "scanned" in out, row  # the scan ran to its end
    assert f"mark-at {ours}" in out, row  # it reaches what its own network holds...
    assert f"mark-at {other}" not in out, row  # ...but not another team's instance
    assert "host-blocked" in out and "hostaddr-blocked" in out, row
    assert "internet-blocked" in out, row
    assert row["state"] == "ok", row  # and its canary answered


def test_the_health_answer_names_the_canarys_host(setup: Setup) -> None:
    """Each verdict says which host's canary (and so which host's instances) it proves."""
    row = settled(setup, "probe")
    r = setup.api.get("/api/v1/instances", headers=ADMIN)
    assert r.status_code == 200, r.text
    (canary,) = [i for i in r.json()["instances"]
                 if i["team_id"] == "canary" and i["challenge"] == "probe"]
    assert row["host"] and row["host"] == canary["host"], (row, canary)


@pytest.mark.browser
def test_the_dashboard_marks_a_broken_challenge_with_its_output(setup: Setup,
                                                               tmp_path: Path) -> None:
    """The organiser dashboard lists the solvers' verdicts; a broken one shows its output."""
    settled(setup, "shopless")
    settled(setup, "shop")
    if not CHROMIUM.exists():
        unavailable("chromium is missing: run ./setup-celery.sh --dev (apt-get install chromium)")
    with sync_playwright() as p:
        browser: Browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(base_url=setup.url)
            page.goto(f"/#token={ADMIN_TOKEN}")
            broken = page.locator('#checks tr[data-challenge="shopless"]')
            expect(broken.locator(".badge")).to_have_text("BROKEN", timeout=30_000)
            expect(broken.locator("details")).to_have_attribute("open", "", timeout=10_000)
            expect(broken.locator("pre.output")).to_contain_text("flag no-flag")
            good = page.locator('#checks tr[data-challenge="shop"]')
            expect(good.locator(".badge")).to_have_text("OK")
            expect(good.locator(".c-challenge")).to_have_text("Shop with a database (shop)")
            expect(good.locator("pre.output")).to_be_hidden()  # an ok one stays folded
            expect(page.locator("#checks-count")).to_contain_text("1 of 4 broken")
            # The panel as the README shows it (CTF_DASHBOARD_SCREENSHOTS=1 writes it there).
            shot = tmp_path / "dashboard-health.png"
            page.locator("#checks-panel").screenshot(path=str(shot))
            if os.environ.get("CTF_DASHBOARD_SCREENSHOTS") == "1":
                shutil.copyfile(shot, ROOT / "docs" / shot.name)
        finally:
            browser.close()
