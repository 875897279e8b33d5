"""End to end: an OpenAI-compatible upstream's own token counts reach every dialect (issue 16).

The :class:`~providers.openai.emulator.OpenAIEmulator` counts a token per four
characters of any kind; the relay's estimate counts a CJK character as a token
and adds a per-message overhead to the prompt. With a Chinese answer the two
differ, so the official SDKs' ``usage`` shows whose counts the client got.
The fixtures and helpers are :mod:`tests.relay.test_openai_upstream`'s.
"""

# The imported fixtures are parameters of the tests below, which ruff sees as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from protocol.chunks import estimate_tokens
from protocol.deltas import Delta, Finish, Usage
from protocol.openai import parse_chat_request, prompt_tokens
from providers.openai.emulator import OpenAIEmulator, tokens_of
from relay.embed import Relay, settings
from tests.relay.conftest import Running, post, sse_events
from tests.relay.test_openai_upstream import (  # noqa: F401  (relay, upstream: fixtures)
    claude,
    in_thread,
    relay,
    sdk,
    upstream,
    upstreams,
)

if TYPE_CHECKING:
    import pytest

ANSWER = "你好，这是上游自己数过的回答。"
REASONING = "Let me think it over."
#: What the emulator reports for a "hi" prompt and that answer.
PROMPT_TOKENS = tokens_of("hi")
REASONING_TOKENS = tokens_of(REASONING)
OUTPUT_TOKENS = tokens_of(ANSWER) + REASONING_TOKENS
HI: Any = [{"role": "user", "content": "hi"}]


def answer_counted(emulator: OpenAIEmulator) -> None:
    """The emulator answers ANSWER after REASONING."""
    emulator.behavior.answer = ANSWER
    emulator.behavior.reasoning = REASONING


def test_the_estimates_differ_from_the_counts() -> None:
    """The premise of this module: the relay's estimates are not the emulator's counts."""
    request = parse_chat_request(orjson.dumps({"model": "m", "messages": HI}))
    assert prompt_tokens(request) != PROMPT_TOKENS
    assert estimate_tokens(ANSWER) + estimate_tokens(REASONING) != OUTPUT_TOKENS


# --- the Responses API ---------------------------------------------------------------------


async def test_responses_report_the_upstream_usage(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """client.responses.create, whole and streamed (the completed response and the SDK's
    stream helper): input, output, reasoning and total tokens are the upstream's."""
    answer_counted(upstream)

    def run() -> tuple[Any, Any, Any]:
        with sdk(relay) as client:
            whole = client.responses.create(model="deepseek-chat", input="hi")
            events = list(client.responses.create(model="deepseek-chat", input="hi",
                                                  stream=True))
            with client.responses.stream(model="deepseek-chat", input="hi") as stream:
                final = stream.get_final_response()
        assert events[-1].type == "response.completed"
        return whole, events[-1].response, final

    for response in await in_thread(run):
        assert response.output_text == ANSWER
        usage = response.usage
        assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
            PROMPT_TOKENS, OUTPUT_TOKENS, PROMPT_TOKENS + OUTPUT_TOKENS)
        assert usage.output_tokens_details.reasoning_tokens == REASONING_TOKENS
        assert usage.input_tokens_details.cached_tokens == 0


# --- Anthropic Messages ---------------------------------------------------------------------


async def test_anthropic_reports_the_upstream_usage(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """messages.create and messages.stream's final message: the upstream's input and
    output tokens (the stream's message_delta carries both)."""
    answer_counted(upstream)

    def run() -> tuple[Any, Any]:
        with claude(relay) as client:
            message = client.messages.create(model="deepseek-chat", max_tokens=100,
                                             messages=HI)
            with client.messages.stream(model="deepseek-chat", max_tokens=100,
                                        messages=HI) as stream:
                final = stream.get_final_message()
        return message, final

    for message in await in_thread(run):
        assert [b.type for b in message.content] == ["thinking", "text"]
        assert message.content[1].text == ANSWER
        assert (message.usage.input_tokens, message.usage.output_tokens) == (
            PROMPT_TOKENS, OUTPUT_TOKENS)
        assert message.usage.output_tokens_details.thinking_tokens == REASONING_TOKENS


async def test_anthropic_stream_message_delta_on_the_wire(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """On the wire: message_start has the estimate (sent before any count), message_delta
    the upstream's counts."""
    answer_counted(upstream)
    body = orjson.dumps({"model": "deepseek-chat", "max_tokens": 100, "messages": HI,
                         "stream": True})
    reply = await post(relay.base_url, "/v1/messages", body)
    assert reply.status == 200, reply.content
    events = [orjson.loads(e) for e in sse_events(reply.content)]
    start = next(e for e in events if e["type"] == "message_start")
    delta = next(e for e in events if e["type"] == "message_delta")
    assert start["message"]["usage"]["input_tokens"] != PROMPT_TOKENS  # the estimate
    assert delta["usage"]["input_tokens"] == PROMPT_TOKENS
    assert delta["usage"]["output_tokens"] == OUTPUT_TOKENS


# --- OpenAI chat completions (the fast path) and the embedded relay ------------------------


async def test_chat_completions_keep_the_upstream_usage(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """Chat completions, streamed with include_usage and whole: the upstream's counts."""
    answer_counted(upstream)

    def run() -> tuple[Any, Any]:
        with sdk(relay) as client:
            chunks = list(client.chat.completions.create(
                model="deepseek-chat", messages=HI, stream=True,
                stream_options={"include_usage": True}))
            whole = client.chat.completions.create(model="deepseek-chat", messages=HI)
        return chunks[-1].usage, whole.usage

    for usage in await in_thread(run):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            PROMPT_TOKENS, OUTPUT_TOKENS, PROMPT_TOKENS + OUTPUT_TOKENS)
        assert usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS


async def test_embedded_relay_finish_carries_the_counts(upstream: OpenAIEmulator) -> None:
    """relay.Relay.chat: the last event is the upstream's Finish, its counts on it."""
    answer_counted(upstream)
    config = settings(host="127.0.0.1", port=0, openai_upstreams=upstreams(upstream))
    async with Relay(config) as service:
        events: list[Delta] = [e async for e in service.chat(
            {"model": "deepseek-chat", "messages": HI})]
    assert events[-1] == Finish("stop", usage=Usage(PROMPT_TOKENS, OUTPUT_TOKENS,
                                                    REASONING_TOKENS))


# --- the access log --------------------------------------------------------------------------


async def test_access_log_counts_are_the_upstreams(
    relay: Running, upstream: OpenAIEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The access record's prompt and completion tokens are the upstream's on the neutral
    path, streamed and whole (they were the relay's estimates)."""
    answer_counted(upstream)
    caplog.set_level(logging.INFO, logger="relay.access")
    for path, body in (
        ("/v1/responses", {"model": "deepseek-chat", "input": "hi"}),
        ("/v1/messages", {"model": "deepseek-chat", "max_tokens": 100, "messages": HI}),
    ):
        for stream in (False, True):
            caplog.clear()
            response = await post(relay.base_url, path, orjson.dumps({**body, "stream": stream}),
                                  headers=[(b"authorization", b"Bearer k")])
            await relay.settled()
            assert response.status == 200, response.content
            [record] = [r for r in caplog.records if r.name == "relay.access"]
            access = record.__dict__["access"]
            assert (access["prompt_tokens"], access["completion_tokens"]) == (
                PROMPT_TOKENS, OUTPUT_TOKENS), (path, stream)
