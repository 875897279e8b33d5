"""Tests of the sans-IO readers of an OpenAI-compatible upstream's answers."""

from __future__ import annotations

import contextlib
from typing import Any

import hypothesis.strategies as st
import orjson
import pytest
from hypothesis import given

from protocol.deltas import (
    Delta,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    Usage,
)
from protocol.errors import (
    AuthError,
    NoAccountFree,
    RemoteProtocolError,
    RequestError,
    UpstreamFailed,
    UpstreamTimeout,
)
from protocol.sse import SSEDecoder
from providers.openai.stream import (
    ChunkStream,
    EventFramer,
    error_from_response,
    holds_event,
    model_member,
    rewrite_model,
    usage_from,
)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, *,
          model: str = "x", **extra: Any) -> bytes:
    """One ``data:`` event of a chat.completion.chunk."""
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                            "model": model}
    body["choices"] = [] if delta is None else [
        {"index": 0, "delta": delta, "finish_reason": finish}]
    body.update(extra)
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"
WIRE = b"".join([
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "Hmm"}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo ✓"}),
    chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                           "function": {"name": "f", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
    chunk({}, "tool_calls"),
    chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
    DONE,
])
EXPECTED: list[Delta] = [
    ReasoningDelta("Hmm"), TextDelta("Hel"), TextDelta("lo ✓"),
    ToolCallDelta(0, "call_a", "f", ""), ToolCallDelta(0, "", "", '{"a":'),
    ToolCallDelta(0, "", "", "1}"), Finish("tool_calls", usage=Usage(3, 4)),
]


def translate(wire: bytes, cuts: list[int]) -> tuple[list[Delta], ChunkStream]:
    """Feed ``wire`` cut at ``cuts`` through an SSE decoder and a translator, then close."""
    decoder, stream, out, start = SSEDecoder(), ChunkStream(), [], 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        for event in decoder.feed(wire[start:cut]):
            if not stream.finished:
                out += stream.feed(event)
        start = cut
    decoder.close()
    out += stream.close()
    return out, stream


@given(st.data())
def test_any_split_gives_the_same_deltas(data: st.DataObject) -> None:
    """However the bytes are cut, the deltas are the same: reasoning, text, a tool call
    whose id and name come first, then the finish reason the upstream gave, with the
    usage chunk's counts that came after it; usage is kept."""
    cuts = data.draw(st.lists(st.integers(0, len(WIRE))), label="cuts")
    deltas, stream = translate(WIRE, cuts)
    assert deltas == EXPECTED
    assert stream.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_byte_by_byte() -> None:
    """One byte per read gives the same deltas (a multi-byte character split included)."""
    assert translate(WIRE, list(range(len(WIRE))))[0] == EXPECTED


@given(st.binary(max_size=80), st.lists(st.integers(0, 80)))
def test_garbage_gives_deltas_or_remote_protocol_error(wire: bytes, cuts: list[int]) -> None:
    """Any bytes give deltas or RemoteProtocolError, nothing else."""
    with contextlib.suppress(RemoteProtocolError):
        translate(wire, cuts)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (chunk({"content": "a"}) + chunk({}, "stop"), [TextDelta("a"), Finish("stop")]),
        (chunk({"content": "a"}), [TextDelta("a"), UpstreamError(
            "truncated", "upstream stream ended before the answer was complete")]),
        (chunk({"content": "a"}) + DONE, [TextDelta("a"), Finish("stop")]),
        (chunk({"content": "a"}, "length") + DONE, [TextDelta("a"), Finish("length")]),
        (chunk({}, "function_call") + DONE, [Finish("tool_calls")]),
        (chunk({}, "eos") + DONE, [Finish("stop")]),
        (chunk({"reasoning": "r"}) + DONE, [ReasoningDelta("r"), Finish("stop")]),
        (chunk({"content": "a"}) + b'data: {"error": {"message": "overloaded", '
         b'"type": "server_error", "code": 503}}\n\n' + DONE,
         [TextDelta("a"), UpstreamError("503", "overloaded", 503)]),
        (chunk({"tool_calls": [{"index": 1, "function": {"name": "g", "arguments": "{}"}}]})
         + DONE, [ToolCallDelta(1, "call_1", "g", "{}"), Finish("stop")]),
    ],
)
def test_endings(wire: bytes, expected: list[Delta]) -> None:
    """[DONE] or EOF after a finish reason is a Finish, EOF before one is truncated; an
    in-band error object ends the answer; unknown reasons are stop; a call without an id
    gets one."""
    assert translate(wire, [])[0] == expected


