"""One team cannot stall the event (issue 17): floods through a real API server process.

A stack of its own, with the product's default settings (limits, wait bounds, worker
threads as the tests run them): a private set of Redis databases, a real Celery worker, and
the API run as ``run-celery-worker.sh`` runs it (``python -m celery_app.cli api``, uvicorn).
Its objects carry a label of their own, so the session worker's janitor never judges them.
The figures the flood tests print are quoted in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import redis
from api_helpers import ADMIN, ADMIN_TOKEN, team_headers
from conftest import ROOT, RUN_ID, TEST_POOL, Worker, cleanup_docker, containers_of, private_label

from celery_app.api.client import NOOP_TTL
from celery_app.engine.firewall import table_name
from celery_app.vocab.models import parse_iso
from ctf_testkit.support import (
    RedisServer,
    close_platform_client,
    free_port,
    platform_client,
    wait_for,
)

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

FLOOD_LABEL = private_label("flood")
# Our own pool: neither the session's (10.214/16) nor another module's.
FLOOD_POOL = "10.233.0.0/16"
assert FLOOD_POOL != TEST_POOL
DBS = (3, 4, 5)  # broker, results, state: on the session's Redis, apart from its 0-2
BOOT = 20  # seconds the "slower" challenge takes to answer (the took 40)
# Ten challenges that start at once: ten start requests that each do real work.
TEN = ["web", "exposed", "other", "fourth", "lasting", "brief", "e1", "e2", "e3", "e4"]
# Thirty different challenges that each take BOOT s to answer: a by-name flood (issue 22).
THIRTY_SLOW = [f"slow{i:02d}" for i in range(30)]


def flood_catalog(images: dict[str, str]) -> str:
    """The stand-in web challenge, one that takes BOOT s to answer, one that never answers."""
    slow_entries = "".join(
        f"  {cid}:\n    image: {images['http']}\n    port: 8080\n    start_timeout: 90\n"
        f"    command: [\"sh\", \"-c\", \"/bin/busybox sleep {BOOT} && "
        f"exec /bin/busybox httpd -f -p 8080 -h /www\"]\n" for cid in THIRTY_SLOW)
    return f"""
challenges:
  web:
    image: {images['http']}
    port: 8080
    start_timeout: 30
  exposed:
    image: {images['http']}
    port: 8080
    start_timeout: 30
  other:
    image: {images['http']}
    port: 8080
    start_timeout: 30
  fourth:
    image: {images['http']}
    port: 8080
    start_timeout: 30
  e1: {{image: "{images['http']}", port: 8080}}
  e2: {{image: "{images['http']}", port: 8080}}
  e3: {{image: "{images['http']}", port: 8080}}
  e4: {{image: "{images['http']}", port: 8080}}
  e5: {{image: "{images['http']}", port: 8080}}
  lasting:
    image: {images['http']}
    port: 8080
    ttl: 600
    max_lifetime: 86400
  brief:
    image: {images['http']}
    port: 8080
    ttl: 600
    max_lifetime: 600
  slower:
    image: {images['http']}
    port: 8080
    command: ["sh", "-c", "/bin/busybox sleep {BOOT} && exec /bin/busybox httpd -f -p 8080 -h /www"]
    start_timeout: 90
{slow_entries}
  markup:
    image: {images['http']}
    port: 8080
    command: ["sh", "-c", "echo '[bold red]pwned[/] [link=http://x.test]here[/link]'; exit 3"]
    start_timeout: 30
  hang:
    image: {images['http']}
    port: 8080
    command: ["sleep", "3600"]
    start_timeout: 300
