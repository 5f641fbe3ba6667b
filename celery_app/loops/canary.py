"""Solver health checks (SPEC §14): a canary instance per challenge, proven by its solver.

For every challenge whose catalog entry has a ``solver:`` block, :class:`CanaryLoop` keeps an
instance for the reserved team ``canary`` (made by :meth:`InstanceService.start
<celery_app.core.service.InstanceService.start>`, the path every team's start takes: the same
hardening, network rules and egress firewall) and runs the solver's container against it:

- at once when the canary is (re)made, then every ``interval`` seconds; a pool drain
  (``ctfctl pool drain``, ``POST /api/v1/pools/{challenge}/drain``: an image update), or a
  pull or rebuild that gives one of its images' names another image on its host, makes the
  canary again and proves it at once;
- on the canary's own team network, hardened like an instance (every capability dropped,
  ``no-new-privileges``, memory, CPU and pid limits, a read-only root), without the
  ``ctf.egress=internet`` label: the egress firewall lets it reach its network and nothing
  else (no host address, no internet);
- with ``CTF_TARGET_URL``, ``CTF_TARGET_HOST`` (the canary's address on that network) and
  ``CTF_TARGET_PORT`` (the challenge's container port).

A Compose challenge (SPEC §12) works the same way: its canary is a whole group, the targets
are its primary endpoint's (the primary service's address, the endpoint's port and protocol),
and the solver joins the instance's own network (``ctf-inst-<challenge>.canary``, or a
claimed warm-pool slot's), where every service answers to its name (``db``) as it does to
its siblings. A pool drain removes the whole group; the start that follows makes it anew.

A run passes when the solver exits 0 within its timeout and its output contains the canary's
flag (with the solver's ``flag_name``, the app's in-app flag of that name computed from the
canary's key, as Juice Shop computes it; with ``given_flag``, the solver gets the flag in
``CTF_FLAG``); a solver still running at its timeout is killed. The solver's container carries our
labels and ``ctf.role=solver`` and is always removed. The outcome (``ok``/``broken``, the last
output lines with the flag masked, when, how long) is kept in Redis (:class:`SolverResults`),
read by ``GET /api/v1/health/challenges``, ``ctfctl challenges`` and the API's metrics.

One worker per host runs the loop's passes (a Redis lock per host); a canary lives on the host
whose worker made it, and that host's worker proves it: each verdict records that host
(``host`` in ``GET /api/v1/health/challenges``), the host whose instances it vouches for.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from celery_app.core.catalog import Challenge, Solver
from celery_app.core.flags import in_app_flag
from celery_app.core.service import InstanceService
from celery_app.engine.driver import ContainerInfo, ContainerSpec, Filesystem
from celery_app.errors import CTFError, StartFailed
from celery_app.state.store import one_at_a_time
from celery_app.vocab.models import Instance, InstanceKey
from celery_app.vocab.naming import (
    CANARY_TEAM,
    LABEL_CHALLENGE,
    LABEL_EGRESS,
    LABEL_ROLE,
    LABEL_SERVICE,
    LABEL_TEAM,
    ROLE_SOLVER,
    SOLVER_NAME_PREFIX,
)
from celery_app.vocab.signals import ERROR_OR_SIGNAL, OnOtherHost
from celery_app.worker.loop import Loop

log = logging.getLogger(__name__)

# Seconds between passes: a killed canary is re-made (and proven) within about this long.
PASS_INTERVAL = 5.0
# The output lines kept of a run.
OUTPUT_LINES = 20
# Output lines read to look for the flag (a solver may print it before a long epilogue).
SEARCHED_LINES = 2000
# What a solver's container may use: enough for a script or a small client.
SOLVER_MEMORY = 256 * 1024**2
SOLVER_NANO_CPUS = 1_000_000_000
SOLVER_PIDS = 128
SOLVER_TMPFS = {"/tmp": 64 * 1024**2}  # noqa: S108  # a tmpfs inside the container
# Seconds between looks at a running solver.
POLL = 0.25
@dataclass
class Outcome:
    """One solver run's verdict."""

    passed: bool
    output: list[str]
    seconds: float
    why: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class CanaryLoop(Loop):
    """Keeps each solver's canary on this host and runs the solver against it.

    Args:
        service: this host's instance service (its start path makes the canaries).
        interval: seconds between passes.
    """

    def __init__(self, service: InstanceService, interval: float = PASS_INTERVAL) -> None:
        super().__init__(interval, name="canary")
        self.service = service
        self.results = service.store.solvers
        self._trouble: dict[str, str] = {}  # challenge -> the last trouble logged

    def solvers(self) -> list[Challenge]:
        """The challenges with a solver."""
        return [ch for ch in self.service.catalog if ch.solver is not None]

    def run_once(self, now: float) -> None:
        """Make or re-make each canary of this host, and run the solvers that are due."""
        checked = self.solvers()
        if not checked:
            return
        # Held for the longest thing one challenge's turn may take, renewed at each turn.
        hold = max(ch.start_timeout + ch.solver.timeout for ch in checked  # type: ignore[union-attr]
                   ) + 60
        lock = self.service.store.canary_lock(self.service.host, hold)
        with one_at_a_time(lock, "canary") as mine:
            if not mine:
                return  # another worker of this host runs the passes
            for ch in checked:
                if self.stopping:
                    return
                try:
                    lock.reacquire()
                    self.check(ch, time.time())
                except ERROR_OR_SIGNAL as exc:
                    # Once per kind of trouble, not every pass (a full host stays full).
                    if self._trouble.get(ch.id) != str(exc):
                        log.warning("canary of %s: %s; tried again every %g s", ch.id, exc,
                                    self.interval)
                    self._trouble[ch.id] = str(exc)
                else:
                    self._trouble.pop(ch.id, None)

    def check(self, ch: Challenge, now: float) -> None:
        """One challenge's turn: keep its canary running; run its solver when due."""
        solver = ch.solver
        assert solver is not None
        svc = self.service
        before = self.results.get(ch.id)
        record = svc.store.get(ch.id, CANARY_TEAM)
        if record is not None and record.host != svc.host:
            return  # another host's canary: its worker proves it
        info = self._running(record)
        if info is not None and before and (why := self._outdated(ch, info, before)):
            # The canary is made again, from the images as they are now, and proven at once.
            log.info("canary of %s: made again after %s", ch.id, why)
            if ch.is_group:  # every service of it: the new group is made whole
                svc.specs.remove_group(ch.id, CANARY_TEAM, svc.egress)
            else:
                svc.driver.remove_container(info.id)
            info = None
        if info is None:
            if before.get("made_failed") == "1" and now < float(before["at"]) + solver.interval:
                return  # it could not be made: try again at the next interval, not each pass
            try:
                record = svc.start(InstanceKey(ch.id, CANARY_TEAM), count_rate=False)
            except OnOtherHost:
                return
            except StartFailed as exc:
                self._verdict(ch, before, Outcome(False, [exc.detail], 0.0), now, "",
                              made_failed=True)
                return
            info = self._running(record)
            if info is None:
                return  # died at once: the next pass makes it again
        due = (not before or before.get("canary") != info.id
               or now >= float(before.get("at", 0)) + solver.interval)
        if not due:
            return
        outcome = self.run_solver(ch, solver, record, info)  # type: ignore[arg-type]
        self._verdict(ch, before, outcome, now, info.id)

    def _outdated(self, ch: Challenge, info: ContainerInfo, before: dict[str, str]
                  ) -> str | None:
        """Why the running canary is to be made again, or ``None`` while it is current.

        A pool drain since its last run (an organiser's image update), or an image of it
        whose name now gives another image here (a ``ctfctl pull``, a ``docker pull`` or a
        rebuild on this host): the canary must prove what a team's next start would get.
        """
        svc = self.service
        if svc.store.pools.drained_at(ch.id) > float(before.get("at", 0)):
            return "a pool drain"
        members = svc.specs.group_of(ch.id, CANARY_TEAM) if ch.app is not None else [info]
        for member in members:
            try:
                image = ch.image if ch.app is None else \
                    ch.app.service(member.labels.get(LABEL_SERVICE, "")).image
            except KeyError:  # not a service of the file as it is now: the group is remade
                return "a service no longer in the file"
            now = svc.driver.image_id(image)
            if member.image_id and now is not None and now != member.image_id:
                return f"a new image {image}"
        return None

    def _running(self, record: Instance | None) -> ContainerInfo | None:
        """The canary's container when its record says running and it runs; else ``None``."""
        if record is None or record.status != "running" or not record.container_id:
            return None
        info = self.service.driver.get_container(record.container_id)
        return info if info is not None and info.state == "running" else None

    def _verdict(self, ch: Challenge, before: dict[str, str], outcome: Outcome, now: float,
                 canary: str, *, made_failed: bool = False) -> None:
        """Record the outcome; log a turn to broken (WARNING) or back to ok (INFO)."""
        state = "ok" if outcome.passed else "broken"
        self.results.save(ch.id, state, outcome.output, at=now,
                          seconds=None if made_failed else outcome.seconds, canary=canary,
                          made_failed=made_failed, host=self.service.host)
        was = before.get("state", "unknown")
        if state == "broken" and was != "broken":
            log.warning("challenge %s is broken: its solver %s (last output: %s)", ch.id,
                        outcome.why or "failed", " | ".join(outcome.output[-3:]))
        elif state == "ok" and was != "ok":
            log.info("challenge %s is %s: its solver passed in %.1f s", ch.id,
                     "healthy again" if was == "broken" else "healthy", outcome.seconds)

    def run_solver(self, ch: Challenge, solver: Solver, record: Instance,
                   canary: ContainerInfo) -> Outcome:
        """Run the solver's container against the canary once; always remove it.

        Returns:
            Whether it exited 0 within its timeout with the canary's flag in its output.
        """
        svc, driver = self.service, self.service.driver
        networks: dict[str, Any] = canary.attrs.get("NetworkSettings", {}).get("Networks") or {}
        network, address = next(((name, (net or {}).get("IPAddress") or "")
                                 for name, net in networks.items()), ("", ""))
        if not network or not address:
            return Outcome(False, ["the canary has no network address"], 0.0,
                           "could not be run")
        # A Compose challenge's target is its primary endpoint (SPEC §14): the record's
        # container is the primary service's, its port and protocol the endpoint's.
        port = svc.specs.container_port(ch)
        protocol = ch.app.primary.protocol if ch.app is not None else ch.protocol
        key = svc.flag_for(InstanceKey(ch.id, CANARY_TEAM))
        # Juice Shop's kind of app shows flags it computes from its key, never the key.
        flag = in_app_flag(key, solver.flag_name) if solver.flag_name else key
        svc.egress.require()  # fail closed, as a start does: no solver without the firewall
        if not driver.image_present(solver.image):
            try:
                driver.pull(solver.image)
            except CTFError as exc:
                # A verdict, judged again at the next interval (not a pull every pass): the
                # shipped solvers are built on each host, never pulled (examples/solvers).
                return Outcome(False, [f"the solver image {solver.image} is not on this host "
                                       f"and could not be pulled: {exc.detail}; build or "
                                       "load it on every Docker host (the shipped ones: "
                                       "examples/solvers/build.sh)"], 0.0, "could not be run")
        scheme = "http" if protocol == "http" else "tcp"
        env = {"CTF_TARGET_URL": f"{scheme}://{address}:{port}/",
               "CTF_TARGET_HOST": address, "CTF_TARGET_PORT": str(port)}
        if solver.given_flag:
            env["CTF_FLAG"] = flag
        spec = ContainerSpec(
            name=f"{SOLVER_NAME_PREFIX}{ch.id}-{time.time_ns() // 1_000_000}",
            image=solver.image, port=None, team_id=CANARY_TEAM,
            labels={**svc.scope_labels, LABEL_CHALLENGE: ch.id, LABEL_TEAM: CANARY_TEAM,
                    LABEL_ROLE: ROLE_SOLVER, LABEL_EGRESS: "none"},
            env=env,
            memory_bytes=SOLVER_MEMORY, nano_cpus=SOLVER_NANO_CPUS, pids=SOLVER_PIDS,
            cap_add=[], publish_ip=svc.settings.publish_ip or "", command=solver.command,
            filesystem=Filesystem(read_only=True, tmpfs=dict(SOLVER_TMPFS)), publish=False,
            network=network,
        )
        began = time.monotonic()
        info = driver.run_container(spec)
        try:
            timed_out, exit_code = self._wait(info.id, began + solver.timeout)
            seconds = time.monotonic() - began
            text = ""
            try:
                text = driver.container_logs(info.id, tail=SEARCHED_LINES)
            except CTFError as exc:
                text = f"(its output could not be read: {exc})"
        finally:
            try:
                driver.remove_container(info.id)
            except CTFError as exc:  # the janitor removes it later (it carries our labels)
                log.warning("solver container %s not removed: %s", spec.name, exc)
        # An app's in-app flag is hex, which a solver may print in either case.
        found = flag in text or (solver.flag_name is not None and flag in text.lower())
        hidden = re.compile("|".join(re.escape(f) for f in {flag, key}), re.IGNORECASE)
        lines = [hidden.sub("[flag]", line) for line in text.splitlines()][-OUTPUT_LINES:]
        if timed_out:
            why = f"was still running at its timeout ({solver.timeout:g} s) and was killed"
        elif exit_code != 0:
            why = f"exited with code {exit_code}"
        elif not found:
            why = "exited 0 but did not print the canary's flag"
        else:
            return Outcome(True, lines, seconds)
        return Outcome(False, lines, seconds, why)

    def _wait(self, container: str, deadline: float) -> tuple[bool, int | None]:
        """Wait for the container to end; kill it at ``deadline``: ``(timed out, exit code)``."""
        driver = self.service.driver
        while True:
            info = driver.get_container(container)
            if info is None:
                return False, None
            if info.state in ("exited", "dead"):
                return False, info.exit_code
            if time.monotonic() >= deadline or self.stopping:
                driver.kill_container(container)
                return True, None
            time.sleep(POLL)
