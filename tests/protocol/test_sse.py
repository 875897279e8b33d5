"""Tests of protocol/sse.py: the WHATWG event-stream rules, any-split
invariance, the encoder round trip, garbage input and the size limit."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.sse import (
    DONE,
    SSEDecoder,
    SSEEvent,
    encode_comment,
    encode_data,
    encode_event,
)

BOM = "\ufeff".encode()
PROPERTY = settings(max_examples=200, deadline=None)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a decoder made of a whole stream: its events, or that it refused."""

    events: tuple[SSEEvent, ...]
    truncated: bool
    refused: bool


def feed_split(wire: bytes, cuts: list[int], max_event_bytes: int = 1 << 20) -> Outcome:
    """Feed ``wire`` cut at ``cuts`` (clamped to its length), then close."""
    decoder = SSEDecoder(max_event_bytes)
    events: list[SSEEvent] = []
    start = 0
    try:
        for cut in sorted({min(cut, len(wire)) for cut in cuts}):
            events += decoder.feed(wire[start:cut])
            start = cut
        events += decoder.feed(wire[start:])
    except RemoteProtocolError:
        return Outcome((), truncated=False, refused=True)
    events += decoder.close()
    return Outcome(tuple(events), decoder.truncated, refused=False)


def decode(*chunks: bytes) -> list[SSEEvent]:
    """Feed each chunk in turn and return every event, without closing."""
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


# --- line ends --------------------------------------------------------------


def test_lf_ends_lines() -> None:
    """LF-terminated lines and a blank LF line dispatch one event."""
    assert decode(b"data: a\ndata: b\n\n") == [SSEEvent("a\nb")]


def test_crlf_ends_lines() -> None:
    """CRLF line ends are one line end each, not two (which would dispatch early)."""
    assert decode(b"data: a\r\ndata: b\r\n\r\n") == [SSEEvent("a\nb")]


def test_lone_cr_ends_lines() -> None:
    """WHATWG: a lone CR ends a line too; CR CR is a line and a blank line."""
    assert decode(b"data: a\rdata: b\r\r") == [SSEEvent("a\nb")]


def test_cr_then_crlf_is_two_line_ends() -> None:
    """A CR followed by CRLF is a line end and then a blank line: the event dispatches."""
    assert decode(b"data: a\r\r\n") == [SSEEvent("a")]


def test_mixed_line_ends() -> None:
    """LF, CR and CRLF may be mixed within one stream."""
    assert decode(b"data: a\rdata: b\r\ndata: c\n\r\n") == [SSEEvent("a\nb\nc")]


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    """A CR that ends one read and the LF that starts the next are one line end:
    the LF is not taken as a blank line, so nothing dispatches before the real one."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == [SSEEvent("a\nb")]  # the blank line, CR-terminated
    assert decoder.feed(b"\ndata: c\n") == []  # that CR's LF pair is no second blank line
    assert decoder.feed(b"\n") == [SSEEvent("c")]
    decoder.close()
    assert decoder.truncated is False


def test_cr_at_end_of_read_then_empty_read_keeps_pairing() -> None:
    """An empty read between a CR and its LF does not forget the pending CR."""
    assert decode(b"data: a\r", b"", b"\n", b"\n") == [SSEEvent("a")]


def test_cr_at_end_of_read_then_other_byte() -> None:
    """A CR at the end of a read followed by a non-LF byte was a lone CR."""
    assert decode(b"data: a\r", b"\r") == [SSEEvent("a")]


# --- byte order mark ----------------------------------------------------------


def test_bom_at_start_is_skipped() -> None:
    """A UTF-8 BOM at the start of the stream is skipped; the first field still counts."""
    assert decode(BOM + b"data: a\n\n") == [SSEEvent("a")]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_bom_split_across_feeds_is_skipped(cut: int) -> None:
    """A BOM cut between reads (one, two or all three bytes first) is still skipped."""
    wire = BOM + b"data: a\n\n"
    assert decode(wire[:cut], wire[cut:]) == [SSEEvent("a")]


def test_bom_one_byte_at_a_time_is_skipped() -> None:
    """A BOM fed one byte per read, with empty reads between, is skipped."""
    assert decode(BOM[:1], b"", BOM[1:2], BOM[2:], b"data: a\n\n") == [SSEEvent("a")]


def test_bom_is_skipped_only_once() -> None:
    """Only one BOM is skipped: a second one makes the first field name unknown."""
    assert decode(BOM + BOM + b"data: a\n\ndata: b\n\n") == [SSEEvent("b")]


def test_bom_later_in_stream_is_not_skipped() -> None:
    """A BOM at the start of a later line is part of that line's field name."""
    assert decode(b"data: a\n\n" + BOM + b"data: b\n\n") == [SSEEvent("a")]


