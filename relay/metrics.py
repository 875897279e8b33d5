"""Prometheus metrics (``GET /metrics``), one registry per application.

Counted per request, never per chunk, so the hot path pays nothing: a
stream's chunk count is added once when it ends. Account pools and the
server report through ``statistics()`` snapshots.

One process (the default): the snapshots are read at scrape time by a
collector, and the registry is the output.

``relay serve --workers N``: prometheus-client's multi-process mode. The
parent points ``PROMETHEUS_MULTIPROC_DIR`` at a private directory before it
starts the workers; each worker's counters, histograms and gauges are files
there, and a scrape, answered by whichever worker the kernel gives the
connection, merges every worker's files. The snapshots are copied into
gauges and counters of the same names by :meth:`Metrics.refresh` (every
second while the app serves, and before each scrape), so that a scrape sums
them over the workers too (or takes the largest or smallest view where a
sum would count one account once per worker).
"""

from __future__ import annotations

import os
from operator import attrgetter
from typing import TYPE_CHECKING, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from relay.accounts import PoolStatistics

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
#: seconds: request durations and first tokens (search and thinking can take minutes)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: seconds between two writes of a stream (a paced model writes every few tens of ms)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 30)
#: the directory of prometheus-client's multi-process mode (set for ``--workers``)
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: seconds between two copies of a worker's snapshots into its metric files
REFRESH_S = 1.0

#: how the workers' values of a gauge combine in multi-process mode ("live": a worker
#: that has exited no longer counts)
Combine = Literal["livesum", "livemax", "livemin"]

#: per provider, from an account pool's snapshot: name, help, value, how workers combine
#: (every worker knows the same server-side accounts and rests them in its own view:
#: the largest count and resting, the fewest healthy, i.e. the worst worker's view)
_POOL_GAUGES: tuple[tuple[str, str, Callable[[PoolStatistics], int], Combine], ...] = (
    ("relay_account_active_streams", "Requests each provider's accounts serve now",
     attrgetter("active_streams"), "livesum"),
    ("relay_accounts", "Accounts known per provider", attrgetter("accounts"), "livemax"),
    ("relay_accounts_resting", "Accounts resting after an auth failure",
     attrgetter("resting"), "livemax"),
    ("relay_accounts_healthy", "Accounts not resting (may be chosen first)",
     lambda stats: stats.accounts - stats.resting, "livemin"),
    ("relay_account_waiters", "Requests waiting for a free account",
     attrgetter("waiting"), "livesum"),
)
_POOL_COUNTERS: tuple[tuple[str, str, Callable[[PoolStatistics], int]], ...] = (
    ("relay_account_logins", "Logins (access tokens obtained) since start",
     attrgetter("logins")),
    ("relay_account_refreshes",
     "Logins of accounts that had logged in before (expired or refused tokens renewed)",
     attrgetter("refreshes")),
)
#: from the server's snapshot: key, name, help (gauges summed over the workers)
_SERVER_GAUGES = (
    ("connections", "relay_open_connections", "Client connections open now"),
    ("in_flight", "relay_requests_in_flight", "Client requests being answered now"),
    ("upstream_active", "relay_upstream_connections_active",
     "Upstream connections carrying a request now"),
    ("upstream_idle", "relay_upstream_connections_idle",
     "Upstream connections kept open for reuse"),
    ("cleanup_pending", "relay_cleanup_pending",
     "Upstream conversation deletes running after their answers"),
)
_SERVER_COUNTERS = (
    ("upstream_opened", "relay_upstream_connections_opened",
     "Upstream connections opened since start"),
)


def multiprocess_directory() -> str | None:
    """The directory of prometheus-client's multi-process mode, or None (one process)."""
    return os.environ.get(MULTIPROC_DIR) or None


class _Snapshots(Collector):
    """One process: reads pool and server statistics when scraped."""

    def __init__(
        self,
        pools: Callable[[], Iterable[PoolStatistics]],
        server: Callable[[], dict[str, int]],
    ) -> None:
        self._pools = pools
        self._server = server

    def collect(self) -> Iterable[Metric]:
        pools = list(self._pools())
        for name, text, value, _ in _POOL_GAUGES:
            gauge = GaugeMetricFamily(name, text, labels=["provider"])
            for stats in pools:
                gauge.add_metric([stats.provider], value(stats))
            yield gauge
        for name, text, value in _POOL_COUNTERS:
            counter = CounterMetricFamily(name, text, labels=["provider"])
            for stats in pools:
                counter.add_metric([stats.provider], value(stats))
            yield counter
        server = self._server()
        for key, name, text in _SERVER_GAUGES:
            if key in server or key == "connections":
                yield GaugeMetricFamily(name, text, value=server.get(key, 0))
        for key, name, text in _SERVER_COUNTERS:
            if key in server:
                yield CounterMetricFamily(name, text, value=server[key])


