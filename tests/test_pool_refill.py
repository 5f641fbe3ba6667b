"""A pool drained during an opening refills while user starts go on (issue 27), real engine.

A real worker (its beat runs the pool pass) on a Redis of its own, with ``pooled`` (``pool:
2``, an image that answers at once) and the catalog's ``slow`` (no pool, answers after 2 s).
Two streams of new teams start ``slow`` back to back, staggered, so a user's start is in
flight on the host throughout; meanwhile new teams start ``pooled``. Before issue 27 the pool
pass booted nothing while a user's start was in flight, so once drained the pool stayed empty
for as long as the stream lasted; now it boots a bounded number beside the starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime

import docker
import pytest
from conftest import RedisServer, catalog_yaml, private_label
from test_pool import POOLED, Setup, running_setup

from celery_app.core.pool import BOOT_BESIDE_STARTS

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]

POOL = "10.212.0.0/16"  # this file's subnets, away from every other file's
LABEL = private_label("refill")
SIZE = 2
STREAMS = 2
REFILL_WITHIN = 60.0  # seconds of stream in which a refilled container must be claimed


@pytest.fixture(scope="module")
def refill(
    docker_client: docker.DockerClient, images: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    """A worker, a platform client and the API, on a Redis of their own."""
    work = tmp_path_factory.mktemp("refill")
    catalog = work / "challenges.yaml"
    catalog.write_text(catalog_yaml(images) + POOLED.format(image=images["http"], size=SIZE))
    server = RedisServer(tmp_path_factory.mktemp("redis-refill"))
    server.start()
    try:
        with running_setup(server, catalog, work, docker_client, label=LABEL,
                           CTF_TEAM_SUBNET_POOL=POOL) as made:
            yield made
    finally:
        server.stop()


def _created(setup: Setup, container_id: str) -> float:
    """When Docker created the container (epoch seconds)."""
    raw = setup.docker.api.inspect_container(container_id)["Created"]
    return datetime.fromisoformat(raw[:26].rstrip("Z") + "+00:00").timestamp()


def test_a_pool_drained_by_starts_refills_while_starts_go_on(refill: Setup) -> None:
    """Claims drain the pool during a stream of starts; it boots again and a claim gets one."""
    assert BOOT_BESIDE_STARTS > 0
    refill.full(SIZE)
    windows: list[tuple[float, float]] = []  # each stream start, from send to running
    stop = threading.Event()
    failures: list[BaseException] = []

    def stream(k: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                began = time.time()
                refill.start("slow", f"rs{k}x{i}")  # answers after 2 s: in flight meanwhile
                windows.append((began, time.time()))
                i += 1
        except BaseException as exc:  # noqa: BLE001  # reported by the test below
            failures.append(exc)

    threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(STREAMS)]
    try:
        for t in threads:
            t.start()
            time.sleep(1.0)  # staggered: while one stream's start answers, the other's runs
        # the opening drains the pool ...
        claimed, missed = [], 0
        for i in range(SIZE):
            inst = refill.start("pooled", f"rd{i}")
            assert "ctf.pool" in refill.docker.containers.get(inst["container_id"]).labels
        # ... and new teams keep starting it while the stream goes on
        deadline = time.monotonic() + REFILL_WITHIN
        i = 0
        while not claimed and time.monotonic() < deadline:
            inst = refill.start("pooled", f"rn{i}")
            i += 1
            if "ctf.pool" in refill.docker.containers.get(inst["container_id"]).labels:
                claimed.append(inst["container_id"])
            else:
                missed += 1  # a cold start, as before the refill
                time.sleep(0.5)
        assert not failures, failures
        assert claimed, (f"no pooled start claimed a refilled container within "
                         f"{REFILL_WITHIN:.0f} s of starts ({missed} cold starts)")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures
    print(f"refill: {missed} cold starts of pooled, then a refilled claim; "
          f"{len(windows)} stream starts meanwhile")
    # the claimed container was booted while a stream start was in flight
    made = _created(refill, claimed[0])
    assert any(began <= made <= ended for began, ended in windows), (made, windows)
