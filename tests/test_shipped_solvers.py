"""The shipped solvers of the seed's two challenges (SPEC §14, issue 26) on the real engine.

``examples/solvers/build.sh`` builds them, as an organiser does; the catalog is the shipped
``deploy/challenges.yaml`` with its entries as they are (port, health path, flag_env, solver
block) but the images: the real ``bkimminich/juice-shop`` and ``pasapples/apjctf-todo-java-app``
cannot be pulled here (no registry), so stand-ins FROM scratch with /bin/busybox take their
place. The Juice Shop stand-in does what the solver relies on: asking for the score board's
image solves "Score Board", whose flag, the hex HMAC-SHA1 of that name under its CTF_KEY (or,
without one, the key in its ctf.key file), it sends in a "challenge solved" notification to a
Socket.IO client over Engine.IO's long-polling transport. The To-Do stand-in serves a to-do
page on 8080. A real worker with default settings (the egress firewall on) runs them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from api_helpers import ADMIN
from ci import unavailable
from conftest import (
    BUSYBOX,
    ROOT,
    RUN_ID,
    TEST_LABEL,
    base_env,
    build_image,
    cleanup_docker,
    containers_of,
    private_label,
    worker_and_api,
)

from celery_app.core.flags import in_app_flag, team_flag
from celery_app.engine.firewall import table_name
from celery_app.settings import load_settings
from ctf_testkit.support import RedisServer, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("shipped-solvers")
POOL = "10.211.0.0/16"  # this file's team-subnet pool (and its own firewall table)
SOLVERS = ROOT / "examples" / "solvers"
# The key Juice Shop falls back to without CTF_KEY (its ctf.key file): not the canary's.
FILE_KEY = "TRwzkRJnHOTckssAeyJbysWgP8We"
ABSENT = "127.0.0.1:9/ctf-example/todo-app-solver:1"  # port 9 ("discard"): no registry there

# hmac_sha1 KEY MESSAGE in busybox sh: Node's crypto.createHmac('sha1', KEY), as hex.
HMAC_SH = """# hmac_sha1 KEY MESSAGE: the hex HMAC-SHA1 (RFC 2104).
hmac_sha1() {
    if [ "$(printf %s "$1" | wc -c)" -gt 64 ]; then
        k="$(printf %s "$1" | sha1sum | cut -c 1-40)"
    else
        k="$(printf %s "$1" | xxd -p | tr -d '\\n')"
    fi
    while [ ${#k} -lt 128 ]; do k="${k}00"; done
    i=0 ipad="" opad=""
    while [ $i -lt 128 ]; do
        b=$((0x$(echo "$k" | cut -c $((i + 1))-$((i + 2)))))
        ipad="$ipad$(printf %02x $((b ^ 0x36)))"
        opad="$opad$(printf %02x $((b ^ 0x5c)))"
        i=$((i + 2))
    done
    inner="$( (printf %s "$ipad" | xxd -r -p; printf %s "$2") | sha1sum | cut -c 1-40)"
    printf %s "$opad$inner" | xxd -r -p | sha1sum | cut -c 1-40
}
"""
SERVE_SH = """#!/bin/busybox sh
# Juice Shop stand-in: its flags are the hex HMAC-SHA1 of a challenge's name under CTF_KEY
# (or, without it, the key in /ctf.key, as Juice Shop reads ctf.key), served on port 3000.
. /hmac.sh
state=/tmp/juice
mkdir -p "$state"
key="${CTF_KEY:-}"
[ -n "$key" ] || key="$(cat /ctf.key)"
hmac_sha1 "$key" "Score Board" >"$state/flag"
exec nc -ll -p 3000 -e /handle
"""
HANDLE_SH = """#!/bin/busybox sh
# One HTTP exchange with the Juice Shop stand-in (nc -ll -e runs it for each connection).
state=/tmp/juice
cr="$(printf '\\r')"
read -r method target _proto
length=0
while read -r line; do
    line="${line%"$cr"}"
    [ -z "$line" ] && break
    case "$line" in
        [Cc]ontent-[Ll]ength:*) length="${line#*:}"; length="${length# }" ;;
    esac
done
body=""
[ "$length" -gt 0 ] && body="$(head -c "$length")"
respond() {
    printf 'HTTP/1.1 %s\\r\\nContent-Type: %s\\r\\n' "$1" "$2"
    size="$(printf %s "$3" | wc -c)"
    printf 'Content-Length: %s\\r\\nConnection: close\\r\\n\\r\\n%s' "$size" "$3"
}
path="${target%%\\?*}"
sid="$(echo "$target" | sed -n 's/.*[?&]sid=\\([^&]*\\).*/\\1/p')"
case "$path" in
    /rest/admin/application-version) respond "200 OK" application/json '{"version":"17.1.1"}' ;;
    /assets/public/images/padding/1px.png)
        # Asking for the score board's image solves "Score Board" (routes/verify.ts).
        touch "$state/solved"
        respond "200 OK" image/png "PNG" ;;
    /socket.io/)
        if [ -z "$sid" ]; then
            sid="$(head -c 8 /dev/urandom | xxd -p)"
            : >"$state/sid-$sid"
            respond "200 OK" "text/plain; charset=UTF-8" \\
                "0{\\"sid\\":\\"$sid\\",\\"upgrades\\":[],\\"pingInterval\\":25000,\\"pingTimeout\\":20000}"
        elif [ ! -e "$state/sid-$sid" ]; then
            respond "400 Bad Request" application/json '{"code":1,"message":"Session ID unknown"}'
        elif [ "$method" = POST ]; then
            if [ "$body" = 40 ]; then
                # Connected: the queued notifications follow the connect packet.
                printf '40{"sid":"%s"}' "$sid" >"$state/sid-$sid"
                if [ -e "$state/solved" ]; then
                    n='42["challenge solved",{"key":"scoreBoardChallenge","name":"Score Board",'
                    n="$n"'"challenge":"Score Board (Find the carefully hidden page.)",'
                    n="$n"'"flag":"'"$(cat "$state/flag")"'","hidden":false,"isRestore":false,'
                    n="$n"'"codingChallenge":true}]'
                    printf '\\036%s' "$n" >>"$state/sid-$sid"
                fi
            fi
            respond "200 OK" "text/html" ok
        elif [ -s "$state/sid-$sid" ]; then
            packets="$(cat "$state/sid-$sid")"
            : >"$state/sid-$sid"
            respond "200 OK" "text/plain; charset=UTF-8" "$packets"
        else
            sleep 1
            respond "200 OK" "text/plain; charset=UTF-8" 2
        fi ;;
    /) respond "200 OK" text/html '<title>OWASP Juice Shop</title>' ;;
    *) respond "404 Not Found" text/plain "Unexpected path: $path" ;;
