"""Fault injection (issue 7): a killed worker, a Redis that loses everything, racing requests.

Each test runs its own worker (and, where it breaks Redis, its own Redis), bounded in time and
count, and the fixtures remove everything it made, pass or fail.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from api_helpers import ADMIN, ADMIN_TOKEN
from celery import Celery
from conftest import (
    TEST_LABEL,
    RedisServer,
    Worker,
    base_env,
    cleanup_docker,
    close_platform_client,
    containers_of,
    default_setting,
    platform_client,
    private_label,
    wait_for,
)
from engines import second_engine
from fastapi.testclient import TestClient

from celery_app.api.app import create_app
from celery_app.api.client import Dispatcher
from celery_app.errors import InstanceNotFound, Superseded
from celery_app.settings import load_settings
from celery_app.worker.context import Context

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

# Workers on a Redis of their own label what they make with this, so the session worker's
# janitor (which sweeps TEST_LABEL objects its Redis does not know) leaves them alone.
FAULT_LABEL = private_label("faults")
ROOT = Path(__file__).resolve().parents[1]


# SPEC §10: a killed worker's requests are done within a minute of a worker for its host
# being back, with default settings.
PROMISED_DELAY = 60.0


def _results_within(results: list[Any], seconds: float) -> list[dict[str, Any]]:
    """Collect every result, failing if the last one is not in within ``seconds``."""
    deadline = time.monotonic() + seconds
    done = []
    for r in results:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"not every request was done within {seconds:.0f} s"
        done.append(r.get(timeout=remaining))
    return done


def _containers(docker_client: Any, **labels: str) -> list[Any]:
    return containers_of(docker_client, FAULT_LABEL, **labels)


def _answers_at(address: str, port: int) -> bool:
    try:
        return b"hello from ctf" in urllib.request.urlopen(
            f"http://{address}:{port}/", timeout=3).read()
    except OSError:
        return False


@pytest.fixture
def own_worker(
    redis_server: RedisServer, catalog_file: Path, tmp_path: Path, docker_client: Any
) -> Iterator[Callable[..., tuple[Worker, Celery, dict[str, str]]]]:
    """Build a worker on Redis databases of its own (so it can be killed without harm)."""
    made: list[tuple[Worker, Celery]] = []
    db = random.choice(range(6, 14, 3))  # spread over a few free db triples

    def make(**env_overrides: str) -> tuple[Worker, Celery, dict[str, str]]:
        env = {
            **base_env(redis_server, catalog_file, tmp_path / "data"),
            "CELERY_BROKER_URL": f"{redis_server.url}/{db}",
            "CELERY_RESULT_BACKEND": f"{redis_server.url}/{db + 1}",
            "CTF_REDIS_URL": f"{redis_server.url}/{db + 2}",
            "CTF_EXTRA_LABELS": json.dumps(FAULT_LABEL),
            **env_overrides,
        }
        for n in (db, db + 1, db + 2):
            redis.Redis.from_url(f"{redis_server.url}/{n}").flushdb()
        w = Worker(env, tmp_path / f"worker-{len(made)}.log")
        client = platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
        made.append((w, client))
        return w, client, env

    yield make
    for w, client in made:
        w.stop()
        close_platform_client(client)
    cleanup_docker(docker_client, FAULT_LABEL)  # the next test starts from nothing


def test_worker_killed_mid_burst_leaves_exactly_one_instance_each(
    own_worker: Callable[..., tuple[Worker, Celery, dict[str, str]]], docker_client: Any
) -> None:
    """Kill -9 during 30 starts by name, restart: all done within 60 s, each exactly once."""
    # Default timeouts: the killed worker's messages come back because nobody keeps them
    # fresh any more (celery_app.worker.inflight), not because a test shortened the
    # broker's timeout.
    # The janitor's pace and orphan grace a user gets (the suite's are 1 s and 2 s): the
    # promise must not lean on a janitor that sweeps half-made containers within seconds.
    worker, client, env = own_worker(CTF_MAX_INSTANCES="100",
                                     CTF_JANITOR_INTERVAL=default_setting("janitor_interval"),
                                     CTF_ORPHAN_GRACE=default_setting("orphan_grace"))
    worker.start()
    teams = [f"k{uuid.uuid4().hex[:5]}{i}" for i in range(30)]
    results = [client.send_task("celery_app.tasks.start_container", args=["web", t])
               for t in teams]
    # Kill it while the burst is under way: some started, some half-made, some not begun.
    wait_for(lambda: len(_containers(docker_client)) >= 5, 60, 0.02, "the burst to begin")
    worker.kill()
    assert len(_containers(docker_client)) < 30, "the burst finished before the kill"
    worker.start()
    done = _results_within(results, PROMISED_DELAY)
    assert all(d["status"] == "running" for d in done)

    containers = _containers(docker_client)
    assert sorted(c.labels["ctf.team"] for c in containers) == sorted(teams)
    assert all(c.status == "running" for c in containers)
    by_team = {d["team_id"]: d for d in done}
    assert all(_answers_at("127.0.0.1", int(by_team[t]["url"].rsplit(":", 1)[1]))
               for t in teams)
    ports = [d["ports"]["8080/tcp"] for d in done]
    assert len(set(ports)) == 30
    state = redis.Redis.from_url(env["CTF_REDIS_URL"], decode_responses=True)
    records = [json.loads(state.get(f"ctf:inst:web/{t}") or "{}") for t in teams]
    assert [r.get("container_id") for r in records] == [by_team[t]["container_id"] for t in teams]
    wait_for(lambda: not list(state.scan_iter("ctf:lock:*")), 40, 0.2, "every lock to be gone")
    nets = docker_client.networks.list(filters={"label": [f"ctf.test={FAULT_LABEL['ctf.test']}"]})
    assert sorted(n.name for n in nets) == sorted(f"ctf-team-{t}" for t in teams)


# A stand-in for a worker killed -9 in the instant after it took a message (its reply unread,
# the task not begun): our channel's take step alone, then death.
TAKE_AND_DIE = """
import os, sys
from kombu import Connection
from celery_app.worker.broker import transport_for
url = sys.argv[1]
conn = Connection(url, transport=transport_for(url))
queue, item = conn.default_channel.take(["celery"])
print(item, flush=True)
os._exit(9)
"""


def test_a_message_taken_by_a_worker_killed_before_it_began_is_done_within_60_s(
    own_worker: Callable[..., tuple[Worker, Celery, dict[str, str]]], docker_client: Any
) -> None:
    """A start by name taken by a process killed -9 before running it is done once within 60 s."""
    # The defaults a user gets (the suite's own janitor is faster): read, not spelled.
    worker, client, env = own_worker(CTF_JANITOR_INTERVAL=default_setting("janitor_interval"),
                                     CTF_ORPHAN_GRACE=default_setting("orphan_grace"))
    team = f"w{uuid.uuid4().hex[:6]}"
    result = client.send_task("celery_app.tasks.start_container", args=["web", team])
    died = subprocess.run([sys.executable, "-c", TAKE_AND_DIE, env["CELERY_BROKER_URL"]],
                          cwd=ROOT, capture_output=True, timeout=60, check=False)
    assert died.returncode == 9, died.stderr.decode()
    tag = json.loads(died.stdout)["properties"]["delivery_tag"]
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    # The window kombu's BRPOP left open: off the queue, not yet known to any worker. Ours
    # recorded it as unacknowledged in the same step.
    assert broker.llen("celery") == 0
    assert broker.hexists("unacked", tag)
    worker.start()
    back = time.monotonic()
    done = result.get(timeout=PROMISED_DELAY)
    assert time.monotonic() - back < PROMISED_DELAY
    assert done["status"] == "running"
    assert [c.labels["ctf.team"] for c in _containers(docker_client)] == [team]
    wait_for(lambda: not broker.hexists("unacked", tag), 10, 0.1, "the message to be acked")
    broker.close()


def test_redis_losing_everything_mid_run(
    images: dict[str, str], tmp_path: Path, docker_client: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Redis restarts empty: 503 meanwhile, then state comes back and the janitor still reaps."""
    cleanup_docker(docker_client, FAULT_LABEL)
    server = RedisServer(tmp_path_factory.mktemp("redis-fault"))
    server.start()
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        f"challenges:\n  web:\n    image: {images['http']}\n    port: 8080\n    ttl: 600\n"
        f"  brief:\n    image: {images['http']}\n    port: 8080\n    ttl: 25\n"
    )
    env = {**base_env(server, catalog, tmp_path / "data"),
           "CTF_EXTRA_LABELS": json.dumps(FAULT_LABEL)}
    worker = Worker(env, tmp_path / "worker.log")
    settings = load_settings(
        broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
        redis_url=env["CTF_REDIS_URL"], challenges_file=catalog, data_dir=tmp_path / "data",
        extra_labels=FAULT_LABEL, admin_token=ADMIN_TOKEN,
    )
    try:
        worker.start()
        with TestClient(create_app(settings)) as api:
            base = "/api/v1/teams/rteam/instances"
            for ch in ("web", "brief"):
                r = api.put(f"{base}/{ch}?wait=60", headers=ADMIN)
                assert r.status_code == 200, r.text
            before = {i["challenge"]: i for i in api.get(base, headers=ADMIN).json()["instances"]}

            server.stop()
            assert api.get("/healthz").status_code == 503
            down = api.get(base, headers=ADMIN)
            assert down.status_code == 503
            assert down.json()["error"] == "backend_unavailable"

            server.start()  # same port, no data at all

            def restored() -> dict[str, Any] | None:
                r = api.get(base, headers=ADMIN)
                if r.status_code != 200:
                    return None
                found = {i["challenge"]: i for i in r.json()["instances"]}
                return found if set(found) == {"web", "brief"} else None

            after = wait_for(restored, 60, 0.2, "reconcile to restore the instances")
            for ch in ("web", "brief"):
                assert after[ch]["container_id"] == before[ch]["container_id"]
                assert after[ch]["expires_at"] == before[ch]["expires_at"]
                assert after[ch]["status"] == "running"
            assert wait_for(lambda: api.get("/healthz").status_code == 200, 30, 0.2,
                            "health to come back")
            # The janitor still works: the 25 s instance is reaped, the other stays.
            wait_for(lambda: not _containers(docker_client, **{"ctf.challenge": "brief",
                                                              "ctf.team": "rteam"}),
                     60, 0.5, "the janitor to reap the short instance")
            assert _containers(docker_client, **{"ctf.challenge": "web", "ctf.team": "rteam"})
    finally:
        worker.stop()
        server.stop()
        cleanup_docker(docker_client, FAULT_LABEL)


