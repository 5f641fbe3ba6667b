"""Shared fixtures: a private Redis, the real Docker engine, stand-in images, a real worker.

Everything a test creates in Docker carries the label ``ctf.test=<run id>`` and is removed at
the end of the run, pass or fail (and after each test that uses ``ctx``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import redis

from celery_app.settings import Settings
from celery_app.worker.context import Context, build_context, set_context
from ctf_testkit import own_run, support
from ctf_testkit.docker_sweep import sweep as cleanup_docker
from ctf_testkit.env import RunConfig
from ctf_testkit.support import (  # noqa: F401  # tests import these from here
    HTTP_DOCKERFILE,
    RedisServer,
    close_platform_client,
    free_port,
    platform_client,
    wait_for,
)
from ctf_testkit.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
TEST_LABEL = {"ctf.test": RUN_ID}
_LABELS_USED = [TEST_LABEL]
# Our own pool, away from a real deployment's default 10.213.0.0/16 on the same engine.
TEST_POOL = "10.214.0.0/16"
BUSYBOX = Path("/bin/busybox")


def containers_of(client: Any, label: dict[str, str] = TEST_LABEL, **labels: str) -> list[Any]:
    """The containers carrying ``label`` and ``labels`` (any removed meanwhile are skipped)."""
    filters = [f"{k}={v}" for k, v in {**label, **labels}.items()]
    return list(client.containers.list(all=True, filters={"label": filters},
                                       ignore_removed=True))


def private_label(purpose: str) -> dict[str, str]:
    """A test label of its own, for objects no other test's janitor may judge.

    The session worker's janitor sweeps everything labelled ``TEST_LABEL`` that its Redis
    does not account for; a test with its own Redis (or record-less objects) labels its
    objects with this instead. Removed at the end of the run like ``TEST_LABEL``.
    """
    label = {"ctf.test": f"{RUN_ID}-{purpose}"}
    if label not in _LABELS_USED:
        _LABELS_USED.append(label)
    return label


def default_setting(field: str) -> str:
    """A setting's default, as the environment spells it (what a user gets)."""
    return str(Settings.model_fields[field].default)


def janitor_pass(ctx: Context, now: Any = None) -> Any:
    """Run one janitor pass, waiting out a pass the session's worker may be running."""

    def attempt() -> Any:
        summary = ctx.janitor.run_once(now)
        return None if summary.skipped else summary

    return wait_for(attempt, 30, 0.05, "a janitor pass that is not skipped")


# -- Redis ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# -- Docker -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.exit(f"no Docker engine answers ({exc}); run ./run-tests.sh", returncode=3)
    yield client
    # Every label's containers first, the images last: an image still used by a running
    # container of a private label (swept after the test label) would otherwise stay behind.
    for label in _LABELS_USED:
        cleanup_docker(client, label)
    cleanup_docker(client, TEST_LABEL, images=True)
    client.close()


def build_image(
    client: docker.DockerClient, tag: str, dockerfile: str, files: dict[str, bytes | Path]
) -> str:
    """Build a stand-in image labelled with this run's label; return its tag."""
    return support.build_image(client, tag, dockerfile, files, TEST_LABEL)



SLOW_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY index.html /www/index.html
EXPOSE 8080
ENTRYPOINT ["/bin/busybox", "sh", "-c"]
CMD ["/bin/busybox sleep 2 && exec /bin/busybox httpd -f -p 8080 -h /www"]
"""

CRASH_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
EXPOSE 8080
ENTRYPOINT ["/bin/busybox", "sh", "-c", "echo boom; exit 3"]
"""


@pytest.fixture(scope="session")
def images(docker_client: docker.DockerClient) -> dict[str, str]:
    """Stand-in challenge images: http (instant), slow (answers after 2 s), crash (exits)."""
    assert BUSYBOX.exists(), "/bin/busybox is missing: apt-get install busybox-static"
    files: dict[str, bytes | Path] = {"busybox": BUSYBOX, "index.html": b"hello from ctf\n"}
    return {
        "http": build_image(docker_client, f"ctf-test/http:{RUN_ID}", HTTP_DOCKERFILE, files),
        "slow": build_image(docker_client, f"ctf-test/slow:{RUN_ID}", SLOW_DOCKERFILE, files),
        "crash": build_image(docker_client, f"ctf-test/crash:{RUN_ID}", CRASH_DOCKERFILE,
                             {"busybox": BUSYBOX}),
    }


# -- settings, catalog, context ---------------------------------------------------------------


