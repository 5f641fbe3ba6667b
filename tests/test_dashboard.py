"""The web dashboard (issue 5) end-to-end: headless Chromium against the real API and worker.

The API is served over real HTTP (uvicorn in a thread) with a real worker, Redis and Docker
behind it. Playwright from PyPI drives Debian's ``chromium`` (``apt-get install chromium``;
Playwright's own browser downloads are not used). Set ``CTF_DASHBOARD_SCREENSHOTS=1`` to write
the screenshots of both views into ``docs/`` (they always go to the test's tmp folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from api_helpers import ADMIN, ADMIN_TOKEN, our_containers, team_headers
from ci import unavailable
from conftest import ROOT, free_port, wait_for
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright

from celery_app.api.app import create_app
from celery_app.settings import Settings
from celery_app.vocab.team_tokens import team_token

pytest_plugins = ["api_fixtures"]
pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT = 30_000  # ms: a stand-in container starts in about a second
DOCS = ROOT / "docs"
# Extend and stop go through the worker; on a loaded machine that can take longer than
# Playwright's default 5 s, so every expect() waits up to 20 s (it returns as soon as it holds).
expect.set_options(timeout=20_000)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    if not CHROMIUM.exists():
        unavailable("chromium is missing: run ./setup-celery.sh --dev (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def live_api(worker: Any, clean_worker_state: None, api_settings: Settings) -> Iterator[str]:
    """Serve create_app(settings) over real HTTP on a free port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(api_settings), host="127.0.0.1", port=port, log_level="warning",
        lifespan="on"))
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 20, message="uvicorn to start")
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(20)


@pytest.fixture
def page(browser: Browser, live_api: str) -> Iterator[Page]:
    """A fresh browser context (own sessionStorage) on the live API."""
    context = browser.new_context(base_url=live_api, viewport={"width": 1280, "height": 860})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_api)
    context.set_default_timeout(30_000)
    pg = context.new_page()
    yield pg
    context.close()


