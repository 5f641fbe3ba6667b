"""Prometheus metrics of the API (``GET /metrics``), with prometheus-client.

Each app gets its own registry, so several apps in one process (tests) do not collide.
Instance counts are computed from Redis by a custom collector, so they need no bookkeeping in
the request paths. Reading them walks every instance record: :class:`CachedCollector` does
it at most once per ``STATE_TTL`` seconds however often (and by however many) ``/metrics`` is
scraped (issue 22), and the series are counts per challenge and status, never per instance.
``CTF_METRICS_TOKEN`` makes ``/metrics`` ask for a bearer token (see the API).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from celery_app.core.catalog import Catalog
from celery_app.core.pool import PoolCollector
from celery_app.errors import CTFError
from celery_app.state.store import StateStore
from celery_app.vocab.models import STATUSES

log = logging.getLogger(__name__)

# Seconds a collection of the Redis-backed metrics is served again before it is read anew.
STATE_TTL = 2.0


class CachedCollector(Collector):
    """Serves another collector's metrics, collected at most once per ``ttl`` seconds.

    Args:
        inner: the collector that reads Redis.
        ttl: seconds one collection is served.
    """

    def __init__(self, inner: Collector, ttl: float = STATE_TTL) -> None:
        self.inner = inner
        self.ttl = ttl
        self._lock = threading.Lock()  # concurrent scrapes share one collection
        self._at = -float("inf")
        self._metrics: list[Metric] = []

    def describe(self) -> list[Metric]:
        """Describe nothing: the registry then reads no Redis when the API is built."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the inner collector's metrics as of at most ``ttl`` seconds ago."""
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                self._metrics = list(self.inner.collect())
                self._at = time.monotonic()
            metrics = self._metrics
        yield from metrics


class StateCollector(Collector):
    """Reads instance counts (by challenge and status) from Redis at scrape time."""

    def __init__(self, store: StateStore, catalog: Catalog) -> None:
        self.store = store
        self.catalog = catalog

    def collect(self) -> Iterator[Metric]:
        """Yield ``ctf_instances``, ``ctf_state_up`` and ``ctf_janitor_removed_total``."""
        up = GaugeMetricFamily("ctf_state_up", "Whether the state Redis answered this scrape")
        try:
            instances = self.store.list()
            removed = self.store.removals()
        except CTFError as exc:
            log.warning("metrics: cannot read instance state: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        counts: dict[tuple[str, str], int] = {
            (ch.id, status): 0 for ch in self.catalog for status in STATUSES
        }
        for inst in instances:
            key = (inst.challenge, inst.status)
            counts[key] = counts.get(key, 0) + 1
        gauge = GaugeMetricFamily(
            "ctf_instances", "Instances recorded, by challenge and status",
            labels=["challenge", "status"],
        )
        for (challenge, status), count in sorted(counts.items()):
            gauge.add_metric([challenge, status], count)
        yield gauge
        janitor = CounterMetricFamily(
            "ctf_janitor_removed", "What janitor passes removed, by kind", labels=["kind"]
        )
        for kind, total in sorted(removed.items()):
            janitor.add_metric([str(kind)], float(total))
        yield janitor
        yield from self._solvers()

    def _solvers(self) -> Iterator[Metric]:
        """Yield ``ctf_challenge_healthy`` and ``ctf_challenge_solver_seconds`` (SPEC §14)."""
        checked = [ch.id for ch in self.catalog if ch.solver is not None]
        if not checked:
            return
        results = self.store.solvers
        healthy = GaugeMetricFamily(
            "ctf_challenge_healthy",
            "Whether the challenge's solver passed its last run (1) or not (0); absent until "
            "its first run", labels=["challenge"])
        runs = HistogramMetricFamily(
            "ctf_challenge_solver_seconds", "How long the challenge's solver runs took",
            labels=["challenge"])
        try:
            for row in results.report(checked):
                if row["state"] != "unknown":
                    healthy.add_metric([row["challenge"]], 1 if row["state"] == "ok" else 0)
                buckets, total = results.histogram(row["challenge"])
                runs.add_metric([row["challenge"]], buckets, total)
        except CTFError as exc:
            log.warning("metrics: cannot read the solvers' results: %s", exc)
            return
        yield healthy
        yield runs


class ApiMetrics:
    """The API's metrics and their registry.

    Args:
        store: the state store the instance gauge reads.
        catalog: the challenges (every challenge shows, even with no instance).

    """

    def __init__(
        self, store: StateStore, catalog: Catalog, hosts: list[str] | None = None,
        host_collector: Collector | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ctf_api_requests", "HTTP requests answered, by method, route and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "ctf_api_request_seconds", "Time to answer HTTP requests, by route", ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 300),
            registry=self.registry,
        )
        self.tasks_sent = Counter(
            "ctf_tasks_sent", "Tasks sent to the workers, by task (starts, stops, extends)",
            ["task", "challenge"], registry=self.registry,
        )
        self.task_failures = Counter(
            "ctf_task_failures", "Tasks seen failing by the API, by task and error code",
            ["task", "code"], registry=self.registry,
        )
        self.start_duration = Histogram(
            "ctf_start_duration_seconds",
            "From PUT to running, for starts the API waited for (?wait=N)", ["challenge"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.registry.register(CachedCollector(StateCollector(store, catalog)))
        if hosts is not None:  # warm pools (issue 14)
            self.registry.register(CachedCollector(PoolCollector(store.pools, catalog, hosts)))
        if host_collector is not None:  # per-host liveness and capacity (issue 28's alerts)
            self.registry.register(CachedCollector(host_collector))

    def render(self) -> tuple[bytes, str]:
        """Return the Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
