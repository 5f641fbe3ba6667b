"""The one place that starts and stops the loops of a worker process.

:func:`wire` connects two Celery signals: when the worker is ready, a
:class:`WorkerMachinery` starts, in this order,

1. the in-flight keeper (:mod:`celery_app.worker.inflight`): refresh what Celery still
   holds, redeliver what nobody holds;
2. the host's heartbeat (:mod:`celery_app.worker.heartbeat`): this worker's Docker host is
   served;
3. the event follower (:mod:`celery_app.worker.events`): the index follows the engine; it
   pokes the heartbeat whenever its stream opens or breaks, so the host's ``host_up`` follows
   within a second whatever the heartbeat's TTL;
4. a reconcile of the index from Docker's labels;
5. the egress firewall keeper (:mod:`celery_app.worker.egress`);
6. the canary loop (:mod:`celery_app.loops.canary`), when a challenge has a solver.

A step that fails is logged and the others still run. When the worker shuts down it stops
them: the heartbeat is withdrawn at once (starts go elsewhere while this worker is away), the
firewall's rules stay in place for the next worker (and after a crash).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from celery.signals import worker_ready, worker_shutdown

from celery_app.worker.inflight import InflightKeeper, held_by_worker

if TYPE_CHECKING:  # the app's import stays light: the rest is imported inside the worker
    from celery_app.core.service import InstanceService
    from celery_app.engine.driver import Driver
    from celery_app.engine.firewall import EgressGuard
    from celery_app.settings import Settings
    from celery_app.state.store import StateStore
    from celery_app.worker.egress import EgressKeeper
    from celery_app.worker.heartbeat import Heartbeat
    from celery_app.worker.loop import Loop

log = logging.getLogger(__name__)


class WorkerParts(Protocol):
    """What the loops are built from: the worker's context (``worker.context.Context``)."""

    settings: Settings
    driver: Driver
    store: StateStore
    service: InstanceService
    egress: EgressGuard | None


class WorkerMachinery:
    """The loops of one worker process.

    Args:
        app: the Celery application (the in-flight keeper uses its broker connection).
        context: returns this process's context (built on first use, inside the worker).
        consumer: the worker's consumer (``worker_ready``'s sender), whose held messages the
            in-flight keeper keeps fresh.

    """

    def __init__(self, app: Any, context: Callable[[], WorkerParts], consumer: Any = None) -> None:
        self.app = app
        self.context = context
        self.consumer = consumer
        self.inflight: InflightKeeper | None = None
        self.heartbeat: Heartbeat | None = None
        self.egress: EgressKeeper | None = None
        self.canary: Loop | None = None

    def start(self) -> None:
        """Start every loop (and reconcile the index), in the order of the module docstring."""
        self._keep_inflight()
        self._beat()
        self._follow_events()
        self._reconcile()
        self._keep_egress()
        self._prove_challenges()

    def stop(self) -> None:
        """Stop every loop; the heartbeat is withdrawn, the firewall's rules stay."""
        from celery_app.worker.events import stop_following  # noqa: PLC0415  # only inside the worker

        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.inflight is not None:
            self.inflight.stop()
        stop_following()
        if self.egress is not None:
            self.egress.stop()
        if self.canary is not None:
            self.canary.stop()

    # -- the steps ------------------------------------------------------------------------------

    def _keep_inflight(self) -> None:
        """Refresh what Celery still holds; redeliver what nobody holds."""
        consumer = self.consumer
        try:
            timeout = float(self.app.conf.broker_transport_options.get("visibility_timeout",
                                                                       3600))
            self.inflight = InflightKeeper(self.app, timeout,
                                           held=lambda: held_by_worker(consumer))
            self.inflight.start()
        except Exception:
            log.exception("cannot start the in-flight keeper; a dead worker's messages come "
                          "back only by kombu's own restore")

    def _beat(self) -> None:
        """Say in Redis that this worker's Docker host is served."""
        from celery_app.worker.heartbeat import Heartbeat  # noqa: PLC0415  # only inside the worker

        try:
            ctx = self.context()
            self.heartbeat = Heartbeat(ctx.store, ctx.service.host, ctx.settings.heartbeat_ttl,
                                       worker=getattr(self.consumer, "hostname", "") or "",
                                       engine_up=ctx.driver.ping)
            self.heartbeat.start()
        except Exception:
            log.exception("cannot start the host heartbeat; this host will look down")

    def _poke_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.poke()

    def _follow_events(self) -> None:
        """Keep the index true from the engine's events."""
        from celery_app.worker.events import start_following  # noqa: PLC0415  # only inside the worker

        try:
            # The heartbeat (started above) tells at once that the engine is back or gone:
            # its instances' host_up follows within a second, whatever the TTL.
            start_following(self.context().service, self._poke_heartbeat)
        except Exception:
            log.exception("cannot follow the engine's events; status reads will ask Docker")

    def _reconcile(self) -> None:
        """Rebuild the Redis index from Docker labels as soon as the worker is up."""
        try:
            summary = self.context().service.reconcile()
            log.info("worker ready; reconciled %s", summary.as_dict())
        except Exception:
            log.exception("reconcile at worker start failed; the janitor will retry")

    def _keep_egress(self) -> None:
        """Install the egress firewall for our pool now, and keep it while the worker runs."""
        from celery_app.worker.egress import EgressKeeper  # noqa: PLC0415  # only inside the worker

        try:
            ctx = self.context()
            for where in ctx.settings.unprotected_redis_urls():
                log.warning("Redis at %s has no password but is off loopback: anyone who reaches "
                            "it can send tasks; set requirepass and put it in the URL "
                            "(redis://:PASSWORD@host:6379/0)", where)
            if ctx.egress is not None:
                self.egress = EgressKeeper(ctx.egress)
                self.egress.start()
        except Exception:
            log.exception("cannot start the egress firewall keeper; starts check it themselves")

    def _prove_challenges(self) -> None:
        """Keep the solvers' canaries and run the solvers (SPEC §14), if any is configured."""
        from celery_app.loops.canary import CanaryLoop  # noqa: PLC0415  # only inside the worker

        try:
            loop = CanaryLoop(self.context().service)
            if loop.solvers():
                self.canary = loop
                loop.start()
        except Exception:
            log.exception("cannot start the canary loop; the solvers do not run")


_machinery: WorkerMachinery | None = None  # this process's, once its worker is ready


def wire(app: Any, context: Callable[[], WorkerParts]) -> None:
    """Start the machinery when this process's worker is ready; stop it when it shuts down.

    Args:
        app: the Celery application.
        context: returns this process's context (:func:`celery_app.worker.context.get_context`),
            called only once the worker is ready.

    """

    def on_ready(sender: Any = None, **_kwargs: Any) -> None:
        global _machinery  # noqa: PLW0603  # one per worker process
        if _machinery is None:
            _machinery = WorkerMachinery(app, context, sender)
            _machinery.start()

    def on_shutdown(**_kwargs: Any) -> None:
        if _machinery is not None:
            _machinery.stop()

    # Strong references: the two handlers live as long as the app (Celery keeps weak ones).
    worker_ready.connect(on_ready, weak=False, dispatch_uid="ctf-worker-machinery-start")
    worker_shutdown.connect(on_shutdown, weak=False, dispatch_uid="ctf-worker-machinery-stop")
