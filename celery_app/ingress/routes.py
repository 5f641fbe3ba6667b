"""Traefik's configuration: the static file it starts with and the routes it watches.

Routes go through Traefik's file provider: one YAML file per instance in a directory
Traefik watches, written atomically (a temporary name Traefik ignores, then a rename), so
Traefik never reads half a file and is never restarted to learn of an instance. A shared
file holds what every route may use: the forwardAuth gate and the certificate.

With ``CTF_INGRESS_GATE=plugin`` (the default) a gated route carries its own middleware:
our Traefik plugin (:data:`PLUGIN_MODULE`, installed by :mod:`.setup`) with that host's
verification key only, so the files are written mode 0600 and a leaked one opens one host.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import yaml

from celery_app.ingress import tokens
from celery_app.settings import Settings

COMMON_FILE = "_common.yml"
GATE_MIDDLEWARE = "ctf-gate"
# The gate plugin: its name in Traefik's static configuration and its Go module path, under
# plugins-local/src/ in Traefik's working directory (the ingress folder).
PLUGIN_NAME = "ctfgate"
PLUGIN_MODULE = "ctf-instancer/ctfgate"
GATE_PATH = "/_ingress/gate"
# Headers the gate may rewrite on the way to the challenge: it answers them with our cookie
# (and our bearer tokens) removed and everything else as it came; absent means removed.
GATE_REWRITES = ("Cookie", "Authorization")
# Coalesces route changes of a burst of starts; a lone change is applied at once.
THROTTLE = "100ms"


def bind_parts(bind: str) -> tuple[str, int]:
    """Split ``host:port``; a wildcard host becomes loopback (where we connect)."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return host, int(port)


def gate_url(settings: Settings) -> str:
    """Return where Traefik reaches the gate: ``CTF_INGRESS_GATE_URL`` or the API's."""
    if settings.ingress_gate_url:
        return settings.ingress_gate_url
    host, port = bind_parts(settings.api_bind)
    return f"http://{host}:{port}{GATE_PATH}"


def static_config(settings: Settings, dynamic_dir: Path, log_file: Path | None) -> dict[str, Any]:
    """Return Traefik's static configuration (entry points, file provider, its API)."""
    # No tracing, metrics or access logs on the players' entry points: none is configured,
    # and Traefik wraps every request in their middlewares otherwise.
    quiet = {"accessLogs": False, "tracing": False, "metrics": False}
    # X-Forwarded-* headers are believed only from CTF_INGRESS_TRUSTED_PROXIES (a front proxy
    # that terminates TLS); Traefik replaces anyone else's with what it saw itself.
    forwarded = {"forwardedHeaders": {"trustedIPs": settings.ingress_trusted_networks}} \
        if settings.ingress_trusted_networks else {}
    config: dict[str, Any] = {
        "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
        "entryPoints": {
            "web": {"address": settings.ingress_http_bind, "observability": quiet, **forwarded},
            "websecure": {"address": settings.ingress_https_bind, "observability": quiet,
                          **forwarded},
            # Traefik's API and ping: loopback only, for route checks and start-up.
            "traefik": {"address": settings.ingress_status_bind},
        },
        "api": {"insecure": True, "dashboard": False},
        "ping": {"entryPoint": "traefik"},
        "providers": {
            "providersThrottleDuration": THROTTLE,
            "file": {"directory": str(dynamic_dir), "watch": True},
        },
        "log": {"level": "WARN"},
    }
    if uses_plugin(settings):
        # Loaded from ./plugins-local/src/<module> at start-up (Traefik runs in the ingress
        # folder); nothing is downloaded.
        config["experimental"] = {"localPlugins": {PLUGIN_NAME: {"moduleName": PLUGIN_MODULE}}}
    if log_file is not None:
        config["log"]["filePath"] = str(log_file)
    return config


