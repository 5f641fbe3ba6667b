"""``share: global`` challenges behind the ingress (SPEC §11 + §13), against a real Traefik.

The stack of tests/test_ingress.py (a real Traefik, the API as its gate, a real ``celery
worker`` with ``CTF_INGRESS=traefik`` and the default ``CTF_INGRESS_AUTH=team``, its janitor
at the default interval, on a private Redis): the workers start the global instances by
themselves, each under a host name of its own, and every team the API shows them to (every
admitted team) opens them through the gate; a request without a team's link or cookie is
refused. Requests go to Traefik's address with the host name, as a browser would send them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from conftest import private_label
from test_ingress import (
    ADMIN_TOKEN,
    DOMAIN,
    Stack,
    host_of,
    ingress_images,
    open_link,
    path_of,
    running_stack,
    tls_echo,
)

from celery_app.ingress import tokens
from celery_app.ingress.labels import label_of_host
from celery_app.vocab.team_tokens import team_token
from ctf_testkit.support import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

POOL = "10.206.0.0/16"  # this file's team networks, away from every other file's
# Team networks are named after teams, and other test runs share the engine: our own names.
_RUN = uuid.uuid4().hex[:6]
ALPHA, BRAVO = (f"{t}-{_RUN}" for t in ("alpha", "bravo"))
WEB, TCP = "gi-web", "gi-tcp"
# The janitor's pass (every 5 s by default) starts it; a cold start takes a few seconds.
COMES_UP = 90.0
PAGE = "hello from the echo challenge"


def catalog(images: dict[str, str]) -> str:
    return f"""
challenges:
  {WEB}:
    name: Shared web page
    image: {images['echo']}
    port: 8080
    share: global
    start_timeout: 30
  {TCP}:
    name: Shared TCP echo
    image: {images['tcp']}
    port: 9000
    protocol: tcp
    share: global
    start_timeout: 30
  echo:
    name: A team's own page
    image: {images['echo']}
    port: 8080
    ttl: 600
    start_timeout: 30
"""


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Private Redis, stand-in images, Traefik, the API and a worker with the ingress on."""
    base = tmp_path_factory.mktemp("global-ingress")
    label = private_label("global-ingress")
    with running_stack(docker_client, base, label, catalog(ingress_images(docker_client, label)),
                       POOL) as made:
        yield made


def as_team(team: str) -> dict[str, str]:
    """The headers of ``team``'s own API token."""
    return {"Authorization": f"Bearer {team_token(ADMIN_TOKEN, team)}"}


def listing(stack: Stack, team: str) -> dict[str, dict[str, Any]]:
    """GET the team's instances with its own token, by challenge."""
    status, body = stack.call("GET", f"/api/v1/teams/{team}/instances", as_team(team))
    assert status == 200, body
    return {i["challenge"]: i for i in body["instances"]}


def running(stack: Stack, challenge: str, team: str = "", not_id: str = "") -> dict[str, Any]:
    """Wait until ``team``'s listing shows the global ``challenge`` running (not ``not_id``)."""
    def up() -> dict[str, Any] | None:
        inst = listing(stack, team or ALPHA).get(challenge)
        ok = inst is not None and inst["status"] == "running" \
            and inst["container_id"] != not_id
        return inst if ok else None
    return dict(wait_for(up, COMES_UP, 0.5, f"the global {challenge} instance running"))


def follow(stack: Stack, inst: dict[str, Any], *, tls: bool = False) -> str:
    """Follow the instance's ``access_url`` (as shown to one team); return the cookie it sets."""
    answer = stack.web(host_of(inst["url"]), path_of(inst["access_url"]), tls=tls)
    assert answer.status == 302, answer.text()
    (cookie,) = answer.set_cookies
    return cookie.split(";", 1)[0]


def test_the_global_instances_come_up_by_themselves_behind_the_ingress(stack: Stack) -> None:
    """With nobody asking, both come up with team id ``global``, a host each, no published port."""
    web, tcp = running(stack, WEB), running(stack, TCP)
    for inst, challenge in ((web, WEB), (tcp, TCP)):
        assert inst["team_id"] == "global"
        assert inst["container_name"] == f"ctf-{challenge}-global"
        assert inst["ports"] == {}
        container = stack.docker.containers.get(inst["container_id"])
        assert not container.attrs["HostConfig"].get("PortBindings")
        route = stack.settings.data_dir / "ingress" / "dynamic" / f"ctf-{challenge}-global.yml"
        assert route.is_file()
    label = label_of_host(host_of(web["url"]))
    assert web["url"] == f"http://{label}.{DOMAIN}:{stack.http_port}/"
    assert len(label) == 16 and label.isalnum() and label.islower()  # unguessable, as a team's
    assert tcp["url"] == f"tls://{host_of(tcp['url'])}:{stack.https_port}"
    assert "access_url" not in tcp  # TLS with SNI: no cookie to set


