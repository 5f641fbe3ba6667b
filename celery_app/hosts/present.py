"""How instances are shown: an instance whose host has no live worker is not shown running.

What the API and the status task present (SPEC §10): liveness is judged from the hosts'
heartbeats (:mod:`celery_app.hosts.liveness`); nothing is written, so when the worker is back,
so is the instance, as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from celery_app.hosts.liveness import heartbeats, liveness
from celery_app.state.store import StateStore
from celery_app.vocab.models import Instance


def present(
    instances: Iterable[Instance], store: StateStore, hosts: Iterable[str]
) -> list[dict[str, Any]]:
    """Return the instances as listings show them; ``host_up: false`` on a host that is down.

    ``hosts`` are the configured host names: liveness is judged over all of them (and the
    hosts the instances name), so "no heartbeat anywhere" is told apart from "this one is down".

    An instance whose host has no live worker is not shown as running: its ``status`` is
    ``failed`` (when it was starting or running) with an ``error`` that says why, and
    ``host_up`` is false (the field is there only then, like ``error``, so the instance of a
    live host is exactly SPEC §4's). Nothing is written: when the worker is back, so is the
    instance, as it was.
    """
    found = list(instances)
    return present_with(found, heartbeats(store, sorted({*hosts, *(i.host for i in found)})))


def present_with(
    found: Iterable[Instance], beats: Mapping[str, dict[str, Any] | None]
) -> list[dict[str, Any]]:
    """:func:`present`, with the heartbeats already read (:func:`~.liveness.parse_beats`).

    ``beats`` must hold every configured host and every host the instances name.
    """
    alive = liveness(beats)
    shown = []
    for inst in found:
        data = inst.public()
        if alive.get(inst.host, True):
            shown.append(data)
            continue
        data["host_up"] = False
        if inst.status in ("running", "starting"):
            data["status"] = "failed"
            data["error"] = (
                f"host {inst.host} is unreachable: its worker sends no heartbeat or its Docker "
                "engine does not answer. The container may still run there; the instance is "
                "shown again when the host is back"
            )
        shown.append(data)
    return shown
