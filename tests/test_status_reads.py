"""The status reads' one-round-trip view, sync and async, on a real Redis (no Docker needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from celery_app.errors import RedisUnavailable
from celery_app.hosts.liveness import parse_beats
from celery_app.hosts.present import present, present_with
from celery_app.settings import Settings
from celery_app.state.reads import AsyncIndex
from celery_app.state.store import StateStore
from celery_app.vocab.models import Instance, iso, utcnow
from celery_app.worker.heartbeat import Heartbeat

pytestmark = [pytest.mark.redis]

HOSTS = ["alpha", "beta"]


def _record(store: StateStore, team: str, challenge: str, host: str) -> Instance:
    now = utcnow()
    inst = Instance(team_id=team, challenge=challenge, status="running",
                    container_name=f"ctf-{challenge}-{team}", host=host, url="http://x:1",
                    started_at=iso(now), expires_at=iso(now + timedelta(seconds=60)))
    store.reserve(inst, per_team=10, global_max=100)
    return inst


@pytest.fixture
def store(make_settings: Callable[..., Settings], redis_server: object) -> StateStore:
    """A flushed store: team t1 on three hosts, one no longer configured ("gamma").

    Alpha's engine answers, beta's does not, gamma has no heartbeat.
    """
    settings = make_settings()
    store = StateStore.from_url(settings.state_redis_url)
    store.redis.flushdb()
    _record(store, "t1", "web", "alpha")
    _record(store, "t1", "slow", "beta")
    _record(store, "t1", "short", "gamma")
    _record(store, "t2", "web", "alpha")
    Heartbeat(store, "alpha", ttl=30, worker="w-a").beat(True)
    Heartbeat(store, "beta", ttl=30, worker="w-b").beat(False)
    return store


def _async_view(url: str, team: str, challenge: str | None) -> Any:
    async def run() -> Any:
        index = AsyncIndex(url)
        await index.open()
        try:
            return await index.view(team, challenge, HOSTS)
        finally:
            await index.close()
    return asyncio.run(run())


@pytest.mark.parametrize("challenge", [None, "web", "slow", "short", "crash"])
def test_the_view_shows_what_the_list_and_the_heartbeats_show(
    store: StateStore, make_settings: Callable[..., Settings], challenge: str | None
) -> None:
    """One round trip gives the same listing as list() + heartbeats(), sync and async."""
    want = present(store.list(team_id="t1", challenge=challenge), store, HOSTS)
    found, beats = store.view("t1", challenge, HOSTS)
    assert present_with(found, parse_beats(beats)) == want
    found, beats = _async_view(make_settings().state_redis_url, "t1", challenge)
    assert present_with(found, parse_beats(beats)) == want
    if challenge == "slow":  # beta's engine is down: not shown as running
        assert want[0]["status"] == "failed" and want[0]["host_up"] is False
    if challenge is None:
        assert [i["challenge"] for i in want] == ["short", "slow", "web"]  # by key, as list()
    if challenge == "crash":
        assert want == []


def test_a_team_without_instances_has_an_empty_view(store: StateStore) -> None:
    """An unknown team reads as no instances, and the heartbeats still come back."""
    found, beats = store.view("nobody", None, HOSTS)
    assert found == []
    assert set(beats) == set(HOSTS)


def test_the_async_view_with_redis_down_is_a_clear_error() -> None:
    """With Redis unreachable the async view raises RedisUnavailable, naming what to check."""
    async def run() -> None:
        index = AsyncIndex("redis://127.0.0.1:9/2")
        await index.open()
        try:
            await index.view("t1", "web", HOSTS)
        finally:
            await index.close()
    with pytest.raises(RedisUnavailable, match="redis-server"):
        asyncio.run(run())


def test_the_api_without_its_lifespan_reads_through_the_store(
    store: StateStore, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """An app run without its lifespan (a bare TestClient) answers the same from the store."""
    from fastapi.testclient import TestClient  # noqa: PLC0415  # only this test needs it

    from celery_app.api.app import create_app  # noqa: PLC0415

    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  alpha: {public_host: 10.0.0.5}\n  beta: {public_host: 10.0.0.6}\n")
    settings = make_settings(admin_token="a" * 32, hosts_file=hosts)
    headers = {"Authorization": "Bearer " + "a" * 32}
    bare = TestClient(create_app(settings))
    with TestClient(create_app(settings)) as full:
        for path in ("/api/v1/teams/t1/instances", "/api/v1/teams/t1/instances/slow"):
            a, b = bare.get(path, headers=headers), full.get(path, headers=headers)
            assert a.status_code == b.status_code == 200
            assert a.json() == b.json()
        assert bare.get("/api/v1/teams/t1/instances/crash", headers=headers).status_code == 404
        assert full.get("/api/v1/teams/t1/instances/crash", headers=headers).status_code == 404
