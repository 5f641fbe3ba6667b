"""Warm pools' pure parts (a real Redis, no Docker).

How a claimed container's labels are read, slot flags, and the Redis steps that keep one slot
with one claimer.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from conftest import RedisServer

from celery_app.core.flags import in_app_flag, team_flag
from celery_app.core.pool import flag_held, holding_network, slot_flag
from celery_app.engine.docker_driver import _container_event, _container_info
from celery_app.state.pool_keys import PoolKeys

pytestmark = [pytest.mark.redis]

SECRET = "s3cret"
POOLED = {"ctf.managed": "true", "ctf.challenge": "web", "ctf.pool": "abc123", "ctf.host": "h"}


@pytest.fixture
def keys(redis_server: RedisServer) -> Iterator[PoolKeys]:
    client = redis.Redis.from_url(f"{redis_server.url}/9", decode_responses=True)
    client.flushdb()
    yield PoolKeys(client)
    client.flushdb()
    client.close()


def _inspect(name: str, labels: dict[str, str], opts: dict[str, str] | None) -> dict[str, object]:
    return {"Id": "x", "Name": "/" + name, "State": {"Status": "running"},
            "Config": {"Labels": labels},
            "NetworkSettings": {"Networks": {"ctf-team-t1": {"IPAddress": "10.0.0.2",
                                                             "DriverOpts": opts}}}}


def test_a_claimed_container_reads_as_its_teams_with_the_claims_times() -> None:
    """Renamed ctf-<ch>-<team>: team from the name, started/expires from the endpoint."""
    opts = {"ctf.started_at": "2026-01-01T00:00:00Z", "ctf.expires_at": "2026-01-01T02:00:00Z"}
    info = _container_info(_inspect("ctf-web-t1", POOLED, opts))
    assert info.team_id == "t1"
    assert info.labels["ctf.started_at"] == "2026-01-01T00:00:00Z"
    assert info.labels["ctf.expires_at"] == "2026-01-01T02:00:00Z"


def test_an_unclaimed_or_foreign_named_container_has_no_team() -> None:
    """A pool name, or a name that is not this challenge's instance name, gives no team."""
    assert _container_info(_inspect("ctfpool-web-abc123", POOLED, None)).team_id == ""
    assert _container_info(_inspect("ctf-other-t1", POOLED, None)).team_id == ""
    assert _container_info(_inspect("ctf-web-../x", POOLED, None)).team_id == ""


def test_a_cold_containers_labels_are_left_alone() -> None:
    """Without ctf.pool the labels are the creation labels, whatever the name or options."""
    cold = {"ctf.managed": "true", "ctf.challenge": "web", "ctf.team": "t1",
            "ctf.expires_at": "label"}
    info = _container_info(_inspect("ctf-web-t2", cold, {"ctf.expires_at": "opt"}))
    assert info.team_id == "t1" and info.labels["ctf.expires_at"] == "label"


def test_events_of_a_claimed_container_name_its_team() -> None:
    """A die event of a renamed pool container carries its team (the follower acts on it)."""
    event = _container_event({"Type": "container", "Action": "die", "Actor": {
        "ID": "x", "Attributes": {**POOLED, "name": "ctf-web-t9", "exitCode": "1"}}})
    assert event.labels["ctf.team"] == "t9" and event.exit_code == 1


def test_slot_flags_are_never_a_teams_flag() -> None:
    """A slot's flag differs from every team's and from other slots'."""
    flag = slot_flag(SECRET, "web", "abc123")
    assert flag.startswith("CTF{") and flag != slot_flag(SECRET, "web", "abc124")
    assert flag not in {team_flag(SECRET, "web", t) for t in ("abc123", "pool", "pool-abc123")}


def test_flags_of_held_slots_are_accepted_for_their_holder_only(keys: PoolKeys) -> None:
    """After the binding, the slot's flag and in-app flags are the holder's, no one else's."""
    keys.bind("web", "t1", "abc123")
    flag = slot_flag(SECRET, "web", "abc123")
    assert flag_held(keys, SECRET, "web", "t1", f" {flag} ")
    assert not flag_held(keys, SECRET, "web", "t2", flag)
    assert not flag_held(keys, SECRET, "other", "t1", flag)
    app_flag = in_app_flag(flag, "Score Board")
    assert flag_held(keys, SECRET, "web", "t1", app_flag.upper(), name="Score Board")
    assert not flag_held(keys, SECRET, "web", "t1", app_flag, name="DOM XSS")


def test_a_ready_slot_goes_to_exactly_one_of_many_claimers(keys: PoolKeys) -> None:
    """Forty concurrent takes of ten ready slots: each slot taken once, thirty misses."""
    slots = [f"s{i}" for i in range(10)]
    for s in slots:
        keys.add_member("h", s, "web")
        assert keys.offer("h", "web", s)
    with ThreadPoolExecutor(40) as pool:
        taken = list(pool.map(lambda _: keys.take("h", "web"), range(40)))
    got = [t for t in taken if t is not None]
    assert sorted(got) == sorted(slots)
    assert keys.members("h") == {}


def test_a_taken_slot_is_neither_offered_again_nor_withdrawn(keys: PoolKeys) -> None:
    """Once a claim owns a slot, the pass can neither re-offer nor remove it."""
    keys.add_member("h", "s1", "web")
    keys.offer("h", "web", "s1")
    assert keys.take("h", "web") == "s1"
    assert not keys.offer("h", "web", "s1")
    assert not keys.withdraw("h", "web", "s1")
    assert keys.take("h", "web") is None


def test_a_withdrawn_slot_cannot_be_claimed(keys: PoolKeys) -> None:
    """A slot the pass removes leaves the ready set and the members in the same step."""
    keys.add_member("h", "s1", "web")
    keys.offer("h", "web", "s1")
    assert keys.withdraw("h", "web", "s1")
    assert keys.take("h", "web") is None and keys.members() == {}


def test_each_subnet_pool_and_deployment_has_its_own_holding_network() -> None:
    """The holding network's name changes with the subnet pool and the scope labels."""
    scope = {"ctf.managed": "true"}
    a = holding_network("local", scope, "10.213.0.0/16")
    assert a.startswith("ctf-pool-local-")
    assert a != holding_network("local", scope, "10.214.0.0/16")
    assert a != holding_network("local", {**scope, "ctf.test": "x"}, "10.213.0.0/16")
    assert a == holding_network("local", dict(scope), "10.213.0.0/16")
