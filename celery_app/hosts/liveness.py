"""Which hosts are served: the workers' heartbeats, read and judged (SPEC §10).

Every worker keeps its host's heartbeat alive (:class:`celery_app.worker.heartbeat.Heartbeat`).
A host whose key has expired has no worker. When *no* host has a heartbeat (every worker down,
or Redis was just flushed) liveness is unknown: placement falls back to room alone (the start
waits in the queue) and instances are shown as recorded; ``/healthz`` then reports no worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from celery_app.state.store import StateStore


def heartbeats(store: StateStore, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
    """Return each host's last heartbeat (``{"worker", "at", "engine"}``), ``None`` if none."""
    names = list(names)
    if not names:
        return {}
    return parse_beats(dict(zip(names, store.heartbeats(names), strict=True)))


def parse_beats(raw: Mapping[str, str | None]) -> dict[str, dict[str, Any] | None]:
    """Decode raw heartbeats (``{host: JSON or None}``) as :func:`heartbeats` returns them."""
    beats: dict[str, dict[str, Any] | None] = {}
    for name, value in raw.items():
        try:
            beats[name] = json.loads(value) if value else None
        except ValueError:
            beats[name] = {"worker": "?", "at": None}
    return beats


def liveness(beats: Mapping[str, dict[str, Any] | None]) -> dict[str, bool]:
    """Return ``{host: alive}`` from :func:`heartbeats`; all alive when none has a heartbeat.

    No heartbeat at all means Redis was just flushed or every worker is down: we cannot tell
    which, so nothing is judged dead (``/healthz`` reports the missing workers). A worker
    whose Docker engine does not answer keeps beating with ``"engine": false``: its host is
    down, and that is known for certain.
    """
    if not any(beats.values()):
        return dict.fromkeys(beats, True)
    return {name: beat is not None and beat.get("engine", True) is not False
            for name, beat in beats.items()}
