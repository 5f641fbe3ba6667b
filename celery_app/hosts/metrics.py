"""Per-host gauges of ``/metrics``: is each host's worker there, and how full is the host.

What the alert rules of ``deploy/prometheus/alerts.yml`` need for a host down and capacity
near full; read from the state Redis at scrape time (one ``MGET`` and one ``SCARD`` per
host), like the other collectors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from celery_app.errors import CTFError
from celery_app.hosts.hostsfile import Hosts
from celery_app.hosts.liveness import heartbeats
from celery_app.state.store import StateStore

log = logging.getLogger(__name__)


class HostCollector(Collector):
    """Yields ``ctf_host_up``, ``ctf_host_instances`` and ``ctf_host_max_instances``.

    ``ctf_host_up`` is the heartbeat itself: 0 for a host with no heartbeat even when no
    host has one (placement then cannot tell and treats every host as alive; an alert must
    not: every worker is gone, or Redis lost its data).

    Args:
        hosts: the Docker hosts (``CTF_HOSTS_FILE``, or the one default host).
        store: the state store the heartbeats and instance sets are in.
    """

    def __init__(self, hosts: Hosts, store: StateStore) -> None:
        self.hosts = hosts
        self.store = store

    def collect(self) -> Iterator[Metric]:
        """Yield the three gauges, one sample per host (nothing when Redis does not answer)."""
        try:
            beats = heartbeats(self.store, self.hosts)
            used = {name: self.store.count(host=name) for name in self.hosts}
        except CTFError as exc:
            log.warning("metrics: cannot read host heartbeats: %s", exc)
            return
        up = GaugeMetricFamily(
            "ctf_host_up", "Whether the host's worker sends heartbeats and its engine answers",
            labels=["host"])
        instances = GaugeMetricFamily("ctf_host_instances",
                                      "Instance containers recorded on the host (what "
                                      "max_instances counts: k for a Compose instance of k "
                                      "services)",
                                      labels=["host"])
        limit = GaugeMetricFamily("ctf_host_max_instances",
                                  "The host's max_instances (CTF_MAX_INSTANCES by default)",
                                  labels=["host"])
        for name, cfg in self.hosts.items():
            beat = beats.get(name)
            alive = beat is not None and beat.get("engine", True) is not False
            up.add_metric([name], 1.0 if alive else 0.0)
            instances.add_metric([name], float(used[name]))
            if cfg.max_instances is not None:
                limit.add_metric([name], float(cfg.max_instances))
        yield from (up, instances, limit)