USAGE = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42,
         "completion_tokens_details": {"reasoning_tokens": 9},
         "prompt_tokens_details": {"cached_tokens": 8}}


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (USAGE, Usage(12, 30, 9, 8)),
        ({"prompt_tokens": 1, "completion_tokens": 0}, Usage(1, 0)),
        ({"prompt_tokens": 1, "completion_tokens": 2, "completion_tokens_details": None,
          "prompt_tokens_details": {"cached_tokens": "3"}}, Usage(1, 2)),
        ({"prompt_tokens": 1}, None),
        ({"prompt_tokens": -1, "completion_tokens": 2}, None),
        ({"prompt_tokens": True, "completion_tokens": 2}, None),
        ({"prompt_tokens": 1.5, "completion_tokens": 2}, None),
        ([1, 2], None),
        (None, None),
    ],
)
def test_usage_from(usage: object, expected: Usage | None) -> None:
    """Both counts are needed, as non-negative integers; the details are read when they
    are counts, 0 otherwise."""
    assert usage_from(usage) == expected


@pytest.mark.parametrize(
    "wire",
    [
        chunk({"content": "a"}) + chunk({}, "stop") + chunk(None, usage=USAGE) + DONE,
        chunk({"content": "a"}) + chunk({}, "stop", usage=USAGE) + DONE,  # in the finish chunk
        chunk({"content": "a"}) + chunk({}, "stop") + chunk(None, usage=USAGE),  # no [DONE]
    ],
)
def test_finish_carries_the_upstream_usage(wire: bytes) -> None:
    """The usage chunk after the finish reason (or in its chunk) is on the Finish,
    [DONE] or not."""
    assert translate(wire, [])[0] == [TextDelta("a"), Finish("stop", usage=Usage(12, 30, 9, 8))]


def test_finish_without_usage() -> None:
    """No usage chunk (include_usage not honoured), or one without counts: no usage."""
    assert translate(chunk({"content": "a"}, "stop") + DONE, [])[0][-1] == Finish("stop")
    bare = chunk({}, "stop") + chunk(None, usage={"total_tokens": 3}) + DONE
    assert translate(bare, [])[0] == [Finish("stop")]


def completion(message: dict[str, Any], finish: str | None = "stop", **extra: Any) -> bytes:
    return orjson.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "x",
                         "choices": [{"index": 0, "message": message,
                                      "finish_reason": finish}], **extra})


def test_whole_completion_gives_the_same_deltas() -> None:
    """A whole chat.completion (stream ignored upstream): reasoning, text, the tool calls
    (ids kept, or made from their position), the finish reason and the usage."""
    body = completion({"role": "assistant", "reasoning_content": "Hmm", "content": "Hi",
                       "tool_calls": [
                           {"id": "call_a", "type": "function",
                            "function": {"name": "f", "arguments": '{"a":1}'}},
                           {"type": "function", "function": {"name": "g", "arguments": ""}}]},
                      "tool_calls", usage=USAGE)
    stream = ChunkStream()
    assert stream.completion(body) == [
        ReasoningDelta("Hmm"), TextDelta("Hi"), ToolCallDelta(0, "call_a", "f", '{"a":1}'),
        ToolCallDelta(1, "call_1", "g", ""), Finish("tool_calls", usage=Usage(12, 30, 9, 8))]
    assert stream.finished
    assert stream.usage == USAGE
    with pytest.raises(RemoteProtocolError):
        stream.completion(body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (completion({"content": "x"}, None), [TextDelta("x"), Finish("stop")]),
        (completion({"content": None}, "length"), [Finish("length")]),
        (b'{"error": {"message": "no", "type": "server_error"}}',
         [UpstreamError("server_error", "no")]),
    ],
)
def test_whole_completion_endings(body: bytes, expected: list[Delta]) -> None:
    """No reason is stop, no usage is none; an error object is an UpstreamError."""
    assert ChunkStream().completion(body) == expected


@pytest.mark.parametrize("body", [b"nope", b"[]", b'{"choices": []}', b'{"choices": [1]}'])
def test_whole_completion_that_is_none(body: bytes) -> None:
    """Not JSON, not an object, no choice: a protocol error."""
    with pytest.raises(RemoteProtocolError):
        ChunkStream().completion(body)


def test_event_after_the_end_is_a_protocol_error() -> None:
    """Nothing may follow [DONE] (the reader stops there; a translator fed more refuses)."""
    decoder, stream = SSEDecoder(), ChunkStream()
    events = decoder.feed(DONE + chunk({"content": "late"}))
    assert stream.feed(events[0]) == [Finish("stop")]
    with pytest.raises(RemoteProtocolError):
        stream.feed(events[1])


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls", "retried"),
    [(401, AuthError, True), (403, AuthError, True), (429, NoAccountFree, True),
     (400, RequestError, False), (404, RequestError, False), (500, UpstreamFailed, False),
     (503, UpstreamFailed, False), (504, UpstreamTimeout, False)],
)
def test_errors_keep_status_and_fields(status: int, cls: type[Exception], retried: bool) -> None:
    """An upstream error keeps its status, message, type, param and code."""
    body = orjson.dumps({"error": {"message": "nope", "type": "weird_error", "param": "model",
                                   "code": "c1"}})
    error = error_from_response(status, body, "deepseek")
    assert isinstance(error, cls)
    assert (error.status, error.message, error.kind, error.param, error.code) == (
        status, "nope", "weird_error", "model", "c1")
    assert (status in (401, 403, 429)) == retried


