"""The application: settings, the shared upstream pool, providers, accounts.

One :class:`App` per process. It is what a program embeds when it runs the
relay as a sidecar without the CLI::

    settings = relay.config.load({"port": 0})
    async with relay.app.App(settings) as app:
        await nursery.start(app.serve)

:meth:`App.serve` binds the listeners and reports the bound addresses
through ``task_status``; :meth:`App.shutdown` stops it gracefully.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from protocol.errors import AuthError, RelayError
from providers.glm.client import DEFAULT_MODEL as GLM_DEFAULT_MODEL
from providers.glm.client import GlmProvider
from providers.step.client import StepProvider
from relay import routes
from relay.accounts import Account, AccountPool, PoolStatistics
from relay.config import ConfigError
from relay.fetcher import UrlFetcher
from relay.janitor import Janitor
from relay.metrics import Metrics
from relay.pool import UpstreamPool
from relay.server import Exchange, Server, bound_addresses, open_listeners
from relay.upstream import HttpTransport, make_pool

if TYPE_CHECKING:
    import ssl
    from collections.abc import Collection, Sequence
    from types import TracebackType

    from providers.contract import Provider
    from relay.config import Settings
    from relay.fetcher import Origin

log = logging.getLogger("relay.app")

#: PROTOCOLS.md 3.10: an agent id is 24+ lowercase letters/digits
_AGENT_ID = re.compile(r"[a-z0-9]{24,}")
_GLM_PREFIXES = ("glm", "chatglm", "cogview", "cogvideo")


@dataclass
class ProviderRuntime:
    """A provider with its account pool and server-side credentials."""

    provider: Provider
    pool: AccountPool
    server_credentials: tuple[str, ...]
    default_model: str


class App:
    """Everything one relay process serves."""

    def __init__(
        self,
        settings: Settings,
        *,
        upstream_ssl_context: ssl.SSLContext | None = None,
        trusted_file_origins: Collection[Origin] = (),
    ) -> None:
        """
        Args:
            settings: the configuration.
            upstream_ssl_context: TLS for upstream calls (tests: a private CA).
            trusted_file_origins: (scheme, host, port) whose file URLs are
                fetched even on private addresses: the emulators ``relay serve
                --demo`` started, never anything a client names.
        """
        self.settings = settings
        self._pool = make_pool(settings, ssl_context=upstream_ssl_context)
        self.fetcher = UrlFetcher(settings, trusted_origins=trusted_file_origins)
        #: runs conversation cleanup after the answers, while serve() runs
        self.janitor = Janitor()
        self.providers: dict[str, ProviderRuntime] = {}
        step = StepProvider(
            HttpTransport(self._pool, settings, "StepChat"),
            self.fetcher,
            base_url=settings.step_base_url,
            cleanup_timeout=settings.cleanup_timeout,
            upload_timeout=settings.upload_timeout,
            file_settle=settings.step_file_settle,
            background=self.janitor,
        )
        self.add_provider(step, settings.step_tokens, settings.step_max_streams, "step")
        # ChatGLM keeps the first-byte timeout itself: past it, it reads on for up
        # to cleanup_timeout to learn the conversation it must delete, so its
        # transport must not give up before that.
        glm_transport_settings = dataclasses.replace(
            settings, first_byte_timeout=settings.first_byte_timeout + settings.cleanup_timeout
        )
        glm = GlmProvider(
            HttpTransport(self._pool, glm_transport_settings, "ChatGLM"),
            self.fetcher,
            base_url=settings.glm_base_url,
            secret=settings.glm_sign_secret,
            system_tag=settings.glm_system_tag,
            cleanup_timeout=settings.cleanup_timeout,
            first_byte_timeout=settings.first_byte_timeout,
            upload_timeout=settings.upload_timeout,
            video_timeout=settings.video_timeout,
            video_poll_interval=max(settings.video_poll_interval, 0.001),
            background=self.janitor,
        )
        self.add_provider(glm, settings.glm_tokens, settings.glm_max_streams, GLM_DEFAULT_MODEL)
        self._check_server_credentials()
        self.server = Server(settings, self.handle)
        self.metrics = Metrics(self.pool_statistics, self.statistics)
        self.addresses: list[str] = []
        #: set when serve() has returned (connections drained or cancelled)
        self.stopped = trio.Event()

    def add_provider(
        self, provider: Provider, credentials: Sequence[str], max_streams: int, default_model: str
    ) -> None:
        """Register a provider (its name routes /<name>/v1/... and its models)."""
        self.providers[provider.name] = ProviderRuntime(
            provider,
            AccountPool(provider, self.settings, max_streams),
            tuple(credentials),
            default_model,
        )

    def _check_server_credentials(self) -> None:
        """Refuse to start with a malformed entry in a server-side token list.

        Found here, at start, rather than by the first request that leases
        that account. The message names the setting and the entry's position,
        never the entry (it is a secret).

        Raises:
            ConfigError: ``RELAY_<PROVIDER>_TOKENS: entry N of M ...``.
        """
        for name, runtime in self.providers.items():
            count = len(runtime.server_credentials)
            for position, credential in enumerate(runtime.server_credentials, 1):
                try:
                    runtime.provider.validate_credential(credential)
                except RelayError as exc:
                    raise ConfigError(
                        f"RELAY_{name.upper()}_TOKENS: entry {position} of {count} is "
                        f"malformed: {exc.message}"
                    ) from None

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
        try:
            async with trio.open_nursery() as outer:
                await outer.start(self.janitor.run)
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(functools.partial(self.server.run, listeners))
                        task_status.started(self.addresses)
                finally:
                    self.janitor.close()
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        """Stop accepting and let requests in flight finish (grace period)."""
        self.server.shutdown()

    async def handle(self, ex: Exchange) -> None:
        """Entry point for every request."""
        await routes.dispatch(self, ex)

    # --- routing helpers -------------------------------------------------------------------

    def provider_for_model(self, model: str) -> ProviderRuntime:
        """The provider a model name selects (PROTOCOLS.md 3.10 for agent ids)."""
        lowered = model.lower()
        name = self.settings.default_provider
        if lowered.startswith("step"):
            name = "step"
        elif lowered.startswith(_GLM_PREFIXES) or _AGENT_ID.fullmatch(model):
            name = "glm"
        runtime = self.providers.get(name) or self.providers.get(self.settings.default_provider)
        if runtime is None:
            runtime = next(iter(self.providers.values()))
        return runtime

    def accounts_for(self, ex: Exchange, runtime: ProviderRuntime) -> list[Account]:
        """The accounts a request may use, after checking its credentials.

        - With ``api_keys``: the bearer must be one of them; accounts come
          from the server-side pool.
        - Without: the bearer carries upstream credentials (comma-separated);
          with no bearer, the server-side pool is used if there is one.

        Raises:
            AuthError: missing or wrong credentials.
            RelayError: (503) the provider has no accounts configured.
        """
        bearer = bearer_token(ex.request.header(b"authorization"))
        s = self.settings
        name = runtime.provider.name
        if s.demo and runtime.server_credentials and not s.api_keys:
            # demo mode: any key (the SDK insists on one) uses the emulator's account
            return runtime.pool.server_accounts(runtime.server_credentials)
        if s.api_keys:
            if bearer is None or not any(
                hmac.compare_digest(bearer.encode(), key.encode()) for key in s.api_keys
            ):
                raise AuthError("invalid or missing API key", code="invalid_api_key")
            if not runtime.server_credentials:
                raise RelayError(
                    f"no {name} accounts are configured on this relay "
                    f"(RELAY_{name.upper()}_TOKENS)",
                    status=503, code="no_accounts",
                )
            return runtime.pool.server_accounts(runtime.server_credentials)
        if bearer:
            credentials = [c.strip() for c in bearer.split(",") if c.strip()]
            if not credentials:
                raise AuthError("the Authorization header names no credential")
            for credential in credentials:
                runtime.provider.validate_credential(credential)
            return runtime.pool.client_accounts(credentials)
        if runtime.server_credentials:
            return runtime.pool.server_accounts(runtime.server_credentials)
        raise AuthError(
            f"missing Authorization: Bearer <{name} credential>", code="missing_credentials"
        )

    def check_api_key(self, ex: Exchange) -> None:
        """With ``api_keys`` set, require one of them (for non-chat endpoints)."""
        if not self.settings.api_keys:
            return
        bearer = bearer_token(ex.request.header(b"authorization"))
        if bearer is None or not any(
            hmac.compare_digest(bearer.encode(), key.encode()) for key in self.settings.api_keys
        ):
            raise AuthError("invalid or missing API key", code="invalid_api_key")


def bearer_token(header: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None
