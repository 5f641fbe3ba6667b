"""Placement of new instances over several hosts, on a real Redis (no Docker needed)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from celery_app.errors import BackendUnavailable, CapacityExhausted
from celery_app.hosts.hostsfile import Hosts, load_hosts
from celery_app.hosts.placement import pick_host
from celery_app.settings import Settings
from celery_app.state.store import StateStore
from celery_app.vocab.models import Instance, Status, iso, utcnow
from celery_app.worker.heartbeat import Heartbeat

pytestmark = [pytest.mark.redis]


@pytest.fixture
def two_hosts(make_settings: Callable[..., Settings], tmp_path: Path,
              redis_server: object) -> tuple[Settings, StateStore]:
    path = tmp_path / "hosts.yaml"
    path.write_text(
        "hosts:\n"
        "  alpha: {public_host: 10.0.0.5, max_instances: 4}\n"
        "  beta: {public_host: 10.0.0.6, max_instances: 4}\n"
    )
    settings = make_settings(hosts_file=path)
    store = StateStore.from_url(settings.state_redis_url)
    store.redis.flushdb()
    return settings, store


def _beat(store: StateStore, host: str, engine: bool = True) -> None:
    Heartbeat(store, host, ttl=30, worker=f"w-{host}").beat(engine)


def _only_alpha_up(settings: Settings, store: StateStore) -> Hosts:
    _beat(store, "alpha")
    _beat(store, "beta", engine=False)
    return load_hosts(settings)


def _instance(team: str, status: Status) -> Instance:
    now = utcnow()
    return Instance(team_id=team, challenge="web", status=status, container_name=f"ctf-web-{team}",
                    host="alpha", started_at=iso(now), expires_at=iso(now + timedelta(seconds=60)))


def test_a_burst_spreads_over_hosts_up_to_their_room(two_hosts: tuple[Settings, StateStore]
                                                     ) -> None:
    """Eight starts at once land four per host (room 4 each); the ninth is refused clearly."""
    settings, store = two_hosts
    hosts = load_hosts(settings)
    _beat(store, "alpha")
    _beat(store, "beta")
    with ThreadPoolExecutor(8) as pool:
        chosen = list(pool.map(lambda i: pick_host(hosts, store, f"web/t{i}"), range(8)))
    assert Counter(chosen) == {"alpha": 4, "beta": 4}
    with pytest.raises(CapacityExhausted, match="full"):
        pick_host(hosts, store, "web/t9")


def test_a_host_whose_engine_is_down_gets_nothing(two_hosts: tuple[Settings, StateStore]
                                                  ) -> None:
    """A host whose worker reports its engine down is skipped; all down is a backend error."""
    settings, store = two_hosts
    hosts = load_hosts(settings)
    _beat(store, "alpha")
    _beat(store, "beta", engine=False)
    assert {pick_host(hosts, store) for _ in range(3)} == {"alpha"}
    _beat(store, "alpha", engine=False)
    with pytest.raises(BackendUnavailable, match="no Docker host is usable"):
        pick_host(hosts, store)


def test_a_placement_stops_counting_once_its_instance_is_recorded(
    two_hosts: tuple[Settings, StateStore],
) -> None:
    """A recorded instance is counted once (as used), not again as a placement on its way."""
    hosts = _only_alpha_up(*two_hosts)
    store = two_hosts[1]
    assert pick_host(hosts, store, "web/first") == "alpha"
    store.put(_instance("first", "running"))
    assert [pick_host(hosts, store, f"web/n{i}") for i in range(3)] == ["alpha"] * 3
    with pytest.raises(CapacityExhausted):
        pick_host(hosts, store, "web/n4")


def test_a_placement_reserved_then_stopped_no_longer_counts(
    two_hosts: tuple[Settings, StateStore],
) -> None:
    """A start placed, reserved and stopped before the next pick leaves no phantom behind."""
    hosts = _only_alpha_up(*two_hosts)
    store = two_hosts[1]
    assert pick_host(hosts, store, "web/brief") == "alpha"
    store.reserve(_instance("brief", "starting"), 5, 100, 4)
    store.delete("web", "brief", "alpha")  # stopped at once
    assert [pick_host(hosts, store, f"web/m{i}") for i in range(4)] == ["alpha"] * 4


def test_a_host_with_a_ready_pool_container_is_preferred(two_hosts: tuple[Settings, StateStore]
                                                         ) -> None:
    """A start goes where its challenge has a ready pool container, even with less room."""
    from celery_app.state.pool_keys import PoolKeys  # noqa: PLC0415

    settings, store = two_hosts
    hosts = load_hosts(settings)
    _beat(store, "alpha")
    _beat(store, "beta")
    store.put(_instance("other", "running"))  # alpha: 3 of 4 free, beta: 4 of 4
    PoolKeys(store.redis).offer("alpha", "web", "slot1")
    assert {pick_host(hosts, store, f"web/t{i}") for i in range(3)} == {"alpha"}
    assert pick_host(hosts, store, "juice/t9") == "beta"  # no pool for it: the most room
