"""Copyable connection lines of a TCP instance (issue 25): the CTFd modal's and the dashboard's.

The plugin's ``connection_lines`` (client.py, no CTFd needed) and the dashboard's
``connect.js`` (run by node) give the same lines for the same address.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONNECT_JS = ROOT / "celery_app" / "api" / "static" / "connect.js"

TLS_LINES = [
    {"tool": "ncat", "line": "ncat --ssl nc-t1.ctf.example 443"},
    {"tool": "openssl", "line": "openssl s_client -quiet -connect nc-t1.ctf.example:443 "
                                "-servername nc-t1.ctf.example"},
    {"tool": "pwntools",
     "line": 'remote("nc-t1.ctf.example", 443, ssl=True, sni="nc-t1.ctf.example")'},
]
CASES: list[tuple[Any, list[dict[str, str]]]] = [
    ("tls://nc-t1.ctf.example:443", TLS_LINES),
    ("tcp://203.0.113.7:32768", [{"tool": "nc", "line": "nc 203.0.113.7 32768"},
                                 {"tool": "pwntools", "line": 'remote("203.0.113.7", 32768)'}]),
    ("tcp://[2001:db8::1]:4000", [{"tool": "nc", "line": "nc 2001:db8::1 4000"},
                                  {"tool": "pwntools", "line": 'remote("2001:db8::1", 4000)'}]),
    ("http://localhost:8080", []),
    ("https://web-t1.ctf.example/", []),
    (None, []),
    ('tls://evil";rm -rf /:443', []),          # nothing that breaks out of a quoted line
    ("tcp://host name:1", []),
]


def _client() -> ModuleType:
    path = ROOT / "integrations" / "ctfd" / "ctf_instancer" / "client.py"
    spec = importlib.util.spec_from_file_location("ctf_instancer_client_lines", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("url", "expected"), CASES)
def test_the_ctfd_modal_offers_each_client_line(url: Any, expected: list[dict[str, str]]) -> None:
    """tls:// gives ncat --ssl, openssl s_client with SNI and pwntools ssl; tcp:// gives nc."""
    assert _client().connection_lines(url) == expected


def test_the_dashboard_renders_the_same_lines() -> None:
    """connect.js (the team dashboard's) answers each address as the plugin does."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail("node is missing (CI=true: the suite does not skip what CI must run)")
        pytest.skip("node is missing: the dashboard's connect.js cannot be run")
    script = ("const {connectLines} = require(process.argv[1]);"
              "const urls = JSON.parse(process.argv[2]);"
              "console.log(JSON.stringify(urls.map((u) => connectLines(u))));")
    urls = [url for url, _ in CASES]
    out = subprocess.run([node, "-e", script, str(CONNECT_JS), json.dumps(urls)],
                         capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(out.stdout) == [expected for _, expected in CASES]