@pytest.mark.parametrize("body", [b"", b"<html>", b"[1]", b'{"error": 5}'])
def test_error_without_a_readable_body(body: bytes) -> None:
    """A body that is no error object still gives the status and a message naming it."""
    error = error_from_response(502, body, "deepseek")
    assert (error.status, error.message) == (502, "deepseek answered HTTP 502")


def test_error_as_text_or_detail() -> None:
    """{"error": "text"} and {"detail": "text"} (vLLM, FastAPI) give their text."""
    assert error_from_response(400, b'{"error": "bad"}', "u").message == "bad"
    assert error_from_response(400, b'{"detail": "worse"}', "u").message == "worse"


# --- the passthrough framer ---------------------------------------------------------------


def frame(wire: bytes, cuts: list[int], member: bytes | None) -> tuple[bytes, bool]:
    framer, out, start = EventFramer(member), b"", 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        piece = framer.feed(wire[start:cut])
        if piece:
            assert piece.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))  # whole events only
        out += piece
        start = cut
    framer.close()
    return out, framer.done


@given(st.data())
def test_framer_any_split_gives_the_same_bytes(data: st.DataObject) -> None:
    """However the reads are cut, the framer gives whole events whose bytes are the wire's,
    with every model member rewritten, and sees [DONE]."""
    cuts = data.draw(st.lists(st.integers(0, len(WIRE))), label="cuts")
    member = model_member("deepseek/x")
    out, done = frame(WIRE, cuts, member)
    assert out == WIRE.replace(b'"model":"x"', b'"model":"deepseek/x"')
    assert done
    assert frame(WIRE, cuts, None) == (WIRE, True)


def test_framer_rewrites_model_members_only() -> None:
    """Answer text that mentions "model": "x" (escaped in JSON) is left alone; spaces
    around the colon, CRLF event ends and names that need escaping are handled."""
    text = chunk({"content": 'say "model":"x"'})
    spaced = b'data: {"id":"c","model" : "x","choices":[]}\r\n\r\n'
    member = model_member('we"ird\\name')
    out, done = frame(text + spaced, [], member)
    assert orjson.loads(out.split(b"\n\n")[0][6:])["choices"][0]["delta"]["content"] == (
        'say "model":"x"')
    assert orjson.loads(out.split(b"\n\n")[0][6:])["model"] == 'we"ird\\name'
    assert orjson.loads(out.split(b"\n\n")[1].strip()[6:])["model"] == 'we"ird\\name'
    assert not done


@pytest.mark.parametrize("served", ["p/x", "p/y", "abcd"])
def test_framer_follows_a_model_that_changes(served: str) -> None:
    """The upstream names another model later in the stream (or one as long as the served
    name): every member is still rewritten, read by read."""
    framer = EventFramer(model_member(served))
    first = framer.feed(chunk({"content": "a"}, model="x"))
    second = framer.feed(chunk({"content": "b"}, model="x") + chunk({"content": "c"},
                                                                    model="x-2024"))
    third = framer.feed(chunk({"content": "d"}, model="wxyz"))
    events = [e for block in (first, second, third) for e in block.split(b"\n\n") if e]
    assert [orjson.loads(e[6:])["model"] for e in events] == [served] * 4


def test_framer_done_is_a_line_of_its_own() -> None:
    """[DONE] quoted in answer text is not the end; a real one is, with or without a space."""
    assert not frame(chunk({"content": "data: [DONE]"}), [], None)[1]
    assert frame(b"data:[DONE]\n\n", [], None)[1]


def test_framer_refuses_a_cut_or_endless_event() -> None:
    """EOF inside an event, or an event over the limit, is a RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError):
        frame(b'data: {"cut', [], None)
    framer = EventFramer(None, max_event_bytes=10)
    with pytest.raises(RemoteProtocolError):
        framer.feed(b"data: " + b"x" * 20)


def test_rewrite_whole_body() -> None:
    """A whole chat.completion gets the served name too; None leaves it as it is."""
    body = b'{"id":"c","model":"x","choices":[]}'
    assert orjson.loads(rewrite_model(body, model_member("p/x")))["model"] == "p/x"
    assert rewrite_model(body, None) is body


@pytest.mark.parametrize(
    ("block", "held"),
    [
        (b": PROCESSING\n\n", False),
        (b": waiting for data\n\n: still\r\n\r\n", False),  # "data" in a comment is no event
        (b": PROCESSING\n\ndata: {}\n\n", True),
        (b"data: [DONE]\n\n", True),
        (b"event: error\ndata: boom\n\n", True),
    ],
)
def test_holds_event_tells_comments_from_events(block: bytes, held: bool) -> None:
    assert holds_event(block) is held