def test_bom_prefix_that_is_not_a_bom_is_kept() -> None:
    """Bytes that begin like a BOM but are not one are part of the first line."""
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"\xbbX: 1\ndata: a\n\n") == [SSEEvent("a")]


# --- fields -------------------------------------------------------------------


def test_multi_line_data_is_joined_with_lf() -> None:
    """Several data lines are joined with LF; the final LF is removed once."""
    assert decode(b"data: a\ndata:\ndata: b\n\n") == [SSEEvent("a\n\nb")]


def test_data_with_trailing_empty_line_keeps_one_lf() -> None:
    """Only one trailing LF is stripped: a final empty data line leaves one LF."""
    assert decode(b"data: a\ndata:\n\n") == [SSEEvent("a\n")]


def test_empty_data_line_dispatches_empty_event() -> None:
    """A lone ``data:`` line makes the buffer non-empty: an event with empty data goes out."""
    assert decode(b"data:\n\n") == [SSEEvent("")]


def test_only_one_space_after_colon_is_removed() -> None:
    """One space after the colon is removed; further spaces are data."""
    assert decode(b"data:  a \n\ndata:b\n\n") == [SSEEvent(" a "), SSEEvent("b")]


def test_value_with_colons_keeps_them() -> None:
    """Only the first colon separates name and value."""
    assert decode(b'data: {"a": "b:c"}\n\n') == [SSEEvent('{"a": "b:c"}')]


def test_line_without_colon_is_field_with_empty_value() -> None:
    """``data`` without a colon is a data field with an empty value."""
    assert decode(b"data\ndata\n\n") == [SSEEvent("\n")]


def test_comments_are_ignored() -> None:
    """Lines starting with a colon are comments: they neither add data nor dispatch."""
    assert decode(b": keep-alive\n\n:\ndata: a\n: inside\ndata: b\n\n") == [SSEEvent("a\nb")]


def test_field_names_are_case_sensitive() -> None:
    """``Data`` is not ``data``: it is an unknown field and is ignored."""
    assert decode(b"Data: a\ndata: b\n\n") == [SSEEvent("b")]


def test_unknown_fields_are_ignored() -> None:
    """Unknown fields change nothing."""
    assert decode(b"foo: bar\ndata: a\nbaz\n\n") == [SSEEvent("a")]


def test_event_field_sets_type_for_one_event() -> None:
    """``event`` names one event's type; the next event is a ``message`` again."""
    assert decode(b"event: add\ndata: 1\n\ndata: 2\n\n") == [
        SSEEvent("1", event="add"),
        SSEEvent("2"),
    ]


def test_empty_event_field_means_message() -> None:
    """An empty ``event`` value leaves the type ``message``."""
    assert decode(b"event:\ndata: 1\n\n") == [SSEEvent("1")]


def test_id_field_persists_across_events() -> None:
    """``id`` sets the last event id, which stays in effect for later events."""
    decoder = SSEDecoder()
    events = decoder.feed(b"data: 0\n\nid: 7\ndata: 1\n\ndata: 2\n\nid\ndata: 3\n\n")
    assert events == [
        SSEEvent("0", id=None),
        SSEEvent("1", id="7"),
        SSEEvent("2", id="7"),
        SSEEvent("3", id=""),  # an empty id resets it to the empty string
    ]
    assert decoder.last_event_id == ""


def test_id_without_data_still_sets_last_event_id() -> None:
    """An ``id`` in a block that dispatches nothing still sets the last event id."""
    assert decode(b"id: 5\n\ndata: a\n\n") == [SSEEvent("a", id="5")]


def test_id_with_nul_is_ignored() -> None:
    """WHATWG: an ``id`` value containing NUL leaves the last event id unchanged."""
    assert decode(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n") == [
        SSEEvent("a", id="1"),
        SSEEvent("b", id="1"),
    ]


def test_retry_with_digits_is_reported() -> None:
    """An all-digits ``retry`` comes with its event and sets the reconnection time."""
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 3000\ndata: a\n\ndata: b\n\n")
    assert events == [SSEEvent("a", retry=3000), SSEEvent("b")]
    assert decoder.reconnection_time == 3000