def test_interleaved_starts_and_stops_end_as_the_last_request(
    worker: Worker, worker_env: dict[str, str], clean_worker_state: None, docker_client: Any,
) -> None:
    """50 concurrent starts and stops of one instance: the end state is the last request's."""
    settings = load_settings(
        broker_url=worker_env["CELERY_BROKER_URL"],
        result_backend=worker_env["CELERY_RESULT_BACKEND"],
        redis_url=worker_env["CTF_REDIS_URL"], challenges_file=worker_env["CTF_CHALLENGES_FILE"],
        data_dir=Path(worker_env["CTF_DATA_DIR"]), extra_labels=TEST_LABEL,
        admin_token=ADMIN_TOKEN,
        # the Dispatcher counts the rate limit now: the worker's limit, as the API tests have
        rate_limit_count=int(worker_env["CTF_RATE_LIMIT_COUNT"]),
    )
    disp = Dispatcher(settings)
    team = f"flip{uuid.uuid4().hex[:5]}"
    try:
        disp.wait(disp.start(disp.key("web", team))[0], 60)

        def request(i: int) -> str | None:
            try:
                task_id, _ = (disp.start if i % 2 else disp.stop)(disp.key("web", team))
            except InstanceNotFound:
                return None  # a stop when nothing runs is refused at once: no request made
            return task_id

        with ThreadPoolExecutor(10) as pool:
            task_ids = [t for t in pool.map(request, range(50)) if t]
        views = [disp.wait(t, 120) for t in task_ids]
        assert all(v.ready for v in views)
        for v in views:  # each did its part, was superseded, or found nothing left to stop
            assert v.state == "SUCCESS" or (
                v.error is not None and v.error.code in ("superseded", "instance_not_found")
            ), v.public()
        latest = disp.store.redis.get(f"ctf:intent:web/{team}")
        assert latest is not None
        last_op = str(latest).split(":")[1]
        running = containers_of(docker_client, **{"ctf.team": team})
        record = disp.store.get("web", team)
        if last_op == "start":
            assert len(running) == 1 and running[0].status == "running"
            assert record is not None and record.status == "running"
            assert record.container_id == running[0].id
        else:
            assert running == []
            assert record is None
    finally:
        disp.close()


