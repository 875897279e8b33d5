"""Stream readers (bench.readers): timing, stamp extraction and error counting, sans-IO."""

from __future__ import annotations

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bench.readers import (
    ConnectStreamReader,
    OpenAIStreamReader,
    StreamRecord,
    extract_stamps,
)
from protocol.connect import FLAG_END_STREAM, encode_envelope


def chunk(content: str | None = None, *, reasoning: str | None = None, role: bool = False) -> bytes:
    """One OpenAI SSE chunk event."""
    delta: dict[str, str] = {}
    if role:
        delta["role"] = "assistant"
        delta["content"] = ""
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    body = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


FINAL = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
DONE = b"data: [DONE]\n\n"
GOOD = chunk(role=True) + chunk("[ts:100]") + chunk("[ts:200][ts:300]") + FINAL + DONE


def read_openai(
    wire: bytes, *, complete: bool = True, cuts: list[int] | None = None
) -> StreamRecord:
    """Feed ``wire`` to an OpenAI reader (split at ``cuts``); receipt time = read index."""
    record = StreamRecord(start_ns=0)
    reader = OpenAIStreamReader(record, stamps=True)
    start = 0
    for index, cut in enumerate([*sorted(set(cuts or [])), len(wire)]):
        reader.feed(wire[start:cut], 1000 + index)
        start = cut
    reader.finish(complete=complete, now_ns=5000)
    return record


def test_extract_stamps_finds_every_stamp_in_order() -> None:
    """Several stamps merged into one chunk are all found; other text is ignored."""
    assert extract_stamps("a[ts:12]b[ts:3][ts:x][ts:45]") == [12, 3, 45]
    assert extract_stamps("no stamps here") == []


def test_good_stream_is_ok_with_chunks_and_stamps() -> None:
    """A stream with [DONE] is ok; the role chunk is not a text chunk; stamps pair with times."""
    record = read_openai(GOOD)
    assert record.ok
    assert record.error is None
    assert len(record.chunk_ns) == 2
    assert record.chars == len("[ts:100]") + len("[ts:200][ts:300]")
    assert record.stamps == [100, 200, 300]
    assert record.stamp_ns == [1000, 1000, 1000]
    assert record.first_ns == 1000
    assert record.end_ns == 1000


def test_stream_without_done_is_an_error() -> None:
    """A body that ends cleanly but never says [DONE] counts as no_done, not success."""
    record = read_openai(chunk("hello") + FINAL)
    assert not record.ok
    assert record.error == "no_done"
    assert record.chunk_ns == [1000]


def test_in_band_error_is_an_error_even_if_done_follows() -> None:
    """An OpenAI error object inside the stream is inband_error, whatever comes after."""
    wire = chunk("partial") + b'data: {"error": {"message": "boom", "type": "x"}}\n\n' + DONE
    record = read_openai(wire)
    assert record.error == "inband_error"
    assert "boom" in record.detail
    assert not record.ok


def test_event_error_type_is_an_in_band_error() -> None:
    """An SSE event named 'error' is an in-band error even without an error key."""
    record = read_openai(b'event: error\ndata: {"message": "overloaded"}\n\n' + DONE)
    assert record.error == "inband_error"


def test_cut_off_stream_is_an_error() -> None:
    """A body that did not end cleanly (connection dropped) is cut_off, never a fast success."""
    record = read_openai(chunk("[ts:1]") + chunk("[ts:2]"), complete=False)
    assert record.error == "cut_off"
    assert not record.done
    assert record.stamps == [1, 2]


def test_cut_off_after_done_is_still_cut_off() -> None:
    """[DONE] followed by a broken HTTP body still counts as cut off."""
    record = read_openai(GOOD, complete=False)
    assert record.error == "cut_off"
    assert not record.ok


def test_stream_ending_inside_an_event_is_cut_off() -> None:
    """A clean body end in the middle of an SSE event means the stream was truncated."""
    record = read_openai(chunk("[ts:1]") + b'data: {"choices": [')
    assert record.error == "cut_off"


def test_bad_json_is_a_bad_frame() -> None:
    """A data event that is not JSON is bad_frame."""
    record = read_openai(b"data: {not json\n\n" + DONE)
    assert record.error == "bad_frame"