def catalog_yaml(images: dict[str, str]) -> str:
    """The test catalog: stand-ins for the real challenges plus edge cases."""
    return f"""
challenges:
  web:
    name: Stand-in web challenge
    image: {images['http']}
    port: 8080
    ttl: 600
    max_lifetime: 1800
    memory: 64m
    cpus: 0.5
    pids: 64
    flag_env: FLAG
    start_timeout: 20
  exposed:
    image: {images['http']}
    protocol: tcp
    ttl: 600
  slow:
    image: {images['slow']}
    port: 8080
    ttl: 600
    start_timeout: 20
  crash:
    image: {images['crash']}
    port: 8080
    start_timeout: 10
  short:
    image: {images['http']}
    port: 8080
    ttl: 3
    max_lifetime: 8
"""


@pytest.fixture(scope="session")
def catalog_file(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "challenges.yaml"
    path.write_text(catalog_yaml(images))
    return path


# Settings of every test's instancer, in process and in its workers alike.
TEST_FIELDS: dict[str, Any] = {
    "rate_limit_count": 1000,
    "max_instances_per_team": 5,
    "orphan_grace": 2.0,
    # The egress firewall is machine-wide kernel state, shared with every other run on
    # this engine: tests/test_egress.py turns it on (its default) for a pool of its own.
    "egress_firewall": "off",
}
ADMIN_TOKEN = "test-admin-token-0123456789abcdefghij"


def run_config(redis_server: RedisServer, catalog_file: Path, data_dir: Path) -> RunConfig:
    """The test run's instancer on ``redis_server`` with ``data_dir`` (see ctf_testkit.env)."""
    return RunConfig(redis_server.url, catalog_file, data_dir, TEST_LABEL, TEST_POOL,
                     TEST_FIELDS)


def base_env(redis_server: RedisServer, catalog_file: Path, data_dir: Path) -> dict[str, str]:
    """The environment of a worker or API process for this test run."""
    run = run_config(redis_server, catalog_file, data_dir)
    return run.env(janitor_interval=1, admin_token=ADMIN_TOKEN)


def worker_and_api(
    env: dict[str, str], catalog: Path, workdir: Path,
    ready: Callable[[Worker], None] | None = None,
) -> contextlib.AbstractContextManager[tuple[Worker, Any, Any]]:
    """A worker of ``env``, a platform's Celery client and the API on the same Redis.

    ``ready`` waits for what the test needs of the started worker. Yields
    ``(worker, client, api)`` (the API as a FastAPI ``TestClient``); all stopped afterwards
    (:func:`ctf_testkit.own_run.worker_and_api`, with the test run's admin token).
    """
    return own_run.worker_and_api(env, catalog, workdir, admin_token=ADMIN_TOKEN, ready=ready)


@pytest.fixture
def make_settings(
    redis_server: RedisServer, catalog_file: Path, tmp_path: Path
) -> Callable[..., Settings]:
    """Build settings for this run; keyword arguments override fields."""

    def make(**overrides: Any) -> Settings:
        run = run_config(redis_server, catalog_file, tmp_path / "data")
        return run.settings(**{"lock_wait": 30.0, **overrides})

    return make


@pytest.fixture
def make_ctx(
    make_settings: Callable[..., Settings], docker_client: docker.DockerClient,
    redis_server: RedisServer,
) -> Iterator[Callable[..., Context]]:
    """Build contexts on a clean Redis; remove what their tests made afterwards."""
    made: list[Context] = []
    redis.Redis.from_url(f"{redis_server.url}/2").flushdb()

    def make(**overrides: Any) -> Context:
        ctx = build_context(make_settings(**overrides))
        made.append(ctx)
        return ctx

    yield make
    cleanup_docker(docker_client, TEST_LABEL)
    for ctx in made:
        ctx.driver.close()
    set_context(None)


@pytest.fixture
def ctx(make_ctx: Callable[..., Context]) -> Context:
    """A context with the test settings."""
    return make_ctx()


# -- a real Celery worker (ctf_testkit.worker.Worker) ---------------------------------------


@pytest.fixture(scope="session")
def worker_env(
    redis_server: RedisServer, catalog_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return base_env(redis_server, catalog_file, tmp_path_factory.mktemp("worker-data"))


@pytest.fixture(scope="session")
def worker(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
    docker_client: docker.DockerClient, images: dict[str, str],
) -> Iterator[Worker]:
    w = Worker(worker_env, tmp_path_factory.mktemp("worker-log") / "worker.log")
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def celery_client(worker_env: dict[str, str]) -> Iterator[Any]:
    """A Celery client of the test worker (a plain app, as a web platform would have)."""
    client = platform_client(worker_env["CELERY_BROKER_URL"], worker_env["CELERY_RESULT_BACKEND"])
    yield client
    close_platform_client(client)


@pytest.fixture
def clean_worker_state(
    worker: Worker, redis_server: RedisServer, docker_client: docker.DockerClient
) -> Iterator[None]:
    """Before and after a worker test: no instance of this run left in Docker or Redis."""
    cleanup_docker(docker_client, TEST_LABEL)
    redis.Redis.from_url(f"{redis_server.url}/2").flushdb()
    yield
    cleanup_docker(docker_client, TEST_LABEL)
