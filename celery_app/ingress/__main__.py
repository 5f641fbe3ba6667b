"""``python -m celery_app.ingress prepare [--log FILE]``: write Traefik's files, print the path.

``python -m celery_app.ingress wait``: wait until the Traefik just started answers its ping.
Used by ``run-celery-worker.sh`` when ``CTF_INGRESS=traefik``.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
from pathlib import Path

from celery_app.errors import CTFError
from celery_app.ingress.routes import bind_parts
from celery_app.ingress.setup import prepare
from celery_app.settings import load_settings


def _ping(bind: str) -> bool:
    host, port = bind_parts(bind)
    conn = http.client.HTTPConnection(host, port, timeout=1)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m celery_app.ingress")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write Traefik's configuration; print its path")
    prep.add_argument("--log", type=Path, default=None, help="Traefik's log file")
    wait = sub.add_parser("wait", help="wait until Traefik answers its ping")
    wait.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.command == "prepare":
        try:
            print(prepare(settings, args.log))
        except CTFError as exc:
            print(f"error: {exc.detail}", file=sys.stderr)
            return 1
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if _ping(settings.ingress_status_bind):
            return 0
        time.sleep(0.1)
    print(f"error: Traefik did not answer on {settings.ingress_status_bind} within "
          f"{args.timeout:.0f} s; see its log", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
