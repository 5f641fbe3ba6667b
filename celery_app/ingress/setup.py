"""Prepare Traefik's files: static configuration, shared routes, certificate."""

from __future__ import annotations

from pathlib import Path

from celery_app.ingress import Ingress, routes
from celery_app.ingress.certs import ensure_certificate
from celery_app.settings import Settings


def prepare(settings: Settings, log_file: Path | None = None) -> Path:
    """Write everything Traefik starts with; return its static configuration file.

    Idempotent: the certificate is kept while it still fits the domain, and the instance
    routes already in the dynamic folder are left as they are (Traefik serves them again).

    Raises:
        InvalidRequest: the organiser's certificate files are missing or do not fit.
    """
    ingress = Ingress(settings)
    ingress.dynamic_dir.mkdir(parents=True, exist_ok=True)
    cert, key = ensure_certificate(settings, ingress.root)
    routes.write_atomically(ingress.dynamic_dir / routes.COMMON_FILE,
                            routes.common_config(settings, cert, key))
    static = ingress.root / "traefik.yml"
    routes.write_atomically(static, routes.static_config(settings, ingress.dynamic_dir.resolve(),
                                                         log_file))
    return static.resolve()
