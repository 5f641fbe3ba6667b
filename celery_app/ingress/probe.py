"""Readiness through the ingress: the instance answers through its own route.

An instance behind the ingress is ``running`` only once a request through Traefik, on the
instance's host name and past the gate, reaches it (SPEC §11: the route exists before the
instance is reported running). Traefik's API says whether it has loaded the route, which
tells its "no such host" 404 apart from the challenge's own.
"""

from __future__ import annotations

import http.client
import socket
import ssl

GATE_HEADER = "X-Ctf-Gate"
# A TCP backend that refused Traefik's connection shows as the TLS stream closing at once.
_TCP_SETTLE = 0.2


def route_loaded(status_host: str, status_port: int, router: str, protocol: str,
                 timeout: float = 1.0) -> bool:
    """Return whether Traefik has loaded the router ``router`` (from our file provider)."""
    kind = "tcp" if protocol == "tcp" else "http"
    conn = http.client.HTTPConnection(status_host, status_port, timeout=timeout)
    try:
        conn.request("GET", f"/api/{kind}/routers/{router}@file")
        response = conn.getresponse()
        response.read()
    except (OSError, http.client.HTTPException):
        return False
    else:
        return response.status == 200
    finally:
        conn.close()


def http_through(host: str, port: int, server_name: str, path: str, cookie: str | None,
                 timeout: float) -> bool:
    """Return whether ``GET path`` on ``server_name`` through Traefik reaches the challenge.

    Any answer below 500 that the gate did not make counts, like the direct probe.
    """
    headers = {"Host": server_name, "User-Agent": "ctf-instancer-probe"}
    if cookie is not None:
        headers["Cookie"] = cookie
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
    except (OSError, http.client.HTTPException):
        return False
    else:
        return response.status < 500 and response.getheader(GATE_HEADER) is None
    finally:
        conn.close()


def tls_through(host: str, port: int, server_name: str, timeout: float) -> bool:
    """Return whether a TLS connection with SNI ``server_name`` reaches a TCP challenge.

    Traefik completes the handshake, then connects to the container; when that fails it
    closes the connection at once. Data, or a connection still open a moment later, means
    the challenge accepted it.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # loopback to our own Traefik; any certificate
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.settimeout(_TCP_SETTLE)
            try:
                return tls.recv(1) != b""
            except TimeoutError:
                return True
    except OSError:  # refused, reset, or a TLS error (ssl.SSLError is one)
        return False
