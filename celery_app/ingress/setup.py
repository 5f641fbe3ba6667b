"""Prepare Traefik's files: static configuration, shared routes, certificate, gate plugin."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from celery_app.ingress import Ingress, routes
from celery_app.ingress.certs import ensure_certificate
from celery_app.settings import Settings

PLUGIN_SOURCE = Path(__file__).with_name("plugin") / "ctfgate"
# Traefik refuses a local plugin without these manifest fields.
_MANIFEST = {
    "displayName": "CTF instancer team gate",
    "type": "middleware",
    "import": routes.PLUGIN_MODULE,
    "summary": "Checks the instance's access cookie and strips it; asks the API about the rest",
    "testData": {"label": "example", "key": "A" * 43, "cookie": "ctf_ingress_access",
                 "secureCookie": "__Host-ctf_ingress_access",
                 "linkPrefix": "/_ctf/access/", "gate": "http://127.0.0.1:8000/_ingress/gate"},
}


def install_plugin(root: Path) -> Path:
    """Copy the gate plugin's Go source where Traefik (run in ``root``) loads it from.

    Traefik reads local plugins from ``./plugins-local/src/<module>/`` of its working
    directory, once at start-up: nothing is downloaded.

    Returns:
        The plugin's folder.
    """
    target = root / "plugins-local" / "src" / routes.PLUGIN_MODULE
    target.mkdir(parents=True, exist_ok=True)
    for source in PLUGIN_SOURCE.iterdir():
        if source.suffix in (".go", ".mod"):
            tmp = target / f".{source.name}.tmp"
            shutil.copyfile(source, tmp)
            tmp.replace(target / source.name)
    (target / ".traefik.yml").write_text(yaml.safe_dump(_MANIFEST, sort_keys=False),
                                         encoding="utf-8")
    return target


def prepare(settings: Settings, log_file: Path | None = None) -> Path:
    """Write everything Traefik starts with; return its static configuration file.

    Traefik must run in the returned file's folder (it loads the gate plugin from there).
    Idempotent: the certificate is kept while it still fits the domain, and the instance
    routes already in the dynamic folder are left as they are (Traefik serves them again).

    Raises:
        InvalidRequest: the organiser's certificate files are missing or do not fit.
    """
    ingress = Ingress(settings)
    ingress.dynamic_dir.mkdir(parents=True, exist_ok=True)
    ingress.dynamic_dir.chmod(0o700)  # routes hold their hosts' gate keys
    cert, key = ensure_certificate(settings, ingress.root)
    install_plugin(ingress.root)
    routes.write_atomically(ingress.dynamic_dir / routes.COMMON_FILE,
                            routes.common_config(settings, cert, key))
    static = ingress.root / "traefik.yml"
    routes.write_atomically(static, routes.static_config(settings, ingress.dynamic_dir.resolve(),
                                                         log_file))
    return static.resolve()
