"""Placement over several hosts, on an in-memory Redis: room, liveness, one host per instance."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_app.errors import BackendUnavailable, CapacityExhausted
from celery_app.hosts.hostsfile import Hosts, load_hosts
from celery_app.hosts.placement import pick_host
from celery_app.settings import Settings
from celery_app.state.store import StateStore
from celery_app.worker.heartbeat import Heartbeat


@pytest.fixture
def hosts(make_settings: Callable[..., Settings], tmp_path: Path) -> Hosts:
    """Two hosts with room for three instances each."""
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts:\n"
                    "  alpha: {public_host: 10.0.0.5, max_instances: 3}\n"
                    "  beta: {public_host: 10.0.0.6, max_instances: 3}\n")
    return load_hosts(make_settings(hosts_file=path))


def beat(store: StateStore, host: str, engine: bool = True) -> None:
    """Publish one heartbeat of ``host``."""
    Heartbeat(store, host, ttl=30, worker=f"w-{host}").beat(engine)


def test_new_instances_spread_up_to_each_hosts_room(hosts: Hosts, store: StateStore) -> None:
    """Six placements land three per host; the seventh is refused as capacity exhausted."""
    beat(store, "alpha")
    beat(store, "beta")
    chosen = Counter(pick_host(hosts, store, f"web/t{i}") for i in range(6))
    assert chosen == {"alpha": 3, "beta": 3}
    with pytest.raises(CapacityExhausted):
        pick_host(hosts, store, "web/t7")


def test_one_instance_keeps_its_placement(hosts: Hosts, store: StateStore) -> None:
    """Placing the same instance again (a retried start) keeps its host and its one slot."""
    beat(store, "alpha")
    beat(store, "beta")
    first = pick_host(hosts, store, "web/t1")
    assert {pick_host(hosts, store, "web/t1") for _ in range(5)} == {first}


def test_a_host_whose_engine_is_down_gets_nothing(hosts: Hosts, store: StateStore) -> None:
    """Only the host whose worker and engine answer is chosen."""
    beat(store, "alpha")
    beat(store, "beta", engine=False)
    assert {pick_host(hosts, store, f"web/t{i}") for i in range(3)} == {"alpha"}


def test_no_usable_host_is_a_retryable_error(hosts: Hosts, store: StateStore) -> None:
    """With every engine down the start is refused as backend unavailable (retry later)."""
    beat(store, "alpha", engine=False)
    beat(store, "beta", engine=False)
    with pytest.raises(BackendUnavailable):
        pick_host(hosts, store, "web/t1")