"""


# Team names of this run: container names are global on the engine, which other runs share.
SUFFIX = RUN_ID.rsplit("-", 1)[-1][:4]


def t(name: str) -> str:
    """The team id ``name`` of this run (``name-<run>``)."""
    return f"{name}-{SUFFIX}"


@dataclass
class Stack:
    """The flood stack: its API's base URL, its Redis databases and its worker."""

    base: str
    env: dict[str, str]
    worker: Worker
    state: redis.Redis
    url: str

    def client(self) -> httpx.Client:
        """A fresh HTTP client of the API (one per thread)."""
        return httpx.Client(base_url=self.base, timeout=180)

    def flush(self) -> None:
        """Forget every task, result and record of the stack (between tests)."""
        for db in DBS:
            redis.Redis.from_url(f"{self.url}/{db}").flushdb()


def api_process(env: dict[str, str], logfile: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``python -m celery_app.cli api`` (uvicorn) on a free port; return URL and process."""
    port = free_port()
    with logfile.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery_app.cli", "api", "--bind", f"127.0.0.1:{port}"],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, logfile.read_text(errors="replace")[-3000:]
        try:
            return httpx.get(f"{base}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, 0.1, "the API server to answer")
    return base, proc


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, images: dict[str, str], docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A worker and an API server process with default settings, on Redis dbs 3-5."""
    workdir = tmp_path_factory.mktemp("flood")
    catalog = workdir / "challenges.yaml"
    catalog.write_text(flood_catalog(images))
    url = redis_server.url
    env = {
        "CELERY_BROKER_URL": f"{url}/{DBS[0]}", "CELERY_RESULT_BACKEND": f"{url}/{DBS[1]}",
        "CTF_REDIS_URL": f"{url}/{DBS[2]}", "CTF_CHALLENGES_FILE": str(catalog),
        "CTF_DATA_DIR": str(workdir / "data"), "CTF_EXTRA_LABELS": json.dumps(FLOOD_LABEL),
        "CTF_TEAM_SUBNET_POOL": FLOOD_POOL, "CTF_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    for key in ("CTF_RATE_LIMIT_COUNT", "CTF_MAX_INSTANCES_PER_TEAM", "CTF_MAX_INSTANCES"):
        assert key not in env  # the defaults are what is tested
    for db in DBS:
        redis.Redis.from_url(f"{url}/{db}").flushdb()
    worker = Worker(env, workdir / "worker.log")
    worker.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        base, proc = api_process(env, workdir / "api.log")
        yield Stack(base, env, worker, redis.Redis.from_url(f"{url}/{DBS[2]}",
                                                            decode_responses=True), url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        worker.stop()
        for db in DBS:
            redis.Redis.from_url(f"{url}/{db}").flushdb()
        cleanup_docker(docker_client, FLOOD_LABEL)
        # The worker installed its pool's egress table (on by default) and leaves it by design.
        subprocess.run(["nft", "delete", "table", "inet", table_name(IPv4Network(FLOOD_POOL))],
                       capture_output=True, check=False)


@pytest.fixture
def fresh(stack: Stack, docker_client: docker.DockerClient) -> Iterator[Stack]:
    """The stack with no instance, record or rate count left from another test."""
    cleanup_docker(docker_client, FLOOD_LABEL)
    stack.state.flushdb()
    yield stack
    cleanup_docker(docker_client, FLOOD_LABEL)
    stack.state.flushdb()


def put(client: httpx.Client, team: str, challenge: str, wait: float | None = None) -> Any:
    """``PUT /api/v1/teams/{team}/instances/{challenge}`` with the team's token."""
    query = f"?wait={wait}" if wait is not None else ""
    return client.put(f"/api/v1/teams/{team}/instances/{challenge}{query}",
                      headers=team_headers(team))


def p99(samples: list[float]) -> float:
    """The 99th percentile of ``samples`` (seconds)."""
    return statistics.quantiles(samples, n=100)[98]


def latencies(stack: Stack, path: str, headers: dict[str, str], n: int) -> list[float]:
    """Time ``n`` sequential GETs of ``path``; every one must answer (200 or 503 health)."""
    samples = []
    with stack.client() as client:
        client.get(path, headers=headers)  # warm-up: the connection, the first health check
        for _ in range(n):
            began = time.perf_counter()
            r = client.get(path, headers=headers)
            samples.append(time.perf_counter() - began)
            assert r.status_code in (200, 503), r.text
    return samples


def parallel(stack: Stack, n: int, call: Callable[[httpx.Client, int], Any]) -> list[Any]:
    """Run ``call(client, i)`` for i < n, all at once, each in its own thread and client."""
    clients = [stack.client() for _ in range(n)]
    try:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(call, clients, range(n)))
    finally:
        for client in clients:
            client.close()


def test_duplicate_starts_of_a_slow_challenge_do_not_delay_another_team(
    fresh: Stack, docker_client: docker.DockerClient
) -> None:
    """40 duplicate starts of a slow challenge make one task; another team starts at once."""
    stack = fresh
    with stack.client() as client:  # the same start without a flood, for comparison
        calm_began = time.monotonic()
        assert put(client, t("calm-team"), "web", wait=60).status_code == 200
        calm = time.monotonic() - calm_began
    answers = parallel(stack, 40, lambda client, _i: put(client, t("spam"), "slower"))
    assert {r.status_code for r in answers} == {202}, [r.text for r in answers][:3]
    assert len({r.json()["task_id"] for r in answers}) == 1  # one task for all 40
    # Only the one start that does work counted against the rate limit.
    assert stack.state.zcard(f"ctf:rate:{t('spam')}") == 1
    with stack.client() as client:
        other_began = time.monotonic()
        r = put(client, t("other-team"), "web", wait=60)
        other_took = time.monotonic() - other_began
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "running"
        spam_state = client.get(f"/api/v1/teams/{t('spam')}/instances/slower",
                                headers=team_headers(t("spam"))).json()["status"]
    # The spam start was still booting all along: the other team did not wait for it.
    assert spam_state == "starting"
    print(f"\nFLOOD other team's start during 40 duplicate starts: {other_took:.2f} s "
          f"(without the flood: {calm:.2f} s)")
    assert other_took < 5, f"another team's start took {other_took:.1f} s"
    assert len(containers_of(docker_client, FLOOD_LABEL, **{"ctf.team": t("spam")})) == 1


def test_duplicate_extends_and_stops_coalesce(fresh: Stack, docker_client: Any) -> None:
    """10 extends of an instance while one is pending are one task; so are 10 stops."""
    stack = fresh
    headers = team_headers(t("dup"))
    with stack.client() as client:
        started = put(client, t("dup"), "lasting", wait=60).json()
    path = f"/api/v1/teams/{t('dup')}/instances/lasting"
    # Another operation holds the instance's lock meanwhile, so the first extend stays
    # pending while the other nine arrive, however fast or slow the machine is.
    lock = stack.state.lock(f"ctf:lock:lasting/{t('dup')}", timeout=60)
    assert lock.acquire(blocking_timeout=10)
    try:
        extended = parallel(stack, 10,
                            lambda c, _i: c.post(f"{path}/extend", headers=headers))
    finally:
        lock.release()
    # still pending after the route's wait (or past the team's 8 waits): 202 with the task
    assert {r.status_code for r in extended} == {202}, [r.text for r in extended]
    (task_id,) = {r.json()["task_id"] for r in extended}  # one task for all ten
    with stack.client() as client:
        done = wait_for(lambda: (v := client.get(f"/api/v1/tasks/{task_id}", headers=headers)
                                 .json()).get("state") == "SUCCESS" and v, 60, 0.1, "the extend")
        record = client.get(path, headers=headers).json()
    # extended once by its ttl (600 s), not ten times
    assert done["result"]["expires_at"] == record["expires_at"]
    assert parse_iso(record["expires_at"]) - parse_iso(started["expires_at"]) \
        == timedelta(seconds=600)
    stopped = parallel(stack, 10, lambda c, _i: c.delete(path, headers=headers))
    assert {r.status_code for r in stopped} == {202}
    assert len({r.json()["task_id"] for r in stopped}) == 1
    assert stack.state.zcard(f"ctf:rate:{t('dup')}") == 2  # the start and the one stop
    wait_for(lambda: containers_of(docker_client, FLOOD_LABEL, **{"ctf.team": t("dup")}) == [],
             60, 0.1, "the instance to be stopped")


def ours(db: redis.Redis, keys: set[bytes]) -> set[str]:
    """``keys`` without what the janitor's beat writes meanwhile (pass lock, its results)."""
    kept = set()
    for raw in keys:
        key = raw.decode()
        if key.startswith(("ctf:janitor", "ctf:hostbeat", "ctf:epoch")):
            continue
        if key.startswith("celery-task-meta-"):
            meta = json.loads(db.get(key) or b"{}")
            if str(meta.get("name", "")).endswith("reap_expired"):
                continue
        kept.add(key)
    return kept


def test_repeated_starts_of_a_running_instance_add_nothing_to_redis(fresh: Stack) -> None:
    """200 starts of a running instance send no task and leave no per-request record."""
    stack = fresh
    dbs = [redis.Redis.from_url(f"{stack.url}/{db}") for db in DBS]
    with stack.client() as client:
        assert put(client, t("steady"), "web", wait=60).status_code == 200
        before = [set(db.keys()) for db in dbs]
        ids = {put(client, t("steady"), "web").json()["task_id"] for _ in range(200)}
        # (results and state; the broker only ever holds messages in flight)
        new = [ours(db, set(db.keys()) - keys)
               for db, keys in zip(dbs[1:], before[1:], strict=True)]
        (task_id,) = ids  # one answer, reused
        done = client.get(f"/api/v1/tasks/{task_id}", headers=team_headers(t("steady"))).json()
    assert done["state"] == "SUCCESS"
    assert done["result"]["status"] == "running"
    key = f"celery-task-meta-{task_id}"
    # Only the one reused answer (its result and its owner key) is new.
    assert new == [{key}, {f"ctf:task:{task_id}"}], new
    results = dbs[1]
    assert 0 < results.ttl(key) <= NOOP_TTL
    assert 0 < dbs[2].ttl(f"ctf:task:{task_id}") <= NOOP_TTL
    kept = int(results.memory_usage(key) or 0) + int(dbs[2].memory_usage(f"ctf:task:{task_id}")
                                                     or 0)
    print(f"\nFLOOD 200 starts of a running instance: {sum(map(len, new)):+d} keys; "
          f"the one reused answer takes {kept} bytes for {NOOP_TTL} s")


def test_limits_answer_their_errors_through_the_api(fresh: Stack) -> None:
    """Quota (raced over 4 challenges), lifetime and rate limits answer 409/409/429."""
    stack = fresh
    challenges = ["web", "exposed", "other", "fourth"]
    answers = parallel(stack, 4,
                       lambda client, i: put(client, t("racer"), challenges[i], wait=60))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 409], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 409).json()
    assert refused["error"] == "team_quota_exceeded"
    assert "CTF_MAX_INSTANCES_PER_TEAM" in refused["detail"]
    with stack.client() as client:
        listed = client.get(f"/api/v1/teams/{t('racer')}/instances",
                            headers=team_headers(t("racer")))
        assert len(listed.json()["instances"]) == 3

        assert put(client, t("ager"), "brief", wait=60).status_code == 200
        r = client.post(f"/api/v1/teams/{t('ager')}/instances/brief/extend",
                        headers=team_headers(t("ager")))
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "max_lifetime_reached"

        # 10 start/stop actions a minute by default: 10 starts (of 10 challenges, so none
        # coalesces) are taken at once, whatever the quota then says; the 11th is 429 before
        # anything is sent.
        for challenge in TEN:
            assert put(client, t("looper"), challenge).status_code == 202
        r = put(client, t("looper"), "e5", wait=60)
        assert r.status_code == 429, r.text
        assert r.json()["error"] == "rate_limited"
        assert "wait" in r.json()["detail"]


