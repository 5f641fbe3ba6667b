"""The ingress (SPEC §11): every instance under its own host name, behind Traefik.

``CTF_INGRESS=traefik`` puts Traefik in front of the instances: containers publish no host
port, each instance gets a route ``<label>.<CTF_INSTANCE_DOMAIN>`` (Traefik's file
provider, see :mod:`.routes`), and the team gate lets only the owning team and organisers
through: our Traefik plugin checks the access cookie in Traefik and hands everything else
to the API's gate (:mod:`.gate`), which is also the forwardAuth fallback
(``CTF_INGRESS_GATE=forwardauth``). :class:`Ingress` is what the service and the API use;
``python -m celery_app.ingress prepare`` writes Traefik's configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery_app.ingress import probe, routes, tokens
from celery_app.ingress.labels import instance_host, instance_label
from celery_app.settings import Settings
from celery_app.vocab.naming import CONTAINER_NAME_PREFIX, ROUTE_PORT_SEP


def _no_revocations(_team_id: str) -> int:
    return 0


@dataclass
class Ingress:
    """One process's view of the ingress, built from the settings.

    Args:
        settings: the settings (``load_settings()``: the flag secret must be set).
        generation: returns a team's access generation (the workers pass the state
            store's): labels change with it, which revokes the team's links and cookies.
            The API only reads hosts from instances' ``url`` and needs none.
    """

    settings: Settings
    generation: Callable[[str], int] = _no_revocations

    @property
    def enabled(self) -> bool:
        """Whether instances are behind Traefik (``CTF_INGRESS=traefik``)."""
        return self.settings.ingress == "traefik"

    @property
    def gated(self) -> bool:
        """Whether the team gate is on (``CTF_INGRESS_AUTH=team``)."""
        return self.settings.ingress_auth == "team"

    @property
    def root(self) -> Path:
        """The folder of Traefik's configuration, certificate and routes."""
        return self.settings.data_dir / "ingress"

    @property
    def dynamic_dir(self) -> Path:
        """The folder Traefik watches for routes."""
        return self.root / "dynamic"

    def _secret(self) -> str:
        return self.settings.flag_secret_value()

    def label(self, challenge: str, team_id: str, protocol: str, started_at: str,
              generation: int | None = None, endpoint: str = "") -> str:
        """Return the instance's host label (unguessable).

        An HTTP instance's is the same for its (challenge, team) until the team's access is
        revoked; a TCP instance's also changes with each new instance (``started_at``): its
        name is its only gate (see :mod:`.labels`). ``generation``: the team's access
        generation when the caller has read it already (else it is read now).
        ``endpoint``: a Compose instance's endpoint other than its primary one
        (:func:`~celery_app.ingress.labels.endpoint_key`), which has a host of its own.
        """
        if generation is None:
            generation = self.generation(team_id)
        return instance_label(self._secret(), challenge, team_id, generation,
                              started_at if protocol == "tcp" else "", endpoint)

    def host(self, challenge: str, team_id: str, protocol: str, started_at: str,
             generation: int | None = None, endpoint: str = "") -> str:
        """Return ``<label>.<CTF_INSTANCE_DOMAIN>``."""
        return instance_host(
            self.label(challenge, team_id, protocol, started_at, generation, endpoint),
            self.settings.instance_domain)

    def url(self, challenge: str, team_id: str, protocol: str, *, started_at: str,
            generation: int | None = None, endpoint: str = "") -> str:
        """Return the instance's ``url``: ``http(s)://host[:port]/`` or ``tls://host:port``.

        ``endpoint``: a Compose instance's non-primary endpoint (its own host, see
        :meth:`label`).
        """
        host = self.host(challenge, team_id, protocol, started_at, generation, endpoint)
        _, https_port = routes.bind_parts(self.settings.ingress_https_bind)
        if protocol == "tcp":
            return f"tls://{host}:{https_port}"
        # With the organiser's own certificate players get HTTPS; a self-signed one would
        # only show them a warning, so plain HTTP is the default link then.
        if self.settings.ingress_cert_file is not None:
            return f"https://{host}{'' if https_port == 443 else f':{https_port}'}/"
        _, http_port = routes.bind_parts(self.settings.ingress_http_bind)
        return f"http://{host}{'' if http_port == 80 else f':{http_port}'}/"

    # -- routes (the worker on the Docker host) ----------------------------------------------

    def route_file(self, container_name: str) -> Path:
        """Return the route file of an instance's container (or of an endpoint's route).

        ``container_name``: a container's name, or an endpoint's route name
        (:func:`~celery_app.vocab.naming.endpoint_route_name`).
        """
        return self.dynamic_dir / f"{container_name}.yml"

    def add_route(self, container_name: str, challenge: str, team_id: str, protocol: str,
                  address: str, port: int, *, started_at: str,
                  generation: int | None = None, endpoint: str = "") -> bool:
        """Write (or replace) the instance's route; Traefik loads it within a moment.

        The file is named after the container: a new label (a revocation) replaces the old
        host's route, whose host then answers 404. A Compose instance's other endpoints
        pass their route name (``<container>@<port>``) and ``endpoint`` (their own host).

        Returns:
            Whether the file changed.
        """
        label = self.label(challenge, team_id, protocol, started_at, generation, endpoint)
        plugin = routes.plugin_config(self.settings, label) \
            if routes.uses_plugin(self.settings) else None
        config = routes.route_config(label, instance_host(label, self.settings.instance_domain),
                                     protocol, address, port, self.gated, plugin)
        return routes.write_atomically(self.route_file(container_name), config)

    def remove_route(self, container_name: str) -> bool:
        """Remove the instance's route: its host answers 404 once Traefik reloads."""
        return routes.remove(self.route_file(container_name))

    def remove_routes(self, container_name: str) -> bool:
        """Remove every route of a container: its own and its endpoints' (``<name>@<port>``).

        Returns:
            Whether there was one.
        """
        removed = self.remove_route(container_name)
        if self.dynamic_dir.is_dir():
            for path in self.dynamic_dir.glob(f"{container_name}{ROUTE_PORT_SEP}*.yml"):
                removed = routes.remove(path) or removed
        return removed

    def route_names(self) -> set[str]:
        """Return the route names that have a route file.

        Container names, and ``<container>@<port>`` for a Compose instance's other endpoints.
        """
        if not self.dynamic_dir.is_dir():
            return set()
        return {p.stem for p in self.dynamic_dir.glob(f"{CONTAINER_NAME_PREFIX}*.yml")}

    def route_age(self, container_name: str) -> float:
        """Return how many seconds ago the route file was written (0 when there is none)."""
        try:
            return time.time() - self.route_file(container_name).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def probe(self, challenge: str, team_id: str, protocol: str,
              health_path: str, *, started_at: str, endpoint: str = "",
              ) -> Callable[[float], bool]:
        """Return a readiness check that goes through Traefik, the route and the gate.

        ``endpoint``: a Compose instance's non-primary endpoint (its own host and route).
        """
        label = self.label(challenge, team_id, protocol, started_at, endpoint=endpoint)
        host = instance_host(label, self.settings.instance_domain)
        status_host, status_port = routes.bind_parts(self.settings.ingress_status_bind)
        router = routes.router_name(label)

        if protocol == "tcp":
            tls_host, tls_port = routes.bind_parts(self.settings.ingress_https_bind)

            def tcp_check(timeout: float) -> bool:
                return probe.route_loaded(status_host, status_port, router, "tcp", timeout) \
                    and probe.tls_through(tls_host, tls_port, host, timeout)

            return tcp_check
        web_host, web_port = routes.bind_parts(self.settings.ingress_http_bind)

        def http_check(timeout: float) -> bool:
            cookie = None
            if self.gated:
                token = tokens.issue(tokens.gate_key(self._secret()), "cookie", label,
                                     tokens.ORGANISER, 60)
                cookie = f"{tokens.COOKIE_NAME}={token}"  # plain HTTP: the plain name
            return probe.http_through(web_host, web_port, host, health_path, cookie, timeout) \
                and probe.route_loaded(status_host, status_port, router, "http", timeout)

        return http_check

    def probe_hint(self) -> str:
        """Say what a readiness check through the ingress needs (for a failed start)."""
        gate = f" and the gate at {routes.gate_url(self.settings)} (the API)" if self.gated \
            else ""
        return (f" through the ingress (Traefik on {self.settings.ingress_http_bind} / "
                f"{self.settings.ingress_https_bind}{gate} must be running)")

    # -- access links (the API) ---------------------------------------------------------------

    def access_url(self, url: str | None, team_id: str, principal: str | None = None) -> str | None:
        """Return a short-lived signed link that opens the instance at ``url`` (HTTP only).

        Args:
            url: the instance's ``url`` (it names the host, and the worker's domain).
            team_id: the owning team.
            principal: who the link is for: the team (default) or :data:`tokens.ORGANISER`.
        """
        if not url or not url.startswith(("http://", "https://")):
            return None  # TCP instances: TLS with SNI, no cookie to set
        if not self.gated:
            return url
        origin = url.rstrip("/")
        hostname = origin.split("://", 1)[1].split("/", 1)[0]
        label = hostname.split(".", 1)[0]
        token = tokens.issue(tokens.gate_key(self._secret()), "link", label,
                             principal or team_id, self.settings.ingress_link_ttl)
        return f"{origin}{tokens.LINK_PREFIX}{token}"

    def with_access(self, data: dict[str, Any], principal: str | None = None) -> dict[str, Any]:
        """Return an instance's JSON with ``access_url`` added (ingress on, HTTP instance).

        A Compose instance's ``endpoints`` get theirs too: each HTTP endpoint has a host of
        its own, and a link opens one host only.

        ``principal``: who the links are for (default: the instance's team). A ``share:
        global`` instance (SPEC §13) is shown to every team, each with a link naming itself:
        a link and its cookie are bound to the host, not to a team, so every team that
        is shown the instance (every admitted team) opens it.
        """
        if not self.enabled or data.get("status") not in ("running", "starting"):
            return data
        team = str(data.get("team_id", ""))
        link = self.access_url(data.get("url"), team, principal)
        shown = {**data, "access_url": link} if link else dict(data)
        endpoints = data.get("endpoints")
        if isinstance(endpoints, list) and endpoints:
            with_links = []
            for ep in endpoints:
                ep_link = self.access_url(ep.get("url"), team, principal) \
                    if isinstance(ep, dict) else None
                with_links.append({**ep, "access_url": ep_link} if ep_link else ep)
            shown["endpoints"] = with_links
        return shown


__all__ = ["Ingress"]
