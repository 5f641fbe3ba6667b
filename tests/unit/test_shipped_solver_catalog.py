"""The seed challenges' shipped solvers in both default catalogs, and the new solver fields."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from celery_app.core.catalog import DEFAULT_CATALOG, build_catalog
from celery_app.errors import CatalogError
from celery_app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_both_default_catalogs_ship_the_same_solvers(
        make_settings: Callable[..., Settings]) -> None:
    """The code's default catalog and deploy/challenges.yaml carry the same solver blocks."""
    shipped = yaml.safe_load((ROOT / "deploy" / "challenges.yaml").read_text())
    from_file = build_catalog(shipped, make_settings(), "deploy/challenges.yaml")
    default = build_catalog({"challenges": DEFAULT_CATALOG}, make_settings(), "default")
    assert {ch.id: ch.solver for ch in from_file} == {ch.id: ch.solver for ch in default}
    juice, todo = default.get("juice-shop").solver, default.get("todo-app").solver
    assert juice is not None and todo is not None
    assert (juice.image, juice.flag_name, juice.given_flag) == (
        "ctf-example/juice-shop-solver:1", "Score Board", False)
    assert (todo.image, todo.flag_name, todo.given_flag) == (
        "ctf-example/todo-app-solver:1", None, True)
    for name in ("juice-shop", "todo-app"):  # what examples/solvers/build.sh builds from
        assert (ROOT / "examples" / "solvers" / name / "Dockerfile").is_file()
        assert (ROOT / "examples" / "solvers" / name / "solve").is_file()


def test_flag_name_needs_the_key_variable(make_settings: Callable[..., Settings]) -> None:
    """An in-app flag name without flag_env (no key for the app) is refused, saying why."""
    entry = {"image": "x", "port": 80, "solver": {"image": "s", "flag_name": "Score Board"}}
    with pytest.raises(CatalogError, match="'flag_name' needs 'flag_env'"):
        build_catalog({"challenges": {"c1": entry}}, make_settings())
    ok = build_catalog({"challenges": {"c1": {**entry, "flag_env": "CTF_KEY"}}},
                       make_settings()).get("c1")
    assert ok.solver is not None and ok.solver.flag_name == "Score Board"