def test_a_later_stop_supersedes_an_earlier_start(ctx: Context) -> None:
    """A start whose instance was asked to stop afterwards does nothing and says why."""
    first = ctx.store.register_intent("web", "sup", "start")
    ctx.store.register_intent("web", "sup", "stop")
    with pytest.raises(Superseded, match="requested after this start"):
        ctx.service.start(ctx.service.catalog.key("web", "sup"), intent=first)
    assert ctx.service.status(team_id="sup") == []
    # Repeated starts are not superseded by each other: they are the same request.
    again = ctx.store.register_intent("web", "sup", "start")
    ctx.store.register_intent("web", "sup", "start")
    assert ctx.service.start(ctx.service.catalog.key("web", "sup"),
                             intent=again).status == "running"



def test_docker_engine_restart_mid_run(
    own_worker: Callable[..., tuple[Worker, Celery, dict[str, str]]], images: dict[str, str],
) -> None:
    """The engine restarts: starts retry and then succeed; a dead container is never 'running'."""
    label = private_label("engine")
    with second_engine(images, label, index=1) as engine:
        worker, client, env = own_worker(
            DOCKER_HOST=engine.tcp_url, CTF_PUBLIC_HOST=engine.address,
            CTF_PUBLISH_IP=engine.address, CTF_EXTRA_LABELS=json.dumps(label),
            CTF_TEAM_SUBNET_POOL="10.218.0.0/16",
        )
        worker.start()
        settings = load_settings(
            broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
            redis_url=env["CTF_REDIS_URL"], challenges_file=env["CTF_CHALLENGES_FILE"],
            data_dir=Path(env["CTF_DATA_DIR"]), admin_token=ADMIN_TOKEN,
        )
        start = "celery_app.tasks.start_container"
        with TestClient(create_app(settings)) as api:

            def shown(team: str) -> dict[str, Any]:
                [inst] = api.get(f"/api/v1/teams/{team}/instances", headers=ADMIN
                                 ).json()["instances"]
                return dict(inst)

            first = client.send_task(start, args=["web", "e1"]).get(timeout=90)
            assert _answers_at(engine.address, first["ports"]["8080/tcp"])

            engine.stop_daemon()  # every container of the engine dies with it
            pending = client.send_task(start, args=["web", "e2"])
            wait_for(lambda: "cannot reach the Docker engine" in worker.log()
                     and "Retry in" in worker.log(), 60, 0.2, "the start to be retried")
            # While the engine is away its instances are not reported running, and a start
            # through the API is refused as a backend problem (503), not queued blind.
            def host_down() -> dict[str, Any] | None:
                inst = shown("e1")
                return inst if inst.get("host_up") is False else None

            down = wait_for(host_down, 20, 0.2, "e1's host to be reported down")
            assert down["status"] == "failed"
            refused = api.put("/api/v1/teams/e3/instances/web", headers=ADMIN)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "backend_unavailable"

            engine.start_daemon()
            second = pending.get(timeout=120)
            assert second["status"] == "running"
            assert _answers_at(engine.address, second["ports"]["8080/tcp"])
            # The old container did not survive the restart: it is failed, never running.
            def marked_failed() -> dict[str, Any] | None:
                inst = shown("e1")
                up_and_failed = inst["status"] == "failed" and inst.get("host_up") is None
                return inst if up_and_failed else None

            failed = wait_for(marked_failed, 30, 0.2, "the janitor to mark e1 failed")
            assert "container" in failed["error"]
            # Starting it again makes a fresh, answering instance.
            again = client.send_task(start, args=["web", "e1"]).get(timeout=90)
            assert again["container_id"] != first["container_id"]
            assert _answers_at(engine.address, again["ports"]["8080/tcp"])


