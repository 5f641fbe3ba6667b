"""A test file's own instancer: a worker and the API on a Redis, labels and subnet pool of its own.

Files whose tests must not meet the session worker (its janitor judges everything labelled with
the run's label that its Redis does not know) run their own: tests/test_global.py,
tests/test_restart.py and tests/test_audit.py. Each keeps its own Redis folder, label and pool;
what they share is how such a run is started and cleaned up, here:

- :func:`own_redis`: a private redis-server, stopped afterwards;
- :func:`worker_and_api`: a real worker, a platform's Celery client and the API (a FastAPI
  ``TestClient``) on one environment;
- :func:`own_run`: both on an emptied Redis, with the file's labels and pool; what the run made
  in Docker is swept afterwards, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from celery_app.settings import Settings, load_settings
from ctf_testkit import support
from ctf_testkit.docker_sweep import sweep
from ctf_testkit.support import RedisServer
from ctf_testkit.worker import Worker


@contextlib.contextmanager
def own_redis(folder: Path) -> Iterator[RedisServer]:
    """A private redis-server keeping its files in ``folder``; stopped afterwards."""
    server = RedisServer(folder)
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def worker_and_api(
    env: dict[str, str], catalog: Path, workdir: Path, *, admin_token: str,
    ready: Callable[[Worker], None] | None = None,
) -> Iterator[tuple[Worker, Any, Any]]:
    """A worker of ``env``, a platform's Celery client and the API on the same Redis.

    Args:
        env: the worker's environment (the API's settings come from the same URLs).
        catalog: the challenges file.
        workdir: where the worker's log goes.
        admin_token: the API's admin token.
        ready: waits for what the test needs of the started worker.

    Yields:
        ``(worker, client, api)``, the API as a FastAPI ``TestClient``; all stopped afterwards.

    """
    from fastapi.testclient import TestClient  # noqa: PLC0415  # only runs with an API

    from celery_app.api.app import create_app  # noqa: PLC0415

    worker = Worker(env, workdir / f"worker-{uuid.uuid4().hex[:4]}.log")
    client = support.platform_client(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
    settings = load_settings(
        broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
        redis_url=env["CTF_REDIS_URL"], challenges_file=catalog,
        # The worker's: the API checks flags with the secret the worker's flags come from.
        data_dir=Path(env["CTF_DATA_DIR"]),
        admin_token=admin_token,
    )
    try:
        worker.start()
        if ready is not None:
            ready(worker)
        with TestClient(create_app(settings)) as api:
            yield worker, client, api
    finally:
        worker.stop()
        support.close_platform_client(client)


@dataclass(frozen=True)
class OwnRun:
    """A running :func:`own_run`.

    Attributes:
        platform: a platform's Celery client (it sends the tasks by name).
        api: the API, as a FastAPI ``TestClient``.
        env: the worker's environment, with the file's labels and pool.
        settings: the run's settings as the worker has them (its data folder's secrets).

    """

    platform: Any
    api: Any
    env: dict[str, str]
    settings: Settings


@contextlib.contextmanager
def own_run(
    docker: Any, env: dict[str, str], catalog: Path, workdir: Path, labels: dict[str, str],
    pool: str, *, admin_token: str,
) -> Iterator[OwnRun]:
    """A worker and the API of one test file, on its own labels and team subnet pool.

    The state Redis of ``env`` is emptied first (a file's Redis may hold an earlier run's
    records); whatever carries ``labels`` in Docker is removed afterwards, pass or fail.

    Args:
        docker: the Docker client that sweeps what the run made.
        env: the run's environment (``tests/conftest.py``'s ``base_env`` and its changes);
            ``CTF_EXTRA_LABELS`` and ``CTF_TEAM_SUBNET_POOL`` are set here.
        catalog: the challenges file.
        workdir: where the worker's log goes.
        labels: what every container and network of the run carries.
        pool: the file's team subnet pool, away from every other file's.
        admin_token: the API's admin token.

    """
    env = {**env, "CTF_EXTRA_LABELS": json.dumps(labels), "CTF_TEAM_SUBNET_POOL": pool}
    redis.Redis.from_url(env["CTF_REDIS_URL"]).flushdb()
    try:
        with worker_and_api(env, catalog, workdir, admin_token=admin_token) as (
                _worker, platform, api):
            settings = load_settings(data_dir=Path(env["CTF_DATA_DIR"]))
            yield OwnRun(platform, api, env, settings)
    finally:
        sweep(docker, labels)
