"""Several Docker hosts (SPEC §10) on a real second engine, through real workers.

Host ``alpha`` is the machine's engine. Host ``beta`` is a second ``dockerd`` in its own
network namespace, reached over a veth pair at 10.250.<n>.2 (its Docker API on
tcp://10.250.<n>.2:2375, only on that private link, like a remote engine; its published
ports on that address). One worker per host, each consuming ``celery,ctf.host.<name>``.
Everything is labelled ``ctf.test=<run id>-multihost`` and removed at the end, pass or fail, and the
second engine, its namespace and its data are removed too.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from api_helpers import ADMIN_TOKEN
from conftest import (
    RedisServer,
    Worker,
    base_env,
    cleanup_docker,
    close_platform_client,
    platform_client,
    private_label,
    wait_for,
)
from engines import SecondEngine, second_engine

from celery_app.api.client import Dispatcher
from celery_app.errors import CapacityExhausted
from celery_app.settings import Settings, load_settings

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

# Redis databases of this module: away from the session worker's (0-2) and the retry test's.
BROKER_DB, BACKEND_DB, STATE_DB = 9, 10, 11
# Host alpha shares the machine's engine with the session's test worker, whose janitor would
# take our containers for its orphans if they carried its exact scope: a label value and a
# subnet pool of our own keep the two apart (as two hosts never share an engine for real).
LABEL = private_label("multihost")
POOL = "10.217.0.0/16"
# The default a user gets: a dead worker's host is judged gone after this long.
HEARTBEAT_TTL = Settings.model_fields["heartbeat_ttl"].default
START = "celery_app.tasks.start_container"
STOP = "celery_app.tasks.stop_container"
EXTEND = "celery_app.tasks.extend_container"
STATUS = "celery_app.tasks.get_container_status"


@pytest.fixture(scope="module")
def beta_engine(images: dict[str, str]) -> Iterator[SecondEngine]:
    """The second Docker host, with the stand-in images loaded."""
    with second_engine(images, LABEL) as engine:
        yield engine


class HostWorker(Worker):
    """A real ``celery worker -B`` serving one Docker host, as run-celery-worker.sh --host."""

    def __init__(self, host: str, env: dict[str, str], workdir: Path) -> None:
        super().__init__({**env, "CTF_HOST": host, "CTF_DATA_DIR": str(workdir / f"data-{host}")},
                         workdir / f"worker-{host}.log")


@dataclass
class Cluster:
    """The dispatcher (as the API uses it), each host's worker, engine and public address."""

    disp: Dispatcher
    workers: dict[str, HostWorker]
    engines: dict[str, docker.DockerClient]
    public: dict[str, str]


