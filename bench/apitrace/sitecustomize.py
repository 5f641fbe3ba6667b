"""Time every Docker Engine API call this process makes (bench only; issue 27).

Put this folder on ``PYTHONPATH`` and set ``CTF_BENCH_APITRACE`` to a file: each call of the
Docker SDK's ``APIClient`` (``_get``, ``_post``, ``_delete``, ``_put``) appends one line,
``method<TAB>path shape<TAB>HTTP status<TAB>seconds``, the path with ids and names replaced by
``*`` and no query string. ``bench_bulk.py herd --trace`` sets it for the worker and uses
:func:`install` for its own raw side.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

_SHAPES = [
    (re.compile(r"^.*?/v[0-9.]+/"), "/"),
    (re.compile(r"\?.*$"), ""),
    (re.compile(r"/images/.+/json$"), "/images/*/json"),
    (re.compile(r"/(containers|networks|images|volumes|exec)/(?!json$|create$|prune$)[^/]+"),
     r"/\1/*"),
]

_lock = threading.Lock()
_out: Any = None


def shape(url: str) -> str:
    """The call's path with ids and names as ``*``."""
    for pattern, repl in _SHAPES:
        url = pattern.sub(repl, url)
    return url


def switch(path: str | None) -> None:
    """Write the following calls' lines to ``path`` (``None``: stop writing)."""
    global _out  # noqa: PLW0603  # one trace file per process at a time
    with _lock:
        if _out is not None:
            _out.close()
        _out = open(path, "a", buffering=1) if path else None  # noqa: SIM115


def install(path: str | None = None) -> None:
    """Wrap the SDK's request methods (once); write to ``path`` if given."""
    from docker.api import client as api  # noqa: PLC0415  # only when tracing

    if not getattr(api.APIClient, "_ctf_traced", False):
        for name in ("_get", "_post", "_delete", "_put"):
            _wrap(api.APIClient, name)
        api.APIClient._ctf_traced = True  # type: ignore[attr-defined]
    if path:
        switch(path)


def _wrap(cls: Any, name: str) -> None:
    original = getattr(cls, name)

    def timed(self: Any, url: str, *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        status: Any = "error"
        try:
            response = original(self, url, *args, **kwargs)
            status = getattr(response, "status_code", "?")
            return response
        finally:
            took = time.perf_counter() - began
            with _lock:
                if _out is not None:
                    _out.write(f"{name[1:].upper()}\t{shape(url)}\t{status}\t{took:.4f}\n")

    setattr(cls, name, timed)


if os.environ.get("CTF_BENCH_APITRACE"):
    install(os.environ["CTF_BENCH_APITRACE"])
