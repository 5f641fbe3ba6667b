"""Every test states the behaviour it checks in a one-line docstring."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_has_a_one_line_docstring() -> None:
    """Each test function under tests/ has a docstring of exactly one line."""
    missing = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                    and node.name.startswith("test_"):
                doc = ast.get_docstring(node)
                if not doc or "\n" in doc.strip():
                    missing.append(f"{path.relative_to(TESTS)}:{node.lineno} {node.name}")
    assert missing == []
