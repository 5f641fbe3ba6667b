"""The API's routes, one plain ``APIRouter`` per concern, in the order the app includes them.

- :mod:`.instances`: one team's instances (start, status, stop, extend: the admin or that team);
- :mod:`.admin`: the catalog, flag checks, warm pools, every instance, capacity (organisers);
- :mod:`.audit`: the audit trail and the shared flags (organisers, SPEC §13);
- :mod:`.health_checks`: the solvers' verdicts on each challenge (admin, SPEC §14);
- :mod:`.tasks`: a task's state (the team it concerns, or the admin);
- :mod:`.teams`: team tokens and their revocation (admin);
- :mod:`.operations`: ``/healthz``, ``/metrics`` (no token, or the metrics token), and the
  dashboard's static files at ``/``;
- the team gate's router lives with the gate, in :mod:`celery_app.ingress.gate`.
"""

from __future__ import annotations

from fastapi import APIRouter

from celery_app.api.routes import (
    admin,
    audit,
    health_checks,
    instances,
    operations,
    tasks,
    teams,
)

# Order matters only for OpenAPI's listing (no two routes share a path and method).
ROUTERS: tuple[APIRouter, ...] = (
    instances.router, admin.router, audit.router, health_checks.router, tasks.router,
    teams.router, operations.router,
)
