"""The ingress's test machinery: a real Traefik from .venv, stand-in images, HTTP helpers.

Shared by tests/test_ingress.py and bench/bench_ingress.py, so both run the same Traefik,
configured by the product's own ``celery_app.ingress.setup.prepare``.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from celery_app.ingress.setup import prepare
from celery_app.settings import Settings
from ctf_testkit.support import wait_for

TRAEFIK = Path(sys.executable).parent / "traefik"
BUSYBOX = Path("/bin/busybox")

# Echoes the request headers it received (busybox httpd hands them to CGI as HTTP_*).
ECHO_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY index.html /www/index.html
COPY echo /www/cgi-bin/echo
EXPOSE 8080
ENTRYPOINT ["/bin/busybox"]
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""
ECHO_CGI = b"""#!/bin/busybox sh
echo "Content-Type: text/plain"
echo
/bin/busybox env
"""
# Juice Shop's health route, served like Juice Shop on port 3000.
JUICE_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY version /www/rest/admin/application-version
COPY index.html /www/index.html
EXPOSE 3000
ENTRYPOINT ["/bin/busybox"]
CMD ["httpd", "-f", "-p", "3000", "-h", "/www"]
"""
JUICE_VERSION = b'{"version":"17.1.1"}'
# A TCP challenge: an echo server on 9000 (busybox nc runs "cat" for each connection).
TCP_DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY busybox /bin/cat
EXPOSE 9000
ENTRYPOINT ["/bin/busybox", "nc", "-ll", "-p", "9000", "-e", "/bin/cat"]
"""


def image_files() -> dict[str, dict[str, bytes | Path]]:
    """The build contexts of the echo, juice and tcp stand-ins."""
    return {
        "echo": {"busybox": BUSYBOX, "index.html": b"hello from the echo challenge\n",
                 "echo": ECHO_CGI},
        "juice": {"busybox": BUSYBOX, "version": JUICE_VERSION,
                  "index.html": b"<title>OWASP Juice Shop</title>\n"},
        "tcp": {"busybox": BUSYBOX},
    }


DOCKERFILES = {"echo": ECHO_DOCKERFILE, "juice": JUICE_DOCKERFILE, "tcp": TCP_DOCKERFILE}


class Traefik:
    """A real Traefik (``.venv/bin/traefik``) configured from ``settings``, as the script does."""

    def __init__(self, settings: Settings, logfile: Path) -> None:
        self.settings = settings
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Write its configuration, start it, wait until it answers its ping."""
        config = prepare(self.settings, self.logfile)
        with self.logfile.open("ab") as log:
            # In the ingress folder, as the script runs it: the gate plugin loads from there.
            proc = subprocess.Popen([str(TRAEFIK), f"--configfile={config}"], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=config.parent)
        self.proc = proc
        host, port = self.settings.ingress_status_bind.rsplit(":", 1)
        wait_for(lambda: self._ping(host, int(port)) or proc.poll() is not None, 30, 0.1,
                 "Traefik to answer its ping")
        assert proc.poll() is None, self.logfile.read_text()[-3000:]

    @staticmethod
    def _ping(host: str, port: int) -> bool:
        try:
            return get(host, port, "/ping", {}).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it (its whole process group)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)


@dataclass
class Answer:
    """One HTTP answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    set_cookies: list[str]
    body: bytes

    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", "replace")


def get(host: str, port: int, path: str, headers: dict[str, str], *, tls_name: str | None = None,
        cafile: Path | None = None, method: str = "GET", timeout: float = 10,
        source: str | None = None) -> Answer:
    """Send one request to ``host:port`` (over TLS with SNI ``tls_name`` when given).

    ``source``: the local address to send from (e.g. ``127.0.0.2``: another loopback client).
    """
    if tls_name is not None:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        conn: http.client.HTTPConnection = _SNIConnection(host, port, tls_name, context, timeout)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                          source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()},
                      r.headers.get_all("Set-Cookie") or [], r.read())
    finally:
        conn.close()


class _SNIConnection(http.client.HTTPSConnection):
    """HTTPS to an address, with the TLS server name (and certificate check) of a host name."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.server_name = server_name
        self._ctx = context

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.server_name)
