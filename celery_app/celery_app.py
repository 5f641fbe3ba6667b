"""The Celery application, importable as ``celery_app.celery_app:app``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from celery_app.loops.inflight import InflightKeeper, held_by_worker

app = Celery("ctf_instancer", include=["celery_app.tasks"])
app.config_from_object("celery_app.celery_config")

log = logging.getLogger(__name__)


# Tasks whose every call would otherwise be two INFO lines: the beat's passes (every few
# seconds) and status reads (a platform polls every team's instances every few seconds).
_ROUTINE = ("celery_app.tasks.reap_expired", "celery_app.tasks.refill_pools",
            "celery_app.tasks.get_container_status")


class _QuietRoutineTasks(logging.Filter):
    """Drop Celery's received/succeeded lines of routine tasks (:data:`_ROUTINE`).

    They say nothing: a janitor or pool pass that did something logs its own summary, and a
    status read is logged at DEBUG. A failing call is logged by Celery at ERROR, which this
    lets through. Celery passes the task's name in the record's arguments, so the line (with
    the whole result in it) is not even formatted.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        args = record.args
        if isinstance(args, Mapping):
            return args.get("name") not in _ROUTINE
        message = record.getMessage()  # the beat's "Sending due task …" lines
        return not any(name in message for name in _ROUTINE)


for _name in ("celery.worker.strategy", "celery.app.trace", "celery.beat"):
    logging.getLogger(_name).addFilter(_QuietRoutineTasks())

_heartbeat: Any = None
_keeper: InflightKeeper | None = None


@worker_ready.connect
def _start_keeper(sender: Any = None, **_kwargs: Any) -> None:
    """Refresh what Celery still holds; redeliver what nobody holds (celery_app.loops.inflight)."""
    global _keeper  # noqa: PLW0603  # one per worker process
    if _keeper is None:
        timeout = float(app.conf.broker_transport_options.get("visibility_timeout", 3600))
        _keeper = InflightKeeper(app, timeout, held=lambda: held_by_worker(sender))
        _keeper.start()


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    """Say in Redis that this worker's Docker host is served (see celery_app.hosts.placement)."""
    global _heartbeat  # noqa: PLW0603  # one per worker process
    from celery_app.context import get_context  # noqa: PLC0415  # only inside the worker
    from celery_app.worker.heartbeat import Heartbeat  # noqa: PLC0415

    try:
        ctx = get_context()
        _heartbeat = Heartbeat(ctx.store, ctx.service.host, ctx.settings.heartbeat_ttl,
                               worker=getattr(sender, "hostname", "") or "",
                               engine_up=ctx.driver.ping)
        _heartbeat.start()
    except Exception:
        log.exception("cannot start the host heartbeat; this host will look down")


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs: Any) -> None:
    """Withdraw the heartbeat at once, so starts go elsewhere while this worker is away."""
    if _heartbeat is not None:
        _heartbeat.stop()
    if _keeper is not None:
        _keeper.stop()
    from celery_app.loops.events import stop_following  # noqa: PLC0415  # only inside the worker

    stop_following()


@worker_ready.connect
def _follow_events(**_kwargs: Any) -> None:
    """Keep the index true from the engine's events (see celery_app.loops.events)."""
    from celery_app.context import get_context  # noqa: PLC0415  # only inside the worker
    from celery_app.loops.events import start_following  # noqa: PLC0415

    try:
        # The heartbeat (started by the handler above) tells at once that the engine is
        # back or gone: its instances' host_up follows within a second, whatever the TTL.
        start_following(get_context().service,
                        lambda: _heartbeat.poke() if _heartbeat is not None else None)
    except Exception:
        log.exception("cannot follow the engine's events; status reads will ask Docker")


@worker_ready.connect
def _reconcile_on_start(sender: Any = None, **_kwargs: Any) -> None:
    """Rebuild the Redis index from Docker labels as soon as a worker is up."""
    from celery_app.context import get_context  # noqa: PLC0415  # only inside the worker

    try:
        summary = get_context().service.reconcile()
        log.info("worker ready; reconciled %s", summary.as_dict())
    except Exception:
        log.exception("reconcile at worker start failed; the janitor will retry")


_egress_keeper: Any = None


@worker_ready.connect
def _keep_egress_firewall(**_kwargs: Any) -> None:
    """Install the egress firewall for our pool now, and keep it while the worker runs."""
    global _egress_keeper  # noqa: PLW0603  # one per worker process
    from celery_app.context import get_context  # noqa: PLC0415  # only inside the worker
    from celery_app.engine.firewall import EgressKeeper  # noqa: PLC0415

    try:
        ctx = get_context()
        for where in ctx.settings.unprotected_redis_urls():
            log.warning("Redis at %s has no password but is off loopback: anyone who reaches "
                        "it can send tasks; set requirepass and put it in the URL "
                        "(redis://:PASSWORD@host:6379/0)", where)
        if ctx.egress is not None:
            _egress_keeper = EgressKeeper(ctx.egress)
            _egress_keeper.start()
    except Exception:
        log.exception("cannot start the egress firewall keeper; starts check it themselves")


@worker_shutdown.connect
def _stop_egress_keeper(**_kwargs: Any) -> None:
    """Stop keeping the rules; they stay in place for the next worker (and after a crash)."""
    if _egress_keeper is not None:
        _egress_keeper.stop()