class _Mirror:
    """Multi-process mode: the snapshots copied into this worker's metric files.

    Gauges are set; counters are raised by what the snapshot's count grew
    since the last copy.
    """

    def __init__(
        self,
        pools: Callable[[], Iterable[PoolStatistics]],
        server: Callable[[], dict[str, int]],
        registry: CollectorRegistry,
    ) -> None:
        self._pools = pools
        self._server = server
        self._pool_gauges = [
            (Gauge(name, text, ["provider"], registry=registry, multiprocess_mode=combine),
             value)
            for name, text, value, combine in _POOL_GAUGES
        ]
        self._pool_counters = [
            (name, Counter(name, text, ["provider"], registry=registry), value)
            for name, text, value in _POOL_COUNTERS
        ]
        self._server_gauges = [
            (key, Gauge(name, text, registry=registry, multiprocess_mode="livesum"))
            for key, name, text in _SERVER_GAUGES
        ]
        self._server_counters = [
            (key, name, Counter(name, text, registry=registry))
            for key, name, text in _SERVER_COUNTERS
        ]
        #: (metric name, provider) -> the count last added
        self._counted: dict[tuple[str, str], int] = {}

    def _count(self, name: str, counter: Counter, provider: str, total: int) -> None:
        grown = total - self._counted.get((name, provider), 0)
        self._counted[name, provider] = total
        child = counter.labels(provider) if provider else counter
        child.inc(max(grown, 0))  # inc(0) too: the series shows from the first refresh

    def refresh(self) -> None:
        for stats in self._pools():
            for gauge, value in self._pool_gauges:
                gauge.labels(stats.provider).set(value(stats))
            for name, counter, value in self._pool_counters:
                self._count(name, counter, stats.provider, value(stats))
        server = self._server()
        for key, gauge in self._server_gauges:
            if key in server or key == "connections":
                gauge.set(server.get(key, 0))
        for key, name, counter in self._server_counters:
            if key in server:
                self._count(name, counter, "", server[key])


class Metrics:
    """The relay's metrics."""

    def __init__(
        self,
        pools: Callable[[], Iterable[PoolStatistics]],
        server: Callable[[], dict[str, int]],
    ) -> None:
        # no *_created series: they only clutter the output (prometheus-client is untyped here)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        #: prometheus-client's multi-process mode (``--workers``): the workers' directory
        self.directory = multiprocess_directory()
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "relay_requests", "HTTP requests answered",
            ["route", "provider", "model", "status"], registry=self.registry,
        )
        self.duration = Histogram(
            "relay_request_duration_seconds", "Request head to the end of the response",
            ["route", "provider"], registry=self.registry, buckets=LATENCY_BUCKETS,
        )
        self.first_token = Histogram(
            "relay_time_to_first_token_seconds",
            "Request head to the first answer event from upstream",
            ["provider"], registry=self.registry, buckets=LATENCY_BUCKETS,
        )
        self.chunk_gap = Histogram(
            "relay_inter_chunk_gap_seconds",
            "Time between two writes of one stream to its client",
            ["provider"], registry=self.registry, buckets=GAP_BUCKETS,
        )
        self.active_streams = Gauge(
            "relay_active_streams", "Streamed answers being written now", ["provider"],
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.chunks = Counter(
            "relay_stream_batches", "Upstream reads relayed to clients", ["provider"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "relay_upstream_errors", "Requests that failed upstream, by kind",
            ["provider", "kind"], registry=self.registry,
        )
        self._mirror: _Mirror | None = None
        if self.directory is None:
            self.registry.register(_Snapshots(pools, server))
        else:
            self._mirror = _Mirror(pools, server, self.registry)

    def refresh(self) -> None:
        """Multi-process mode: copy this worker's snapshots into its metric files
        (App.serve does it every :data:`REFRESH_S`); nothing in one process."""
        if self._mirror is not None:
            self._mirror.refresh()

    def render(self) -> bytes:
        """The text exposition format: this process's metrics, or with ``--workers``
        every worker's merged."""
        if self.directory is None:
            return generate_latest(self.registry)
        self.refresh()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
