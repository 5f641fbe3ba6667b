"""The CTFd plugin (issue 13) end to end: the real CTFd 3.8.7 on SQLite, our real stack.

CTFd runs under gunicorn from its own venv (tests/ctfd_support.py builds it once from
``CTF_CTFD_SOURCE``, default the vendored archive) with ``integrations/ctfd/ctf_instancer``
linked into ``CTFd/plugins/``. Behind it: a real worker, our API as its own uvicorn process
(``ctfctl api``), a private Redis and the real Docker engine. Chromium plays the organiser
and two teams. Without CTFd's source the tests skip, saying why; under ``CI=true`` they fail.
Set ``CTF_DASHBOARD_SCREENSHOTS=1`` to write the screenshots into ``docs/``.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from conftest import (
    BUSYBOX,
    ROOT,
    Worker,
    build_image,
    containers_of,
    free_port,
    private_label,
    wait_for,
)
from ctfd_support import CtfdInstall, CtfdServer, CtfdUnavailable, install_plugin, prepare
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from celery_app.core.catalog import DEFAULT_CATALOG
from celery_app.core.flags import in_app_flag, team_flag
from celery_app.engine.firewall import table_name
from ctf_testkit.support import RedisServer, stop_process

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS = ROOT / "docs"
LABEL = private_label("ctfd")
POOL = "10.241.0.0/16"  # our own team-subnet pool, away from every other test's
# This run's team-id prefix (CTFd numbers its teams from 1 every run; the engine is shared).
PREFIX = f"c{secrets.token_hex(4)}"
ADMIN_NAME, ADMIN_PASSWORD = "organiser", "organiser-password-1"
expect.set_options(timeout=30_000)

# A stand-in challenge that shows its team's flag on its page (as a real one hides it).
FLAG_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY index.html /www/index.html
EXPOSE 8080
ENTRYPOINT ["/bin/busybox", "sh", "-c"]
CMD ["echo \\"<h1>Stand-in challenge</h1><p>Your flag: <code id=flag>$FLAG</code></p>\\" \
> /www/index.html && exec /bin/busybox httpd -f -p 8080 -h /www"]
"""

DUO_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY www /www
ENTRYPOINT ["/bin/busybox"]
"""
DUO_COMPOSE = """
services:
  web:
    image: {image}
    command: ["httpd", "-f", "-p", "8080", "-h", "/www/web"]
    ports: ["8080"]
  admin:
    image: {image}
    command: ["httpd", "-f", "-p", "9090", "-h", "/www/admin"]
    ports: ["9090"]
"""

# -- the stack: Redis, worker, API process, CTFd ---------------------------------------------


@pytest.fixture(scope="module")
def ctfd_install() -> CtfdInstall:
    """CTFd's source unpacked with its own venv (cached); skip or, under CI, fail without it."""
    try:
        return prepare()
    except CtfdUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {exc}")
        pytest.skip(str(exc))


