"""Control signals: how a layer says "not here" or "not now"; they are not errors.

A signal never reaches a user as it is. The task that catches it carries the request on:
:class:`OnOtherHost` hands it to that host's queue, :class:`InstanceBusy` retries it later.
Only when that is no longer possible does the task (or the dispatcher) end the request with an
error of :mod:`celery_app.errors` (``errors.InstanceBusy``, code ``instance_busy``, 409), so what
the API and the result backend show is unchanged.

They sit on the ground floor, beside the other shared vocabulary: the state store raises
them, the service and the loops raise and catch them, the tasks catch them.
"""

from __future__ import annotations

from celery_app.errors import CTFError


class ControlSignal(Exception):
    """Base of the control signals: the request goes on elsewhere or later, it did not fail."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class OnOtherHost(ControlSignal):
    """The instance lives on another Docker host than the worker asked to act.

    Tasks catch it and hand the request to that host's queue (SPEC §10).

    Args:
        detail: what was found, for the log.
        host: the host whose worker acts on the instance.
    """

    def __init__(self, detail: str, host: str = "") -> None:
        super().__init__(detail)
        self.host = host


class InstanceBusy(ControlSignal):
    """Another operation holds the instance's (or the team network's) lock: try again later."""


# What a step that may fail or be told "not here / not now" raises, caught in one place where
# either only means "leave it for the next pass" (the janitor, reconcile, a failed start's
# clean-up): an error of the one error tree, or a control signal.
ERROR_OR_SIGNAL: tuple[type[Exception], ...] = (CTFError, ControlSignal)
