"""Smoke test against a running worker: start an instance, show its status, stop it.

Usage: ./run-celery-test.sh [challenge] [team-id]     (default: todo-app team1)

It talks to the worker only through Celery, by task name, as a web platform would; the exit
status says whether every step worked.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1")


def _call(app: Celery, name: str, *args: str, timeout: float = 300, **kwargs: Any) -> Any:
    result = app.send_task(f"celery_app.tasks.{name}", args=list(args), kwargs=kwargs)
    last = None
    deadline = time.monotonic() + timeout
    while not result.ready():
        if result.state == "PROGRESS" and result.info != last:
            last = result.info
            print(f"   … {last}")
        if time.monotonic() > deadline:
            raise CeleryTimeout(f"{name} did not finish within {timeout} s")
        time.sleep(0.2)
    return result.get(timeout=5)


def main(argv: list[str]) -> int:
    """Run start, status and stop for one (challenge, team); return the exit status."""
    challenge = argv[1] if len(argv) > 1 else "todo-app"
    team = argv[2] if len(argv) > 2 else "team1"
    app = Celery(broker=BROKER, backend=BACKEND)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    try:
        if not app.control.ping(timeout=2.0):
            print("no worker answers: start one with ./run-celery-worker.sh", file=sys.stderr)
            return 1
        print(f"1. start_container({challenge!r}, {team!r})")
        began = time.monotonic()
        inst = _call(app, "start_container", challenge, team)
        print(f"   {inst['status']} in {time.monotonic() - began:.2f} s")
        print("2. get_container_status")
        status = _call(app, "get_container_status", team_id=team, challenge=challenge)
        for i in status["instances"]:
            print(f"   {i['container_name']}: {i['status']}")
            print(f"   url:     {i['url']}")
            print(f"   ports:   {i['ports']}")
            print(f"   expires: {i['expires_at']}")
        print("3. stop_container")
        print(f"   {_call(app, 'stop_container', challenge, team)['status']}")
    except Exception as exc:  # noqa: BLE001  # report any failure as the exit status
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        app.close()
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