@pytest.mark.parametrize("value", [b"", b"12a", b" 5", b"-1", b"1.5", "\u0663".encode()])
def test_retry_other_than_ascii_digits_is_ignored(value: bytes) -> None:
    """A ``retry`` that is empty or not all ASCII digits (Arabic-Indic three too) is ignored."""
    decoder = SSEDecoder()
    assert decoder.feed(b"retry: " + value + b"\ndata: a\n\n") == [SSEEvent("a")]
    assert decoder.reconnection_time is None


def test_retry_with_huge_digit_run_is_ignored_not_an_error() -> None:
    """A retry of thousands of digits (over Python's int-conversion limit) is ignored."""
    decoder = SSEDecoder()
    assert decoder.feed(b"retry: " + b"9" * 5000 + b"\ndata: a\n\n") == [SSEEvent("a")]
    assert decoder.reconnection_time is None


def test_retry_without_data_only_sets_reconnection_time() -> None:
    """A ``retry``-only block dispatches nothing and does not stick to the next event."""
    decoder = SSEDecoder()
    assert decoder.feed(b"retry: 10\n\ndata: a\n\n") == [SSEEvent("a")]
    assert decoder.reconnection_time == 10


def test_blank_line_without_data_dispatches_nothing_and_resets_type() -> None:
    """A blank line with no data pending dispatches nothing and resets the event type."""
    assert decode(b"\n\nevent: x\n\ndata: a\n\n") == [SSEEvent("a")]


def test_several_events_in_one_read_all_come_out() -> None:
    """Every event a read completes is returned by that feed, in order."""
    assert decode(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4") == [
        SSEEvent("1"),
        SSEEvent("2"),
        SSEEvent("3"),
    ]


def test_a_callers_bytearray_is_neither_kept_nor_pinned() -> None:
    """A read parsed in place is not held: the caller may reuse and resize its buffer."""
    decoder = SSEDecoder()
    read = bytearray(b"data: first\n\ndata: sec")
    assert decoder.feed(read) == [SSEEvent("first")]
    read[:] = b"XXXXXXXX"  # reusing the buffer would fail if a view of it were alive
    read += b"more"
    assert decoder.feed(bytearray(b"ond\n\n")) == [SSEEvent("second")]


# --- text ---------------------------------------------------------------------


def test_utf8_character_split_across_feeds() -> None:
    """A multi-byte character cut between reads decodes whole: lines decode only once complete."""
    wire = "data: 你好\n\n".encode()
    for cut in range(len(wire) + 1):
        assert decode(wire[:cut], wire[cut:]) == [SSEEvent("你好")], cut


def test_invalid_utf8_is_replaced() -> None:
    """Invalid UTF-8 becomes U+FFFD, not an exception."""
    assert decode(b"data: a\xffb\n\n") == [SSEEvent("a\ufffdb")]


def test_unicode_line_separators_are_not_line_ends() -> None:
    """Only CR and LF end lines: U+2028, VT and FF stay inside the data."""
    text = "a\u2028b\x0bc\x0cd\x85e"
    assert decode(f"data: {text}\n\n".encode()) == [SSEEvent(text)]


def test_nul_in_data_is_kept() -> None:
    """NUL is ordinary data (only ``id`` refuses it)."""
    assert decode(b"data: a\x00b\n\n") == [SSEEvent("a\x00b")]


# --- end of stream ------------------------------------------------------------


def test_trailing_partial_event_is_discarded_and_truncated() -> None:
    """EOF with data lines pending: the event is discarded (WHATWG) and ``truncated`` is set."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2\n") == [SSEEvent("1")]
    assert decoder.close() == []
    assert decoder.truncated is True


def test_eof_inside_a_line_is_truncated() -> None:
    """EOF in the middle of a line is truncation, even before any data field completes."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2") == [SSEEvent("1")]
    assert decoder.close() == []
    assert decoder.truncated is True


def test_clean_end_is_not_truncated() -> None:
    """EOF right after a blank line is a clean end."""
    decoder = SSEDecoder()
    decoder.feed(b"data: 1\n\n")
    assert decoder.close() == []
    assert decoder.truncated is False


