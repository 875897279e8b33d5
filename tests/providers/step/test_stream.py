"""Tests of providers.step.stream: StepChat Connect envelopes -> deltas."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.connect import FLAG_END_STREAM, Envelope, EnvelopeDecoder, encode_envelope
from protocol.deltas import Citation, Delta, Finish, TextDelta, UpstreamError
from protocol.errors import RemoteProtocolError
from providers.step.stream import CITATION_LINE, MARKER, MARKER_PREFIX, StepStream


def msg(obj: Any) -> Envelope:
    """An ordinary envelope carrying ``obj`` as JSON."""
    return Envelope(0, orjson.dumps(obj))


def end(obj: Any = None) -> Envelope:
    """The end-of-stream envelope (``{}`` unless given)."""
    return Envelope(FLAG_END_STREAM, orjson.dumps({} if obj is None else obj))


def text_event(text: str) -> Envelope:
    """A textEvent envelope."""
    return msg({"textEvent": {"text": text}})


DONE = msg({"doneEvent": {}})
SEARCH = msg(
    {
        "pipelineEvent": {
            "eventSearch": {"results": [{"title": "StepFun", "url": "https://www.stepfun.com/"}]}
        }
    }
)


def run(envelopes: list[Envelope], *, ended: bool | None = None) -> list[Delta]:
    """Feed every envelope to a fresh translator, then close it."""
    stream = StepStream()
    out: list[Delta] = []
    for envelope in envelopes:
        out += stream.feed(envelope)
    if ended is None:
        ended = any(e.flags & FLAG_END_STREAM for e in envelopes)
    out += stream.close(ended=ended)
    assert stream.finished
    return out


# --- the documented example -------------------------------------------------


def test_protocols_example_stream() -> None:
    """The example of PROTOCOLS.md 2.7 gives a citation, two texts (marker removed), one Finish."""
    envelopes = [
        SEARCH,
        text_event("阶跃星辰是<web_3f9a2b>"),
        text_event("一家人工智能公司。"),
        DONE,
        end(),
    ]
    assert run(envelopes) == [
        Citation("StepFun", "https://www.stepfun.com/"),
        TextDelta("阶跃星辰是"),
        TextDelta("一家人工智能公司。"),
        Finish("stop"),
    ]


def test_citation_line_renders_like_the_reference() -> None:
    """CITATION_LINE formats a hit as the reference's stream rendering does."""
    line = CITATION_LINE.format(title="StepFun", url="https://www.stepfun.com/")
    assert line == "检索 StepFun - https://www.stepfun.com/ ...\n"


# --- markers ----------------------------------------------------------------


def test_marker_split_across_two_text_events_is_removed() -> None:
    """A marker cut between two textEvents is held back and removed, text around it kept."""
    stream = StepStream()
    assert stream.feed(text_event("A<we")) == [TextDelta("A")]
    assert stream.feed(text_event("b_12ab>B")) == [TextDelta("B")]
    assert stream.feed(DONE) == [Finish("stop")]


def test_every_marker_kind_is_removed() -> None:
    """web, url and unknown markers are all removed."""
    out = run([text_event("a<web_1>b<url_X9>c<unknown_zz>d"), DONE, end()])
    assert out == [TextDelta("abcd"), Finish("stop")]


def test_html_like_text_is_kept() -> None:
    """'<b>' is not a marker and passes through, even across envelopes."""
    out = run([text_event("x <b"), text_event(">bold</b>"), DONE, end()])
    texts = "".join(d.text for d in out if isinstance(d, TextDelta))
    assert texts == "x <b>bold</b>"
    assert out[-1] == Finish("stop")


def test_held_text_is_flushed_before_finish() -> None:
    """Text held as a possible marker comes out before the Finish when none completes it."""
    stream = StepStream()
    assert stream.feed(text_event("see <web_")) == [TextDelta("see ")]
    assert stream.feed(DONE) == [TextDelta("<web_"), Finish("stop")]


