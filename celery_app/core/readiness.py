"""Readiness probes: an instance is ``running`` only once its port answers (SPEC §4)."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable


def probe_once(host: str, port: int, protocol: str, path: str = "/", timeout: float = 2.0) -> bool:
    """Return whether the service answers once.

    HTTP: any response below 500 to ``GET path``. TCP: a connection is accepted.
    """
    if protocol == "tcp":
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "ctf-instancer-probe"})
        return conn.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_ready(
    host: str,
    port: int,
    protocol: str,
    path: str,
    timeout: float,
    still_alive: Callable[[], bool] | None = None,
    first_delay: float = 0.005,
    max_delay: float = 0.25,
) -> bool:
    """Poll until the service answers, the deadline passes, or ``still_alive()`` says no.

    The delay starts small and grows, so a fast service is seen running within milliseconds
    and a slow one is not hammered.

    Returns:
        ``True`` once it answered; ``False`` on timeout or when the container died.
    """
    return wait_until(
        lambda limit: probe_once(host, port, protocol, path, timeout=limit),
        timeout, still_alive, first_delay, max_delay,
    )


def wait_until(
    check: Callable[[float], bool],
    timeout: float,
    still_alive: Callable[[], bool] | None = None,
    first_delay: float = 0.005,
    max_delay: float = 0.25,
) -> bool:
    """Poll ``check(per_try_timeout)`` like :func:`wait_ready` (any probe: direct, ingress).

    Returns:
        ``True`` once it answered; ``False`` on timeout or when the container died.
    """
    deadline = time.monotonic() + timeout
    delay = first_delay
    checks = 0
    while True:
        if check(min(2.0, max(timeout, 0.1))):
            return True
        checks += 1
        # Asking Docker whether the container died costs a round trip: not on every poll.
        if still_alive is not None and checks % 4 == 0 and not still_alive():
            return False
        if time.monotonic() + delay > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, max_delay)
