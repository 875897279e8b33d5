"""End to end: a client's sampling parameters reach an OpenAI-compatible upstream (issue 16).

OpenAI chat completions take the passthrough fast path, so the client's body
goes up as sent. The Responses and Anthropic Messages dialects (and
:meth:`relay.embed.Relay.chat`) go through the neutral request, which now
carries ``temperature`` and ``top_p`` (and, from chat bodies, the penalties
and ``seed``) into the upstream's chat body. The
:class:`~providers.openai.emulator.OpenAIEmulator` records every body it
accepted, so the tests read what the upstream received. A value outside the
dialect's range is a 400 in that dialect's shape, and the upstream is never
asked. The fixtures and helpers are :mod:`tests.relay.test_openai_upstream`'s.

The installed ``anthropic`` SDK's ``messages.create`` has no ``temperature``
or ``top_p`` keyword (its typed parameters dropped them), so the tests send
them as its ``extra_body``, which is what reaches the wire either way.
"""

# The imported fixtures are parameters of the tests below, which ruff sees as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import pytest

from relay.embed import Relay, settings
from tests.relay.conftest import Running, post
from tests.relay.test_openai_upstream import (  # noqa: F401  (relay, upstream: fixtures)
    ANSWER,
    claude,
    in_thread,
    relay,
    sdk,
    upstream,
    upstreams,
)

if TYPE_CHECKING:
    from providers.openai.emulator import OpenAIEmulator

HI: Any = [{"role": "user", "content": "hi"}]
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty",
                 "seed")


def sent(emulator: OpenAIEmulator) -> list[dict[str, Any]]:
    """The sampling fields of every chat body the upstream received, in order."""
    return [{key: call.body[key] for key in SAMPLING_KEYS if key in call.body}
            for call in emulator.record.chats]


async def test_anthropic_sdk_temperature_and_top_p_reach_the_upstream(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """messages.create and messages.stream with temperature and top_p: the upstream got
    both, a zero temperature included; top_k (no OpenAI counterpart) did not go up."""
    def run() -> tuple[str, str]:
        with claude(relay) as client:
            message = client.messages.create(
                model="deepseek-chat", max_tokens=100, messages=HI,
                extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 40})
            with client.messages.stream(model="deepseek-chat", max_tokens=100, messages=HI,
                                        extra_body={"temperature": 0}) as stream:
                text = "".join(stream.text_stream)
        return message.content[0].text, text

    assert await in_thread(run) == (ANSWER, ANSWER)
    assert sent(upstream) == [{"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.0}]


async def test_openai_sdk_responses_temperature_reaches_the_upstream(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """responses.create with temperature (and top_p), whole and streamed: the upstream got
    them, and the response object echoes them."""
    def run() -> tuple[Any, list[Any]]:
        with sdk(relay) as client:
            whole = client.responses.create(model="deepseek-chat", input="hi",
                                            temperature=0.3)
            events = list(client.responses.create(model="deepseek-chat", input="hi",
                                                  temperature=1.5, top_p=0.8, stream=True))
        return whole, events

    whole, events = await in_thread(run)
    assert (whole.output_text, whole.temperature, whole.top_p) == (ANSWER, 0.3, None)
    completed = events[-1].response
    assert (completed.output_text, completed.temperature, completed.top_p) == (ANSWER, 1.5, 0.8)
    assert sent(upstream) == [{"temperature": 0.3}, {"temperature": 1.5, "top_p": 0.8}]


async def test_without_sampling_parameters_none_go_up(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """A client that sets none leaves the upstream's defaults: no sampling field goes up,
    from either dialect (top_k alone included)."""
    def run() -> None:
        with claude(relay) as client:
            client.messages.create(model="deepseek-chat", max_tokens=10, messages=HI,
                                   extra_body={"top_k": 5})
        with sdk(relay) as openai_client:
            openai_client.responses.create(model="deepseek-chat", input="hi")

    await in_thread(run)
    assert sent(upstream) == [{}, {}]


async def test_chat_completions_sampling_still_goes_up_as_sent(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """The fast path (chat completions): every sampling parameter goes up as the client
    sent it, as before."""
    def run() -> str | None:
        with sdk(relay) as client:
            completion = client.chat.completions.create(
                model="deepseek-chat", messages=HI, temperature=0.7, top_p=1,
                presence_penalty=-0.5, frequency_penalty=0.5, seed=11)
        return completion.choices[0].message.content

    assert await in_thread(run) == ANSWER
    assert sent(upstream) == [{"temperature": 0.7, "top_p": 1, "presence_penalty": -0.5,
                               "frequency_penalty": 0.5, "seed": 11}]


async def test_embedded_relay_sends_the_chat_requests_sampling(
    upstream: OpenAIEmulator,
) -> None:
    """relay.Relay.chat goes by the neutral path: an OpenAI chat body's temperature,
    penalties and seed reach the upstream."""
    config = settings(host="127.0.0.1", port=0, openai_upstreams=upstreams(upstream))
    async with Relay(config) as service:
        events = [e async for e in service.chat({
            "model": "deepseek-chat", "messages": HI, "temperature": 0.4,
            "presence_penalty": 1, "frequency_penalty": -1, "seed": 3})]
    assert events
    assert sent(upstream) == [{"temperature": 0.4, "presence_penalty": 1.0,
                               "frequency_penalty": -1.0, "seed": 3}]


@pytest.mark.parametrize(("path", "body", "error"), [
    ("/v1/messages",
     {"model": "deepseek-chat", "max_tokens": 10, "messages": HI, "temperature": 1.5},
     {"type": "error", "error": {"type": "invalid_request_error",
                                 "message": "temperature: range: 0..1"}}),
    ("/v1/messages",
     {"model": "deepseek-chat", "max_tokens": 10, "messages": HI, "top_p": "high"},
     {"type": "error", "error": {"type": "invalid_request_error",
                                 "message": "top_p: Input should be a valid number"}}),
    ("/v1/responses", {"model": "deepseek-chat", "input": "hi", "temperature": 2.5},
     {"error": {"type": "invalid_request_error", "param": "temperature",
                "code": "decimal_above_max_value",
                "message": "Invalid 'temperature': decimal above maximum value. Expected a "
                           "value <= 2, but got 2.5 instead."}}),
    ("/v1/responses", {"model": "deepseek-chat", "input": "hi", "top_p": -0.1},
     {"error": {"type": "invalid_request_error", "param": "top_p",
                "code": "decimal_below_min_value",
                "message": "Invalid 'top_p': decimal below minimum value. Expected a "
                           "value >= 0, but got -0.1 instead."}}),
    ("/v1/chat/completions", {"model": "deepseek-chat", "messages": HI, "seed": 1.5},
     {"error": {"type": "invalid_request_error", "param": "seed", "code": None,
                "message": "Invalid type for 'seed': expected an integer."}}),
])
async def test_a_bad_sampling_value_is_a_400_in_the_dialects_shape(
    relay: Running, upstream: OpenAIEmulator, path: str, body: dict[str, Any],
    error: dict[str, Any],
) -> None:
    """Out of the dialect's range, or of the wrong type: a 400 naming the field, in the
    dialect's error shape; the upstream is never asked."""
    reply = await post(relay.base_url, path, orjson.dumps(body))
    assert reply.status == 400, reply.content
    got = orjson.loads(reply.content)
    inner = got["error"]
    assert {key: inner.get(key) for key in error["error"]} == error["error"]
    assert got.get("type") == error.get("type")
    assert upstream.record.keys == []
