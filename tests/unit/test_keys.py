"""The Redis keyspace is spelled in one module, and ARCHITECTURE.md's key table is that module."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from celery_app.state import keys, pool_keys
from celery_app.state import store as state

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "celery_app"
ROW = re.compile(r"^\s*\| `(ctf:[^`]*)` \| (.*) \|\s*$")


def documented() -> dict[str, str]:
    """The key table of ARCHITECTURE.md: pattern -> what it holds."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    return {m[1]: m[2] for line in text.splitlines() if (m := ROW.match(line))}


def built() -> set[str]:
    """Every key the module's builders and constants make, with ``<param>`` placeholders."""
    made = set()
    for name, fn in inspect.getmembers(keys, inspect.isfunction):
        if fn.__module__ != keys.__name__ or name.startswith("_"):
            continue
        made.add(fn(*(f"<{p}>" for p in inspect.signature(fn).parameters)))
    for name, value in vars(keys).items():
        if name.isupper() and isinstance(value, str) and value.startswith(keys.PREFIX) \
                and not name.endswith("PREFIX"):
            made.add(value)
    return made


def test_architecture_table_is_the_keys_module() -> None:
    """ARCHITECTURE.md lists exactly the keys of the keys module, described the same way."""
    assert documented() == keys.TABLE


def test_every_builder_makes_a_documented_key() -> None:
    """Each key builder and constant yields a pattern of the table, and each pattern has one."""
    assert built() == set(keys.TABLE)


def test_no_other_module_spells_a_key_or_touches_redis() -> None:
    """Outside the state package no module spells a key; outside it none uses .redis."""
    offenders = []
    # The warm pools' keys are listed in their own module's docstring, beside their steps.
    ours = {Path(state.__file__), Path(pool_keys.__file__)}
    # The state package is where the store touches Redis (the broker transport, in
    # celery_app.worker.broker, has its own client); only the store and the pools spell ctf: keys.
    state_package = Path(state.__file__).parent
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix not in (".py", ".js", ".html") or path == Path(keys.__file__):
            continue
        text = path.read_text()
        if "ctf:" in text and path not in ours:
            offenders.append(f"{path.relative_to(ROOT)} spells a ctf: key")
        if path.suffix == ".py" and path.parent != state_package and any(
                isinstance(node, ast.Attribute) and node.attr == "redis"
                for node in ast.walk(ast.parse(text))):
            offenders.append(f"{path.relative_to(ROOT)} uses .redis")
    assert offenders == []