@dataclass
class Stack:
    """Our side: the API's URL, its admin token and the Redis CTFd may use too."""

    api: str
    token: str
    redis: RedisServer
    data_dir: Path


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient,
) -> Iterator[Stack]:
    """A private Redis, a real worker and ``ctfctl api`` as its own process."""
    work = tmp_path_factory.mktemp("ctfd-stack")
    image = build_image(docker_client, f"ctf-test/flagweb:{work.name}", FLAG_DOCKERFILE,
                        {"busybox": BUSYBOX, "index.html": b"starting\n"})
    # A Compose challenge of two endpoints (SPEC §12): web and admin, each a page of its own.
    duo = build_image(docker_client, f"ctf-test/ctfd-duo:{work.name}", DUO_DOCKERFILE, {
        "busybox": BUSYBOX, "www/web/index.html": b"<h1>the web page</h1>\n",
        "www/admin/index.html": b"<h1>the admin page</h1>\n"})
    (work / "duo.yaml").write_text(DUO_COMPOSE.format(image=duo))
    # The shipped catalog's todo-app entry as it is (its flag_env, port, health path), on the
    # stand-in image: the real one is pulled from Docker Hub, which a test run cannot rely on.
    # Without its solver block: no canary here (tests/test_shipped_solvers.py proves it).
    todo = {**{k: v for k, v in DEFAULT_CATALOG["todo-app"].items() if k != "solver"},
            "image": image, "ttl": 600, "start_timeout": 120}
    catalog = work / "challenges.yaml"
    catalog.write_text(f"""
challenges:
  duo:
    name: Web and admin
    compose: duo.yaml
    ttl: 600
    memory: 64m
    start_timeout: 120
  flagweb:
    name: Stand-in web challenge
    image: {image}
    port: 8080
    ttl: 600
    memory: 64m
    flag_env: FLAG
    start_timeout: 120
    read_only: false        # it writes its page (with the team's flag) into /www at boot
  shop:
    name: Stand-in Juice Shop
    image: {image}
    port: 8080
    ttl: 600
    memory: 64m
    env: {{NODE_ENV: ctf}}
    flag_env: CTF_KEY
    start_timeout: 120
    read_only: false
  plainweb:
    name: Stand-in without a team flag
    image: {image}
    port: 8080
    ttl: 600
    memory: 64m
    start_timeout: 120
    read_only: false
  rawtcp:
    name: Stand-in TCP service
    image: {image}
    port: 8080
    protocol: tcp
    ttl: 600
    memory: 64m
    start_timeout: 120
    read_only: false
  todo-app: {json.dumps(todo)}
""")
    redis_server = RedisServer(work)
    redis_server.start()
    token = secrets.token_urlsafe(32)
    env = {
        "CELERY_BROKER_URL": f"{redis_server.url}/0",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/1",
        "CTF_REDIS_URL": f"{redis_server.url}/2",
        "CTF_CHALLENGES_FILE": str(catalog),
        "CTF_DATA_DIR": str(work / "data"),
        "CTF_EXTRA_LABELS": json.dumps(LABEL),
        "CTF_TEAM_SUBNET_POOL": POOL,
        "CTF_ADMIN_TOKEN": token,
        # Two challenges, one instance at a time: the quota error is part of the story.
        "CTF_MAX_INSTANCES_PER_TEAM": "1",
    }
    worker = Worker({**env, "CTF_HOST": "local"}, work / "worker.log")
    api_port = free_port()
    api_log = work / "api.log"
    api_proc: subprocess.Popen[bytes] | None = None
    try:
        worker.start()
        with api_log.open("ab") as out:
            api_proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "ctfctl"), "api", "--bind",
                 f"127.0.0.1:{api_port}"],
                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True)
        api = f"http://127.0.0.1:{api_port}"

        def healthy() -> bool:
            assert api_proc is not None and api_proc.poll() is None, api_log.read_text()
            try:
                return httpx.get(f"{api}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, 0.2, "our API to answer /healthz with a worker")
        yield Stack(api, token, redis_server, work / "data")
    finally:
        if api_proc is not None:
            stop_process(api_proc)
        worker.stop()
        for c in containers_of(docker_client, LABEL):
            c.remove(force=True)
        # The worker installed its pool's egress table (the firewall is on by default) and
        # leaves it in place by design: it is this test's to remove.
        subprocess.run(["nft", "delete", "table", "inet", table_name(IPv4Network(POOL))],
                       capture_output=True, check=False)
        redis_server.stop()


def _nonce(html: str) -> str:
    match = re.search(r'name="nonce"[^>]*value="([^"]+)"', html) or \
        re.search(r"csrfNonce['\"]?\s*:\s*\"([^\"]+)\"", html)
    assert match, "no CSRF nonce on the page"
    return match.group(1)


@contextlib.contextmanager
def serve_ctfd(install: CtfdInstall, workdir: Path, env: dict[str, str]) -> Iterator[str]:
    """Run a CTFd with the plugin linked in, set up in teams mode by its organiser; its URL."""
    install_plugin(install)
    server = CtfdServer(install, workdir, free_port(), env)
    server.start()
    try:
        def answers() -> bool:
            assert server.alive(), server.log.read_text()[-3000:]
            try:
                return httpx.get(f"{server.url}/setup", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 90, 0.3, "CTFd to answer")
        with httpx.Client(base_url=server.url, timeout=30) as web:
            form = {
                "ctf_name": "Instancer CTF", "ctf_description": "A test event",
                "user_mode": "teams", "name": ADMIN_NAME, "email": "organiser@example.org",
                "password": ADMIN_PASSWORD, "ctf_theme": "core",
                "challenge_visibility": "private", "account_visibility": "public",
                "score_visibility": "public", "registration_visibility": "public",
                "nonce": _nonce(web.get("/setup").text),
            }
            done = web.post("/setup", data=form)
            assert done.status_code in (200, 302), done.text[-2000:]
            assert httpx.get(f"{server.url}/setup", timeout=10).status_code == 302
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ctfd(
    ctfd_install: CtfdInstall, stack: Stack, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """CTFd with the plugin linked in, set up in teams mode by its organiser; yield its URL."""
    with serve_ctfd(ctfd_install, tmp_path_factory.mktemp("ctfd"),
                    {"REDIS_URL": f"{stack.redis.url}/7",
                     "CTF_INSTANCER_TEAM_PREFIX": PREFIX}) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    if not CHROMIUM.exists():
        pytest.skip("chromium is missing: run ./setup-celery.sh --dev (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def new_page(browser: Browser, base: str) -> tuple[BrowserContext, Page]:
    """A fresh browser profile (its own cookies) on CTFd."""
    context = browser.new_context(base_url=base, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    return context, context.new_page()


def screenshot(page: Page, tmp_path: Path, name: str, height: int = 900) -> None:
    """Screenshot into tmp_path, and into docs/ when CTF_DASHBOARD_SCREENSHOTS=1."""
    shot = tmp_path / name
    # A taller window rather than a full-page shot, where CTFd's sticky bar would repeat.
    page.set_viewport_size({"width": 1280, "height": height})
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot))
    page.set_viewport_size({"width": 1280, "height": 900})
    if os.environ.get("CTF_DASHBOARD_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS / name)


# -- steps --------------------------------------------------------------------------------------


def log_in(page: Page, name: str, password: str) -> None:
    """Log in through CTFd's login form."""
    page.goto("/login")
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("#_submit")
    expect(page).not_to_have_url(re.compile(r"/login"))


def register_team(page: Page, user: str, team: str) -> None:
    """Register a player and create their team, as a player does."""
    page.goto("/register")
    page.fill("#name", user)
    page.fill("#email", f"{user}@example.org")
    page.fill("#password", f"{user}-password")
    page.click("#_submit")
    expect(page).to_have_url(re.compile(r"/team"))
    page.goto("/teams/new")
    page.fill("#name", team)
    page.fill("#password", f"{team}-password")
    page.click("#_submit")
    expect(page).not_to_have_url(re.compile(r"/teams/new"))


def open_challenge(page: Page, name: str) -> Any:
    """Open a challenge's modal from the challenge board; return its instance panel."""
    page.goto("/challenges")
    page.get_by_role("button", name=re.compile(re.escape(name))).first.click()
    expect(page.locator(".challenge-name")).to_have_text(name)
    panel = page.locator(".ctfi-panel")
    expect(panel).to_be_visible()
    return panel


def submit_flag(page: Page, flag: str) -> Any:
    """Submit a flag in the open modal; return the response alert."""
    page.fill("#challenge-input", flag)
    page.click("#challenge-submit")
    alert = page.locator(".notification-row .alert")
    expect(alert).to_be_visible()
    return alert


def create_challenge(org: Page, fields: dict[str, Any], flag: dict[str, str] | None) -> int:
    """Create a challenge (and a flag) through CTFd's API in the organiser's session."""
    headers = {"CSRF-Token": org.evaluate("init.csrfNonce"), "Content-Type": "application/json"}
    made = org.request.post("/api/v1/challenges", data=json.dumps(fields), headers=headers)
    assert made.ok, made.text()
    chal_id = int(made.json()["data"]["id"])
    if flag is not None:
        added = org.request.post("/api/v1/flags", headers=headers,
                                 data=json.dumps({"challenge": chal_id, **flag}))
        assert added.ok, added.text()
    return chal_id


def team_score(page: Page) -> int:
    """The player's team's score, from CTFd's own API (the browser's session)."""
    body = page.request.get("/api/v1/teams/me").json()
    return int(body["data"]["score"])


def instance_of(client: docker.DockerClient, team_id: str, challenge: str) -> list[Any]:
    """Return the containers of one (challenge, team) made by this test."""
    return containers_of(client, LABEL, **{"ctf.team": team_id, "ctf.challenge": challenge})


# -- the story ----------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_organiser_and_two_teams_through_ctfd(
    ctfd: str, stack: Stack, browser: Browser, docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    """Organiser links the instancer and creates a challenge; teams start, score and stop."""
    # 1. The organiser connects CTFd to the instancer on the plugin's settings page.
    org_ctx, org = new_page(browser, ctfd)
    log_in(org, ADMIN_NAME, ADMIN_PASSWORD)
    org.goto("/admin/ctf_instancer/settings")
    org.fill("#ctfi-url", stack.api)
    org.fill("#ctfi-token", stack.token)
    org.get_by_role("button", name="Save").click()
    expect(org.locator(".ctfi-health")).to_contain_text("Instancer answers")
    expect(org.locator(".ctfi-catalog-list")).to_contain_text("flagweb")
    # The catalog route says which challenges put a team flag in their containers.
    expect(org.locator(".ctfi-catalog-list li", has_text="plainweb")).to_contain_text(
        "no per-team flag")
    expect(org.locator(".ctfi-catalog-list li", has_text="todo-app")).not_to_contain_text(
        "no per-team flag")
    expect(org.locator(".ctfi-token-source")).to_contain_text("from the admin page")
    screenshot(org, tmp_path, "ctfd-settings.png")
    # The token went in and never comes back out: not on the page, not in CTFd's configs.
    assert stack.token not in org.content()
    assert stack.token not in org.request.get("/api/v1/configs").text()

    # 2. It creates an "instanced" challenge of the catalog's flagweb.
    org.goto("/admin/challenges/new")
    # The page first loads the standard type's form; switch only once that is done.
    expect(org.locator("#create-chal-entry-div input[name=type][value=standard]")).to_have_count(1)
    org.wait_for_load_state("networkidle")
    org.locator("#create-chals-select label", has_text="instanced").click()
    form = org.locator("#create-chal-entry-div")
    catalog = form.locator("select[name=instancer_challenge]")
    # The form is in place once its script has filled the catalog from the instancer.
    expect(catalog.locator("option[value=flagweb]")).to_have_count(1)
    # A catalog challenge without a team flag, with the per-team flag ticked: warned at once.
    expect(catalog.locator("option[value=plainweb]")).to_contain_text("no per-team flag")
    catalog.select_option("plainweb")
    expect(form.locator(".ctfi-flag-warning")).to_be_visible()
    form.locator("input[name=name]").fill("Web instance")
    form.locator("input[name=category]").fill("web")
    form.locator(".CodeMirror").first.click()  # the description's Markdown editor
    org.keyboard.type("Start your own instance and find the flag on its page.")
    form.locator("input[name=value]").fill("100")
    catalog.select_option("flagweb")
    expect(form.locator(".ctfi-flag-warning")).to_be_hidden()
    expect(form.locator("input[name=name]")).to_have_value("Web instance")
    expect(form.locator("input[name=category]")).to_have_value("web")
    screenshot(org, tmp_path, "ctfd-create.png", height=1240)
    form.get_by_role("button", name="Create", exact=True).click()
    options = org.locator("#challenge-create-options")
    expect(options).to_be_visible()
    # CTFd's own static-flag field would make any team's answer right: not offered here.
    expect(options.locator("input[name=flag]")).to_be_disabled()
    options.locator("select[name=state]").select_option("visible")
    options.get_by_role("button", name="Finish").click()
    expect(org).to_have_url(re.compile(r"/admin/challenges/\d+$"))
    chal_id = int(org.url.rsplit("/", 1)[1])
    flags = org.request.get(f"/api/v1/challenges/{chal_id}/flags").json()["data"]
    assert [f["type"] for f in flags] == ["instancer"]
    # Nor through CTFd's flag API: a static flag beside the instancer flag is refused.
    headers = {"CSRF-Token": org.evaluate("init.csrfNonce"), "Content-Type": "application/json"}
    static = org.request.post("/api/v1/flags", headers=headers, data=json.dumps(
        {"challenge": chal_id, "type": "static", "content": "CTF{everyone}"}))
    assert static.status == 400
    assert "would be accepted from any team" in static.json()["errors"]["type"][0]
    flags = org.request.get(f"/api/v1/challenges/{chal_id}/flags").json()["data"]
    assert [f["type"] for f in flags] == ["instancer"]
    # Its edit page shows the catalog challenge it instances, among the catalog's others.
    edit = org.locator("#challenge-update-container #ctfi-catalog")
    expect(edit.locator("option[value=shop]")).to_have_count(1)
    expect(edit).to_have_value("flagweb")

    # 3. Team one registers, opens the challenge, starts its instance and follows the link.
    one_ctx, one = new_page(browser, ctfd)
    register_team(one, "alice", "Team One")
    team_one = f"{PREFIX}-t" + str(one.request.get("/api/v1/teams/me").json()["data"]["id"])
    panel = open_challenge(one, "Web instance")
    expect(panel.locator(".ctfi-status")).to_have_text("Not running")
    panel.get_by_role("button", name="Start", exact=True).click()
    expect(panel.locator(".ctfi-status")).to_have_text(re.compile("Starting|Running"))
    expect(panel.locator(".ctfi-status")).to_have_text("Running", timeout=60_000)
    link = panel.locator("a.ctfi-link")
    expect(link).to_have_text(re.compile(r"^http://localhost:\d+$"))
    expect(panel.locator(".ctfi-countdown")).to_have_text(re.compile(r"^(9|10):\d\d$"))
    screenshot(one, tmp_path, "ctfd-modal.png")
    assert len(instance_of(docker_client, team_one, "flagweb")) == 1
    with one.expect_popup() as popup:
        link.click()
    instance_page = popup.value
    expect(instance_page.locator("#flag")).to_have_text(re.compile(r"^CTF\{[0-9a-f]{32}\}$"))
    flag_one = instance_page.locator("#flag").inner_text()
    assert instance_page.url.startswith(link.inner_text())
    instance_page.close()
    panel.get_by_role("button", name="Extend").click()  # ttl 600 s more: about 19-20 min
    expect(panel.locator(".ctfi-countdown")).to_have_text(re.compile(r"^(19|20):\d\d$"))
    # Restart (SPEC §13), after a confirmation: a fresh container, the same flag on its page,
    # and the expiry of a new start again.
    old_ids = {c.id for c in instance_of(docker_client, team_one, "flagweb")}
    one.once("dialog", lambda dialog: dialog.accept())
    panel.get_by_role("button", name="Restart", exact=True).click()
    wait_for(lambda: {c.id for c in instance_of(docker_client, team_one, "flagweb")}
             - old_ids, 60, 0.2, "the modal's restart to make a new container")
    expect(panel.locator(".ctfi-status")).to_have_text("Running", timeout=60_000)
    expect(panel.locator(".ctfi-countdown")).to_have_text(re.compile(r"^(9|10):\d\d$"))
    with one.expect_popup() as popup:
        panel.locator("a.ctfi-link").click()
    expect(popup.value.locator("#flag")).to_have_text(flag_one)
    popup.value.close()

    # Its own flag scores.
    assert team_score(one) == 0
    expect(submit_flag(one, flag_one)).to_have_text(re.compile("Correct"))
    assert team_score(one) == 100

    # 3b. A second instance breaks the per-team quota: the modal says so in our words.
    # Without the per-team flag, a static flag is the organiser's choice: accepted.
    create_challenge(org, {"name": "Juice Shop", "category": "shop", "value": 10,
                           "description": "Your own Juice Shop.", "state": "visible",
                           "type": "instanced", "instancer_challenge": "shop",
                           "instancer_flag": "0"}, {"type": "static", "content": "CTF{any}"})
    create_challenge(org, {"name": "Plain web", "category": "web", "value": 10,
                           "description": "No team flag in it.", "state": "hidden",
                           "type": "instanced", "instancer_challenge": "plainweb",
                           "instancer_flag": "1"}, None)
    create_challenge(org, {"name": "To-Do", "category": "web", "value": 10,
                           "description": "The seed's To-Do app.", "state": "visible",
                           "type": "instanced", "instancer_challenge": "todo-app",
                           "instancer_flag": "1"}, None)
    create_challenge(org, {"name": "Raw TCP", "category": "pwn", "value": 10,
                           "description": "A TCP service.", "state": "visible",
                           "type": "instanced", "instancer_challenge": "rawtcp",
                           "instancer_flag": "0"}, None)
    # The settings page names the instanced challenge no team can ever solve, and only it.
    org.goto("/admin/ctf_instancer/settings")
    expect(org.locator(".ctfi-flag-warning")).to_contain_text("Plain web")
    expect(org.locator(".ctfi-flag-warning")).not_to_contain_text("To-Do")
    create_challenge(org, {"name": "Score Board", "category": "shop", "value": 50,
                           "description": "Find the score board.", "state": "visible",
                           "type": "standard"},
                     {"type": "instancer", "content": "Score Board", "data": "shop"})
    shop = open_challenge(one, "Juice Shop")
    shop.get_by_role("button", name="Start", exact=True).click()
    expect(shop.locator(".ctfi-error")).to_contain_text(
        f"team {team_one} already runs 1 instance(s), the per-team maximum")
    expect(shop.locator(".ctfi-status")).to_have_text("Not running")
    assert not instance_of(docker_client, team_one, "shop")

    # 4. Team two sees only its own (no) instance; team one's flag is wrong for it.
    two_ctx, two = new_page(browser, ctfd)
    register_team(two, "bob", "Team Two")
    team_two = f"{PREFIX}-t" + str(two.request.get("/api/v1/teams/me").json()["data"]["id"])
    assert team_two != team_one
    panel_two = open_challenge(two, "Web instance")
    expect(panel_two.locator(".ctfi-status")).to_have_text("Not running")
    expect(panel_two.locator(".ctfi-address")).to_be_hidden()
    expect(submit_flag(two, flag_one)).to_have_text(re.compile("Incorrect"))
    assert team_score(two) == 0
    panel_two.get_by_role("button", name="Start", exact=True).click()
    expect(panel_two.locator(".ctfi-status")).to_have_text("Running", timeout=60_000)
    link_two = panel_two.locator("a.ctfi-link").inner_text()
    assert link_two != link.inner_text()
    assert len(instance_of(docker_client, team_two, "flagweb")) == 1

    # 5. Team one stops its instance from the modal.
    panel = open_challenge(one, "Web instance")
    expect(panel.locator(".ctfi-status")).to_have_text("Running")
    panel.get_by_role("button", name="Stop").click()
    expect(panel.locator(".ctfi-status")).to_have_text("Not running")
    wait_for(lambda: not instance_of(docker_client, team_one, "flagweb"), 30, 0.2,
             "team one's container to be removed")

    # 5b. Now Juice Shop starts; its in-app flag scores for team one, team two's does not.
    shop = open_challenge(one, "Juice Shop")
    shop.get_by_role("button", name="Start", exact=True).click()
    expect(shop.locator(".ctfi-status")).to_have_text("Running", timeout=60_000)
    (container,) = instance_of(docker_client, team_one, "shop")
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    secret = (stack.data_dir / "flag_secret").read_text().strip()
    assert env["CTF_KEY"] == team_flag(secret, "shop", team_one)  # what the app keys its flags by
    one.goto("/challenges")
    one.get_by_role("button", name=re.compile("Score Board")).click()
    expect(one.locator(".challenge-name")).to_have_text("Score Board")
    expect(one.locator(".ctfi-panel")).to_have_count(0)  # a standard challenge: no instance
    theirs = in_app_flag(team_flag(secret, "shop", team_two), "Score Board")
    expect(submit_flag(one, theirs)).to_have_text(re.compile("Incorrect"))
    ours = in_app_flag(env["CTF_KEY"], "Score Board")  # what Juice Shop shows team one
    expect(submit_flag(one, ours)).to_have_text(re.compile("Correct"))
    assert team_score(one) == 150
    shop = open_challenge(one, "Juice Shop")
    shop.get_by_role("button", name="Stop").click()
    expect(shop.locator(".ctfi-status")).to_have_text("Not running")

    # 5c. The seed's To-Do app (its shipped catalog entry) holds team one's own flag, and the
    # per-team flag the plugin ticks by default scores with it.
    todo = open_challenge(one, "To-Do")
    todo.get_by_role("button", name="Start", exact=True).click()
    expect(todo.locator(".ctfi-status")).to_have_text("Running", timeout=60_000)
    (container,) = instance_of(docker_client, team_one, "todo-app")
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    assert env["FLAG"] == team_flag(secret, "todo-app", team_one)
    with one.expect_popup() as popup:
        todo.locator("a.ctfi-link").click()
    expect(popup.value.locator("#flag")).to_have_text(env["FLAG"])
    popup.value.close()
    expect(submit_flag(one, env["FLAG"])).to_have_text(re.compile("Correct"))
    assert team_score(one) == 160
    todo = open_challenge(one, "To-Do")
    todo.get_by_role("button", name="Stop").click()
    expect(todo.locator(".ctfi-status")).to_have_text("Not running")

    # 6. The organiser's Instances page lists team two's instance and stops it.
    org.goto("/admin/ctf_instancer")
    row = org.locator(f"tr[data-team='{team_two}'][data-challenge='flagweb']")
    expect(row).to_contain_text("Team Two")
    expect(row.locator(".ctfi-row-status")).to_have_text("running")
    expect(org.locator(f"tr[data-team='{team_one}']")).to_have_count(0)
    screenshot(org, tmp_path, "ctfd-admin-instances.png")
    org.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Stop").click()
    expect(org.locator(".ctfi-done")).to_contain_text("Stopped flagweb of Team Two")
    expect(row).to_have_count(0)
    wait_for(lambda: not instance_of(docker_client, team_two, "flagweb"), 30, 0.2,
             "team two's container to be removed")
    panel_two = open_challenge(two, "Web instance")
    expect(panel_two.locator(".ctfi-status")).to_have_text("Not running")

    # 7. The page lists the shared flag of step 4 (team two submitted team one's) and warns
    # of the instanced challenge whose per-team flag no container holds.
    org.goto("/admin/ctf_instancer")
    shared = org.locator(f"tr.ctfi-shared-row[data-team='{team_two}'][data-owner='{team_one}']")
    expect(shared).to_contain_text("Team Two")
    expect(shared).to_contain_text("Team One")
    expect(shared).to_contain_text("Web instance (flagweb)")
    expect(org.locator(".ctfi-flag-warning")).to_contain_text("Plain web (plainweb)")

    # 8. A TCP instance's modal offers the lines to copy: plain nc for a published port.
    raw = open_challenge(two, "Raw TCP")
    raw.get_by_role("button", name="Start", exact=True).click()
    expect(raw.locator(".ctfi-status")).to_have_text("Running", timeout=60_000)
    published = re.fullmatch(r"tcp://([^:]+):(\d+)", raw.locator(".ctfi-plain").inner_text())
    assert published, raw.locator(".ctfi-plain").inner_text()
    host, port = published.groups()
    expect(raw.locator(".ctfi-connect-line[data-tool=nc] code")).to_have_text(f"nc {host} {port}")
    expect(raw.locator(".ctfi-connect-line[data-tool=pwntools] code")).to_have_text(
        f'remote("{host}", {port})')
    raw.get_by_role("button", name="Stop").click()
    expect(raw.locator(".ctfi-status")).to_have_text("Not running")

    for context in (org_ctx, one_ctx, two_ctx):
        context.close()


class _Recorder:
    """An HTTP server that answers everything with ``{}`` and records each request's headers."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                seen.append(f"{self.command} {self.path} {dict(self.headers)}")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815  # http.server's names

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_admin_token_goes_only_to_its_url_and_not_into_backups(
    ctfd: str, stack: Stack, browser: Browser,
) -> None:
    """Another URL saved without the token gets no token; CTFd's backup holds no token."""
    recorder = _Recorder()
    org_ctx, org = new_page(browser, ctfd)
    try:
        log_in(org, ADMIN_NAME, ADMIN_PASSWORD)
        org.goto("/admin/ctf_instancer/settings")
        org.fill("#ctfi-url", stack.api)
        org.fill("#ctfi-token", stack.token)
        org.get_by_role("button", name="Save").click()
        expect(org.locator(".ctfi-catalog-list")).to_contain_text("flagweb")
        # An admin who does not know the token points CTFd at a server of theirs.
        org.goto("/admin/ctf_instancer/settings")
        org.fill("#ctfi-url", recorder.url)
        org.get_by_role("button", name="Save").click()
        expect(org.locator("[role=status]").first).to_contain_text("Saved")
        assert not [r for r in recorder.seen if stack.token in r], recorder.seen
        expect(org.locator("[role=status]").first).to_contain_text("enter it again")
        expect(org.locator(".ctfi-token-source")).to_contain_text("saved for another URL")
        # Every page that calls the instancer, and a player-facing route, send nothing there.
        org.goto("/admin/ctf_instancer")
        org.goto("/admin/ctf_instancer/settings")
        org.request.get("/admin/ctf_instancer/api/catalog")
        assert not [r for r in recorder.seen if stack.token in r], recorder.seen
        assert not [r for r in recorder.seen if "Authorization" in r], recorder.seen
        # CTFd's backup export (every table, the plugin's too) holds no usable token.
        backup = org.request.get("/admin/export")
        assert backup.status == 200
        with zipfile.ZipFile(io.BytesIO(backup.body())) as archive:
            tables = {name: archive.read(name) for name in archive.namelist()}
        assert "db/ctf_instancer_settings.json" in tables
        assert not [name for name, body in tables.items() if stack.token.encode() in body]
        # Back to the instancer's URL: the token saved for it works again, unchanged.
        org.goto("/admin/ctf_instancer/settings")
        org.fill("#ctfi-url", stack.api)
        org.get_by_role("button", name="Save").click()
        expect(org.locator(".ctfi-catalog-list")).to_contain_text("flagweb")
        expect(org.locator(".ctfi-token-source")).to_contain_text("from the admin page")
        # A new URL with the token typed again is the organiser's choice: it is used there.
        org.fill("#ctfi-url", recorder.url)
        org.fill("#ctfi-token", stack.token)
        org.get_by_role("button", name="Save").click()
        expect(org.locator(".ctfi-token-source")).to_contain_text("from the admin page")
        assert [r for r in recorder.seen if stack.token in r]
    finally:
        # Leave the connection as the other tests expect it.
        org.goto("/admin/ctf_instancer/settings")
        org.fill("#ctfi-url", stack.api)
        org.fill("#ctfi-token", stack.token)
        org.get_by_role("button", name="Save").click()
        org_ctx.close()
        recorder.close()


@pytest.mark.timeout(600)
def test_the_modal_links_every_endpoint_of_a_compose_instance(
    ctfd: str, stack: Stack, browser: Browser, docker_client: docker.DockerClient,
) -> None:
    """A team's modal of a two-endpoint Compose challenge links web and admin, each opening."""
    org_ctx, org = new_page(browser, ctfd)
    log_in(org, ADMIN_NAME, ADMIN_PASSWORD)
    org.goto("/admin/ctf_instancer/settings")
    org.fill("#ctfi-url", stack.api)
    org.fill("#ctfi-token", stack.token)
    org.get_by_role("button", name="Save").click()
    expect(org.locator(".ctfi-catalog-list")).to_contain_text("duo")
    create_challenge(org, {"name": "Two doors", "category": "web", "value": 10,
                           "description": "Web and admin.", "state": "visible",
                           "type": "instanced", "instancer_challenge": "duo",
                           "instancer_flag": "0"}, None)
    org_ctx.close()

    ctx, team = new_page(browser, ctfd)
    register_team(team, "carol", "Team Three")
    team_id = f"{PREFIX}-t" + str(team.request.get("/api/v1/teams/me").json()["data"]["id"])
    panel = open_challenge(team, "Two doors")
    expect(panel.locator(".ctfi-endpoints")).to_be_hidden()
    panel.get_by_role("button", name="Start", exact=True).click()
    expect(panel.locator(".ctfi-status")).to_have_text("Running", timeout=90_000)
    assert len(instance_of(docker_client, team_id, "duo")) == 2
    items = panel.locator("li.ctfi-endpoint")
    expect(items).to_have_count(2)
    expect(panel.locator(".ctfi-address")).to_be_hidden()  # the list replaces the one line
    for i, (name, text) in enumerate((("web:8080", "the web page"),
                                      ("admin:9090", "the admin page"))):
        item = items.nth(i)
        expect(item).to_contain_text(name)
        link = item.get_by_role("link")
        expect(link).to_have_text(re.compile(r"^http://localhost:\d+$"))
        expect(link).to_have_attribute("href", re.compile(rf"/open/\d+\?endpoint={i}$"))
        with team.expect_popup() as popup:
            link.click()
        page = popup.value
        expect(page.locator("h1")).to_have_text(text)
        assert page.url.startswith(link.inner_text())
        page.close()
    panel.get_by_role("button", name="Stop").click()
    expect(panel.locator(".ctfi-status")).to_have_text("Not running")
    expect(panel.locator(".ctfi-endpoints")).to_be_hidden()
    wait_for(lambda: not instance_of(docker_client, team_id, "duo"), 30, 0.2,
             "the group's containers to be removed")
    ctx.close()


# -- the organiser's view of the plugin: one name, flags labelled, the environment's fields -----


def connect(org: Page, stack: Stack) -> None:
    """Save the instancer's URL and admin token on Instancer > Settings."""
    org.goto("/admin/ctf_instancer/settings")
    org.fill("#ctfi-url", stack.api)
    org.fill("#ctfi-token", stack.token)
    org.get_by_role("button", name="Save").click()
    expect(org.locator(".ctfi-catalog-list")).to_contain_text("flagweb")


def saved_settings(org: Page) -> dict[str, str]:
    """The plugin's settings table, as CTFd's backup export holds it (key: stored value)."""
    backup = org.request.get("/admin/export")
    assert backup.status == 200
    with zipfile.ZipFile(io.BytesIO(backup.body())) as archive:
        raw = archive.read("db/ctf_instancer_settings.json")
    # CTFd writes an empty table as an empty file.
    table = json.loads(raw) if raw.strip() else {}
    return {row["key"]: row["value"] for row in table.get("results", [])}


def post_by_hand(org: Page, values: dict[str, str]) -> None:
    """Post the settings form with ``values`` in fields the page disabled (as devtools would)."""
    org.evaluate("""(values) => {
        for (const [name, value] of Object.entries(values)) {
            const field = document.getElementById(`ctfi-${name}`);
            field.disabled = false;
            field.name = name;
            field.value = value;
        }
        document.querySelector("form button[type=submit]").disabled = false;
    }""", values)
    org.get_by_role("button", name="Save").click()


@pytest.mark.timeout(600)
def test_one_name_for_the_settings_page_and_the_instancer_flag_labelled(
    ctfd: str, stack: Stack, browser: Browser, tmp_path: Path,
) -> None:
    """Menu, tabs and pages say Instancer > Settings; an instancer flag's row says what it is."""
    org_ctx, org = new_page(browser, ctfd)
    try:
        log_in(org, ADMIN_NAME, ADMIN_PASSWORD)
        # One admin menu entry, "Instancer", opening its Instances tab; its Settings tab is the
        # settings page, by that name only.
        org.goto("/admin/statistics")
        menu = org.locator("#base-navbars")
        expect(menu.get_by_role("link", name="Instances", exact=True)).to_have_count(0)
        menu.get_by_role("link", name="Instancer", exact=True).click()
        expect(org).to_have_url(re.compile(r"/admin/ctf_instancer$"))
        expect(org.locator("h1")).to_have_text("Instancer")
        tabs = org.locator(".ctfi-tabs")
        expect(tabs.locator("[aria-current=page]")).to_have_text("Instances")
        expect(org.locator("#ctfi-admin")).to_contain_text("Instancer > Settings")
        tabs.get_by_role("link", name="Settings", exact=True).click()
        expect(org).to_have_url(re.compile(r"/admin/ctf_instancer/settings$"))
        expect(org.locator("h1")).to_have_text("Instancer")
        expect(tabs.locator("[aria-current=page]")).to_have_text("Settings")
        for other in ("Connection settings", "Instancer settings", "Plugins &gt; Instancer"):
            assert other not in org.content()

        # This CTFd is given CTF_INSTANCER_TEAM_PREFIX: its field is read-only and says so;
        # the URL and the token are the page's to set.
        prefix = org.locator("#ctfi-prefix")
        expect(prefix).to_be_disabled()
        expect(prefix).to_have_value(PREFIX)
        expect(org.locator("#ctfi-prefix-note")).to_contain_text(
            "Set by the environment: CTF_INSTANCER_TEAM_PREFIX.")
        expect(org.locator("#ctfi-url")).to_be_editable()
        expect(org.locator("#ctfi-token")).to_be_editable()
        connect(org, stack)
        # A post that sends a prefix anyway (the field enabled by hand) does not save it.
        post_by_hand(org, {"prefix": "hijack"})
        expect(org.locator(".ctfi-env-ignored")).to_contain_text(
            "Team id prefix (CTF_INSTANCER_TEAM_PREFIX)")
        expect(org.locator("#ctfi-prefix")).to_have_value(PREFIX)
        expect(org.locator("#ctfi-prefix-note")).to_contain_text(f"{PREFIX}-t<team id>")
        expect(org.locator(".ctfi-catalog-list")).to_contain_text("flagweb")
        assert "prefix" not in saved_settings(org)

        # CTFd's admin flag list: the instancer flag's Flag cell says what it is, an in-app
        # one names its challenge and says whose flag it is, a static flag is left as it is.
        team_flag_id = create_challenge(org, {
            "name": "Labelled flag", "category": "web", "value": 10, "description": "-",
            "state": "hidden", "type": "instanced", "instancer_challenge": "flagweb",
            "instancer_flag": "1"}, None)
        in_app_id = create_challenge(org, {
            "name": "Labelled in-app flag", "category": "shop", "value": 10, "description": "-",
            "state": "hidden", "type": "standard"},
            {"type": "instancer", "content": "Score Board", "data": "shop"})
        static_id = create_challenge(org, {
            "name": "Labelled static flag", "category": "misc", "value": 10,
            "description": "-", "state": "hidden", "type": "standard"},
            {"type": "static", "content": "CTF{static}"})
        cells = {}
        for chal_id in (team_flag_id, in_app_id, static_id):
            org.goto(f"/admin/challenges/{chal_id}")
            org.get_by_role("tab", name="Flags").click()
            row = org.locator("#flagsboard tbody tr")
            expect(row).to_have_count(1)
            cells[chal_id] = row.locator("td").nth(1)
            if chal_id == team_flag_id:
                expect(row.locator("td").first).to_have_text("instancer")
                expect(cells[chal_id]).to_have_text("each team's own flag")
                flags_tab = org.locator("#flags")
                expect(flags_tab).to_have_class(re.compile(r"\bshow\b"))
                flags_tab.screenshot(path=str(tmp_path / "ctfd-flag-list.png"),
                                     animations="disabled")  # its fade-in, finished
                if os.environ.get("CTF_DASHBOARD_SCREENSHOTS") == "1":
                    shutil.copyfile(tmp_path / "ctfd-flag-list.png", DOCS / "ctfd-flag-list.png")
            elif chal_id == in_app_id:
                expect(cells[chal_id].locator("pre")).to_have_text("Score Board")
                expect(cells[chal_id]).to_contain_text("each team's own in-app flag")
            else:
                expect(cells[chal_id]).to_have_text("CTF{static}")
                expect(cells[chal_id].locator(".ctfi-flag-note")).to_have_count(0)
    finally:
        org_ctx.close()


@pytest.mark.timeout(600)
def test_settings_set_by_the_environment_are_read_only_and_never_overwritten(
    ctfd_install: CtfdInstall, stack: Stack, browser: Browser, tmp_path: Path,
) -> None:
    """A CTFd given CTF_INSTANCER_*: those fields are read-only, named, and a post keeps them."""
    token_file = tmp_path / "instancer_admin_token"
    token_file.write_text("")  # the operator has not filled it yet
    env = {"REDIS_URL": f"{stack.redis.url}/8", "CTF_INSTANCER_URL": stack.api,
           "CTF_INSTANCER_ADMIN_TOKEN_FILE": str(token_file),
           "CTF_INSTANCER_TEAM_PREFIX": f"{PREFIX}e"}
    with serve_ctfd(ctfd_install, tmp_path / "ctfd", env) as url:
        org_ctx, org = new_page(browser, url)
        try:
            log_in(org, ADMIN_NAME, ADMIN_PASSWORD)
            org.goto("/admin/ctf_instancer/settings")
            # No token yet (the file is empty): the page says where to set one, by its name,
            # and the token field is the page's while the environment gives none.
            expect(org.locator(".ctfi-health")).to_contain_text(
                "The instancer's admin token is not set: an organiser sets it in CTFd on "
                "Admin > Instancer > Settings, or with CTF_INSTANCER_ADMIN_TOKEN.")
            expect(org.locator("#ctfi-token")).to_be_editable()
            url_field = org.locator("#ctfi-url")
            expect(url_field).to_be_disabled()
            expect(url_field).to_have_value(stack.api)
            expect(org.locator("#ctfi-url-note")).to_contain_text(
                "Set by the environment: CTF_INSTANCER_URL.")

            # The operator fills the file: every field now comes from the environment.
            token_file.write_text(stack.token + "\n")
            org.goto("/admin/ctf_instancer/settings")
            expect(org.locator(".ctfi-catalog-list")).to_contain_text("flagweb")
            for field in ("#ctfi-url", "#ctfi-token", "#ctfi-prefix"):
                expect(org.locator(field)).to_be_disabled()
            expect(org.locator("#ctfi-prefix")).to_have_value(f"{PREFIX}e")
            expect(org.locator("#ctfi-token-note")).to_contain_text(
                "Set by the environment: CTF_INSTANCER_ADMIN_TOKEN_FILE")
            expect(org.locator("#ctfi-token-note")).to_contain_text(f", the file {token_file}.")
            expect(org.locator("#ctfi-prefix-note")).to_contain_text(
                "Set by the environment: CTF_INSTANCER_TEAM_PREFIX.")
            expect(org.locator(".ctfi-all-env")).to_have_text(
                "Every field is set by the environment: nothing to save here.")
            expect(org.get_by_role("button", name="Save")).to_be_disabled()
            assert stack.token not in org.content()
            screenshot(org, tmp_path, "ctfd-settings-env.png")

            # A post made by hand with other values changes none of them, and says so.
            post_by_hand(org, {"url": "http://127.0.0.1:9", "token": "not-the-token",
                               "prefix": "hijack"})
            ignored = org.locator(".ctfi-env-ignored")
            expect(ignored).to_contain_text("Instancer URL (CTF_INSTANCER_URL)")
            expect(ignored).to_contain_text("Admin token (CTF_INSTANCER_ADMIN_TOKEN_FILE)")
            expect(ignored).to_contain_text("Team id prefix (CTF_INSTANCER_TEAM_PREFIX)")
            expect(org.locator("#ctfi-url")).to_have_value(stack.api)
            expect(org.locator("#ctfi-prefix")).to_have_value(f"{PREFIX}e")
            expect(org.locator(".ctfi-catalog-list")).to_contain_text("flagweb")
            # Nothing was written to the plugin's table, to come back if the variables go.
            assert saved_settings(org) == {}
        finally:
            org_ctx.close()
