"""Prometheus metrics (``GET /metrics``), one registry per application.

Counted per request, never per chunk, so the hot path pays nothing: a
stream's chunk count is added once when it ends. Account pools and the
server report through ``statistics()`` snapshots read at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from relay.accounts import PoolStatistics

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
#: seconds: request durations and first tokens (search and thinking can take minutes)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: seconds between two writes of a stream (a paced model writes every few tens of ms)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 30)


class _Snapshots(Collector):
    """Reads pool and server statistics when scraped."""

    def __init__(
        self,
        pools: Callable[[], Iterable[PoolStatistics]],
        server: Callable[[], dict[str, int]],
    ) -> None:
        self._pools = pools
        self._server = server

    def collect(self) -> Iterable[Metric]:
        active = GaugeMetricFamily(
            "relay_account_active_streams", "Requests each provider's accounts serve now",
            labels=["provider"],
        )
        accounts = GaugeMetricFamily(
            "relay_accounts", "Accounts known per provider", labels=["provider"]
        )
        resting = GaugeMetricFamily(
            "relay_accounts_resting", "Accounts resting after an auth failure",
            labels=["provider"],
        )
        waiting = GaugeMetricFamily(
            "relay_account_waiters", "Requests waiting for a free account", labels=["provider"]
        )
        healthy = GaugeMetricFamily(
            "relay_accounts_healthy", "Accounts not resting (may be chosen first)",
            labels=["provider"],
        )
        logins = CounterMetricFamily(
            "relay_account_logins", "Logins (access tokens obtained) since start",
            labels=["provider"],
        )
        refreshes = CounterMetricFamily(
            "relay_account_refreshes",
            "Logins of accounts that had logged in before (expired or refused tokens renewed)",
            labels=["provider"],
        )
        for stats in self._pools():
            active.add_metric([stats.provider], stats.active_streams)
            accounts.add_metric([stats.provider], stats.accounts)
            resting.add_metric([stats.provider], stats.resting)
            healthy.add_metric([stats.provider], stats.accounts - stats.resting)
            waiting.add_metric([stats.provider], stats.waiting)
            logins.add_metric([stats.provider], stats.logins)
            refreshes.add_metric([stats.provider], stats.refreshes)
        yield from (active, accounts, resting, healthy, waiting, logins, refreshes)
        server = self._server()
        yield GaugeMetricFamily(
            "relay_open_connections", "Client connections open now",
            value=server.get("connections", 0),
        )
        gauges = (
            ("in_flight", "relay_requests_in_flight",
             "Client requests being answered now"),
            ("upstream_active", "relay_upstream_connections_active",
             "Upstream connections carrying a request now"),
            ("upstream_idle", "relay_upstream_connections_idle",
             "Upstream connections kept open for reuse"),
            ("cleanup_pending", "relay_cleanup_pending",
             "Upstream conversation deletes running after their answers"),
        )
        for key, name, text in gauges:
            if key in server:
                yield GaugeMetricFamily(name, text, value=server[key])
        if "upstream_opened" in server:
            yield CounterMetricFamily(
                "relay_upstream_connections_opened", "Upstream connections opened since start",
                value=server["upstream_opened"],
            )


class Metrics:
    """The relay's metrics."""

    def __init__(
        self,
        pools: Callable[[], Iterable[PoolStatistics]],
        server: Callable[[], dict[str, int]],
    ) -> None:
        # no *_created series: they only clutter the output (prometheus-client is untyped here)
        disable_created_metrics()  # type: ignore[no-untyped-call]
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
            registry=self.registry,
        )
        self.chunks = Counter(
            "relay_stream_batches", "Upstream reads relayed to clients", ["provider"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "relay_upstream_errors", "Requests that failed upstream, by kind",
            ["provider", "kind"], registry=self.registry,
        )
        self.registry.register(_Snapshots(pools, server))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
