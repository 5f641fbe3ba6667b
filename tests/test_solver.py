"""Solver health checks on the real engine (SPEC §14, issue 26).

A real worker with default settings (the egress firewall on, solvers every 300 s: the first
run comes at once when a canary is ready) on a Redis of its own, the API on the same Redis,
and stand-in images FROM scratch with /bin/busybox: the challenge serves a page holding its
flag; the solvers fetch it with ``busybox nc`` (``busybox wget`` crashes in scratch images).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    base_env,
    build_image,
    cleanup_docker,
    containers_of,
    private_label,
    worker_and_api,
)
from test_egress import listener, netns_host

from celery_app.engine.firewall import table_name
from ctf_testkit.support import RedisServer, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.redis]

LABEL = private_label("solver")
POOL = "10.205.0.0/16"  # this file's team-subnet pool (and its own firewall table)
INTERNET = ("ctfsolvnet", "203.0.113.53", "203.0.113.54")  # a stand-in internet host

SOLVER_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
ENTRYPOINT ["/bin/busybox", "sh", "-c"]
"""
# The challenge: a page holding the instance's flag, served on 8080 (read-only root: /tmp).
SERVE = ("/bin/busybox mkdir -p /tmp/www && echo \"the flag is $CTF_FLAG\" > /tmp/www/index.html"
         " && exec /bin/busybox httpd -f -p 8080 -h /tmp/www")
FETCH = ("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 5 "
         "\"$CTF_TARGET_HOST\" \"$CTF_TARGET_PORT\"")
GOOD = f"echo \"solving $CTF_TARGET_URL\" && {FETCH}"
BLIND = "echo 'no flag here'"
HANG = "echo 'solving forever' && exec /bin/busybox sleep 3600"
MARK = "solver-probe-marker"


def probe(address: str, port: int, what: str) -> str:
    """Shell that prints ``<what>-reached`` or ``<what>-blocked`` for a TCP connection."""
    return (f"if /bin/busybox nc -w 3 {address} {port} </dev/null | /bin/busybox grep -q "
            f"{MARK}; then echo {what}-reached; else echo {what}-blocked; fi")


@dataclass
class Setup:
    """The running instancer of this file."""

    api: Any
    platform: Any
    host_port: int
    env: dict[str, str]


def own_image(docker_client: docker.DockerClient, images: dict[str, str], version: int) -> str:
    """The ``updated`` challenge's image: the stand-in under a tag of its own, ``version`` in it.

    Built again with another version, the tag names another image, as after a pull.
    """
    return build_image(docker_client, f"ctf-test/solver-app:{RUN_ID}",
                       f"FROM {images['http']}\nLABEL ctf-test.version={version}\n", {})


def catalog(image: str, solver: str, host_port: int, internet_port: int,
            updated: str) -> dict[str, Any]:
    """Five challenges: solvers that succeed, miss, hang and probe egress, and ``updated``.

    ``updated`` is the good one on an image of its own.
    """
    gateway = "$(/bin/busybox ip route | /bin/busybox awk '/default/ {print $3}')"
    probing = " ; ".join([probe(gateway, host_port, "host"),
                          probe(INTERNET[2], internet_port, "internet"), FETCH])

    def entry(script: str, **more: Any) -> dict[str, Any]:
        return {"image": image, "port": 8080, "flag_env": "CTF_FLAG",
                "command": ["sh", "-c", SERVE],
                "solver": {"image": solver, "command": [script], **more}}

    return {"challenges": {
        "good": entry(GOOD),
        "updated": {**entry(GOOD), "image": updated},
        "blind": entry(BLIND),
        "hang": entry(HANG, timeout=5),
        "probe": entry(probing),
    }}


