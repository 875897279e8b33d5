"""The application: settings, the shared upstream pool, providers, accounts.

One :class:`App` per process. It builds everything a request needs (the
providers come from :mod:`relay.registry`) and serves it; the handlers in
:mod:`relay.routes` see it through :class:`relay.routes.Relay`. It is what a
program embeds when it runs the relay as a sidecar without the CLI::

    settings = relay.config.load({"port": 0})
    async with relay.app.App(settings) as app:
        await nursery.start(app.serve)

:meth:`App.serve` binds the listeners and reports the bound addresses
through ``task_status``; :meth:`App.shutdown` stops it gracefully.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import trio

from protocol.errors import RelayError
from relay.accounts import connected as accounts_connected
from relay.fetcher import UrlFetcher
from relay.janitor import Janitor
from relay.metrics import REFRESH_S, Metrics
from relay.pool import UpstreamPool
from relay.registry import ENTRIES, Parts, build
from relay.routes import Route, dispatch, route_table
from relay.server import Exchange, Server, bound_addresses, open_listeners
from relay.upstream import make_pool

if TYPE_CHECKING:
    import ssl
    from collections.abc import Collection, Sequence
    from types import TracebackType

    from protocol.urls import Origin
    from relay.accounts import PoolStatistics
    from relay.config import Settings
    from relay.registry import Entries, Entry, Providers

log = logging.getLogger("relay.app")


class App:
    """Everything one relay process serves."""

    def __init__(
        self,
        settings: Settings,
        *,
        upstream_ssl_context: ssl.SSLContext | None = None,
        trusted_file_origins: Collection[Origin] = (),
        providers: Sequence[Entry | Entries] = ENTRIES,
    ) -> None:
        """
        Args:
            settings: the configuration.
            upstream_ssl_context: TLS for upstream calls (tests: a private CA).
            trusted_file_origins: (scheme, host, port) whose file URLs are
                fetched even on private addresses: the emulators ``relay serve
                --demo`` started, never anything a client names.
            providers: the providers to serve, in routing order.

        Raises:
            ConfigError: a server-side token list has a malformed entry.
        """
        self.settings = settings
        self._pool = make_pool(settings, ssl_context=upstream_ssl_context)
        self.fetcher = UrlFetcher(settings, trusted_origins=trusted_file_origins)
        #: runs conversation cleanup after the answers, while serve() runs
        self.janitor = Janitor()
        parts = Parts(settings, self._pool, self.fetcher, self.janitor)
        self.providers: Providers = build(parts, providers)
        #: path -> route (handlers by method, dialect), the forced /<provider>/v1/...
        #: routes included; a route added here is served from the next request on
        self.routes: dict[str, Route] = route_table(self.providers)
        self.server = Server(settings, self.handle)
        self.metrics = Metrics(self.pool_statistics, self.statistics)
        self.addresses: list[str] = []
        #: set when serve() has returned (connections drained or cancelled)
        self.stopped = trio.Event()

    def statistics(self) -> dict[str, int]:
        """Server, upstream pool and janitor counters, read when /metrics is scraped."""
        stats = dict(self.server.statistics())
        if isinstance(self._pool, UpstreamPool):
            stats.update(self._pool.statistics())
        stats["cleanup_pending"] = self.janitor.pending
        return stats

    def pool_statistics(self) -> list[PoolStatistics]:
        """Snapshots of every account pool."""
        return [rt.pool.statistics() for rt in self.providers.values()]

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close upstream connections."""
        with trio.move_on_after(2, shield=True):
            await self._pool.aclose()
            await self.fetcher.aclose()

    # --- serving --------------------------------------------------------------------------

    async def serve(
        self,
        *,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until :meth:`shutdown`; reports bound addresses.

        Returns once the server has stopped and every cleanup job the
        janitor took has finished.
        """
        listeners = await open_listeners(self.settings, reuse_port=reuse_port)
        self.addresses = bound_addresses(listeners)
        pools = [runtime.pool for runtime in self.providers.values()]
        try:
            # account state (Redis, when configured) is connected around everything served
            async with accounts_connected(pools), trio.open_nursery() as outer:
                await outer.start(self.janitor.run)
                refreshing = trio.CancelScope()
                if self.metrics.directory is not None:  # --workers: see relay.metrics
                    outer.start_soon(self._refresh_metrics, refreshing)
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(functools.partial(self.server.run, listeners))
                        task_status.started(self.addresses)
                finally:
                    self.janitor.close()
                    refreshing.cancel()
        finally:
            self.stopped.set()

    async def _refresh_metrics(self, scope: trio.CancelScope) -> None:
        """Copy this worker's snapshots into its metric files until ``scope`` is cancelled,
        then once more (the counts of its last requests)."""
        with scope:
            while True:
                self.metrics.refresh()
                await trio.sleep(REFRESH_S)
        self.metrics.refresh()

    def shutdown(self) -> None:
        """Stop accepting and let requests in flight finish (grace period)."""
        self.server.shutdown()

    async def readiness(self) -> str | None:
        """Why the relay cannot serve now (``GET /ready``'s 503), or None when it can.

        Not ready: shutting down; API keys set (pooled mode) but no provider
        has server-side accounts; every server-side account of every provider
        resting; the shared account state (Redis) unreachable.
        """
        if self.server.stopping:
            return "shutting down"
        runtimes = list(self.providers.values())
        if self.settings.api_keys and not any(rt.server_credentials for rt in runtimes):
            return "no upstream accounts are configured (RELAY_<PROVIDER>_TOKENS)"
        resting = []
        try:
            for rt in runtimes:
                await rt.pool.state.ping()
                reason = await rt.pool.all_resting(rt.server_credentials)
                if reason is not None:
                    resting.append(reason)
        except RelayError as exc:
            return f"the shared account state is unreachable: {exc.message}"
        pooled = [rt for rt in runtimes if rt.server_credentials]
        if pooled and len(resting) == len(pooled):
            return "; ".join(resting)
        return None

    async def handle(self, ex: Exchange) -> None:
        """Entry point for every request."""
        await dispatch(self, ex)