def test_end_after_cr_is_not_truncated() -> None:
    """EOF after a CR-terminated blank line is clean although its LF pair never came."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\r\r") == [SSEEvent("1")]
    decoder.close()
    assert decoder.truncated is False


def test_pending_fields_without_data_are_not_truncation() -> None:
    """EOF with only an ``event``/``id`` pending loses no data: not truncated."""
    decoder = SSEDecoder()
    decoder.feed(b"data: 1\n\nevent: x\nid: 2\n")
    decoder.close()
    assert decoder.truncated is False


def test_feed_after_close_is_a_local_error() -> None:
    """Feeding a closed decoder is our bug: LocalProtocolError."""
    decoder = SSEDecoder()
    decoder.close()
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"data: a\n\n")


# --- size limit ---------------------------------------------------------------


def test_incomplete_line_over_limit_raises() -> None:
    """A line that grows past the limit without a line end is refused while still partial."""
    decoder = SSEDecoder(max_event_bytes=64)
    decoder.feed(b"data: " + b"x" * 58)  # 64 bytes: at the limit, accepted
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"x")


def test_complete_line_over_limit_raises() -> None:
    """A whole line longer than the limit, in one read, is refused too."""
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b": " + b"x" * 63 + b"\n")


def test_event_data_over_limit_raises() -> None:
    """Many short data lines whose total passes the limit are refused before dispatch."""
    decoder = SSEDecoder(max_event_bytes=64)
    decoder.feed(b"data: 0123456789\n" * 5)  # 55 bytes of data buffer
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"data: 0123456789\n")


def test_limit_applies_per_event() -> None:
    """The data limit counts one event: many events of small data are fine."""
    decoder = SSEDecoder(max_event_bytes=64)
    events = decoder.feed(b"data: 0123456789\n\n" * 100)
    assert len(events) == 100


# --- encoder ------------------------------------------------------------------


def test_encode_data_and_done() -> None:
    """encode_data is the one-line fast path; DONE is the OpenAI sentinel event."""
    assert encode_data(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert decode(encode_data(b'{"a":1}') + DONE) == [SSEEvent('{"a":1}'), SSEEvent("[DONE]")]


@pytest.mark.parametrize("data", [b"a\nb", b"a\r", b"\r\n"])
def test_encode_data_refuses_line_breaks(data: bytes) -> None:
    """encode_data with a CR or LF would split the event: LocalProtocolError."""
    with pytest.raises(LocalProtocolError):
        encode_data(data)


def test_encode_comment_is_ignored_by_decoder() -> None:
    """A keep-alive comment has the documented bytes and yields no event."""
    assert encode_comment() == b": \n\n"
    assert encode_comment(b"ping") == b": ping\n\n"
    assert decode(encode_comment(b"ping") + encode_data(b"x")) == [SSEEvent("x")]


def test_encode_comment_refuses_line_breaks() -> None:
    """A comment with a line break would inject fields: LocalProtocolError."""
    with pytest.raises(LocalProtocolError):
        encode_comment(b"a\ndata: x")


def test_encode_event_writes_each_line_as_data() -> None:
    """Each line of the payload becomes its own data line; fields come first."""
    wire = encode_event(b"a\nb", event=b"add", id=b"3")
    assert wire == b"event: add\nid: 3\ndata: a\ndata: b\n\n"
    assert decode(wire) == [SSEEvent("a\nb", event="add", id="3")]


def test_encode_event_normalises_cr_to_lf() -> None:
    """SSE cannot carry CR in data: CR and CRLF in the payload come back as LF."""
    assert decode(encode_event(b"a\r\nb\rc\n")) == [SSEEvent("a\nb\nc\n")]


@pytest.mark.parametrize(
    ("event", "id"),
    [(b"a\nb", None), (b"a\rb", None), (None, b"1\n"), (None, b"1\r"), (None, b"1\x002")],
)
def test_encode_event_refuses_unsafe_fields(event: bytes | None, id: bytes | None) -> None:
    """A field value with CR or LF (or NUL in an id) is refused with LocalProtocolError."""
    with pytest.raises(LocalProtocolError):
        encode_event(b"x", event=event, id=id)


no_cr = st.text(st.characters(codec="utf-8", exclude_characters="\r"))
one_line = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"))
id_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"))


@PROPERTY
@given(
    events=st.lists(
        st.tuples(no_cr, st.none() | one_line, st.none() | id_text), min_size=1, max_size=5
    )
)
@example(events=[("", None, None)])
@example(events=[("\n", "", ""), (" lead\n\ntrail ", "x", None)])
def test_encode_decode_round_trip(events: list[tuple[str, str | None, str | None]]) -> None:
    """Any data text (LFs included), event type and id survive encode_event then decoding."""
    wire = b"".join(
        encode_event(
            data.encode(),
            event=None if event is None else event.encode(),
            id=None if id_ is None else id_.encode(),
        )
        for data, event, id_ in events
    )
    expected: list[SSEEvent] = []
    last_id: str | None = None
    for data, event, id_ in events:
        last_id = last_id if id_ is None else id_
        expected.append(SSEEvent(data, event or "message", last_id))
    assert feed_split(wire, []) == Outcome(tuple(expected), truncated=False, refused=False)


# --- any split ----------------------------------------------------------------


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, tuple[SSEEvent, ...]]:
    """A valid event stream with random line ends, comments, unknown fields,
    optional BOM and extra blank lines, together with the events it must give."""
    lines: list[bytes] = []
    expected: list[SSEEvent] = []
    last_id: str | None = None

    def noise() -> None:
        lines.extend(
            draw(
                st.lists(
                    st.sampled_from([b":", b": ping", b"foo: bar", b"retry: x", b"", b"\xffx: 1"]),
                    max_size=2,
                )
            )
        )

    for _ in range(draw(st.integers(0, 4))):
        noise()
        event = draw(st.none() | one_line)
        id_ = draw(st.none() | id_text)
        retry = draw(st.none() | st.integers(0, 10**6))
        data = draw(no_cr)
        if event is not None:
            lines.append(b"event: " + event.encode())
        if id_ is not None:
            lines.append(b"id: " + id_.encode())
            last_id = id_
        if retry is not None:
            lines.append(b"retry: " + str(retry).encode())
        lines.extend(b"data: " + part.encode() for part in data.split("\n"))
        if draw(st.booleans()):
            lines.append(b": between")
        lines.append(b"")
        expected.append(SSEEvent(data, event or "message", last_id, retry))
    noise()
    lines.append(b"")  # a stray data-less field block above must not leak into nothing
    wire = bytearray(BOM if draw(st.booleans()) else b"")
    previous = b""
    for line in lines:
        end = draw(st.sampled_from([b"\n", b"\r", b"\r\n"]))
        if previous == b"\r" and not line and end == b"\n":
            end = b"\r\n"  # CR then a LF-terminated blank line would read as one CRLF
        wire += line + end
        previous = end
    return bytes(wire), tuple(expected)


@PROPERTY
@given(stream=streams(), cuts=st.lists(st.integers(0, 4096), max_size=12))
@example(stream=(b"data: a\r\n\r\n", (SSEEvent("a"),)), cuts=[8])  # CR | LF
@example(stream=(b"data: a\r\r\n", (SSEEvent("a"),)), cuts=[8])  # CR | CRLF
@example(stream=(BOM + b"data: a\n\n", (SSEEvent("a"),)), cuts=[1, 2])  # BOM in pieces
@example(stream=("data: 你\n\n".encode(), (SSEEvent("你"),)), cuts=[7, 8])  # split character
@example(stream=(b"data:\n\n", (SSEEvent(""),)), cuts=[5])  # empty data
def test_any_split_yields_the_same_events(
    stream: tuple[bytes, tuple[SSEEvent, ...]], cuts: list[int]
) -> None:
    """Any split of a valid stream gives the events of the whole stream, which are also
    those of a byte-at-a-time feed and those the stream encodes."""
    wire, expected = stream
    want = Outcome(expected, truncated=False, refused=False)
    assert feed_split(wire, cuts) == want
    assert feed_split(wire, []) == want
    assert feed_split(wire, list(range(len(wire)))) == want


sse_ish = st.lists(
    st.sampled_from(
        [
            *(b"\r", b"\n", b"\r\n", b":", b" ", b"data", b"event", b"id", b"retry", b"7"),
            *(b"\x00", BOM, BOM[:2], b"\xff", b"\xc3", b"\xa9", b"x" * 9),
        ]
    ),
    max_size=40,
).map(b"".join)


@PROPERTY
@given(wire=st.binary(max_size=64) | sse_ish, cuts=st.lists(st.integers(0, 512), max_size=8))
@example(wire=b"\xef\xbb", cuts=[1])
@example(wire=b"data: " + b"x" * 40 + b"\n\n", cuts=[10])
def test_garbage_gives_events_or_remote_protocol_error(wire: bytes, cuts: list[int]) -> None:
    """Any bytes give events or RemoteProtocolError (never another exception), and the
    same outcome however they are split, also against a small size limit."""
    for limit in (1 << 20, 24):
        whole = feed_split(wire, [], limit)
        assert feed_split(wire, cuts, limit) == whole
        assert feed_split(wire, list(range(len(wire))), limit) == whole
        assert all(isinstance(event, SSEEvent) for event in whole.events)
