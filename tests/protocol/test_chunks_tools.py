"""Tests for tool calls in protocol.chunks: the streamed chunks and the whole completion.

Whole event sequences are compared: the SSE ``data:`` lines parsed as JSON
against the exact list OpenAI's shape calls for. Then the official ``openai``
SDK is the judge of compatibility: its pydantic types validate every chunk and
the completion, and its own stream accumulator (``ChatCompletionStreamState``,
what ``client.chat.completions.stream()`` runs) reassembles the calls.
Sans-IO: plain functions, no event loop, no socket.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from protocol.chunks import ChunkEncoder, CompletionAccumulator, ToolCall, estimate_tokens
from protocol.deltas import Finish, ReasoningDelta, TextDelta, ToolCallDelta
from protocol.openai import ToolCall as ExportedToolCall
from tests.protocol.wire import data_events

if TYPE_CHECKING:
    from collections.abc import Sequence

    from protocol.chunks import ReasoningMode
    from protocol.deltas import Delta, FinishReason

ID, MODEL, CREATED = "chat-7", "glm-4", 1700000000

#: A text, then two calls, the first one's arguments in two pieces.
AGENT_ANSWER: list[Delta] = [
    TextDelta("Checking "),
    TextDelta("both."),
    ToolCallDelta(0, "call_a", "get_weather"),
    ToolCallDelta(0, arguments_part='{"city": '),
    ToolCallDelta(0, arguments_part='"Paris"}'),
    ToolCallDelta(1, "call_b", "get_time", '{"tz": "CET"}'),
    Finish("tool_calls"),
]
#: What the usage estimate counts of it: every character of text, names and arguments.
ALL_TEXT = 'Checking both.get_weather{"city": "Paris"}get_time{"tz": "CET"}'


def chunk(delta: dict[str, Any], finish_reason: FinishReason | None = None) -> dict[str, Any]:
    """The whole chunk OpenAI sends around ``delta``."""
    return {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ],
    }


def named(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """The delta of a call's first chunk."""
    function = {"name": name, "arguments": arguments}
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": function}]}


def more(index: int, arguments: str) -> dict[str, Any]:
    """The delta of a later chunk of the same call."""
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


def encode(batches: list[list[Delta]], **kwargs: Any) -> bytes:
    """start() then one encode() per batch."""
    enc = ChunkEncoder(completion_id=ID, model=MODEL, created=CREATED, **kwargs)
    wire = enc.start()
    for batch in batches:
        wire += enc.encode(batch)
    return wire


def whole(deltas: list[Delta], reasoning: ReasoningMode = "field") -> dict[str, Any]:
    acc = CompletionAccumulator(reasoning=reasoning)
    acc.add(deltas)
    body: dict[str, Any] = orjson.loads(
        acc.body(completion_id=ID, model=MODEL, created=CREATED, prompt_tokens=5)
    )
    return body


def sdk_final(wire: bytes) -> ChatCompletion:
    """What the openai SDK's stream accumulator makes of our stream."""
    state: ChatCompletionStreamState[object] = ChatCompletionStreamState()
    for event in data_events(wire):
        if event == "[DONE]":
            break
        state.handle_chunk(ChatCompletionChunk.model_validate(event))
    return state.get_final_completion()


# ---------------------------------------------------------------------------
# stream


def test_one_batch_gives_text_then_one_chunk_per_call() -> None:
    """Text, a call named then given its arguments in pieces, a second call and a
    tool_calls finish, all in one batch: the text chunk, one chunk per call with its
    arguments joined, the final chunk, [DONE]."""
    assert data_events(encode([AGENT_ANSWER])) == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking both."}),
        chunk(named(0, "call_a", "get_weather", '{"city": "Paris"}')),
        chunk(named(1, "call_b", "get_time", '{"tz": "CET"}')),
        chunk({}, "tool_calls"),
        "[DONE]",
    ]


def test_one_delta_per_batch_gives_one_chunk_per_delta() -> None:
    """Each delta in its own batch: a call's first chunk names it with empty arguments, each
    later piece is an index-and-arguments chunk, as OpenAI streams them."""
    assert data_events(encode([[delta] for delta in AGENT_ANSWER])) == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking "}),
        chunk({"content": "both."}),
        chunk(named(0, "call_a", "get_weather", "")),
        chunk(more(0, '{"city": ')),
        chunk(more(0, '"Paris"}')),
        chunk(named(1, "call_b", "get_time", '{"tz": "CET"}')),
        chunk({}, "tool_calls"),
        "[DONE]",
    ]


