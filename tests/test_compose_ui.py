"""Every endpoint of a Compose instance (SPEC §12) where users look, on the real engine.

A stand-in challenge of three services (web and admin, each a busybox httpd with a port of its
own, and db without one) runs under a real worker. Headless Chromium plays a team and the
organiser on the dashboard served over real HTTP; ``ctfctl status`` runs as organisers run it;
the verified status read (what the status task answers while the worker's event follower is
not live) sees a group whose db was removed behind our back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
import uvicorn
from ci import unavailable
from conftest import (
    ADMIN_TOKEN,
    BUSYBOX,
    ROOT,
    RUN_ID,
    TEST_FIELDS,
    RedisServer,
    Worker,
    build_image,
    cleanup_docker,
    free_port,
    private_label,
    wait_for,
)
from playwright.sync_api import Browser, Page, expect, sync_playwright

from celery_app.api.app import create_app
from celery_app.vocab.team_tokens import team_token
from celery_app.worker.context import build_context
from ctf_testkit.env import RunConfig
from ctf_testkit.support import close_platform_client, platform_client

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("compose-ui")
# This file's pool is 10.239.0.0/16, away from every other file's: the worker's half, and the
# other half for the in-process service of the verify test (a scope the worker does not see).
POOL = "10.239.0.0/17"
VERIFY_LABEL = private_label("compose-ui-verify")
VERIFY_POOL = "10.239.128.0/17"
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
expect.set_options(timeout=20_000)

DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY www /www
ENTRYPOINT ["/bin/busybox"]
"""
COMPOSE = """
services:
  web:
    image: {image}
    command: ["httpd", "-f", "-p", "8080", "-h", "/www/web"]
    ports: ["8080"]
    depends_on: [db]
  admin:
    image: {image}
    command: ["httpd", "-f", "-p", "9090", "-h", "/www/admin"]
    ports: ["9090"]
  db:
    image: {image}
    command: ["sleep", "86400"]
"""


@dataclass
class Setup:
    """The worker's run: its settings, a platform's Celery client, the dashboard's URL."""

    run: RunConfig
    env: dict[str, str]
    platform: Any
    api: str
    docker: docker.DockerClient

    def start(self, team: str) -> dict[str, Any]:
        """Send start_container by name, as a platform does; return its result."""
        result: dict[str, Any] = self.platform.send_task(START, args=["duo", team]).get(
            timeout=180)
        return result

    def stop(self, team: str) -> None:
        """Send stop_container by name and wait for it."""
        self.platform.send_task(STOP, args=["duo", team]).get(timeout=120)

    def instance(self, team: str) -> dict[str, Any]:
        """The team's instance of duo as the API answers it (the admin token)."""
        req = urllib.request.Request(f"{self.api}/api/v1/teams/{team}/instances/duo",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(req, timeout=30) as answer:
            body: dict[str, Any] = json.loads(answer.read())
        return body


@pytest.fixture(scope="module")
def setup(docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A private Redis, a real worker, the API over real HTTP and the challenge ``duo``."""
    work = tmp_path_factory.mktemp("compose-ui")
    image = build_image(docker_client, f"ctf-test/compose-ui:{RUN_ID}", DOCKERFILE, {
        "busybox": BUSYBOX, "www/web/index.html": b"<h1>the web page</h1>\n",
        "www/admin/index.html": b"<h1>the admin page</h1>\n"})
    (work / "duo.yaml").write_text(COMPOSE.format(image=image))
    catalog = work / "challenges.yaml"
    catalog.write_text("""
challenges:
  duo:
    name: Web and admin
    compose: duo.yaml
    ttl: 600
    memory: 64m
    start_timeout: 60
""")
    server = RedisServer(tmp_path_factory.mktemp("redis-compose-ui"))
    server.start()
    run = RunConfig(server.url, catalog, work / "data", LABEL, POOL, TEST_FIELDS)
    env = run.env(janitor_interval=1, admin_token=ADMIN_TOKEN)
    redis.Redis.from_url(env["CTF_REDIS_URL"]).flushdb()
    worker = Worker(env, work / "worker.log")
    platform = platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    port = free_port()
    api = uvicorn.Server(uvicorn.Config(
        create_app(run.settings(admin_token=ADMIN_TOKEN)), host="127.0.0.1", port=port,
        log_level="warning", lifespan="on"))
    thread = threading.Thread(target=api.run, name="compose-ui-uvicorn", daemon=True)
    try:
        worker.start()
        thread.start()
        wait_for(lambda: api.started or not thread.is_alive(), 20, message="uvicorn to start")
        assert api.started, "uvicorn did not start"
        yield Setup(run, env, platform, f"http://127.0.0.1:{port}", docker_client)
    finally:
        api.should_exit = True
        thread.join(20)
        worker.stop()
        close_platform_client(platform)
        cleanup_docker(docker_client, LABEL)
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    if not CHROMIUM.exists():
        unavailable("chromium is missing: run ./setup-celery.sh --dev (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _page(browser: Browser, setup: Setup, token: str) -> Page:
    """A fresh browser profile on the dashboard, signed in with ``token`` by link."""
    context = browser.new_context(base_url=setup.api, viewport={"width": 1280, "height": 860})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"/#token={token}")
    return page


def _opens(page: Page, link: Any, text: str) -> None:
    """Clicking ``link`` opens a tab that shows ``text`` (the endpoint answers)."""
    with page.context.expect_page() as opened:
        link.click()
    tab = opened.value
    expect(tab.locator("h1")).to_have_text(text)
    tab.close()


def test_the_dashboards_list_every_endpoint_with_its_own_link(
        setup: Setup, browser: Browser) -> None:
    """A team starts duo: its card links web and admin, each opens; the organiser's row too."""
    page = _page(browser, setup, team_token(ADMIN_TOKEN, "ua"))
    card = page.locator('article[data-challenge="duo"]')
    expect(card.locator(".badge")).to_have_text("Not running")
    card.get_by_role("button", name="Start", exact=True).click()
    expect(card.locator(".badge")).to_have_text("Running", timeout=90_000)
    inst = setup.instance("ua")
    web, admin = inst["endpoints"]
    assert (web["service"], web["port"], admin["service"], admin["port"]) == (
        "web", 8080, "admin", 9090)
    items = card.locator("li.endpoint")
    expect(items).to_have_count(2)
    expect(card.locator(".fact-url")).to_be_hidden()  # no single address beside the list
    for item, ep, text in ((items.nth(0), web, "the web page"),
                           (items.nth(1), admin, "the admin page")):
        expect(item.locator(".ep-name")).to_have_text(f"{ep['service']}:{ep['port']}")
        link = item.get_by_role("link")
        expect(link).to_have_attribute("href", f"{ep['url']}/")
        _opens(page, link, text)
    page.context.close()

    org = _page(browser, setup, ADMIN_TOKEN)
    row = org.locator('tr[data-key="ua/duo"]')
    links = row.locator(".c-url li.endpoint").get_by_role("link")
    expect(links).to_have_count(2)
    expect(links.nth(0)).to_have_attribute("href", f"{web['url']}/")
    expect(links.nth(1)).to_have_attribute("href", f"{admin['url']}/")
    _opens(org, links.nth(1), "the admin page")
    org.context.close()
    setup.stop("ua")


def test_ctfctl_status_shows_every_endpoint(setup: Setup) -> None:
    """``ctfctl status`` prints web and admin, each on its own line with its address."""
    inst = setup.start("ub")
    assert inst["status"] == "running", inst
    web, admin = inst["endpoints"]
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "ctfctl"), "status", "--team", "ub"],
        env={**os.environ, **setup.env, "COLUMNS": "220"}, capture_output=True, text=True,
        timeout=60, cwd=ROOT, check=False)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [ln for ln in lines if f"web:8080 {web['url']}" in ln], shown.stdout
    assert [ln for ln in lines if f"admin:9090 {admin['url']}" in ln], shown.stdout
    setup.stop("ub")


