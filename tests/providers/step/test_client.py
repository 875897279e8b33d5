"""Tests of the StepChat client (providers/step/client.py) against the emulator.

The provider is driven directly, without the relay, over the relay's real
transport; no background is given, so the chat is deleted as the ``chat``
context ends, and the emulator's record says whether it was.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import TYPE_CHECKING

import orjson
import pytest
import trio

from protocol.errors import UpstreamFailed
from protocol.openai import parse_chat_request
from providers.step.client import StepProvider, StepSession
from providers.step.emulator import StepBehavior, StepEmulator
from relay import config
from relay.upstream import HttpTransport, make_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

TOKEN = "oasis-token-alice"
CREDENTIAL = f"device1@{TOKEN}"


@pytest.fixture
async def step(nursery: trio.Nursery) -> StepEmulator:
    """An emulator that accepts TOKEN."""
    emulator = StepEmulator(tokens=[TOKEN], behavior=StepBehavior(answer="Hello!"))
    await nursery.start(emulator.serve)
    return emulator


async def _provider(base_url: str) -> AsyncIterator[StepProvider]:
    settings = config.load({"step_base_url": base_url}, environ={})
    pool = make_pool(settings)
    try:
        yield StepProvider(HttpTransport(pool, settings, "StepChat"), None,  # type: ignore[arg-type]
                           base_url=base_url, cleanup_timeout=2.0, file_settle=0.0)
    finally:
        await pool.aclose()


@pytest.fixture
async def provider(step: StepEmulator) -> AsyncIterator[StepProvider]:
    """A StepProvider on the relay's transport, pointed at the emulator."""
    async for made in _provider(step.base_url):
        yield made


async def _answer_then_expire(provider: StepProvider, step: StepEmulator,
                              session: StepSession) -> None:
    """One whole answer; the site expires the access tokens before DelChat is sent."""
    body = orjson.dumps({"model": "step", "messages": [{"role": "user", "content": "hi"}]})
    with trio.fail_after(5):
        async with provider.chat(session, parse_chat_request(body)) as answer, aclosing(
            answer.__aiter__()
        ) as stream:
            async for _ in stream:
                pass
            step.expire_access_tokens()  # between the answer and its delete


async def test_delete_after_the_access_token_expired_registers_again(
    provider: StepProvider, step: StepEmulator
) -> None:
    """The access token expires between an answer and DelChat: DelChat meets a 401, the
    provider registers the device again with the session's Oasis-Token and deletes the
    chat on the second attempt (before: it gave up, the chat stayed)."""
    session = await provider.login(CREDENTIAL)
    await _answer_then_expire(provider, step, session)
    assert len(step.record.chats_created) == 1
    assert step.record.chats_deleted == step.record.chats_created
    assert step.record.registers == 2


def test_session_repr_shows_no_secret() -> None:
    """The session keeps the Oasis-Token (to register again) but never shows it."""
    session = StepSession("device1", b"Oasis-Token=secret", TOKEN)
    assert TOKEN not in repr(session)
    assert "secret" not in repr(session)


async def test_check_tells_an_unreachable_site_from_a_dead_token(step: StepEmulator) -> None:
    """check() says True for a live credential and False for one the site refuses; a
    site that cannot be reached (connection refused) raises UpstreamFailed instead."""
    async for live_site in _provider(step.base_url):
        with trio.fail_after(5):
            assert await live_site.check(CREDENTIAL) is True
            assert await live_site.check("device1@unknown") is False
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async for dead_site in _provider(f"http://127.0.0.1:{port}"):
        with trio.fail_after(5), pytest.raises(UpstreamFailed):
            await dead_site.check(CREDENTIAL)