def test_limits_fail_tasks_sent_by_name(fresh: Stack) -> None:
    """A plain Celery client gets TeamQuotaExceeded, MaxLifetimeReached and RateLimited."""
    client = platform_client(fresh.env["CELERY_BROKER_URL"], fresh.env["CELERY_RESULT_BACKEND"])

    def call(task: str, challenge: str, team: str) -> Any:
        return client.send_task(f"celery_app.tasks.{task}", args=[challenge, team]).get(
            timeout=90)

    def refused(task: str, challenge: str, team: str) -> str:
        with pytest.raises(Exception) as caught:  # the class is checked below
            call(task, challenge, team)
        return type(caught.value).__name__

    try:
        for challenge in ("web", "exposed", "other"):
            assert call("start_container", challenge, t("named"))["status"] == "running"
        assert refused("start_container", "fourth", t("named")) == "TeamQuotaExceeded"
        assert call("start_container", "brief", t("aged"))["status"] == "running"
        assert refused("extend_container", "brief", t("aged")) == "MaxLifetimeReached"
        # The worker counts by-name starts itself (no intent): the 11th in a minute is refused.
        results = [client.send_task("celery_app.tasks.start_container",
                                    args=[challenge, t("byname")]) for challenge in TEN]
        for result in results:
            with contextlib.suppress(Exception):  # 3 run, the rest are over the quota
                result.get(timeout=120)
        assert refused("start_container", "e5", t("byname")) == "RateLimited"
    finally:
        close_platform_client(client)


