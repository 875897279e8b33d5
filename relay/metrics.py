"""Prometheus metrics (``GET /metrics``), one registry per application.

Counted per request, never per chunk, so the hot path pays nothing: a
stream's chunk count is added once when it ends. Account pools and the
server report through ``statistics()`` snapshots read at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from relay.accounts import PoolStatistics

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


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
        logins = GaugeMetricFamily(
            "relay_account_logins", "Logins (token refreshes) so far", labels=["provider"]
        )
        for stats in self._pools():
            active.add_metric([stats.provider], stats.active_streams)
            accounts.add_metric([stats.provider], stats.accounts)
            resting.add_metric([stats.provider], stats.resting)
            waiting.add_metric([stats.provider], stats.waiting)
            logins.add_metric([stats.provider], stats.logins)
        yield from (active, accounts, resting, waiting, logins)
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
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "relay_requests", "HTTP requests answered", ["route", "status"],
            registry=self.registry,
        )
        self.chunks = Counter(
            "relay_stream_batches", "Upstream reads relayed to clients", ["provider"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "relay_upstream_errors", "Requests that failed upstream", ["provider", "status"],
            registry=self.registry,
        )
        self.first_event = Histogram(
            "relay_first_event_seconds", "Request start to first upstream event",
            ["provider"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.registry.register(_Snapshots(pools, server))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
