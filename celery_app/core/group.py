"""An instance of several services (SPEC §12): its containers started in order, all or nothing.

A Compose challenge's instance is a group: one container per service, on the instance's own
network, where each service is reached by its name. :func:`start_group` starts the members in
the order given (``depends_on`` order, see :mod:`celery_app.core.compose`), waits before each
one until its dependencies meet their condition, then until every service runs (healthy, where
it has a health check; a one-shot service others wait to complete is done once it exits 0).
A wait wakes on the engine's own events of the group's containers (a health check's result, a
start, a death), so a service seen healthy is seen at once, not at the next look; a look every
``POLL`` seconds remains the floor, should the event stream be late or unavailable.

When any service fails, every container the call made is removed and :class:`StartFailed`
names the service and why, with its last output lines: nothing half-made is left behind. The
network is the caller's (it outlives a failed start when the instance had one before).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from celery_app.engine.driver import ContainerInfo, ContainerSpec, Driver
from celery_app.errors import CTFError, StartFailed

log = logging.getLogger(__name__)

Condition = Literal["service_started", "service_healthy", "service_completed_successfully"]
POLL = 0.2  # at most this many seconds between two looks at a container that is not there yet
LOG_LINES = 10


@dataclass(frozen=True)
class Member:
    """One service of a group: the container it is made of, and what it waits for first."""

    service: str
    spec: ContainerSpec
    depends_on: Mapping[str, Condition] = field(default_factory=dict)


class _Failed(Exception):
    """A service did not come up: which one, and why (turned into StartFailed)."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(service, reason)
        self.service, self.reason = service, reason


class _Changes:
    """Wakes a wait as soon as the engine reports an event of the group's containers.

    A thread follows the engine's event stream (filtered on the labels every member carries)
    and sets a flag on each event; :meth:`pause` returns when the flag is set or after the
    given seconds, whichever comes first. Without a stream (the engine refused it) it is a
    plain sleep: the waits fall back to looking every ``POLL`` s.
    """

    def __init__(self, driver: Driver, labels: dict[str, str]) -> None:
        self._changed = threading.Event()
        self._stream = None
        try:
            self._stream = driver.events(labels)
        except CTFError as exc:
            log.info("no event stream for a group start (%s): polling", exc)
            return
        threading.Thread(target=self._follow, name="group-events", daemon=True).start()

    def _follow(self) -> None:
        assert self._stream is not None
        with contextlib.suppress(Exception):  # a broken stream: the waits poll
            for _event in self._stream:
                self._changed.set()

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if an event came since the last pause."""
        self._changed.wait(seconds)
        self._changed.clear()

    def close(self) -> None:
        """Stop following the engine's events."""
        if self._stream is not None:
            self._stream.close()


def _common_labels(members: Sequence[Member]) -> dict[str, str]:
    """The labels every member carries (the instance's: team, challenge, start time)."""
    if not members:
        return {}
    shared = set(members[0].spec.labels.items())
    for member in members[1:]:
        shared &= set(member.spec.labels.items())
    return dict(shared)


