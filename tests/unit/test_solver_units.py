"""The catalog's solver block, the reserved team id and the solvers' results (SPEC §14)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from celery_app.core.catalog import build_catalog
from celery_app.errors import CatalogError, InvalidTeamId
from celery_app.settings import Settings
from celery_app.state.store import StateStore
from celery_app.vocab.naming import check_team_id


def one(settings: Settings, **entry: Any) -> Any:
    """The challenge ``c1`` of a one-entry catalog."""
    return build_catalog({"challenges": {"c1": {"image": "x", "port": 80, **entry}}},
                         settings).get("c1")


def test_a_solver_block_takes_the_defaults(make_settings: Callable[..., Settings]) -> None:
    """``solver: {image}`` runs every 300 s with a 60 s timeout and the image's command."""
    solver = one(make_settings(), solver={"image": "checks/s:1"}).solver
    assert (solver.image, solver.command, solver.interval, solver.timeout) == (
        "checks/s:1", None, 300, 60)
    assert one(make_settings()).solver is None


@pytest.mark.parametrize(("solver", "field"), [
    ({}, "solver.image"),
    ({"image": "s", "timeout": 0}, "solver.timeout"),
    ({"image": "s", "interval": 1}, "solver.interval"),
    ({"image": "s", "command": []}, "solver.command"),
    ({"image": "s", "every": 5}, "solver.every"),
    ("s", "solver"),
])
def test_a_bad_solver_block_names_the_challenge_and_field(
        make_settings: Callable[..., Settings], solver: Any, field: str) -> None:
    """A mistake in the solver block is refused naming the challenge and the field."""
    with pytest.raises(CatalogError, match=f"challenge 'c1', field '{field}'"):
        one(make_settings(), solver=solver)


@pytest.mark.parametrize("team", ["canary", "Canary", "CANARY"])
def test_canary_is_a_reserved_team_id(team: str) -> None:
    """No caller may take the team id canary (any case); the label readers may read it."""
    with pytest.raises(InvalidTeamId, match="reserved"):
        check_team_id(team)
    assert check_team_id(team, reserved=True) == team
    assert check_team_id("canary2") == "canary2"


def test_results_are_unknown_until_a_run_then_kept(store: StateStore) -> None:
    """A challenge is unknown until its first run; a run's state, time and output are kept."""
    assert store.solvers.report(["a"]) == [
        {"challenge": "a", "state": "unknown", "last_run": None, "output": [], "host": None}]
    store.solvers.save("a", "broken", ["no flag"], at=1_800_000_000.0, seconds=3.0, canary="x",
                       host="edge-1")
    assert store.solvers.report(["a"]) == [
        {"challenge": "a", "state": "broken", "last_run": "2027-01-15T08:00:00Z",
         "output": ["no flag"], "host": "edge-1"}]
    buckets, total = store.solvers.histogram("a")
    assert dict(buckets)["2.5"] == 0 and dict(buckets)["5.0"] == 1
    assert dict(buckets)["+Inf"] == 1 and total == 3.0