def test_text_made_only_of_a_marker_gives_no_delta() -> None:
    """A textEvent that is only a marker, or empty, produces no (empty) TextDelta."""
    stream = StepStream()
    assert stream.feed(text_event("<web_abc>")) == []
    assert stream.feed(text_event("")) == []
    assert stream.feed(msg({"textEvent": {"text": None}})) == []


@pytest.mark.parametrize("marker", ["<web_3f9a2b>", "<url_A>", "<unknown_0z9>"])
def test_prefix_pattern_matches_every_proper_prefix(marker: str) -> None:
    """MARKER_PREFIX fully matches each proper prefix of a marker, and MARKER the whole."""
    assert MARKER.fullmatch(marker)
    for cut in range(1, len(marker)):
        assert MARKER_PREFIX.fullmatch(marker[:cut]), marker[:cut]
    assert not MARKER_PREFIX.fullmatch(marker)


@pytest.mark.parametrize("text", ["<b", "<web>", "<web-1", "<x_1", "<web_1 ", "<web_é"])
def test_prefix_pattern_rejects_non_markers(text: str) -> None:
    """Text that cannot grow into a marker is not held back."""
    assert not MARKER_PREFIX.fullmatch(text)


# --- search -------------------------------------------------------------------


def test_search_hits_are_checked_and_deduplicated() -> None:
    """Malformed hits are skipped, and a URL already cited is not cited again."""
    results = [
        {"title": "a", "url": "https://a/"},
        {"title": 1, "url": "https://b/"},
        {"title": "c"},
        "junk",
        {"title": "a again", "url": "https://a/"},
        {"title": "d", "url": "https://d/", "extra": True},
    ]
    stream = StepStream()
    first = stream.feed(msg({"pipelineEvent": {"eventSearch": {"results": results}}}))
    assert first == [Citation("a", "https://a/"), Citation("d", "https://d/")]
    assert stream.feed(SEARCH) == [Citation("StepFun", "https://www.stepfun.com/")]
    assert stream.feed(SEARCH) == []


def test_other_pipeline_events_are_ignored() -> None:
    """A pipelineEvent without search results, or with a non-list, gives nothing."""
    stream = StepStream()
    assert stream.feed(msg({"pipelineEvent": {"eventThink": {}}})) == []
    assert stream.feed(msg({"pipelineEvent": {"eventSearch": {"results": {}}}})) == []
    assert not stream.finished


# --- endings ------------------------------------------------------------------


def test_error_end_of_stream() -> None:
    """An end-of-stream envelope with an error gives UpstreamError with the mapped status."""
    out = run(
        [
            text_event("partial"),
            end({"error": {"code": "resource_exhausted", "message": "busy"}}),
        ]
    )
    assert out == [TextDelta("partial"), UpstreamError("resource_exhausted", "busy", 429)]


@pytest.mark.parametrize(
    ("code", "status"),
    [("unauthenticated", 401), ("deadline_exceeded", 504), ("internal", 502), ("x", 502)],
)
def test_error_statuses(code: str, status: int) -> None:
    """Connect codes map to 401, 504, or 502 for the rest."""
    out = run([end({"error": {"code": code, "message": "m"}})])
    assert out == [UpstreamError(code, "m", status)]


def test_error_in_an_ordinary_message_is_a_failure() -> None:
    """An ordinary message with a truthy error.code ends the answer, as in the reference;
    the end-of-stream envelope that follows is accepted silently."""
    stream = StepStream()
    assert stream.feed(text_event("x<url_")) == [TextDelta("x")]
    out = stream.feed(msg({"error": {"code": "internal", "message": "db"}}))
    assert out == [TextDelta("<url_"), UpstreamError("internal", "db", 502)]
    assert stream.finished
    assert stream.feed(end({"error": {"code": "internal", "message": "db"}})) == []
    assert stream.close(ended=True) == []


