"""The audit trail's store and rules (state/audit.py, core/audit.py) on a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
import redis
from conftest import RedisServer

from celery_app.core.audit import Auditor, flag_digest
from celery_app.core.flags import in_app_flag, team_flag
from celery_app.core.pool import slot_flag
from celery_app.errors import InvalidRequest, InvalidTeamId
from celery_app.settings import Settings, load_settings
from celery_app.state import audit as audit_store
from celery_app.state.audit import KINDS, FlagOwner
from celery_app.state.store import StateStore

pytestmark = [pytest.mark.redis]

DB = 6  # a database of its own on the run's Redis (the worker's state is db 2)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[StateStore]:
    """A store on an empty database of the run's Redis."""
    client = redis.Redis.from_url(f"{redis_server.url}/{DB}", decode_responses=True)
    client.flushdb()
    yield StateStore(client)
    client.flushdb()
    client.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings but a bound of 100 events (a configuration, for the bound's test)."""
    return load_settings(data_dir=tmp_path / "data", audit_max_events=100)


def test_the_routes_kinds_are_the_stores() -> None:
    """The API's ``kind`` filter accepts exactly SPEC §13's kinds."""
    from celery_app.api.routes.audit import Kind  # noqa: PLC0415

    assert get_args(Kind) == KINDS


def test_events_come_back_newest_first_with_redis_time(store: StateStore,
                                                       settings: Settings) -> None:
    """Recorded events read back newest first, with time from the entry id and every field."""
    auditor = Auditor(settings, store)
    auditor.record("start", "t1", "web", "team:t1", "ok", task_id="x")
    auditor.record("admin", None, "web", "admin", "ok", action="drain")
    newest, oldest = auditor.read()
    assert (newest["kind"], newest["team_id"], newest["action"]) == ("admin", None, "drain")
    assert (oldest["kind"], oldest["actor"], oldest["task_id"]) == ("start", "team:t1", "x")
    assert oldest["time"] == audit_store.event_time(oldest["id"])
    assert oldest["time"].endswith("Z") and newest["time"] >= oldest["time"]


def test_the_bound_keeps_the_newest(store: StateStore, settings: Settings) -> None:
    """Past CTF_AUDIT_MAX_EVENTS the oldest go: at most one block of ~100 beyond the bound."""
    auditor = Auditor(settings, store)
    auditor.record("start", "first", "web", "team:first", "ok")
    for i in range(1000):
        auditor.record("flag", f"t{i}", "web", "admin", "wrong")
    assert 100 <= store.audit.length() <= 200
    assert auditor.read(limit=1)[0]["team_id"] == "t999"
    assert auditor.read(team="first") == []


def test_a_filter_scans_back_past_one_batch(store: StateStore, settings: Settings) -> None:
    """A rare event behind more than one read batch of others is still found."""
    auditor = Auditor(settings.model_copy(update={"audit_max_events": 10_000}), store)
    auditor.record("stop", "rare", "web", "admin", "ok")
    for _ in range(audit_store.SCAN_BATCH + 500):
        auditor.record("flag", "busy", "web", "admin", "wrong")
    (found,) = auditor.read(team="rare")
    assert found["kind"] == "stop"
    assert len(auditor.read(team="busy", limit=1000)) == 1000
    assert auditor.read(kind="stop", challenge="web")[0]["team_id"] == "rare"


def test_bad_filters_are_refused_with_what_to_do(store: StateStore, settings: Settings) -> None:
    """An unknown kind, a time that is not ISO 8601, a bad team or limit: typed errors."""
    auditor = Auditor(settings, store)
    with pytest.raises(InvalidRequest, match="kind"):
        auditor.read(kind="reboot")
    with pytest.raises(InvalidRequest, match="ISO 8601"):
        auditor.read(since="noon")
    with pytest.raises(InvalidRequest, match="limit"):
        auditor.read(limit=1001)
    with pytest.raises(InvalidTeamId):
        auditor.read(team="../x")


def test_a_shared_flag_names_its_owner_own_in_app_and_pooled(
    store: StateStore, settings: Settings
) -> None:
    """The owner of a team flag, an in-app flag and a pool slot's flag is found and recorded."""
    auditor = Auditor(settings, store)
    secret, fmt = settings.flag_secret_value(), settings.flag_format
    auditor.task_outcome("start_container", "web", "y", None, "ok", "t1")
    theirs = team_flag(secret, "web", "y", fmt)
    assert auditor.flag_check("web", "x", theirs, None, False, "admin") is False
    assert auditor.flag_check("web", "x", in_app_flag(theirs, "Score Board"), "Score Board",
                              False, "admin") is False
    # A pooled instance's flag: the slot's, bound to its team at the claim (PoolKeys.bind).
    pooled = slot_flag(secret, "web", "s1", fmt)
    store.pools.bind("web", "z", "s1",
                     FlagOwner("web", flag_digest(pooled), "z", "pool:s1"))
    assert auditor.flag_check("web", "x", pooled, None, False, "admin") is False
    # A wrong flag nobody holds is just wrong; a correct one is correct.
    assert auditor.flag_check("web", "x", "CTF{nope}", None, False, "admin") is False
    assert auditor.flag_check("web", "y", theirs, None, True, "admin") is True
    shared = auditor.read(kind="flag_shared")
    assert [(e["team_id"], e["owner"]) for e in shared] == [("x", "z"), ("x", "y"), ("x", "y")]
    assert [e["outcome"] for e in auditor.read(kind="flag")] == ["correct", "wrong"]