def test_a_by_name_flood_of_slow_starts_does_not_delay_another_team(
    fresh: Stack, docker_client: docker.DockerClient
) -> None:
    """30 by-name starts of 30 slow challenges by one team; another team's start takes <= 5 s."""
    client = platform_client(fresh.env["CELERY_BROKER_URL"], fresh.env["CELERY_RESULT_BACKEND"])

    def start(challenge: str, team: str) -> Any:
        return client.send_task("celery_app.tasks.start_container", args=[challenge, team])

    try:
        flood = [start(challenge, t("flooder")) for challenge in THIRTY_SLOW]
        # The flood is being worked on: its first instances boot (BOOT s each).
        wait_for(lambda: containers_of(docker_client, FLOOD_LABEL,
                                       **{"ctf.team": t("flooder")}), 60, 0.1,
                 "the flood's first instance to be created")
        began = time.monotonic()
        other = start("web", t("timed")).get(timeout=60)
        took = time.monotonic() - began
        assert other["status"] == "running"
        # The flood's starts were still booting all along: the other team did not wait for them.
        booting = [r for r in flood if not r.ready()]
        outcomes: dict[str, int] = {}
        for result in flood:
            try:
                state = result.get(timeout=180)["status"]
            except Exception as exc:  # noqa: BLE001  # the class is what is counted
                state = type(exc).__name__
            outcomes[state] = outcomes.get(state, 0) + 1
    finally:
        close_platform_client(client)
    print(f"\nFLOOD another team's start by name during 30 slow starts by name: {took:.2f} s "
          f"(the flood's outcomes: {outcomes})")
    assert booting, "the flood had finished before the other team's start: nothing was measured"
    assert took <= 5, f"another team's start took {took:.1f} s"
    # Every flood start ended: running, or refused by a limit with its typed error.
    assert set(outcomes) <= {"running", "TeamQuotaExceeded", "RateLimited"}, outcomes
    assert outcomes.get("running", 0) >= 1