def test_two_teams_both_open_it_through_the_gate(stack: Stack) -> None:
    """Alpha and bravo each get a link of their own to the one host; both open the page."""
    alpha = running(stack, WEB, ALPHA)
    bravo = running(stack, WEB, BRAVO)
    assert bravo["container_id"] == alpha["container_id"] and bravo["url"] == alpha["url"]
    host = host_of(alpha["url"])
    for team, inst in ((ALPHA, alpha), (BRAVO, bravo)):
        cookie = follow(stack, inst)
        # The cookie names the team it was shown to: it is valid on this one host.
        assert cookie.split("=", 1)[1].startswith(f"{team}.")
        page = stack.web(host, headers={"Cookie": cookie})
        assert page.status == 200 and PAGE in page.text()
    # Over HTTPS too (the __Host- cookie), for a team that opens it there.
    secure = follow(stack, running(stack, WEB, BRAVO), tls=True)
    assert secure.startswith(f"{tokens.SECURE_COOKIE_NAME}=")
    page = stack.web(host, headers={"Cookie": secure}, tls=True)
    assert page.status == 200 and PAGE in page.text()


def test_a_request_without_admission_is_refused(stack: Stack) -> None:
    """No cookie 401; another host's cookie, a forged link or cookie 403; no token, no link."""
    inst = running(stack, WEB)
    host = host_of(inst["url"])
    none = stack.web(host)
    assert none.status == 401 and PAGE not in none.text()
    # Alpha's valid cookie of its own instance does not open the shared host.
    own = stack.start(ALPHA, "echo")
    own_cookie = open_link(stack, own)
    assert stack.web(host_of(own["url"]), headers={"Cookie": own_cookie}).status == 200
    other = stack.web(host, headers={"Cookie": own_cookie})
    assert other.status == 403 and PAGE not in other.text()
    # A link or cookie signed with a key that is not the flag secret's.
    label = label_of_host(host)
    wrong = tokens.gate_key("not-the-flag-secret-0123456789abcdef")
    forged_link = stack.web(host, tokens.LINK_PREFIX + tokens.issue(wrong, "link", label,
                                                                    ALPHA, 60))
    assert forged_link.status == 403 and not forged_link.set_cookies
    forged = f"{tokens.COOKIE_NAME}={tokens.issue(wrong, 'cookie', label, ALPHA, 60)}"
    assert stack.web(host, headers={"Cookie": forged}).status == 403
    # The link comes only with a team's token: without one the API shows nothing.
    status, _ = stack.call("GET", f"/api/v1/teams/{ALPHA}/instances",
                           {"Accept": "application/json"})
    assert status == 401
    stack.call("DELETE", f"/api/v1/teams/{ALPHA}/instances/echo?wait=30")


def test_two_teams_reach_the_tcp_one_through_tls_with_sni(stack: Stack) -> None:
    """Both teams are shown one ``tls://`` host; TLS with that SNI reaches the echo."""
    alpha = running(stack, TCP, ALPHA)
    bravo = running(stack, TCP, BRAVO)
    assert bravo["url"] == alpha["url"]
    host = host_of(alpha["url"])
    assert tls_echo(stack, host, b"from alpha\n") == b"from alpha\n"
    assert tls_echo(stack, host, b"from bravo\n") == b"from bravo\n"
    assert tls_echo(stack, f"unknown{_RUN}.{DOMAIN}", b"ping\n") != b"ping\n"


def test_a_team_gets_403_on_stop_extend_and_restart(stack: Stack) -> None:
    """A team's stop, extend or restart is 403 ``shared_instance``; it keeps running for all."""
    inst = running(stack, WEB)
    url = f"/api/v1/teams/{ALPHA}/instances/{WEB}"
    for method, path in (("DELETE", url), ("POST", f"{url}/extend"),
                         ("POST", f"{url}/restart")):
        status, body = stack.call(method, path, as_team(ALPHA))
        assert status == 403 and body["error"] == "shared_instance", (method, path, body)
    still = running(stack, WEB, BRAVO)
    assert still["container_id"] == inst["container_id"]
    page = stack.web(host_of(still["url"]), headers={"Cookie": follow(stack, still)})
    assert page.status == 200 and PAGE in page.text()


def test_it_comes_back_at_the_same_host_after_docker_kill(stack: Stack) -> None:
    """Killed, the workers start it again; its route follows, and a team's cookie still opens it."""
    inst = running(stack, WEB)
    cookie = follow(stack, inst)
    stack.docker.containers.get(inst["container_id"]).kill()
    again = running(stack, WEB, BRAVO, not_id=inst["container_id"])
    assert again["url"] == inst["url"]  # an HTTP instance's host stays (SPEC §11)
    wait_for(lambda: stack.web(host_of(again["url"]), headers={"Cookie": cookie}).status == 200,
             30, 0.2, "the new container behind the same host")