def test_pieces_of_an_earlier_batch_call_join_in_one_chunk() -> None:
    """Pieces of a call whose first chunk went out in an earlier batch make one arguments
    chunk per batch (never a second naming chunk); text after a call is its own chunk."""
    batches: list[list[Delta]] = [
        [ToolCallDelta(0, "call_a", "f")],
        [ToolCallDelta(0, arguments_part="{"), ToolCallDelta(0, arguments_part="}"),
         TextDelta("and "), TextDelta("then")],
        [Finish("tool_calls")],
    ]
    assert data_events(encode(batches))[1:] == [
        chunk(named(0, "call_a", "f", "")),
        chunk(more(0, "{}")),
        chunk({"content": "and then"}),
        chunk({}, "tool_calls"),
        "[DONE]",
    ]


def test_interleaved_calls_keep_their_order() -> None:
    """Pieces of call 0 after call 1 began go out after call 1's chunk, under index 0."""
    batches: list[list[Delta]] = [[
        ToolCallDelta(0, "call_a", "f", "{"),
        ToolCallDelta(1, "call_b", "g", "{}"),
        ToolCallDelta(0, arguments_part="}"),
        ToolCallDelta(0, arguments_part=""),  # nothing to say: no chunk
        Finish("tool_calls"),
    ]]
    assert data_events(encode(batches))[1:] == [
        chunk(named(0, "call_a", "f", "{")),
        chunk(named(1, "call_b", "g", "{}")),
        chunk(more(0, "}")),
        chunk({}, "tool_calls"),
        "[DONE]",
    ]


def test_tags_mode_closes_think_before_a_call() -> None:
    """In "tags" mode, reasoning followed by a call closes the <think> block first."""
    batches: list[list[Delta]] = [
        [ReasoningDelta("need weather"), ToolCallDelta(0, "call_a", "f", "{}")],
        [Finish("tool_calls")],
    ]
    assert data_events(encode(batches, reasoning="tags"))[1:] == [
        chunk({"content": "<think>\nneed weather\n</think>\n\n"}),
        chunk(named(0, "call_a", "f", "{}")),
        chunk({}, "tool_calls"),
        "[DONE]",
    ]


def test_usage_counts_tool_names_and_arguments() -> None:
    """The usage chunk's completion tokens cover the text, every name and all arguments."""
    events = data_events(encode([AGENT_ANSWER], include_usage=True, prompt_tokens=9))
    expected = estimate_tokens(ALL_TEXT)
    assert events[-2] == {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": None,
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": expected,
                  "total_tokens": 9 + expected},
    }


def test_every_finish_reason_reaches_the_final_chunk() -> None:
    """stop, length, content_filter and tool_calls are OpenAI's own finish reasons, sent as is."""
    for reason in ("stop", "length", "content_filter", "tool_calls"):
        events = data_events(encode([[TextDelta("x"), Finish(reason)]]))
        assert events[-2] == chunk({}, reason)
        ChatCompletionChunk.model_validate(events[-2])


def test_sdk_stream_accumulator_reassembles_the_calls() -> None:
    """The openai SDK's own ChatCompletionStreamState, fed our chunks one delta per batch,
    ends with the text, both calls (ids, names, joined arguments) and finish_reason tool_calls."""
    final = sdk_final(encode([[delta] for delta in AGENT_ANSWER]))
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking both."
    assert calls_of(choice.message.tool_calls) == [
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "get_time", '{"tz": "CET"}'),
    ]


# ---------------------------------------------------------------------------
# whole completion


def test_completion_carries_the_calls_and_the_text() -> None:
    """The whole chat.completion: the text as content, the calls in index order with joined
    arguments, finish_reason tool_calls, usage counting names and arguments."""
    tokens = estimate_tokens(ALL_TEXT)
    assert whole(AGENT_ANSWER) == {
        "id": ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking both.",
                    "tool_calls": [
                        {"id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"id": "call_b", "type": "function",
                         "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
    }


def test_completion_without_text_has_null_content() -> None:
    """Calls alone give content null (OpenAI's form); calls that arrive out of index order are
    listed by index; the SDK's ChatCompletion type accepts it."""
    body = whole([
        ToolCallDelta(1, "call_b", "g"),
        ToolCallDelta(0, "call_a", "f", '{"a"'),
        ToolCallDelta(1, arguments_part="{}"),
        ToolCallDelta(0, arguments_part=": 1}"),
        Finish("tool_calls"),
    ])
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "g", "arguments": "{}"}},
        ],
    }
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content is None
    assert parsed.choices[0].finish_reason == "tool_calls"