def test_falsy_error_code_in_a_message_is_ignored() -> None:
    """An ordinary message whose error.code is empty is not a failure; its textEvent counts."""
    stream = StepStream()
    out = stream.feed(msg({"error": {"code": ""}, "textEvent": {"text": "ok"}}))
    assert out == [TextDelta("ok")]


def test_unreadable_end_of_stream_error_is_not_success() -> None:
    """An end-of-stream error without a usable code still fails the answer."""
    out = run([text_event("t"), end({"error": "oops"})])
    assert out[0] == TextDelta("t")
    assert isinstance(out[-1], UpstreamError)
    assert out[-1].code == "unknown"


def test_success_end_without_done_event_finishes() -> None:
    """A success end-of-stream with no doneEvent still ends the answer with one Finish."""
    assert run([text_event("t<web"), end()]) == [TextDelta("t"), TextDelta("<web"), Finish("stop")]


def test_truncated_stream_is_an_error() -> None:
    """EOF without doneEvent or end-of-stream: held text, then UpstreamError('truncated')."""
    out = run([text_event("half an ans"), text_event("wer <web_1")], ended=False)
    assert out == [
        TextDelta("half an ans"),
        TextDelta("wer "),
        TextDelta("<web_1"),
        UpstreamError("truncated", "upstream stream ended before the answer was complete", 502),
    ]


def test_close_after_done_event_without_end_envelope_is_complete() -> None:
    """A doneEvent says the answer is whole, even if the end-of-stream envelope never came."""
    stream = StepStream()
    assert stream.feed(DONE) == [Finish("stop")]
    assert stream.close(ended=False) == []


def test_close_when_ended_but_end_envelope_not_fed() -> None:
    """close(ended=True) on an open answer finishes it rather than calling it truncated."""
    stream = StepStream()
    stream.feed(text_event("a"))
    assert stream.close(ended=True) == [Finish("stop")]


def test_message_after_done_event_is_a_protocol_error() -> None:
    """Any ordinary envelope after the doneEvent is a RemoteProtocolError."""
    stream = StepStream()
    stream.feed(DONE)
    with pytest.raises(RemoteProtocolError):
        stream.feed(text_event("late"))


def test_error_end_after_done_event_is_a_protocol_error() -> None:
    """An error end-of-stream after a complete answer is a RemoteProtocolError."""
    stream = StepStream()
    stream.feed(DONE)
    with pytest.raises(RemoteProtocolError):
        stream.feed(end({"error": {"code": "internal", "message": "m"}}))


def test_anything_after_end_of_stream_is_a_protocol_error() -> None:
    """After the end-of-stream envelope, even another end envelope is refused."""
    stream = StepStream()
    assert stream.feed(end()) == [Finish("stop")]
    with pytest.raises(RemoteProtocolError):
        stream.feed(end())
    stream2 = StepStream()
    stream2.feed(end())
    with pytest.raises(RemoteProtocolError):
        stream2.feed(DONE)


def test_unknown_messages_are_ignored() -> None:
    """Bookkeeping messages and odd shapes of known keys produce nothing."""
    stream = StepStream()
    for obj in ({}, {"messageEvent": {"id": "1"}}, {"textEvent": "x"}, {"doneEvent": None}):
        assert stream.feed(msg(obj)) == []
    assert not stream.finished


@pytest.mark.parametrize("payload", [b"", b"not json", b"[]", b'"x"', b"1", b"null", b"\xff"])
def test_garbage_payload_is_a_protocol_error(payload: bytes) -> None:
    """A payload that is not a JSON object is a RemoteProtocolError, ordinary or end."""
    with pytest.raises(RemoteProtocolError):
        StepStream().feed(Envelope(0, payload))
    with pytest.raises(RemoteProtocolError):
        StepStream().feed(Envelope(FLAG_END_STREAM, payload))


# --- properties ---------------------------------------------------------------

