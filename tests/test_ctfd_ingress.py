"""The CTFd plugin with CTF_INGRESS=traefik: the modal's link opens the team's instance only.

The real CTFd (tests/test_ctfd_plugin.py's fixtures) in front of the ingress stack of
tests/test_ingress.py (Traefik with the team gate, the API, a worker), in Chromium with
``*.instances.test`` mapped to this machine.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from conftest import private_label
from playwright.sync_api import Browser, expect, sync_playwright
from test_ctfd_plugin import (  # noqa: F401  # ctfd and ctfd_install are fixtures used here
    ADMIN_NAME,
    ADMIN_PASSWORD,
    CHROMIUM,
    CHROMIUM_ARGS,
    create_challenge,
    ctfd,
    ctfd_install,
    log_in,
    new_page,
    open_challenge,
    register_team,
)
from test_ingress import (
    ADMIN_TOKEN,
    DOMAIN,
    Stack,
    catalog,
    host_of,
    ingress_images,
    running_stack,
)

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

POOL = "10.227.0.0/16"  # a team-subnet pool of its own


@dataclass
class _Redis:
    url: str


@dataclass
class IngressStack:
    """What the ``ctfd`` fixture needs of a stack (api, token, redis), and the ingress stack."""

    api: str
    token: str
    redis: _Redis
    ingress: Stack


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngressStack]:
    """The ingress stack (Traefik, the API, a worker) that CTFd talks to."""
    base = tmp_path_factory.mktemp("ctfd-ingress")
    label = private_label("ctfd-ingress")
    with running_stack(docker_client, base, label, catalog(ingress_images(docker_client, label)),
                       POOL) as made:
        redis_url = made.settings.broker_url.rsplit("/", 1)[0]
        yield IngressStack(made.api, ADMIN_TOKEN, _Redis(redis_url), made)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, with every instance host name resolving to this machine."""
    if not CHROMIUM.exists():
        pytest.skip("chromium is missing: run ./setup-celery.sh --dev (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            *CHROMIUM_ARGS, f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1"])
        yield b
        b.close()


def start_in_modal(page: Any, name: str) -> Any:
    """Start the team's instance from the challenge's modal; return the modal's link."""
    panel = open_challenge(page, name)
    panel.get_by_role("button", name="Start", exact=True).click()
    expect(panel.locator(".ctfi-status")).to_have_text("Running", timeout=60_000)
    return panel.locator("a.ctfi-link")


@pytest.mark.timeout(600)
def test_modal_link_opens_the_teams_instance_and_another_team_gets_403(
    ctfd: str, stack: IngressStack, browser: Browser,  # noqa: F811  # the imported fixture
) -> None:
    """The modal's link opens the team's instance behind Traefik; another team's cookie: 403."""
    org_ctx, org = new_page(browser, ctfd)
    one_ctx, one = new_page(browser, ctfd)
    two_ctx, two = new_page(browser, ctfd)
    try:
        log_in(org, ADMIN_NAME, ADMIN_PASSWORD)
        org.goto("/admin/ctf_instancer/settings")
        org.fill("#ctfi-url", stack.api)
        org.fill("#ctfi-token", stack.token)
        org.get_by_role("button", name="Save").click()
        expect(org.locator(".ctfi-catalog-list")).to_contain_text("echo")
        create_challenge(org, {"name": "Echo", "category": "web", "value": 10,
                               "description": "Your own echo.", "state": "visible",
                               "type": "instanced", "instancer_challenge": "echo",
                               "instancer_flag": "0"}, None)

        # Team one: the modal's link goes through the plugin to the access link, then the
        # instance's own host with the team's cookie.
        register_team(one, "ingrid", "Ingress One")
        link = start_in_modal(one, "Echo")
        expect(link).to_have_text(re.compile(
            rf"^http://[a-z2-7]{{16}}\.{re.escape(DOMAIN)}:{stack.ingress.http_port}/?$"))
        address = link.inner_text().rstrip("/")
        with one.expect_popup() as popup:
            link.click()
        instance = popup.value
        expect(instance.locator("body")).to_contain_text("hello from the echo challenge")
        host_one = host_of(instance.url)
        assert instance.url == f"{address}/"
        instance.close()

        # Team two: without a cookie for team one's host its browser gets the 401 page.
        register_team(two, "ingmar", "Ingress Two")
        stranger = two.goto(f"{address}/")
        assert stranger is not None and stranger.status == 401
        assert "echo challenge" not in two.content()
        # With its own instance opened, it holds a valid cookie, for its own host only;
        # presented at team one's host, that cookie gets 403.
        link_two = start_in_modal(two, "Echo")
        with two.expect_popup() as popup_two:
            link_two.click()
        own = popup_two.value
        expect(own.locator("body")).to_contain_text("hello from the echo challenge")
        host_two = host_of(own.url)
        assert host_two != host_one
        cookies = two_ctx.cookies(own.url)
        assert cookies, "team two's instance set no access cookie"
        header = "; ".join(f"{c['name']}={c['value']}" for c in cookies)
        assert stack.ingress.web(host_two, headers={"Cookie": header}).status == 200
        refused = stack.ingress.web(host_one, headers={"Cookie": header})
        assert refused.status == 403
        assert "echo challenge" not in refused.text()
    finally:
        for context in (org_ctx, one_ctx, two_ctx):
            with contextlib.suppress(Exception):
                context.close()