@pytest.fixture(scope="module")
def setup(images: dict[str, str], docker_client: docker.DockerClient,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A worker with default settings and the firewall on, its API, a host and an internet."""
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("nsenter"):
        unavailable("the solvers' egress test needs root, nft and nsenter")
    workdir = tmp_path_factory.mktemp("solver")
    solver = build_image(docker_client, f"ctf-test/solver:{RUN_ID}", SOLVER_DOCKERFILE,
                         {"busybox": BUSYBOX})
    server = RedisServer(tmp_path_factory.mktemp("solver-redis"))
    server.start()
    table = table_name(ipaddress.IPv4Network(POOL))
    try:
        with listener(MARK) as host_port, \
                netns_host(*INTERNET) as _internet, \
                listener(MARK, netns=INTERNET[0]) as internet_port:
            path = workdir / "challenges.yaml"
            path.write_text(yaml.safe_dump(catalog(images["http"], solver, host_port,
                                                   internet_port,
                                                   own_image(docker_client, images, 1))))
            env = {**base_env(server, path, workdir / "data"),
                   "CTF_EXTRA_LABELS": json.dumps(LABEL),
                   "CTF_TEAM_SUBNET_POOL": POOL}
            for name in ("CTF_EGRESS_FIREWALL", "CTF_JANITOR_INTERVAL", "CTF_ORPHAN_GRACE"):
                env.pop(name, None)  # what users get: the firewall on, default intervals
            with worker_and_api(env, path, workdir) as (_worker, platform, api):
                yield Setup(api, platform, host_port, env)
    finally:
        cleanup_docker(docker_client, LABEL)
        subprocess.run(["nft", "delete", "table", "inet", table], check=False,
                       capture_output=True)
        server.stop()


def health(setup: Setup) -> dict[str, dict[str, Any]]:
    """``GET /api/v1/health/challenges`` by challenge."""
    r = setup.api.get("/api/v1/health/challenges", headers=ADMIN)
    assert r.status_code == 200, r.text
    return {row["challenge"]: row for row in r.json()["challenges"]}


def settled(setup: Setup, challenge: str, after: str = "", timeout: float = 180) -> dict[str, Any]:
    """The challenge's row once it has a verdict from a run after ``after`` (ISO time)."""
    found: dict[str, Any] = {}

    def ready() -> bool:
        found.update(health(setup)[challenge])
        return found["state"] != "unknown" and (found["last_run"] or "") > after

    wait_for(ready, timeout, 0.5, f"a verdict on {challenge}")
    return found


def test_a_good_challenge_turns_ok(setup: Setup) -> None:
    """A solver that prints the canary's flag and exits 0 makes its challenge ok."""
    row = settled(setup, "good")
    assert row["state"] == "ok", row
    assert any(line.startswith("solving http://") and ":8080/" in line for line in row["output"])
    assert any("the flag is [flag]" in line for line in row["output"]), row
    metrics = setup.api.get("/metrics", headers=ADMIN).text
    assert 'ctf_challenge_healthy{challenge="good"} 1.0' in metrics
    assert 'ctf_challenge_solver_seconds_count{challenge="good"}' in metrics


def test_a_solver_without_the_flag_turns_broken_with_its_output(setup: Setup) -> None:
    """A solver that exits 0 without printing the flag fails; its output is kept."""
    row = settled(setup, "blind")
    assert row["state"] == "broken"
    assert row["output"] == ["no flag here"]
    metrics = setup.api.get("/metrics", headers=ADMIN).text
    assert 'ctf_challenge_healthy{challenge="blind"} 0.0' in metrics
    done = subprocess.run([sys.executable, "-m", "celery_app.cli", "challenges", "--json"],
                          env={**os.environ, **setup.env}, cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    shown = {c["id"]: c.get("health") for c in json.loads(done.stdout)["challenges"]}
    assert shown["blind"] == "broken"


def test_a_hanging_solver_is_cut_at_its_timeout(setup: Setup,
                                                docker_client: docker.DockerClient) -> None:
    """A solver still running at its timeout is killed, removed, and fails the challenge."""
    row = settled(setup, "hang")
    assert row["state"] == "broken"
    assert row["output"] == ["solving forever"]
    wait_for(lambda: not containers_of(docker_client, LABEL, **{"ctf.role": "solver",
                                                                  "ctf.challenge": "hang"}),
             30, 0.5, "the hung solver's container to be removed")


def test_a_killed_canary_is_made_again_and_proven_again(
        setup: Setup, docker_client: docker.DockerClient) -> None:
    """Killing the canary makes a new one at once, and the solver proves it again."""
    before = settled(setup, "good")
    (canary,) = containers_of(docker_client, LABEL, **{"ctf.team": "canary",
                                                        "ctf.challenge": "good"})
    time.sleep(1.1)  # last_run has whole seconds: the next run's must be a later one
    canary.kill()
    row = settled(setup, "good", after=before["last_run"], timeout=240)
    assert row["state"] == "ok", row
    (again,) = [c for c in containers_of(docker_client, LABEL, **{"ctf.team": "canary",
                                                                   "ctf.challenge": "good"})
                if c.status == "running"]
    assert again.id != canary.id


def test_a_pool_drain_makes_the_canary_again_and_proves_it_at_once(
        setup: Setup, docker_client: docker.DockerClient) -> None:
    """After a drain (an image update) the canary is made again and proven within a pass."""
    before = settled(setup, "good")
    (canary,) = [c for c in containers_of(docker_client, LABEL, **{"ctf.team": "canary",
                                                                    "ctf.challenge": "good"})
                 if c.status == "running"]
    time.sleep(1.1)  # last_run has whole seconds: the next run's must be a later one
    r = setup.api.post("/api/v1/pools/good/drain", headers=ADMIN)
    assert r.status_code == 200, r.text
    row = settled(setup, "good", after=before["last_run"], timeout=240)
    assert row["state"] == "ok", row
    running = [c.id for c in containers_of(docker_client, LABEL, **{"ctf.team": "canary",
                                                                     "ctf.challenge": "good"})
               if c.status == "running"]
    assert running and canary.id not in running


def test_a_new_image_under_the_tag_makes_the_canary_again_and_proves_it_at_once(
        setup: Setup, docker_client: docker.DockerClient, images: dict[str, str]) -> None:
    """A pull or rebuild of the challenge's image makes a canary of the new image, proven."""
    before = settled(setup, "updated")
    (canary,) = [c for c in containers_of(docker_client, LABEL, **{"ctf.team": "canary",
                                                                    "ctf.challenge": "updated"})
                 if c.status == "running"]
    time.sleep(1.1)  # last_run has whole seconds: the next run's must be a later one
    image = docker_client.images.get(own_image(docker_client, images, 2)).id
    assert canary.image.id != image
    # Long before the solver's interval (300 s by default): at the next canary pass.
    row = settled(setup, "updated", after=before["last_run"], timeout=60)
    assert row["state"] == "ok", row
    running = [c for c in containers_of(docker_client, LABEL, **{"ctf.team": "canary",
                                                                  "ctf.challenge": "updated"})
               if c.status == "running"]
    assert [c.image.id for c in running] == [image]


def test_the_solver_reaches_the_canary_and_nothing_else(setup: Setup) -> None:
    """With the firewall on the solver reaches its canary but not the host or the internet."""
    row = settled(setup, "probe")
    assert "host-blocked" in row["output"], row
    assert "internet-blocked" in row["output"], row
    assert row["state"] == "ok", row  # and the canary itself answered


def test_canary_is_refused_as_a_team_id(setup: Setup) -> None:
    """The API, the tasks and token issuance refuse the team id canary."""
    for method, path in (("PUT", "/api/v1/teams/canary/instances/good"),
                         ("GET", "/api/v1/teams/canary/instances"),
                         ("GET", "/api/v1/teams/canary/token")):
        r = setup.api.request(method, path, headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (422, "invalid_team_id"), (path, r.text)
    result = setup.platform.send_task("celery_app.tasks.start_container",
                                      args=["good", "canary"])
    with pytest.raises(Exception, match="reserved") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidTeamId"