@pytest.fixture(scope="module")
def cluster(
    beta_engine: SecondEngine, docker_client: docker.DockerClient, redis_server: RedisServer,
    catalog_file: Path, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("multihost")
    hosts_file = workdir / "hosts.yaml"
    hosts_file.write_text(
        "hosts:\n"
        "  alpha: {docker_url: 'unix:///var/run/docker.sock', public_host: 127.0.0.1,"
        " publish_ip: 127.0.0.1, max_instances: 4}\n"
        f"  beta: {{docker_url: '{beta_engine.tcp_url}', public_host: {beta_engine.address},"
        f" publish_ip: {beta_engine.address}, max_instances: 4}}\n"
    )
    for db in (BROKER_DB, BACKEND_DB, STATE_DB):
        redis.Redis.from_url(f"{redis_server.url}/{db}").flushdb()
    env = {
        **base_env(redis_server, catalog_file, workdir / "data"),
        "CELERY_BROKER_URL": f"{redis_server.url}/{BROKER_DB}",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/{BACKEND_DB}",
        "CTF_REDIS_URL": f"{redis_server.url}/{STATE_DB}",
        "CTF_HOSTS_FILE": str(hosts_file),
        "CTF_MAX_INSTANCES_PER_TEAM": "5",
        "CTF_EXTRA_LABELS": json.dumps(LABEL),
        "CTF_TEAM_SUBNET_POOL": POOL,
    }
    workers = {h: HostWorker(h, env, workdir) for h in ("alpha", "beta")}
    settings = load_settings(
        broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
        redis_url=env["CTF_REDIS_URL"], challenges_file=catalog_file, hosts_file=hosts_file,
        data_dir=workdir / "api", admin_token=ADMIN_TOKEN,
    )
    disp = Dispatcher(settings)
    try:
        for w in workers.values():
            w.start()
        wait_for(lambda: all(h.alive for h in disp.host_loads()), 30,
                 message="both hosts' heartbeats")
        yield Cluster(disp, workers, {"alpha": docker_client, "beta": beta_engine.client},
                      {"alpha": "127.0.0.1", "beta": beta_engine.address})
    finally:
        for w in workers.values():
            w.stop()
        disp.close()
        cleanup_docker(docker_client, LABEL)  # beta's engine cleans itself when it stops


def _start(c: Cluster, challenge: str, team: str) -> dict[str, Any]:
    task_id, _ = c.disp.start(c.disp.key(challenge, team))
    view = c.disp.wait(task_id, 90)
    assert view.ready and view.error is None, (view.state, view.error)
    return dict(view.result)


def _run_task(c: Cluster, task: str, challenge: str, team: str) -> Any:
    record = c.disp.instance(c.disp.key(challenge, team))
    task_id = c.disp.send(task, [challenge, team], None, c.disp.queue_for(record))
    view = c.disp.wait(task_id, 60)
    assert view.ready and view.error is None, (view.state, view.error)
    return view.result


def _names(engine: docker.DockerClient) -> set[str]:
    filters = {"label": [f"{k}={v}" for k, v in LABEL.items()]}
    # ignore_removed: a container the janitor removes between the list and its inspect
    return {ct.name for ct in engine.containers.list(all=True, filters=filters,
                                                     ignore_removed=True)}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:  # our own addresses only
        return str(answer.read().decode())


def _listing(c: Cluster) -> dict[str, dict[str, Any]]:
    return {f"{i['challenge']}/{i['team_id']}": i for i in c.disp.present(c.disp.store.list())}


def _everywhere(c: Cluster) -> dict[str, list[str]]:
    """Every container of ours on both engines: name -> the hosts it exists on."""
    found: dict[str, list[str]] = {}
    for host, engine in c.engines.items():
        for name in _names(engine):
            found.setdefault(name, []).append(host)
    return found


def _counts_match_engines(c: Cluster) -> bool:
    """Each host's capacity count equals the containers that exist on its engine."""
    return all(c.disp.store.count(host=h) == len(_names(e)) for h, e in c.engines.items())


def test_tasks_by_name_act_on_the_instance_host_whichever_worker_takes_them(
    cluster: Cluster,
) -> None:
    """Starts, stops, extends and status sent by name to the default queue stay per-host."""
    # A plain Celery client (as the seed's web app) sends every task to the default queue,
    # which both hosts' workers consume: repeated starts return the same container, one per
    # instance across both engines; extend and status answer from the instance's host; a
    # stop says "stopped" only once the container is gone from its own engine.
    c = cluster
    app = platform_client(c.disp.settings.broker_url, c.disp.settings.result_backend)
    teams = [f"byname{n}" for n in range(8)]
    try:
        first = [app.send_task(START, args=["web", t]) for t in teams]
        made = {r["team_id"]: r for r in (res.get(timeout=120) for res in first)}
        assert sorted(i["host"] for i in made.values()) == ["alpha"] * 4 + ["beta"] * 4
        again = [app.send_task(START, args=["web", t]) for t in teams for _ in range(2)]
        for res in again:
            inst = res.get(timeout=120)
            assert inst["container_id"] == made[inst["team_id"]]["container_id"]
            assert inst["host"] == made[inst["team_id"]]["host"]
        everywhere = _everywhere(c)
        for t in teams:  # exactly one container per instance, on the host it was placed on
            assert everywhere[f"ctf-web-{t}"] == [made[t]["host"]]
        assert _counts_match_engines(c)
        # Whichever worker took them, some requests had to change hands to be right.
        handed = c.workers["alpha"].log().count("handed to host=beta") \
            + c.workers["beta"].log().count("handed to host=alpha")
        assert handed > 0
        for t in teams:
            inst = made[t]
            extended = app.send_task(EXTEND, args=["web", t]).get(timeout=60)
            assert extended["host"] == inst["host"]
            assert extended["expires_at"] > inst["expires_at"]
            assert c.disp.store.get("web", t).expires_at == extended["expires_at"]
            status = app.send_task(STATUS, kwargs={"team_id": t, "challenge": "web"}
                                   ).get(timeout=60)
            assert [(i["container_id"], i["status"]) for i in status["instances"]] == [
                (inst["container_id"], "running")]
        for t in teams:
            stopped = app.send_task(STOP, args=["web", t]).get(timeout=60)
            assert stopped == {"team_id": t, "challenge": "web", "status": "stopped"}
            # "stopped" means gone from the engine it ran on, not just from the index.
            assert f"ctf-web-{t}" not in _everywhere(c)
            assert c.disp.store.get("web", t) is None
        assert _counts_match_engines(c)
    finally:
        for t in teams:  # nothing of this test is left for the next one, even on failure
            with contextlib.suppress(Exception):
                app.send_task(STOP, args=["web", t]).get(timeout=60)
        first = again = []  # collected (and unsubscribed) before the client closes
        close_platform_client(app)


def test_instances_spread_over_both_hosts_and_answer_on_their_address(cluster: Cluster) -> None:
    """Four starts land two per host; each answers on its host's public address."""
    c = cluster
    made = [_start(c, "web", f"spread{n}") for n in range(4)]
    assert sorted(i["host"] for i in made) == ["alpha", "alpha", "beta", "beta"]
    for inst in made:
        host = inst["host"]
        port = inst["ports"]["8080/tcp"]
        assert inst["url"] == f"http://{c.public[host]}:{port}"
        assert _get(inst["url"]) == "hello from ctf\n"
        other = "beta" if host == "alpha" else "alpha"
        assert inst["container_name"] in _names(c.engines[host])
        assert inst["container_name"] not in _names(c.engines[other])
    loads = {h.name: h for h in c.disp.host_loads()}
    assert (loads["alpha"].used, loads["beta"].used) == (2, 2)


def test_extend_and_stop_reach_the_right_engine(cluster: Cluster) -> None:
    """Extend and stop of a beta instance run on beta's worker and remove it from beta."""
    c = cluster
    on_beta = next(i for i in c.disp.store.list() if i.host == "beta")
    on_alpha = next(i for i in c.disp.store.list() if i.host == "alpha")
    extended = _run_task(c, "extend_container", on_beta.challenge, on_beta.team_id)
    assert extended["host"] == "beta"
    assert extended["expires_at"] > on_beta.expires_at
    assert f"task=extend_container team={on_beta.team_id}" in c.workers["beta"].log()
    assert f"task=extend_container team={on_beta.team_id}" not in c.workers["alpha"].log()
    stopped = _run_task(c, "stop_container", on_beta.challenge, on_beta.team_id)
    assert stopped["status"] == "stopped"
    assert on_beta.container_name not in _names(c.engines["beta"])
    assert on_alpha.container_name in _names(c.engines["alpha"])
    assert c.disp.store.get(on_beta.challenge, on_beta.team_id) is None
    _run_task(c, "stop_container", on_alpha.challenge, on_alpha.team_id)
    assert on_alpha.container_name not in _names(c.engines["alpha"])


def test_each_hosts_janitor_reaps_its_own_engine(cluster: Cluster) -> None:
    """Short-lived instances on both hosts are removed from their own engine when they expire."""
    c = cluster
    short = [_start(c, "short", f"reap{n}") for n in range(2)]
    assert {i["host"] for i in short} == {"alpha", "beta"}
    for inst in short:
        wait_for(lambda i=inst: i["container_name"] not in _names(c.engines[i["host"]]),
                 30, 0.2, f"{inst['container_name']} reaped on {inst['host']}")
        assert c.disp.store.get("short", inst["team_id"]) is None
    for host in ("alpha", "beta"):  # each reaped by its own worker's janitor
        wait_for(lambda h=host: f"janitor host={h} {{'expired': ['short/" in c.workers[h].log(),
                 10, 0.1, f"{host}'s janitor log line")


def test_a_host_without_worker_is_skipped_and_comes_back(cluster: Cluster) -> None:
    """Kill beta's worker: its instances are not shown running and starts go to alpha."""
    # When the worker returns, the same instances are back as they were.
    c = cluster
    beta_before = {k: v for k, v in _listing(c).items() if v["host"] == "beta"}
    assert beta_before and all(v["status"] == "running" for v in beta_before.values())
    c.workers["beta"].kill()
    wait_for(lambda: not {h.name: h for h in c.disp.host_loads()}["beta"].alive,
             HEARTBEAT_TTL + 10, 0.1, "beta's heartbeat to expire")
    shown = _listing(c)
    for key in beta_before:
        assert shown[key]["status"] == "failed"
        assert shown[key]["host_up"] is False
        assert "unreachable" in shown[key]["error"]
    assert all("host_up" not in v for v in shown.values() if v["host"] == "alpha")
    # New starts all land on alpha, even though beta has more room.
    moved = [_start(c, "web", f"failover{n}") for n in range(2)]
    assert {i["host"] for i in moved} == {"alpha"}
    for inst in moved:
        assert _get(inst["url"]) == "hello from ctf\n"
    # Alpha is now full (4/4): with beta gone there is no room anywhere.
    _start(c, "web", "failover2")
    with pytest.raises(CapacityExhausted, match="no Docker host with a live worker has room"):
        c.disp.start(c.disp.key("web", "failover3"))
    # The worker comes back: the same containers, running again, still reachable.
    c.workers["beta"].start()
    wait_for(lambda: {h.name: h for h in c.disp.host_loads()}["beta"].alive, 30, 0.1,
             "beta's heartbeat")
    back = _listing(c)
    for key, before in beta_before.items():
        assert back[key]["status"] == "running"
        assert "host_up" not in back[key]
        assert back[key]["container_id"] == before["container_id"]
        assert _get(back[key]["url"]) == "hello from ctf\n"
    # ...and new starts may go there again.
    assert _start(c, "web", "failover3")["host"] == "beta"


def test_capacity_route_and_cli_show_every_host(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/api/v1/capacity and ``ctfctl hosts`` show each host's used/max and liveness."""
    from fastapi.testclient import TestClient  # noqa: PLC0415
    from typer.testing import CliRunner  # noqa: PLC0415

    from celery_app.api.app import create_app  # noqa: PLC0415
    from celery_app.cli import app as cli  # noqa: PLC0415

    c = cluster
    with TestClient(create_app(c.disp.settings)) as api:
        body = api.get("/api/v1/capacity",
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    hosts = {h["host"]: h for h in body["hosts"]}
    assert set(hosts) == {"alpha", "beta"}
    assert all(h["alive"] and h["max"] == 4 for h in hosts.values())
    assert sum(h["used"] for h in hosts.values()) == body["used"] == c.disp.store.count()
    settings = c.disp.settings
    for key, value in {
        "CELERY_BROKER_URL": settings.broker_url, "CELERY_RESULT_BACKEND":
        settings.result_backend, "CTF_REDIS_URL": str(settings.redis_url),
        "CTF_HOSTS_FILE": str(settings.hosts_file), "CTF_CHALLENGES_FILE":
        str(settings.challenges_file), "CTF_DATA_DIR": str(settings.data_dir),
        "CTF_ADMIN_TOKEN": ADMIN_TOKEN,
    }.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, ["hosts", "--json"])
    assert result.exit_code == 0, result.output
    listed = {h["name"]: h for h in json.loads(result.stdout)["hosts"]}
    assert {n: (h["used"], h["alive"]) for n, h in listed.items()} == {
        n: (h["used"], h["alive"]) for n, h in hosts.items()}
    status = CliRunner().invoke(cli, ["status", "--json"])
    assert status.exit_code == 0, status.output
    assert {i["host"] for i in json.loads(status.stdout)["instances"]} == {"alpha", "beta"}
