"""Warm pools (issue 14) over two Docker hosts, end to end.

Host ``alpha`` is the machine's engine with its worker beside it. Host ``beta`` is a second
``dockerd`` in its own network namespace (tests/engines.py), and its worker runs *in that
namespace*, talking to its engine over the engine's own unix socket: the deployment the
architecture describes (one worker per host, next to its engine), where container
addresses are routable from the worker, as the pools' readiness probe needs. The Redis of
this module listens on the namespace link's host address, so both workers and the API
share it. Everything is labelled ``ctf.test=<run id>-pool-multihost`` and removed after.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
from api_helpers import ADMIN_TOKEN
from conftest import base_env, catalog_yaml, cleanup_docker, private_label, wait_for
from engines import SecondEngine, second_engine

from celery_app.api.client import Dispatcher
from celery_app.settings import load_settings
from ctf_testkit.support import RedisServer
from ctf_testkit.worker import Worker

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

LABEL = private_label("pool-multihost")
POOL = "10.222.0.0/16"
# ``everywhere`` is on both engines; ``beta-only``'s image exists only on beta's (and
# CTF_PULL_POLICY=never), so only beta can keep that pool, or start it at all.
POOLED = """
  everywhere:
    image: {image}
    port: 8080
    ttl: 600
    start_timeout: 20
    pool: 1
  beta-only:
    image: {beta_image}
    port: 8080
    ttl: 600
    start_timeout: 20
    pool: 1
"""


@dataclass
class TwoHosts:
    """The dispatcher (as the API uses it) and each host's engine and public address."""

    disp: Dispatcher
    engines: dict[str, docker.DockerClient]
    public: dict[str, str]


@pytest.fixture(scope="module")
def two_hosts(
    images: dict[str, str], docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TwoHosts]:
    workdir = tmp_path_factory.mktemp("pool-multihost")
    with second_engine(images, LABEL, index=1) as beta:
        yield from _cluster(images, docker_client, beta, workdir)


def _cluster(images: dict[str, str], docker_client: docker.DockerClient, beta: SecondEngine,
             workdir: Path) -> Iterator[TwoHosts]:
    assert beta.client is not None
    repo, tag = images["http"].rsplit(":", 1)
    beta_image = f"{repo}-beta-only:{tag}"
    beta.client.images.get(images["http"]).tag(f"{repo}-beta-only", tag)  # beta's only
    catalog = workdir / "challenges.yaml"
    catalog.write_text(catalog_yaml(images)
                       + POOLED.format(image=images["http"], beta_image=beta_image))
    # beta's worker is in beta's namespace: it reaches this Redis over the namespace link
    redis_server = RedisServer(workdir, bind=f"10.250.{beta.subnet}.1")
    hosts_file = workdir / "hosts.yaml"
    # alpha has more room than beta: placement would choose alpha but for beta's ready one
    hosts_file.write_text(
        "hosts:\n"
        "  alpha: {docker_url: 'unix:///var/run/docker.sock', public_host: 127.0.0.1,"
        " publish_ip: 127.0.0.1, max_instances: 8}\n"
        f"  beta: {{docker_url: '{beta.unix_url}', public_host: {beta.address},"
        f" publish_ip: {beta.address}, max_instances: 4}}\n"
    )
    env = {
        **base_env(redis_server, catalog, workdir / "data"),
        "CTF_HOSTS_FILE": str(hosts_file),
        "CTF_EXTRA_LABELS": json.dumps(LABEL),
        "CTF_TEAM_SUBNET_POOL": POOL,
        "CTF_PULL_POLICY": "never",
    }
    inside = ("nsenter", f"--net=/var/run/netns/{beta.netns}")
    workers = [
        Worker({**env, "CTF_HOST": "alpha", "CTF_DATA_DIR": str(workdir / "data-alpha")},
               workdir / "worker-alpha.log"),
        Worker({**env, "CTF_HOST": "beta", "CTF_DATA_DIR": str(workdir / "data-beta")},
               workdir / "worker-beta.log", prefix=inside),
    ]
    settings = load_settings(
        broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
        redis_url=env["CTF_REDIS_URL"], challenges_file=catalog, hosts_file=hosts_file,
        data_dir=workdir / "api", admin_token=ADMIN_TOKEN,
    )
    disp = Dispatcher(settings)
    try:
        redis_server.start()
        for w in workers:
            w.start()
        wait_for(lambda: all(h.alive for h in disp.host_loads()), 30,
                 message="both hosts' heartbeats")
        yield TwoHosts(disp, {"alpha": docker_client, "beta": beta.client},
                       {"alpha": "127.0.0.1", "beta": beta.address})
    finally:
        for w in workers:
            w.stop()
        disp.close()
        cleanup_docker(docker_client, LABEL)  # beta's engine cleans itself when it stops
        redis_server.stop()