def test_completion_without_calls_keeps_its_old_shape() -> None:
    """No calls: no tool_calls key, and an empty answer's content stays "" (not null)."""
    assert whole([Finish("length")])["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": "length",
    }


def test_completion_tool_calls_property_and_exported_class() -> None:
    """The accumulator's tool_calls are ToolCall objects, the class protocol.openai exports."""
    acc = CompletionAccumulator()
    acc.add(AGENT_ANSWER[:4])
    assert acc.tool_calls == [ToolCall("call_a", "get_weather", '{"city": ')]
    assert ToolCall is ExportedToolCall


# ---------------------------------------------------------------------------
# properties: any batching, the same calls

names = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
pieces = st.lists(st.text(max_size=6), max_size=4)


@st.composite
def agent_answers(draw: st.DrawFn) -> list[Delta]:
    """Text pieces, then calls whose argument pieces may interleave, then Finish."""
    deltas: list[Delta] = [TextDelta(t) for t in draw(st.lists(st.text(max_size=6), max_size=3))]
    count = draw(st.integers(0, 3))
    queues: list[list[Delta]] = []
    for index in range(count):
        first = ToolCallDelta(index, f"call_{index}", draw(names), draw(st.text(max_size=4)))
        queues.append([first, *(ToolCallDelta(index, arguments_part=p) for p in draw(pieces))])
    # Merge the calls: each call's deltas keep their order and its first delta comes
    # before every later call's first delta (the shaper's order).
    started = 0
    while any(queues):
        choices = [i for i, q in enumerate(queues) if q and (i < started or i == started)]
        index = draw(st.sampled_from(choices))
        deltas.append(queues[index].pop(0))
        if index == started:
            started += 1
    deltas.append(Finish("tool_calls" if count else "stop"))
    return deltas


def calls_of(calls: Sequence[Any] | None) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of the SDK's tool call objects."""
    return [(c.id, c.function.name, c.function.arguments) for c in calls or []]


@settings(max_examples=200, deadline=None)
@given(deltas=agent_answers(), data=st.data())
def test_any_batching_gives_the_sdk_the_accumulators_answer(
    deltas: list[Delta], data: st.DataObject
) -> None:
    """Any answer of text and calls, in any batching: every chunk is a valid SDK chunk, and the
    SDK's stream accumulator ends with the same content, calls and finish reason as our
    non-stream completion, and the usage equals the completion's."""
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(deltas)), max_size=6))))
    batches, start = [], 0
    for cut in [*cuts, len(deltas)]:
        batches.append(deltas[start:cut])
        start = cut
    wire = encode(batches, include_usage=True, prompt_tokens=5)
    events = data_events(wire)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        ChatCompletionChunk.model_validate(event)
    streamed = sdk_final(wire).choices[0]
    body = whole(deltas)
    completion = ChatCompletion.model_validate(body).choices[0]
    assert streamed.finish_reason == completion.finish_reason
    # The stream's role chunk carries content "": no text gives "" there, null (with
    # calls) or "" in the completion.
    assert (streamed.message.content or "") == (completion.message.content or "")
    assert calls_of(streamed.message.tool_calls) == calls_of(completion.message.tool_calls)
    assert events[-2]["usage"] == body["usage"]


def test_sdk_parses_strict_tool_arguments_from_our_stream() -> None:
    """With a strict tool given to the SDK's accumulator (as .stream(tools=...) does), the
    arguments we stream in pieces come out parsed."""
    tool: Any = {
        "type": "function",
        "function": {"name": "get_weather", "strict": True,
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"], "additionalProperties": False}},
    }
    state: ChatCompletionStreamState[object] = ChatCompletionStreamState(input_tools=[tool])
    wire = encode([[delta] for delta in AGENT_ANSWER[2:5]] + [[Finish("tool_calls")]])
    kinds = []
    for event in data_events(wire)[:-1]:
        kinds += [e.type for e in state.handle_chunk(ChatCompletionChunk.model_validate(event))]
    assert "tool_calls.function.arguments.done" in kinds
    call = (state.get_final_completion().choices[0].message.tool_calls or [])[0]
    assert call.function.parsed_arguments == json.loads('{"city": "Paris"}')
