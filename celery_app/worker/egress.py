"""The egress firewall keeper: the worker installs its pool's table and keeps it in place.

A reboot, ``nft flush ruleset`` or a deleted table is repaired within
:data:`~celery_app.engine.firewall.KEEP_INTERVAL` (:meth:`EgressGuard.keep
<celery_app.engine.firewall.EgressGuard.keep>`, one atomic ``nft -f`` transaction). The rules
stay when the worker stops: they must outlive it (and a crash).
"""

from __future__ import annotations

import logging
import time

from celery_app.engine.firewall import KEEP_INTERVAL, EgressGuard
from celery_app.errors import CTFError
from celery_app.worker.loop import Loop

log = logging.getLogger(__name__)


class EgressKeeper(Loop):
    """A daemon thread that runs :meth:`EgressGuard.keep` every :data:`KEEP_INTERVAL` s."""

    def __init__(self, guard: EgressGuard, interval: float = KEEP_INTERVAL) -> None:
        # The first pass is made by start() itself; the thread's first one an interval later.
        super().__init__(interval, name="egress-keeper", at_once=False)
        self.guard = guard

    def start(self) -> None:
        """Install now (logging why not, when it cannot), then keep it in the background."""
        if not self.guard.enforced:
            log.warning("egress firewall not kept by this worker: %s", self.guard.why_not)
            return
        self.run_once(time.time())
        super().start()
        fw = self.guard.firewall
        assert fw is not None
        log.info("egress firewall: keeping table inet %s for pool %s (checked every %g s)",
                 fw.table, fw.policy.pool, self.interval)

    def run_once(self, now: float) -> None:
        """Put the table back when it is not in place (a refusal is logged, not raised)."""
        try:
            self.guard.keep()
        except CTFError as exc:
            log.error(  # noqa: TRY400  # the detail says it all; no traceback
                "egress firewall not in place; starts are refused until it is: %s", exc.detail)
