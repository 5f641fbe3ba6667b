"""The house's floors, read from the code's imports: no ring, and imports only run down.

Floors, lowest first (a module may import its own floor's and lower floors' modules):

0. ground: ``errors``, ``settings`` and the shared vocabulary (the ``vocab`` package: names,
   models, limits, team tokens), which every layer may use;
1. ``state`` (Redis) and ``engine`` (Docker, nftables): the parts that talk to the outside;
2. ``core``: the rules; ``hosts``: placement; ``ingress``: host labels, links, route files;
3. ``loops`` (the janitor's pass) and ``worker`` (the worker wing: its loops, broker transport
   and signal wiring): the worker's machinery;
4. the entry points: ``api``, ``tasks``, ``cli``, ``context``, ``celery_app``, ``celery_config``.

``KNOWN_UPWARD`` and ``KNOWN_RINGS`` list what the code does today against that rule; issue 23
removes them. The tests fail when a new upward import or ring appears, and when a listed one is
gone (so the lists only shrink).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "celery_app"
GROUND = {"errors", "settings"}
FLOORS = {"state": 1, "engine": 1, "core": 2, "hosts": 2, "ingress": 2, "loops": 3, "worker": 3}
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_RINGS: list[set[str]] = []


def modules() -> dict[str, Path]:
    """Every module of the package, by its dotted name below ``celery_app``."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name or "__init__"] = path
    return found


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any depth, TYPE_CHECKING included)."""
    known = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.startswith("celery_app."):
                base = node.module.removeprefix("celery_app.")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("celery_app.") for a in node.names
                           if a.name.startswith("celery_app.")]
            graph[name].update(t for t in targets if t in known and t != name)
    return graph


def floor(module: str) -> int:
    """The floor of ``module`` (see the module docstring)."""
    if module in GROUND or module.split(".", maxsplit=1)[0] == "vocab":
        return 0
    return FLOORS.get(module.split(".", maxsplit=1)[0], 4)


def rings(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_run_only_down_the_floors() -> None:
    """No module imports one of a higher floor, beyond the listed ones issue 23 removes."""
    upward = {
        (source, target)
        for source, targets in imports().items()
        for target in targets
        if floor(target) > floor(source)
    }
    assert upward - KNOWN_UPWARD == set(), "a new import runs up the floors"
    assert KNOWN_UPWARD - upward == set(), "a listed upward import is gone: drop it from the list"


def test_no_new_import_ring() -> None:
    """The package's import rings are exactly the listed ones (issue 23 breaks them)."""
    found = sorted(sorted(ring) for ring in rings(imports()))
    assert found == sorted(sorted(ring) for ring in KNOWN_RINGS)


def test_the_graph_sees_imports() -> None:
    """The reader finds real imports (so the two tests above cannot pass on an empty graph)."""
    graph = imports()
    assert "vocab.naming" in graph["core.service"]
    assert "errors" in graph["core.catalog"]
    assert floor("engine.docker_driver") == 1
    assert floor("api.app") == 4


def test_the_core_parts_are_handed_what_they_use() -> None:
    """Inside ``core`` imports run one way: service -> (pool, reconcile) -> specs."""
    graph = imports()
    below_the_service = ("core.pool", "core.reconcile", "core.specs")
    assert all("core.service" not in graph[m] for m in below_the_service)
    assert {"core.pool", "core.reconcile"} & graph["core.specs"] == set()
    assert "core.pool" not in graph["core.reconcile"]
    assert "core.reconcile" not in graph["core.pool"]
    assert {"core.pool", "core.reconcile", "core.specs"} <= graph["core.service"]


def test_only_the_entry_points_pick_the_docker_driver() -> None:
    """Below the entry points, code sees the ``Driver`` seam (``engine.driver``), never Docker's."""
    graph = imports()
    picking = {m for m, targets in graph.items() if "engine.docker_driver" in targets}
    # The worker's context is its process's composition root: it builds the parts, and so
    # picks the real driver, like the entry points that build theirs.
    assert picking and all(floor(m) == 4 or m == "worker.context" for m in picking), picking
