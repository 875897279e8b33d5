"""Who may call, and with which upstream accounts.

Two modes (DESIGN.md, Accounts and credentials):

- With ``api_keys`` set, a client must present one of them as its bearer
  token, and upstream accounts come from the server-side pools
  (``RELAY_<PROVIDER>_TOKENS``): the relay is not an open proxy.
- Without, the bearer token carries the client's own upstream credentials
  (comma-separated for several accounts); with no bearer, the server-side
  pool is used if there is one. Demo mode takes any bearer and uses the
  emulators' accounts.

A provider whose accounts are the operator's alone (an OpenAI-compatible
upstream's API keys, ``RELAY_OPENAI_UPSTREAMS``: :attr:`ProviderRuntime.server_only`)
is served from its configured keys in both modes, never from a client's
bearer: with ``api_keys`` set the bearer must be a relay key, as for any
provider; without, anyone who reaches the relay spends the operator's keys
(``relay serve`` says so at start).

Keys are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from protocol.errors import AuthError, RelayError
from protocol.http1 import bearer_token

if TYPE_CHECKING:
    from relay.accounts import Account
    from relay.config import Settings
    from relay.registry import ProviderRuntime
    from relay.server import Exchange


def presented_key(ex: Exchange) -> str | None:
    """The key or credentials a client presented.

    ``Authorization: Bearer <key>`` (OpenAI's clients), else ``x-api-key:
    <key>`` (Anthropic's clients send their key this way); None for neither.
    """
    bearer = bearer_token(ex.request.header(b"authorization"))
    if bearer is None:
        raw = ex.request.header(b"x-api-key")
        if raw:
            bearer = raw.decode("latin-1").strip() or None
    return bearer


def _is_api_key(settings: Settings, bearer: str | None) -> bool:
    return bearer is not None and any(
        hmac.compare_digest(bearer.encode(), key.encode()) for key in settings.api_keys
    )


def check_api_key(settings: Settings, ex: Exchange) -> None:
    """With ``api_keys`` set, require one of them (for non-chat endpoints).

    Raises:
        AuthError: missing or wrong key.
    """
    if settings.api_keys and not _is_api_key(settings, presented_key(ex)):
        raise AuthError("invalid or missing API key", code="invalid_api_key")


def accounts_for(settings: Settings, ex: Exchange, runtime: ProviderRuntime[Any]) -> list[Account]:
    """The accounts a request may use, after checking its credentials.

    Raises:
        AuthError: missing or wrong credentials.
        RelayError: (503) the provider has no accounts configured.
    """
    bearer = presented_key(ex)
    name = runtime.provider.name
    if runtime.server_only:
        if settings.api_keys and not _is_api_key(settings, bearer):
            raise AuthError("invalid or missing API key", code="invalid_api_key")
        return runtime.pool.server_accounts(runtime.server_credentials)
    if settings.demo and runtime.server_credentials and not settings.api_keys:
        # demo mode: any key (the SDK insists on one) uses the emulator's account
        return runtime.pool.server_accounts(runtime.server_credentials)
    if settings.api_keys:
        if not _is_api_key(settings, bearer):
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
