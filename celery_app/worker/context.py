"""The worker's long-lived objects, built once per process from the settings."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from celery_app.core.catalog import Catalog, load_catalog
from celery_app.core.service import InstanceService
from celery_app.engine.docker_driver import DockerDriver
from celery_app.engine.driver import Driver
from celery_app.engine.firewall import EgressGuard, host_addresses
from celery_app.hosts.hostsfile import Hosts, load_hosts
from celery_app.loops.janitor import Janitor
from celery_app.settings import Settings, load_settings
from celery_app.state.store import StateStore


@dataclass
class Context:
    """Everything a task needs: settings, catalog, hosts, Docker driver, Redis store, service."""

    settings: Settings
    catalog: Catalog
    driver: Driver
    store: StateStore
    service: InstanceService
    janitor: Janitor
    hosts: Hosts
    egress: EgressGuard | None = None


def build_context(settings: Settings) -> Context:
    """Build the objects a worker uses for ``settings``.

    Raises:
        CatalogError: the catalog file has a mistake.
        HostsFileError: the hosts file has a mistake or no host ``settings.host``.
    """
    catalog = load_catalog(settings)
    # The Docker host this worker serves (CTF_HOST of CTF_HOSTS_FILE; one "local" without).
    hosts = load_hosts(settings)
    host = hosts.get_host(settings.host)
    assert host.publish_ip is not None and host.max_instances is not None
    settings = settings.model_copy(
        update={"public_host": host.public_host, "publish_ip": host.publish_ip}
    )
    driver = DockerDriver(host.docker_url)
    store = StateStore.from_url(settings.state_redis_url)
    # Every host of the hosts file is one of ours: no instance may reach any of them.
    egress = EgressGuard.for_settings(settings, driver, host_addresses(hosts.values()),
                                      docker_url=host.docker_url)
    service = InstanceService(settings, catalog, driver, store, host=host.name,
                              public_host=host.public_host, host_max=host.max_instances,
                              egress=egress)
    return Context(settings, catalog, driver, store, service, Janitor(service), hosts, egress)


_context: Context | None = None
_context_lock = threading.Lock()


def get_context() -> Context:
    """Return this process's context, building it from the environment on first use."""
    global _context  # noqa: PLW0603  # one per worker process, built lazily, never at import
    if _context is None:
        with _context_lock:
            if _context is None:
                _context = build_context(load_settings())
    return _context


def set_context(context: Context | None) -> None:
    """Replace this process's context (tests, embedded use); ``None`` rebuilds on next use."""
    global _context  # noqa: PLW0603
    with _context_lock:
        _context = context