def test_verify_reports_a_group_without_its_db_as_failed(setup: Setup) -> None:
    """The verified status of a group whose db was removed behind our back is failed, naming db."""
    # status(verify=True) is what the status task answers while the worker's event follower
    # is not live, i.e. exactly when the index may have missed such news. To keep the worker's
    # follower and janitor from recording the death first, this group is made by an in-process
    # service of its own scope (labels, Redis databases, half of this file's pool), on the
    # same engine and catalog, which no worker watches.
    run = RunConfig(setup.run.redis_url, setup.run.catalog_file,
                    setup.run.data_dir.parent / "verify-data", VERIFY_LABEL, VERIFY_POOL,
                    TEST_FIELDS, dbs=(3, 4, 5))
    ctx = build_context(run.settings())
    key = ctx.catalog.key("duo", "uc")
    try:
        assert ctx.service.start(key).status == "running"
        (seen,) = ctx.service.status("uc", "duo", verify=True)
        assert seen.status == "running"
        labels = {**VERIFY_LABEL, "ctf.team": "uc", "ctf.service": "db"}
        (db,) = setup.docker.containers.list(ignore_removed=True,
            all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})
        assert db.name == "ctf-duo-uc.db"
        db.remove(force=True)
        (seen,) = ctx.service.status("uc", "duo", verify=True)
        assert (seen.status, seen.error) == ("failed", "service db: the container is gone")
        # The index still says running, and the primary (web) still runs: only a look at
        # every service tells that the group is broken.
        assert ctx.service.status("uc", "duo")[0].status == "running"
        assert setup.docker.containers.get("ctf-duo-uc").status == "running"
        ctx.service.stop(key)
        assert not setup.docker.containers.list(ignore_removed=True, all=True, filters={"label": [
            f"{k}={v}" for k, v in {**VERIFY_LABEL, "ctf.team": "uc"}.items()]})
    finally:
        ctx.driver.close()
        cleanup_docker(setup.docker, VERIFY_LABEL)
