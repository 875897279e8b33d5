"""Access to the relay's own endpoints (relay/routes.py), driven over loopback with httpcore."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpcore
import orjson
import pytest
import trio

if TYPE_CHECKING:
    from tests.relay.conftest import RelayFactory

KEY = "relay-key-1"


async def get_metrics(base_url: str, authorization: str | None) -> httpcore.Response:
    """``GET /metrics``, with ``Authorization: <authorization>`` unless it is None."""
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request("GET", base_url + "/metrics", headers=headers)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic cmVsYXk=", "Bearer"])
async def test_metrics_need_an_api_key_when_keys_are_set(
    relay_factory: RelayFactory, authorization: str | None
) -> None:
    """With RELAY_API_KEYS set, /metrics without one of the keys is a 401 OpenAI error that
    asks for a bearer token (metrics name routes and providers: not for anyone who asks)."""
    with trio.fail_after(5):
        relay = await relay_factory(api_keys=f"{KEY},other-key")
        response = await get_metrics(relay.base_url, authorization)
    assert response.status == 401
    assert dict(response.headers)[b"www-authenticate"] == b"Bearer"
    error = orjson.loads(response.content)["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")


async def test_metrics_answer_a_client_with_an_api_key(relay_factory: RelayFactory) -> None:
    """With RELAY_API_KEYS set, /metrics with one of the keys is the Prometheus text."""
    with trio.fail_after(5):
        relay = await relay_factory(api_keys=f"other-key,{KEY}")
        response = await get_metrics(relay.base_url, f"Bearer {KEY}")
    assert response.status == 200
    assert dict(response.headers)[b"content-type"].startswith(b"text/plain")
    assert b"# TYPE" in response.content


@pytest.mark.parametrize(
    "settings", [{"api_keys": KEY, "metrics_public": True}, {}], ids=["public", "no-keys"]
)
async def test_metrics_are_open_when_public_or_without_keys(
    relay_factory: RelayFactory, settings: dict[str, object]
) -> None:
    """With RELAY_METRICS_PUBLIC=true, or with no API keys at all, /metrics needs no key."""
    with trio.fail_after(5):
        relay = await relay_factory(**settings)
        response = await get_metrics(relay.base_url, None)
    assert response.status == 200
    assert b"# TYPE" in response.content