esac
"""
JUICE_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY hmac.sh /hmac.sh
COPY serve /serve
COPY handle /handle
COPY ctf.key /ctf.key
EXPOSE 3000
ENTRYPOINT ["/bin/busybox", "sh", "/serve"]
"""
# The To-Do app's page on 8080; /www/none is a folder without a page (GET / answers 404).
TODO_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY www /www
EXPOSE 8080
ENTRYPOINT ["/bin/busybox"]
CMD ["httpd", "-f", "-p", "8080", "-h", "/www/app"]
"""
TODO_PAGE = b"<html><head><title>To-Do List</title></head><body><h1>My to-dos</h1></body></html>"


@dataclass
class Setup:
    """The running instancer of this file."""

    api: Any
    platform: Any
    secret: str
    shipped: dict[str, Any]


def build_solvers(label: dict[str, str]) -> dict[str, str]:
    """Run the shipped build script (run-tagged, labelled); return each solver's image."""
    args = [str(SOLVERS / "build.sh")]
    for k, v in label.items():
        args += ["--label", f"{k}={v}"]
    done = subprocess.run(args, env={**os.environ, "SOLVER_TAG": RUN_ID}, capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    images = {name: f"ctf-example/{name}-solver:{RUN_ID}" for name in ("juice-shop", "todo-app")}
    for image in images.values():
        assert f"built {image}" in done.stdout, done.stdout
    return images


def catalog(shipped: dict[str, Any], juice: str, todo: str,
            solvers: dict[str, str]) -> dict[str, Any]:
    """The shipped entries on the stand-ins, plus one with a wrong key and one that is down."""
    entries: dict[str, Any] = {}
    for cid, image in (("juice-shop", juice), ("todo-app", todo)):
        entry = json.loads(json.dumps(shipped[cid]))
        assert entry["solver"]["image"] == f"ctf-example/{cid}-solver:1"
        entry["image"] = image
        entry["solver"]["image"] = solvers[cid]
        entries[cid] = entry
    # The shop without the canary's key (flag_env names a variable it does not read): it
    # falls back to its ctf.key, so the flag it shows is not the canary's.
    entries["juice_wrongkey"] = {**entries["juice-shop"], "flag_env": "SHOP_KEY"}
    # The To-Do app up (its port answers, so the canary is ready) without its page.
    entries["todo_down"] = {**entries["todo-app"],
                            "command": ["httpd", "-f", "-p", "8080", "-h", "/www/none"]}
    # A host where the solver image was never built (and no registry has it).
    entries["todo_unbuilt"] = {**entries["todo-app"],
                               "solver": {**entries["todo-app"]["solver"], "image": ABSENT}}
    return {"challenges": entries}


@pytest.fixture(scope="module")
def setup(docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A worker with default settings and the firewall on, its API, the shipped solvers."""
    if os.geteuid() != 0 or not shutil.which("nft"):
        unavailable("the solvers' firewall needs root and nft")
    assert BUSYBOX.exists(), "/bin/busybox is missing: apt-get install busybox-static"
    workdir = tmp_path_factory.mktemp("shipped-solvers")
    solvers = build_solvers(TEST_LABEL)
    juice = build_image(docker_client, f"ctf-test/juice-standin:{RUN_ID}", JUICE_DOCKERFILE, {
        "busybox": BUSYBOX, "hmac.sh": HMAC_SH.encode(), "serve": SERVE_SH.encode(),
        "handle": HANDLE_SH.encode(), "ctf.key": FILE_KEY.encode()})
    todo = build_image(docker_client, f"ctf-test/todo-standin:{RUN_ID}", TODO_DOCKERFILE, {
        "busybox": BUSYBOX, "www/app/index.html": TODO_PAGE, "www/none/.keep": b""})
    shipped = yaml.safe_load((ROOT / "deploy" / "challenges.yaml").read_text())["challenges"]
    server = RedisServer(tmp_path_factory.mktemp("shipped-solvers-redis"))
    server.start()
    table = table_name(ipaddress.IPv4Network(POOL))
    try:
        path = workdir / "challenges.yaml"
        path.write_text(yaml.safe_dump(catalog(shipped, juice, todo, solvers)))
        env = {**base_env(server, path, workdir / "data"),
               "CTF_EXTRA_LABELS": json.dumps(LABEL),
               "CTF_TEAM_SUBNET_POOL": POOL}
        for name in ("CTF_EGRESS_FIREWALL", "CTF_JANITOR_INTERVAL", "CTF_ORPHAN_GRACE"):
            env.pop(name, None)  # what users get: the firewall on, default intervals
        with worker_and_api(env, path, workdir) as (_worker, platform, api):
            secret = load_settings(data_dir=Path(env["CTF_DATA_DIR"])).flag_secret_value()
            yield Setup(api, platform, secret, shipped)
    finally:
        cleanup_docker(docker_client, LABEL)
        subprocess.run(["nft", "delete", "table", "inet", table], check=False,
                       capture_output=True)
        server.stop()


def settled(setup: Setup, challenge: str, timeout: float = 240) -> dict[str, Any]:
    """The challenge's row of ``GET /api/v1/health/challenges`` once it has a verdict."""
    found: dict[str, Any] = {}

    def ready() -> bool:
        r = setup.api.get("/api/v1/health/challenges", headers=ADMIN)
        assert r.status_code == 200, r.text
        found.update({row["challenge"]: row for row in r.json()["challenges"]}[challenge])
        return found["state"] != "unknown"

    wait_for(ready, timeout, 0.5, f"a verdict on {challenge}")
    return found


def test_the_juice_shop_solver_proves_the_shop_ok(setup: Setup) -> None:
    """The shipped solver gets Score Board's flag from the shop; the canary's key made it."""
    row = settled(setup, "juice-shop")
    assert row["state"] == "ok", row
    # Masked: what it printed was the canary's in-app flag, HMAC-SHA1("Score Board", key).
    assert "Score Board flag: [flag]" in row["output"], row
    metrics = setup.api.get("/metrics", headers=ADMIN).text
    assert 'ctf_challenge_healthy{challenge="juice-shop"} 1.0' in metrics


def test_the_juice_shop_solver_reports_a_shop_with_a_wrong_key_broken(setup: Setup) -> None:
    """A shop whose flags come from another key than the canary's is broken, its flag shown."""
    row = settled(setup, "juice_wrongkey")
    assert row["state"] == "broken", row
    # It solved the challenge, but the flag is the file key's, not the canary's.
    assert f"Score Board flag: {in_app_flag(FILE_KEY, 'Score Board')}" in row["output"], row
    canary_key = team_flag(setup.secret, "juice_wrongkey", "canary")
    assert in_app_flag(canary_key, "Score Board") != in_app_flag(FILE_KEY, "Score Board")


def test_the_todo_solver_proves_the_app_ok(setup: Setup) -> None:
    """The shipped To-Do solver finds the app's page and prints the canary's flag."""
    row = settled(setup, "todo-app")
    assert row["state"] == "ok", row
    assert "the To-Do app answered GET / with its page" in row["output"], row
    assert "flag: [flag]" in row["output"], row


def test_the_todo_solver_reports_an_app_without_its_page_broken(setup: Setup) -> None:
    """An app whose page does not answer (404) is broken, and the solver says why."""
    row = settled(setup, "todo_down")
    assert row["state"] == "broken", row
    assert any("GET / answered '404'" in line for line in row["output"]), row
    assert not any("[flag]" in line for line in row["output"]), row


def test_a_solver_image_not_built_on_the_host_turns_broken_saying_so(setup: Setup) -> None:
    """A solver image neither present nor pullable is a broken verdict naming build.sh."""
    row = settled(setup, "todo_unbuilt")
    assert row["state"] == "broken", row
    (line,) = row["output"]
    assert f"the solver image {ABSENT} is not on this host" in line
    assert "examples/solvers/build.sh" in line


def test_teams_get_the_seed_challenges_as_before(
        setup: Setup, docker_client: docker.DockerClient) -> None:
    """A team's instance of each seed challenge has only its own key/flag, no solver's."""
    settled(setup, "juice-shop")
    for challenge, variable in (("juice-shop", "CTF_KEY"), ("todo-app", "FLAG")):
        result = setup.platform.send_task("celery_app.tasks.start_container",
                                          args=[challenge, "team1"]).get(timeout=240)
        assert result["status"] == "running", result
        (team,) = containers_of(docker_client, LABEL, **{"ctf.team": "team1",
                                                          "ctf.challenge": challenge})
        env = dict(e.split("=", 1) for e in team.attrs["Config"]["Env"])
        assert env[variable] == team_flag(setup.secret, challenge, "team1")
        assert env.keys() >= set(setup.shipped[challenge]["env"])
        assert not {"CTF_FLAG", "CTF_TARGET_URL"} & env.keys()
        (canary,) = [c for c in containers_of(docker_client, LABEL, **{
            "ctf.team": "canary", "ctf.challenge": challenge}) if c.status == "running"]
        assert canary.id != team.id
    # The team's shop shows its own Score Board flag, which the flag check takes.
    key = team_flag(setup.secret, "juice-shop", "team1")
    r = setup.api.post("/api/v1/teams/team1/flags/juice-shop", headers=ADMIN,
                       json={"flag": in_app_flag(key, "Score Board"), "name": "Score Board"})
    assert r.status_code == 200 and r.json()["correct"] is True, r.text
    for challenge in ("juice-shop", "todo-app"):
        setup.platform.send_task("celery_app.tasks.stop_container",
                                 args=[challenge, "team1"]).get(timeout=120)