def test_capacity_exhausted_answers_503_through_the_api(
    fresh: Stack, tmp_path: Path
) -> None:
    """With CTF_MAX_INSTANCES instances running, another start answers 503 capacity_exhausted."""
    stack = fresh
    with stack.client() as client:
        for team in (t("cap1"), t("cap2")):
            assert put(client, team, "web", wait=60).status_code == 200
    env = {**stack.env, "CTF_MAX_INSTANCES": "2", "CTF_DATA_DIR": str(tmp_path)}
    base, proc = api_process(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            r = put(client, t("cap3"), "web", wait=30)
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "capacity_exhausted"
            cap = client.get("/api/v1/capacity", headers=ADMIN).json()
            assert cap["used"] == 2
    finally:
        proc.terminate()
        proc.wait(20)


def test_ctfctl_status_shows_container_output_as_it_is(fresh: Stack) -> None:
    """A failed start's output that looks like Rich markup is printed literally by ctfctl."""
    stack = fresh
    with stack.client() as client:
        r = put(client, t("mk"), "markup", wait=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "start_failed"
    assert "[bold red]pwned[/]" in r.json()["detail"]
    done = subprocess.run(
        [sys.executable, "-m", "celery_app.cli", "status", "--team", t("mk")],
        env={**os.environ, **stack.env, "COLUMNS": "400"}, capture_output=True, text=True,
        cwd=ROOT, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "[bold red]pwned[/]" in done.stdout
    assert "[link=http://x.test]here[/link]" in done.stdout


def test_waiting_requests_do_not_slow_healthz_or_other_teams(fresh: Stack) -> None:
    """While 60 requests of one team (and one of 60 teams each) wait, others answer < 250 ms."""
    stack = fresh
    held: list[Any] = []
    errors: list[BaseException] = []

    def wait_on(team: str) -> None:
        try:
            with stack.client() as client:
                held.append(put(client, team, "hang", wait=40))
        except BaseException as exc:  # noqa: BLE001  # reported by the assertion below
            errors.append(exc)

    with stack.client() as client:
        assert put(client, t("bystander"), "web", wait=30).status_code == 200
    calm_health = latencies(stack, "/healthz", {}, 300)
    calm_others = latencies(stack, f"/api/v1/teams/{t('bystander')}/instances",
                            team_headers(t("bystander")), 300)
    threads = [threading.Thread(target=wait_on, args=(t("spam2"),)) for _ in range(60)]
    threads += [threading.Thread(target=wait_on, args=(t(f"w{i}"),)) for i in range(60)]
    for thread in threads:
        thread.start()
    # Past the per-team bound (8 by default) a team's waits are refused at once.
    wait_for(lambda: sum(r.status_code == 429 for r in held) >= 52, 30, 0.1,
             "spam2's waits beyond the bound to be refused")
    time.sleep(1)  # let the others reach their wait
    health = latencies(stack, "/healthz", {}, 300)
    others = latencies(stack, f"/api/v1/teams/{t('bystander')}/instances",
                       team_headers(t("bystander")), 300)
    still_waiting = 120 - len(held)
    for thread in threads:
        thread.join(60)
    # The 60 hanging starts would go on booting one after another: drop the queued ones.
    redis.Redis.from_url(f"{stack.url}/{DBS[0]}").flushdb()
    assert not errors, errors
    refused = [r for r in held if r.status_code == 429]
    assert len(refused) == 52
    assert all(r.json()["error"] == "rate_limited" for r in refused)
    assert "CTF_API_MAX_WAITS_PER_TEAM" in refused[0].json()["detail"]
    # the others timed out waiting: 202 with their task, not an error
    assert len(held) == 120
    assert [r.text for r in held if r.status_code not in (202, 429)] == []
    print(f"\nFLOOD {still_waiting} requests waiting: /healthz p50 "
          f"{statistics.median(health) * 1000:.1f} ms p99 {p99(health) * 1000:.1f} ms; "
          f"another team's list p50 {statistics.median(others) * 1000:.1f} ms "
          f"p99 {p99(others) * 1000:.1f} ms (without: /healthz p99 "
          f"{p99(calm_health) * 1000:.1f} ms, list p99 {p99(calm_others) * 1000:.1f} ms)")
    assert still_waiting >= 60
    # Under 250 ms, or (on a machine loaded by others) no slower than 3x the same requests
    # without the flood: before issue 17 the flood made /healthz time out (10 s here), and
    # one scheduler hiccup on 2 busy cores is already 100 ms.
    assert p99(health) < max(0.25, 3 * p99(calm_health))
    assert p99(others) < max(0.25, 3 * p99(calm_others))