def call(base: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """Call the live API outside the browser; return (status, JSON body)."""
    req = urllib.request.Request(base + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def screenshot(page: Page, tmp_path: Path, name: str) -> None:
    """Screenshot the page into tmp_path, and into docs/ when CTF_DASHBOARD_SCREENSHOTS=1."""
    shot = tmp_path / name
    # From the top: a full-page shot of a scrolled page draws the sticky header mid-page.
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("CTF_DASHBOARD_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS / name)


def assert_fits_a_phone(page: Page, tmp_path: Path, name: str) -> None:
    """At a phone's width the page needs no sideways scrolling; restore the desktop size."""
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.locator("html")).to_have_js_property("scrollWidth", 390)
    page.screenshot(path=str(tmp_path / name), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 860})


# -- team view --------------------------------------------------------------------------------


def test_team_starts_opens_extends_and_stops_web(
    page: Page, live_api: str, docker_client: Any, tmp_path: Path
) -> None:
    """A team signs in by link, starts web, opens its URL, extends it and stops it."""
    token = team_token(ADMIN_TOKEN, "alpha")
    requests: list[Request] = []

    def seen(request: Request) -> None:  # Playwright cannot take a bound builtin
        requests.append(request)

    page.on("request", seen)
    page.goto(f"/#token={token}")

    # The fragment is dropped at once; the token lives in sessionStorage only.
    expect(page.locator("#who-label")).to_have_text("Team alpha")
    assert page.url == f"{live_api}/"
    assert page.evaluate("sessionStorage.getItem('ctf.token')") == token
    expect(page.locator("article[data-challenge]")).to_have_count(5)

    card = page.locator('article[data-challenge="web"]')
    badge = card.locator(".badge")
    expect(card.get_by_role("heading")).to_have_text("Stand-in web challenge")
    expect(badge).to_have_text("Not running")
    expect(card.get_by_role("button", name="Stop", exact=True)).to_be_disabled()

    card.get_by_role("button", name="Start", exact=True).click()
    link = card.get_by_role("link")
    expect(link).to_have_attribute("href", re.compile(r"^http://localhost:\d+/$"),
                                   timeout=START_TIMEOUT)
    expect(badge).to_have_text("Running")
    expect(page.locator("#announce")).to_contain_text("running at http://localhost:")
    countdown = card.locator("time.countdown")
    expect(countdown).to_have_text(re.compile(r"^(9|10):\d\d$"))  # ttl 600 s

    with page.context.expect_page() as opened:
        link.click()
    challenge_page = opened.value
    expect(challenge_page.locator("body")).to_contain_text("hello from ctf")
    challenge_page.close()

    card.get_by_role("button", name="Extend", exact=True).click()
    expect(countdown).to_have_text(re.compile(r"^(19|20):\d\d$"))  # + ttl
    expect(card.get_by_role("button", name="Extend", exact=True)).to_be_enabled()
    screenshot(page, tmp_path, "dashboard-team.png")
    assert_fits_a_phone(page, tmp_path, "phone-team.png")

    card.get_by_role("button", name="Stop", exact=True).click()
    expect(badge).to_have_text("Not running", timeout=START_TIMEOUT)
    expect(card.get_by_role("link")).to_have_count(0)
    expect(card.get_by_role("button", name="Start", exact=True)).to_be_enabled()
    assert our_containers(docker_client, **{"ctf.team": "alpha"}) == []

    # The token only ever travelled in the Authorization header.
    api_calls = [r for r in requests if "/api/v1/" in r.url]
    assert api_calls
    assert all(token not in r.url for r in requests)
    assert all(r.headers.get("authorization") == f"Bearer {token}" for r in api_calls)


def test_start_shows_progress_until_the_challenge_answers(page: Page) -> None:
    """Starting the slow challenge shows the waiting phase, then the link."""
    page.goto(f"/#token={team_token(ADMIN_TOKEN, 'beta')}")
    card = page.locator('article[data-challenge="slow"]')
    card.get_by_role("button", name="Start", exact=True).click()
    expect(card.locator(".badge")).to_have_text("Starting…")
    expect(card.locator(".progress-text")).to_have_text("Waiting for the challenge to answer…",
                                                        timeout=START_TIMEOUT)
    expect(card.locator(".steps li.current")).to_have_text("Answering")
    expect(card.get_by_role("link")).to_be_visible(timeout=START_TIMEOUT)
    expect(card.locator(".progress")).to_be_hidden()
    expect(card.get_by_role("button", name="Start", exact=True)).to_be_disabled()


def test_errors_are_shown_in_words_not_codes(page: Page) -> None:
    """A quota refusal shows the API's detail in a sentence; the code never appears."""
    detail = "team alpha already runs 5 instances, its limit; stop one first"

    def refuse(route: Route) -> None:
        route.fulfill(status=409, content_type="application/json",
                      body=json.dumps({"error": "team_quota_exceeded", "detail": detail}))

    page.route("**/api/v1/teams/alpha/instances/web", refuse)
    page.goto(f"/#token={team_token(ADMIN_TOKEN, 'alpha')}")
    card = page.locator('article[data-challenge="web"]')
    card.get_by_role("button", name="Start", exact=True).click()
    alert = card.get_by_role("alert")
    expect(alert).to_contain_text("as many instances as it may")
    expect(alert).to_contain_text("Team alpha already runs 5 instances")
    expect(alert).not_to_contain_text("team_quota_exceeded")
    expect(card.locator(".badge")).to_have_text("Not running")


def test_team_token_cannot_see_another_team(page: Page, live_api: str) -> None:
    """Another team's routes answer 403, and the UI shows only the token's own team."""
    status, inst = call(live_api, "PUT", "/api/v1/teams/other/instances/web?wait=30", ADMIN)
    assert (status, inst["status"]) == (200, "running")

    page.goto(f"/#token={team_token(ADMIN_TOKEN, 'alpha')}")
    expect(page.locator("#who-label")).to_have_text("Team alpha")
    expect(page.locator('article[data-challenge="web"] .badge')).to_have_text("Not running")
    expect(page.locator("#admin-view")).to_be_hidden()
    expect(page.locator("#team-view")).not_to_contain_text("other")

    answered = page.evaluate("""async () => {
        const token = sessionStorage.getItem('ctf.token');
        const r = await fetch('/api/v1/teams/other/instances',
                              {headers: {Authorization: `Bearer ${token}`}});
        return [r.status, await r.json()];
    }""")
    assert answered[0] == 403
    assert answered[1]["error"] == "forbidden"
    status, _ = call(live_api, "GET", "/api/v1/instances", team_headers("alpha"))
    assert status == 403


def test_a_bad_token_is_refused_at_the_login_form(page: Page) -> None:
    """An invalid token keeps the login form up with a sentence saying so."""
    page.goto("/")
    field = page.get_by_label("Access token")
    expect(field).to_be_focused()
    field.fill("alpha.0000")
    field.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("That token is not valid")
    expect(page.locator("#team-view")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('ctf.token')") is None


# -- organiser view ---------------------------------------------------------------------------


def test_admin_filters_issues_a_link_and_stops_another_teams_instance(
    page: Page, live_api: str, docker_client: Any, tmp_path: Path
) -> None:
    """The organiser sees every instance, capacity and health, and stops a team's instance."""
    for team, challenge in (("victim", "web"), ("bystander", "exposed")):
        status, inst = call(live_api, "PUT", f"/api/v1/teams/{team}/instances/{challenge}?wait=30",
                            team_headers(team))
        assert (status, inst["status"]) == (200, "running"), inst

    page.goto("/")
    page.get_by_label("Access token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Organiser dashboard")).to_be_visible()
    expect(page.locator("#who-label")).to_have_text("Organiser")

    victim = page.locator('tr[data-team="victim"][data-challenge="web"]')
    expect(victim.locator(".badge")).to_have_text("Running")
    expect(page.locator("#instances tbody tr")).to_have_count(2)
    expect(page.locator("#cap-used")).to_have_text("2")
    expect(page.locator("#cap-limit")).to_have_text("500")
    expect(page.locator('[data-health="redis"] .value')).to_have_text("OK")
    expect(page.locator('[data-health="docker"] .value')).to_have_text("OK")
    expect(page.locator('[data-health="workers"] .value')).to_have_text(re.compile(r"^[1-9]\d* "))
    # The audit trail (SPEC §13): the two starts, newest first, by the teams themselves.
    starts = page.locator('#audit tbody tr[data-kind="start"]')
    expect(starts).to_have_count(2)
    expect(starts.first).to_contain_text("team bystander")
    expect(starts.last).to_contain_text("team victim")

    # Filters: by team, by challenge, by status.
    page.get_by_label("Team", exact=True).fill("vic")
    expect(page.locator("#instances tbody tr")).to_have_count(1)
    page.get_by_label("Team", exact=True).fill("")
    page.get_by_label("Challenge", exact=True).select_option("exposed")
    expect(page.locator("#instances tbody tr")).to_have_count(1)
    expect(page.locator('tr[data-team="bystander"]')).to_be_visible()
    page.get_by_label("Challenge", exact=True).select_option("")
    page.get_by_label("Status", exact=True).select_option("failed")
    expect(page.locator("#no-instances")).to_be_visible()
    page.get_by_label("Status", exact=True).select_option("")
    expect(page.locator("#instances tbody tr")).to_have_count(2)

    # Issue a team's token and copy its dashboard link.
    page.get_by_label("Team id").fill("victim")
    page.get_by_role("button", name="Issue token").click()
    link = f"{live_api}/#token={team_token(ADMIN_TOKEN, 'victim')}"
    expect(page.get_by_label("Dashboard link")).to_have_value(link)
    page.get_by_role("button", name="Copy dashboard link").click()
    expect(page.locator("#announce")).to_have_text("Dashboard link copied to the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == link
    screenshot(page, tmp_path, "dashboard-admin.png")
    assert_fits_a_phone(page, tmp_path, "phone-admin.png")

    # Extend, then stop, another team's instance.
    before = victim.locator("time.countdown").get_attribute("datetime")
    victim.get_by_role("button", name=re.compile(r"^Extend")).click()
    expect(victim.locator("time.countdown")).not_to_have_attribute("datetime", before or "")
    # Stopping another team's instance asks first: dismissing keeps it, accepting stops it.
    page.once("dialog", lambda dialog: dialog.dismiss())
    victim.get_by_role("button", name=re.compile(r"^Stop")).click()
    expect(victim).to_have_count(1)
    expect(victim.get_by_role("button", name=re.compile(r"^Stop"))).to_be_enabled()
    messages: list[str] = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
    victim.get_by_role("button", name=re.compile(r"^Stop")).click()
    expect(victim).to_have_count(0, timeout=START_TIMEOUT)
    assert messages and "team victim" in messages[0]
    expect(page.locator("#cap-used")).to_have_text("1")
    wait_for(lambda: our_containers(docker_client, **{"ctf.team": "victim"}) == [], 10,
             message="victim's container to be gone")
    assert len(our_containers(docker_client, **{"ctf.team": "bystander"})) == 1