def test_data_after_done_is_an_error() -> None:
    """Anything after [DONE] is a protocol violation."""
    record = read_openai(DONE + chunk("late"))
    assert record.error == "data_after_done"


def test_reasoning_and_keepalive_comments() -> None:
    """reasoning_content counts as text; SSE comments (keep-alives) are ignored."""
    record = read_openai(b": keep-alive\n\n" + chunk(reasoning="thinking") + chunk("answer") + DONE)
    assert record.ok
    assert record.chars == len("thinking") + len("answer")
    assert len(record.chunk_ns) == 2


def test_first_error_wins() -> None:
    """After an error, the rest of the stream and a later cut-off do not change the kind."""
    record = StreamRecord()
    reader = OpenAIStreamReader(record)
    reader.feed(b"data: nope\n\n", 1)
    reader.feed(chunk("ignored"), 2)
    reader.finish(complete=False, now_ns=3)
    assert record.error == "bad_frame"
    assert record.chunk_ns == []


def test_notify_fires_once_at_first_chunk() -> None:
    """The notify hook is called once, at the first text chunk, not per chunk."""
    calls: list[int] = []
    record = StreamRecord(notify=lambda: calls.append(1))
    reader = OpenAIStreamReader(record)
    reader.feed(chunk("a") + chunk("b"), 1)
    reader.feed(DONE, 2)
    reader.finish(complete=True, now_ns=3)
    assert calls == [1]
    assert record.ok


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(GOOD)), max_size=8))
@example(cuts=list(range(len(GOOD))))
def test_any_split_gives_the_same_verdict_and_stamps(cuts: list[int]) -> None:
    """However the body is split into reads, the verdict, text and stamps are the same."""
    record = read_openai(GOOD, cuts=cuts)
    assert record.ok
    assert record.stamps == [100, 200, 300]
    assert record.chars == len("[ts:100]") + len("[ts:200][ts:300]")


# --- StepChat Connect stream -------------------------------------------------------


def text_envelope(text: str) -> bytes:
    """A Connect envelope carrying one textEvent."""
    return encode_envelope(orjson.dumps({"textEvent": {"text": text}}))


STEP_GOOD = (
    encode_envelope(b'{"startEvent": {"chatId": "1"}}')
    + text_envelope("[ts:10]")
    + text_envelope("[ts:20]")
    + encode_envelope(b'{"doneEvent": {}}')
    + encode_envelope(b"{}", FLAG_END_STREAM)
)


def read_connect(wire: bytes, *, complete: bool = True) -> StreamRecord:
    """Feed ``wire`` in one read to a Connect reader."""
    record = StreamRecord(start_ns=0)
    reader = ConnectStreamReader(record, stamps=True)
    reader.feed(wire, 100)
    reader.finish(complete=complete, now_ns=200)
    return record


def test_connect_good_stream() -> None:
    """textEvents are chunks with stamps; doneEvent and the end envelope complete it."""
    record = read_connect(STEP_GOOD)
    assert record.ok
    assert record.stamps == [10, 20]
    assert len(record.chunk_ns) == 2


def test_connect_error_end_of_stream_is_in_band_error() -> None:
    """An end-of-stream envelope with an error is inband_error (PROTOCOLS.md 2.5)."""
    wire = text_envelope("[ts:1]") + encode_envelope(
        b'{"error": {"code": "resource_exhausted", "message": "busy"}}', FLAG_END_STREAM
    )
    record = read_connect(wire)
    assert record.error == "inband_error"
    assert "resource_exhausted" in record.detail


def test_connect_missing_end_is_no_done() -> None:
    """A clean body end without doneEvent or end-of-stream is no_done."""
    record = read_connect(text_envelope("[ts:1]"))
    assert record.error == "no_done"


def test_connect_partial_envelope_is_cut_off() -> None:
    """A body that ends inside an envelope is cut_off."""
    record = read_connect(text_envelope("[ts:1]") + text_envelope("[ts:2]")[:-3])
    assert record.error == "cut_off"
    assert record.stamps == [1]


def test_connect_bad_json_is_bad_frame() -> None:
    """An envelope whose payload is not JSON is bad_frame."""
    record = read_connect(encode_envelope(b"{oops"))
    assert record.error == "bad_frame"
