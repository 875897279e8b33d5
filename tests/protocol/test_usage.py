"""The upstream's own token counts (``Finish.usage``) in every dialect's ``usage`` (issue 16).

Each encoder and accumulator reports the :class:`~protocol.deltas.Usage` a
``Finish`` carries instead of its estimate, in its own wire's meanings, and
the estimate when the ``Finish`` carries none. Bodies and events are held to
the SDKs' types; the streams are rebuilt by the SDKs' accumulators.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from protocol.anthropic import MessageAccumulator, MessageEncoder
from protocol.chunks import ChunkEncoder, CompletionAccumulator
from protocol.deltas import Delta, Finish, ReasoningDelta, TextDelta, Usage
from tests.protocol import test_anthropic as anthropic_wire
from tests.protocol import test_responses as responses_wire
from tests.protocol.wire import data_events, named_events

#: What the upstream counted: 50 prompt tokens (8 of them cached), 20 answer tokens
#: (5 of them reasoning). The estimates of ANSWER are far from these.
COUNTED = Usage(input_tokens=50, output_tokens=20, reasoning_tokens=5, cached_tokens=8)
ANSWER: list[Delta] = [ReasoningDelta("think"), TextDelta("你好世界 hello")]


def counted(reason: Any = "stop") -> list[list[Delta]]:
    return [ANSWER, [Finish(reason, usage=COUNTED)]]


def estimated(reason: Any = "stop") -> list[list[Delta]]:
    return [ANSWER, [Finish(reason)]]


# --- OpenAI chat completions --------------------------------------------------------------


def chat_stream(batches: list[list[Delta]]) -> tuple[list[Any], ChunkEncoder]:
    enc = ChunkEncoder(completion_id="chat-1", model="m", created=1, include_usage=True,
                       prompt_tokens=11)
    wire = enc.start() + b"".join(enc.encode(batch) for batch in batches)
    events = data_events(wire)
    for event in events[:-1]:
        ChatCompletionChunk.model_validate(event)
    return events, enc


def test_chat_stream_usage_chunk_is_the_upstreams() -> None:
    """The usage chunk has the upstream's counts and their details; the encoder's
    completion_tokens (the access log's) too."""
    events, enc = chat_stream(counted())
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == []
    assert events[-2]["usage"] == {
        "prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70,
        "completion_tokens_details": {"reasoning_tokens": 5},
        "prompt_tokens_details": {"cached_tokens": 8}}
    assert enc.completion_tokens == 20


def test_chat_stream_without_counts_estimates() -> None:
    """No counts on the Finish: the estimates, no details."""
    events, enc = chat_stream(estimated())
    estimate = enc.completion_tokens
    assert estimate not in (0, 20)
    assert events[-2]["usage"] == {"prompt_tokens": 11, "completion_tokens": estimate,
                                   "total_tokens": 11 + estimate}


def test_chat_stream_counts_without_details() -> None:
    """Counts the upstream gave without details: no details object."""
    events, _ = chat_stream([ANSWER, [Finish(usage=Usage(3, 4))]])
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


@pytest.mark.parametrize(
    ("batches", "expected"),
    [
        (counted(), {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70,
                     "completion_tokens_details": {"reasoning_tokens": 5},
                     "prompt_tokens_details": {"cached_tokens": 8}}),
        (estimated(), None),
    ],
)
def test_chat_whole_usage(batches: list[list[Delta]], expected: dict[str, Any] | None) -> None:
    """A whole chat.completion: the upstream's counts, or (None here) the estimates the
    stream would give."""
    acc = CompletionAccumulator()
    for batch in batches:
        acc.add(batch)
    body = acc.body(completion_id="c", model="m", created=1, prompt_tokens=11)
    ChatCompletion.model_validate_json(body)
    usage = orjson.loads(body)["usage"]
    if expected is None:
        _, enc = chat_stream(batches)
        expected = {"prompt_tokens": 11, "completion_tokens": enc.completion_tokens,
                    "total_tokens": 11 + enc.completion_tokens}
    assert usage == expected


# --- the Responses API --------------------------------------------------------------------

RESPONSES_COUNTED = {
    "input_tokens": 50, "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0},
    "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 5},
    "total_tokens": 70,
}


@pytest.mark.parametrize(("reason", "kind"), [("stop", "response.completed"),
                                               ("length", "response.incomplete")])
def test_responses_stream_usage_is_the_upstreams(reason: str, kind: str) -> None:
    """response.completed (or .incomplete) carries the upstream's counts; the SDK's stream
    helper rebuilds them; the whole response has the same."""
    events = responses_wire.stream(counted(reason))
    assert events[-1][0] == kind
    assert events[-1][1]["response"]["usage"] == RESPONSES_COUNTED
    if reason == "stop":
        rebuilt = responses_wire.sdk_rebuild(events)
        assert (rebuilt.usage.input_tokens, rebuilt.usage.output_tokens) == (50, 20)
        assert rebuilt.usage.output_tokens_details.reasoning_tokens == 5
        assert rebuilt.usage.input_tokens_details.cached_tokens == 8
    assert responses_wire.whole(counted(reason))["usage"] == RESPONSES_COUNTED


def test_responses_without_counts_estimate() -> None:
    """No counts: the estimate, the same streamed and whole, not the counts above."""
    usage = responses_wire.stream(estimated())[-1][1]["response"]["usage"]
    assert usage == responses_wire.whole(estimated())["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert (usage["input_tokens"], usage["output_tokens"]) != (50, 20)
    assert usage["output_tokens_details"]["reasoning_tokens"] > 0  # estimated from the item


# --- Anthropic Messages --------------------------------------------------------------------

#: COUNTED in Anthropic's meanings: the cache reads are not input_tokens.
ANTHROPIC_COUNTED = {"input_tokens": 42, "output_tokens": 20, "cache_read_input_tokens": 8,
                     "output_tokens_details": {"thinking_tokens": 5}}


def test_anthropic_stream_usage_is_the_upstreams() -> None:
    """message_start keeps the estimate (nothing is counted yet); message_delta carries
    the upstream's input and output counts, and the SDK's accumulator puts them in the
    final message."""
    enc = MessageEncoder(message_id="msg_x", model="m", input_tokens=12)
    wire = enc.start() + b"".join(enc.encode(batch) for batch in counted())
    events = named_events(wire)
    assert events[0][1]["message"]["usage"] == {"input_tokens": 12, "output_tokens": 1}
    [delta] = [data for name, data in events if name == "message_delta"]
    assert delta["usage"] == ANTHROPIC_COUNTED
    usage = anthropic_wire.rebuild(wire)["usage"]
    assert {k: usage[k] for k in ANTHROPIC_COUNTED} == ANTHROPIC_COUNTED
    assert enc.output_tokens == 20


def test_anthropic_whole_usage_is_the_upstreams() -> None:
    """The whole message's usage: the upstream's counts, in Anthropic's meanings."""
    assert anthropic_wire.whole(counted())["usage"] == ANTHROPIC_COUNTED


def test_anthropic_counts_without_cache_or_thinking() -> None:
    """Plain counts: input_tokens and output_tokens only, the input the upstream's prompt."""
    acc = MessageAccumulator()
    acc.add([TextDelta("a"), Finish(usage=Usage(7, 3))])
    body = orjson.loads(acc.body(message_id="m", model="m", input_tokens=99))
    assert body["usage"] == {"input_tokens": 7, "output_tokens": 3}


def test_anthropic_without_counts_estimates() -> None:
    """No counts: message_delta has the output estimate only, the whole message the
    prompt's estimate and the same output estimate."""
    wire = anthropic_wire.stream(estimated())
    [delta] = [data for name, data in named_events(wire)
               if name == "message_delta"]
    estimate = delta["usage"]["output_tokens"]
    assert delta["usage"] == {"output_tokens": estimate}
    assert estimate != 20
    assert anthropic_wire.whole(estimated())["usage"] == {"input_tokens": 12,
                                                         "output_tokens": estimate}