def test_worker_killed_mid_burst_on_two_hosts(
    images: dict[str, str], catalog_file: Path, tmp_path: Path, docker_client: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Kill -9 one host's worker mid-burst of 30 by-name starts: done within 60 s, once each."""
    # Over two hosts: one container per instance across both engines, and each host's capacity
    # count equals the containers on its engine.
    label = private_label("faults2")
    server = RedisServer(tmp_path_factory.mktemp("redis-2hosts"))
    server.start()
    with second_engine(images, label, index=2) as beta:
        hosts_file = tmp_path / "hosts.yaml"
        hosts_file.write_text(
            "hosts:\n"
            "  alpha: {docker_url: 'unix:///var/run/docker.sock', public_host: 127.0.0.1,"
            " publish_ip: 127.0.0.1, max_instances: 30}\n"
            f"  beta: {{docker_url: '{beta.tcp_url}', public_host: {beta.address},"
            f" publish_ip: {beta.address}, max_instances: 30}}\n"
        )
        # The janitor's pace and orphan grace a user gets (the suite's are 1 s and 2 s), as in
        # the one-host test: a half-made start of the killed worker must be finished by its
        # redelivery, not swept by a janitor that happens to run every second.
        env = {**base_env(server, catalog_file, tmp_path / "data"),
               "CTF_HOSTS_FILE": str(hosts_file), "CTF_EXTRA_LABELS": json.dumps(label),
               "CTF_TEAM_SUBNET_POOL": "10.223.0.0/16", "CTF_MAX_INSTANCES": "100",
               "CTF_JANITOR_INTERVAL": default_setting("janitor_interval"),
               "CTF_ORPHAN_GRACE": default_setting("orphan_grace")}
        workers = {
            h: Worker({**env, "CTF_HOST": h, "CTF_DATA_DIR": str(tmp_path / f"data-{h}")},
                      tmp_path / f"worker-{h}.log")
            for h in ("alpha", "beta")
        }
        engines = {"alpha": docker_client, "beta": beta.client}
        client = platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
        state = redis.Redis.from_url(env["CTF_REDIS_URL"], decode_responses=True)
        try:
            for w in workers.values():
                w.start()
            wait_for(lambda: len(list(state.scan_iter("ctf:hostbeat:*"))) == 2, 30, 0.1,
                     "both hosts' heartbeats")
            teams = [f"m{uuid.uuid4().hex[:5]}{i}" for i in range(30)]
            results = [client.send_task("celery_app.tasks.start_container", args=["web", t])
                       for t in teams]
            wait_for(lambda: len(containers_of(beta.client, label)) >= 3, 90, 0.02,
                     "the burst to reach beta")
            workers["beta"].kill()
            assert not all(r.ready() for r in results), "the burst finished before the kill"
            workers["beta"].start()
            done = _results_within(results, PROMISED_DELAY)
            assert all(d["status"] == "running" for d in done)
            where: dict[str, list[str]] = {}
            for host, engine in engines.items():
                for c in containers_of(engine, label):
                    where.setdefault(c.labels["ctf.team"], []).append(host)
            assert {t: where.get(t) for t in teams} == {d["team_id"]: [d["host"]] for d in done}
            for host, engine in engines.items():
                assert int(state.scard(f"ctf:host:{host}")) == len(containers_of(engine, label))
        finally:
            for w in workers.values():
                w.stop()
            results = []  # collected (and unsubscribed) before the client closes
            close_platform_client(client)
            state.close()
            cleanup_docker(docker_client, label)
            server.stop()