def _unclaimed(engine: docker.DockerClient, challenge: str) -> list[Any]:
    filters = [f"{k}={v}" for k, v in {**LABEL, "ctf.challenge": challenge}.items()]
    return [c for c in engine.containers.list(all=True, filters={"label": filters},
                                              ignore_removed=True)
            if c.name.startswith("ctfpool-")]


def _ready(c: TwoHosts) -> dict[tuple[str, str], int]:
    pools = c.disp.store.pools
    return {(h, ch): len(pools.ready(h, ch))
            for h in ("alpha", "beta") for ch in ("everywhere", "beta-only")}


def test_each_host_keeps_its_pool_and_a_start_claims_on_the_host_with_a_ready_one(
    two_hosts: TwoHosts,
) -> None:
    """Pools are per host; placement picks beta for its ready container, and the claim works."""
    c = two_hosts
    wait_for(lambda: _ready(c) == {("alpha", "everywhere"): 1, ("beta", "everywhere"): 1,
                                   ("alpha", "beta-only"): 0, ("beta", "beta-only"): 1},
             90, 0.2, "each host's own pools to be ready")
    for host, engine in c.engines.items():  # each engine holds its own host's containers
        (mine,) = _unclaimed(engine, "everywhere")
        assert mine.labels["ctf.host"] == host
    assert _unclaimed(c.engines["alpha"], "beta-only") == []
    (waiting,) = _unclaimed(c.engines["beta"], "beta-only")
    # alpha has twice beta's room, yet the start goes where a container is ready
    task_id, _ = c.disp.start(c.disp.key("beta-only", "plmh1"))
    view = c.disp.wait(task_id, 90)
    assert view.ready and view.error is None, (view.state, view.error)
    inst = dict(view.result)
    assert inst["host"] == "beta" and inst["status"] == "running"
    assert inst["container_id"] == waiting.id  # claimed, not booted
    claimed = c.engines["beta"].containers.get(waiting.id)
    assert claimed.name == "ctf-beta-only-plmh1"
    # the network it booted on, its own (issue 27: a claim makes no network call)
    assert set(claimed.attrs["NetworkSettings"]["Networks"]) == {
        f"ctfpool-beta-only-{claimed.labels['ctf.pool']}"}
    port = inst["ports"]["8080/tcp"]
    assert inst["url"] == f"http://{c.public['beta']}:{port}"
    with urllib.request.urlopen(inst["url"], timeout=5) as answer:  # beta's address only
        assert answer.read() == b"hello from ctf\n"
    # beta refills its own pool; alpha's is untouched
    wait_for(lambda: _ready(c)[("beta", "beta-only")] == 1, 60, 0.2, "beta's pool to refill")
    assert _ready(c)[("alpha", "everywhere")] == 1
    task_id, _ = c.disp.stop(c.disp.key("beta-only", "plmh1"))
    view = c.disp.wait(task_id, 60)
    assert view.ready and view.error is None, (view.state, view.error)