def start_group(
    driver: Driver, members: Sequence[Member], *, timeout: float, what: str,
    clock: Callable[[], float] = time.monotonic, pause: Callable[[float], None] | None = None,
    started: Callable[[ContainerInfo], None] | None = None,
) -> dict[str, ContainerInfo]:
    """Start a group's containers in order; all of them run on return, or none is left.

    Args:
        driver: the engine.
        members: the services in start order (each one's dependencies come before it).
        timeout: seconds the whole group may take to run (and be healthy).
        what: the instance, for messages (``"shop for team t1"``).
        clock: monotonic seconds (tests pass their own).
        pause: sleeps between looks (tests pass their own); by default a look follows each
            engine event of the group's containers, and at least one every ``POLL`` s.
        started: called with each container right after it starts, before the next service
            (the egress guard's admission: a service allowed the internet has it while the
            services after it wait for its health).

    Returns:
        Each service's container as last seen, in start order.

    Raises:
        StartFailed: a service exited, turned unhealthy, or was not up within ``timeout``;
            the message names the service and the reason.
        CTFError: the engine refused (a name in use, no port left, engine trouble); the
            containers made so far are removed first.
    """
    if pause is None:
        # Subscribed before the first container exists: no event of the group is missed.
        changes = _Changes(driver, _common_labels(members))
        try:
            return start_group(driver, members, timeout=timeout, what=what, clock=clock,
                               pause=changes.pause, started=started)
        finally:
            changes.close()
    deadline = clock() + timeout
    made: dict[str, ContainerInfo] = {}
    one_shots = {dep for m in members for dep, cond in m.depends_on.items()
                 if cond == "service_completed_successfully"}
    try:
        for member in members:
            # 1. wait until each dependency meets its condition
            for dep, condition in member.depends_on.items():
                _wait(driver, made[dep], dep, condition, deadline, clock, pause)
            # 2. make and start the service's container
            made[member.service] = driver.run_container(member.spec)
            if started is not None:
                started(made[member.service])
        # 3. every service runs: healthy where checked, one-shots done
        for member in members:
            goal: Condition = ("service_completed_successfully"
                               if member.service in one_shots else "service_healthy")
            made[member.service] = _wait(driver, made[member.service], member.service,
                                         goal, deadline, clock, pause, lenient=True)
    except _Failed as exc:
        logs = _logs(driver, made.get(exc.service))
        _remove(driver, made)
        raise StartFailed(f"{what}: service {exc.service} {exc.reason}"
                          + (f"; its last output: {logs}" if logs else "")) from None
    except BaseException:
        _remove(driver, made)
        raise
    return made


def _wait(
    driver: Driver, info: ContainerInfo, service: str, condition: Condition, deadline: float,
    clock: Callable[[], float], pause: Callable[[float], None], *, lenient: bool = False,
) -> ContainerInfo:
    """Wait until ``service``'s container meets ``condition``; return it as last seen.

    ``lenient``: ``service_healthy`` of a container without a health check is met once it
    runs (the final check of every service; a ``depends_on`` asking for it is not).
    """
    while True:
        seen = driver.get_container(info.id)
        if seen is None:
            raise _Failed(service, "was removed while the instance started")
        done = _met(seen, service, condition, lenient)
        if done:
            return seen
        if clock() >= deadline:
            state = seen.health if seen.health == "starting" else seen.state
            raise _Failed(service, f"was not {_goal(condition)} in time (still {state})")
        pause(POLL)


def _met(seen: ContainerInfo, service: str, condition: Condition, lenient: bool) -> bool:
    """Whether ``seen`` meets ``condition`` (raise ``_Failed`` when it never will)."""
    exited = seen.state in ("exited", "dead")
    if condition == "service_completed_successfully":
        if exited:
            if seen.exit_code == 0:
                return True
            raise _Failed(service, f"exited with code {seen.exit_code}")
        return False
    if exited:
        raise _Failed(service, f"exited with code {seen.exit_code}"
                      + (" (out of memory)" if seen.oom_killed else ""))
    if seen.state != "running":
        return False
    if condition == "service_started":
        return True
    if seen.health is None:
        if lenient:
            return True
        raise _Failed(service, "has no healthcheck, but a service waits for it to be "
                               "healthy (depends_on: condition: service_healthy)")
    if seen.health == "unhealthy":
        raise _Failed(service, "is unhealthy (its healthcheck failed)")
    return seen.health == "healthy"


def _goal(condition: Condition) -> str:
    return {"service_started": "running", "service_healthy": "up and healthy",
            "service_completed_successfully": "done"}[condition]


def _logs(driver: Driver, info: ContainerInfo | None) -> str:
    if info is None:
        return ""
    try:
        text = driver.container_logs(info.id, tail=LOG_LINES)
    except Exception:  # noqa: BLE001  # the output only adorns the message
        return ""
    return " | ".join(line for line in text.strip().splitlines() if line.strip())[-600:]


def _remove(driver: Driver, made: Mapping[str, ContainerInfo]) -> None:
    """Remove what a failed start made, the last started first (already gone is fine)."""
    for info in reversed(list(made.values())):
        try:
            driver.remove_container(info.id)
        except Exception:  # noqa: BLE001, S112  # the janitor removes what is left
            continue