ID = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFXYZ0123456789", min_size=1, max_size=12)
MARKERS = st.builds(
    lambda kind, ident: f"<{kind}_{ident}>", st.sampled_from(["web", "url", "unknown"]), ID
)
# Plain text may contain '<' and marker-like prefixes, but no '>': then the only
# markers in the answer are the inserted ones, so removing them is well defined.
PLAIN = st.text(alphabet="ab<_webunkorl 1é阶跃。\n", max_size=12)
SEGMENTS = st.lists(st.tuples(PLAIN, st.none() | MARKERS), max_size=8)


def feed_split(wire: bytes, cuts: list[int]) -> list[Delta]:
    """Decode ``wire`` cut at ``cuts`` and translate, as the relay's read loop does."""
    decoder, stream, start = EnvelopeDecoder(), StepStream(), 0
    out: list[Delta] = []
    for cut in [*sorted(set(cuts)), len(wire)]:
        for envelope in decoder.feed(wire[start:cut]):
            out += stream.feed(envelope)
        start = cut
    decoder.close()
    out += stream.close(ended=decoder.ended)
    return out


def check_well_formed(out: list[Delta]) -> None:
    """Exactly one final Finish/UpstreamError, last; no empty TextDelta."""
    finals = [d for d in out if isinstance(d, Finish | UpstreamError)]
    assert len(finals) == 1
    assert out[-1] is finals[0]
    assert all(d.text for d in out if isinstance(d, TextDelta))


@settings(max_examples=200, deadline=None)
@given(segments=SEGMENTS, search=st.booleans(), data=st.data())
def test_any_split_gives_the_text_without_markers(
    segments: list[tuple[str, str | None]], search: bool, data: st.DataObject
) -> None:
    """For any answer cut into textEvents anywhere (inside markers too) and any split of
    the wire bytes, the TextDeltas join to the answer without markers, once finished."""
    answer = "".join(plain + (marker or "") for plain, marker in segments)
    expected = "".join(plain for plain, _ in segments)
    piece_cuts: list[int] = sorted(
        set(data.draw(st.lists(st.integers(0, len(answer))), label="pieces"))
    )
    bounds = [0, *piece_cuts, len(answer)]
    pieces = [answer[a:b] for a, b in itertools.pairwise(bounds)]
    envelopes = [encode_envelope(SEARCH.payload)] if search else []
    envelopes += [encode_envelope(text_event(p).payload) for p in pieces]
    envelopes += [encode_envelope(DONE.payload), encode_envelope(b"{}", FLAG_END_STREAM)]
    wire = b"".join(envelopes)
    wire_cuts: list[int] = data.draw(st.lists(st.integers(0, len(wire)), max_size=10), label="wire")

    out = feed_split(wire, wire_cuts)

    check_well_formed(out)
    assert out[-1] == Finish("stop")
    assert "".join(d.text for d in out if isinstance(d, TextDelta)) == expected
    assert (Citation("StepFun", "https://www.stepfun.com/") in out) == search
    assert feed_split(wire, list(range(len(wire)))) == feed_split(wire, [])


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
KEYS = st.sampled_from(
    ["error", "pipelineEvent", "textEvent", "doneEvent", "text", "code", "eventSearch"]
)
OBJECTS = st.dictionaries(KEYS | st.text(max_size=6), JSON, max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, FLAG_END_STREAM]),
            OBJECTS.map(orjson.dumps) | st.binary(max_size=16),
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_any_input_gives_deltas_or_remote_protocol_error(
    items: list[tuple[int, bytes]], ended: bool
) -> None:
    """Arbitrary JSON objects and garbage payloads give deltas or RemoteProtocolError only;
    when they give deltas, the answer ends exactly once and has no empty text."""
    stream = StepStream()
    out: list[Delta] = []
    with contextlib.suppress(RemoteProtocolError):
        for flags, payload in items:
            out += stream.feed(Envelope(flags, payload))
        out += stream.close(ended=ended)
        check_well_formed(out)