def common_config(settings: Settings, cert: Path, key: Path) -> dict[str, Any]:
    """Return the shared dynamic configuration: the gate middleware and the certificate."""
    return {
        "http": {"middlewares": {GATE_MIDDLEWARE: {"forwardAuth": {
            "address": gate_url(settings),
            "authResponseHeaders": list(GATE_REWRITES),
            "trustForwardHeader": False,
            "maxResponseBodySize": 65536,
        }}}},
        "tls": {"stores": {"default": {"defaultCertificate": {
            "certFile": str(cert), "keyFile": str(key),
        }}}},
    }


def uses_plugin(settings: Settings) -> bool:
    """Whether gated routes use the plugin (``CTF_INGRESS_AUTH=team``, ``CTF_INGRESS_GATE``)."""
    return settings.ingress_auth == "team" and settings.ingress_gate == "plugin"


def plugin_config(settings: Settings, label: str) -> dict[str, Any]:
    """Return the gate plugin's configuration for one host: its label and its own key.

    The key is :func:`tokens.host_key` of the label: it checks (and could mint) tokens of
    this host only; the gate key that signs every host's tokens stays in our processes.
    """
    key = tokens.host_key(tokens.gate_key(settings.flag_secret_value()), label)
    config: dict[str, Any] = {
        "label": label, "key": tokens.encode_key(key), "cookie": tokens.COOKIE_NAME,
        "secureCookie": tokens.SECURE_COOKIE_NAME, "linkPrefix": tokens.LINK_PREFIX,
        "gate": gate_url(settings),
    }
    if settings.ingress_trusted_networks:
        config["trustedProxies"] = settings.ingress_trusted_networks
    return config


def router_name(label: str) -> str:
    """Return the Traefik router (and service) name of an instance."""
    return f"ctf-{label}"


def route_config(
    label: str, host: str, protocol: str, address: str, port: int, gated: bool,
    plugin: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return one instance's dynamic configuration.

    Args:
        label: the instance's host label (names the router and the service).
        host: ``<label>.<domain>``.
        protocol: ``http`` (HTTP and HTTPS entry points) or ``tcp`` (TLS with SNI on HTTPS).
        address: the container's IP on its team network.
        port: the challenge's container port.
        gated: put the team gate in front (``CTF_INGRESS_AUTH=team``).
        plugin: the gate plugin's configuration (:func:`plugin_config`) for a gate of this
            route's own; ``None``: the shared forwardAuth gate.
    """
    name = router_name(label)
    if protocol == "tcp":
        return {"tcp": {
            "routers": {name: {"rule": f"HostSNI(`{host}`)", "entryPoints": ["websecure"],
                               "service": name, "tls": {}}},
            "services": {name: {"loadBalancer": {"servers": [{"address": f"{address}:{port}"}]}}},
        }}
    middlewares = [GATE_MIDDLEWARE] if gated else []
    own: dict[str, Any] = {}
    if gated and plugin is not None:
        middlewares = [f"{GATE_MIDDLEWARE}-{label}"]
        own = {"middlewares": {middlewares[0]: {"plugin": {PLUGIN_NAME: plugin}}}}
    rule = f"Host(`{host}`)"
    return {"http": {
        **own,
        "routers": {
            name: {"rule": rule, "entryPoints": ["web"], "service": name,
                   "middlewares": middlewares},
            f"{name}-tls": {"rule": rule, "entryPoints": ["websecure"], "service": name,
                            "middlewares": middlewares, "tls": {}},
        },
        "services": {name: {"loadBalancer": {
            "servers": [{"url": f"http://{address}:{port}"}], "passHostHeader": True,
        }}},
    }}


def write_atomically(path: Path, config: dict[str, Any]) -> bool:
    """Write ``config`` as YAML to ``path`` (mode 0600) so a watcher never sees half of it.

    Returns:
        ``False`` when the file already said exactly that (nothing written, no reload).
    """
    text = yaml.safe_dump(config, sort_keys=True)
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # No .yml ending: Traefik skips it. 0600: a route may hold its host's gate key.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a stale temporary file keeps its mode through O_TRUNC
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    tmp.replace(path)
    return True


def remove(path: Path) -> bool:
    """Remove a route file; ``False`` when there was none."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False
