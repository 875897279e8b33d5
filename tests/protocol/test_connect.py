"""Tests of protocol/connect.py: the Connect envelope decoder, fed in any split."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.connect import (
    FLAG_COMPRESSED,
    FLAG_END_STREAM,
    Envelope,
    EnvelopeDecoder,
    encode_envelope,
)
from protocol.errors import RemoteProtocolError

PROPERTY = settings(max_examples=200, deadline=None)


def feed_split(wire: bytes, cuts: list[int], max_payload: int = 1 << 20) -> list[Envelope]:
    """Feed ``wire`` cut at ``cuts`` (clamped to its length), then close."""
    decoder = EnvelopeDecoder(max_payload)
    envelopes: list[Envelope] = []
    start = 0
    for cut in sorted({min(cut, len(wire)) for cut in cuts}):
        envelopes += decoder.feed(wire[start:cut])
        start = cut
    envelopes += decoder.feed(wire[start:])
    decoder.close()
    return envelopes


def outcome(wire: bytes, cuts: list[int], max_payload: int) -> list[Envelope] | None:
    """The envelopes of a split feed, or None if the decoder refused the bytes."""
    try:
        return feed_split(wire, cuts, max_payload)
    except RemoteProtocolError:
        return None


# --- examples -----------------------------------------------------------------


def test_byte_example_from_protocols() -> None:
    """PROTOCOLS.md 2.5: ``{"chatId":"1"}`` is framed as 00 00 00 00 0E and the JSON."""
    wire = encode_envelope(b'{"chatId":"1"}')
    assert wire == b"\x00\x00\x00\x00\x0e" + b'{"chatId":"1"}'
    assert EnvelopeDecoder().feed(wire) == [Envelope(0, b'{"chatId":"1"}')]


def test_several_envelopes_in_one_feed_all_come_out() -> None:
    """A read holding several envelopes yields all of them at once: the reference's
    one-frame-per-read bug (PROTOCOLS.md 2.8) that loses the tail of answers."""
    wire = b"".join(
        [
            encode_envelope(b'{"textEvent":{"text":"a"}}'),
            encode_envelope(b'{"textEvent":{"text":"b"}}'),
            encode_envelope(b'{"doneEvent":{}}'),
            encode_envelope(b"{}", FLAG_END_STREAM),
        ]
    )
    decoder = EnvelopeDecoder()
    envelopes = decoder.feed(wire)
    assert [env.payload for env in envelopes] == [
        b'{"textEvent":{"text":"a"}}',
        b'{"textEvent":{"text":"b"}}',
        b'{"doneEvent":{}}',
        b"{}",
    ]
    assert envelopes[-1].end_stream
    assert decoder.ended
    decoder.close()


def test_tiny_reads_do_not_duplicate_leftover() -> None:
    """Reads shorter than a header are not prepended twice (the reference's second 2.8 bug)."""
    decoder = EnvelopeDecoder()
    wire = encode_envelope(b"ab") + encode_envelope(b"cd")
    assert decoder.feed(wire[:5]) == []
    assert decoder.feed(wire[5:8]) == [Envelope(0, b"ab")]  # "ab" and 1 header byte
    assert decoder.feed(wire[8:10]) == []
    assert decoder.feed(wire[10:]) == [Envelope(0, b"cd")]
    decoder.close()


def test_empty_payload() -> None:
    """A zero-length envelope is a header alone and decodes to an empty payload."""
    assert EnvelopeDecoder().feed(encode_envelope(b"")) == [Envelope(0, b"")]


def test_end_stream_envelope_sets_ended() -> None:
    """``ended`` is False until the end-of-stream envelope and True after it."""
    decoder = EnvelopeDecoder()
    assert decoder.feed(encode_envelope(b"{}")) == [Envelope(0, b"{}")]
    assert not decoder.ended
    (end,) = decoder.feed(encode_envelope(b'{"error":{"code":"internal"}}', FLAG_END_STREAM))
    assert end.end_stream
    assert decoder.ended


# --- refusals -----------------------------------------------------------------


def test_over_limit_length_is_refused_from_the_header_alone() -> None:
    """A declared length over the limit is refused as soon as the 5 header bytes are in,
    before any payload is buffered (a JSON 401 body read as an envelope claims ~578 MB)."""
    decoder = EnvelopeDecoder(max_payload=100)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(struct.pack(">BI", 0, 101))


def test_json_error_body_read_as_envelope_is_refused() -> None:
    """PROTOCOLS.md 2.8: an HTTP 401 JSON body fed to the decoder fails at once, no hang."""
    with pytest.raises(RemoteProtocolError):
        EnvelopeDecoder().feed(b'{"code":"unauthenticated","message":"token expired"}')


def test_length_at_limit_is_accepted() -> None:
    """A payload exactly at the limit is accepted."""
    decoder = EnvelopeDecoder(max_payload=100)
    assert decoder.feed(encode_envelope(b"x" * 100)) == [Envelope(0, b"x" * 100)]


def test_compressed_flag_is_refused() -> None:
    """A compressed envelope (never asked for) is refused, not fed to a JSON parser."""
    with pytest.raises(RemoteProtocolError):
        EnvelopeDecoder().feed(encode_envelope(b"x", FLAG_COMPRESSED))


def test_unknown_flag_is_refused() -> None:
    """Flag bits other than compressed and end-of-stream are refused."""
    with pytest.raises(RemoteProtocolError):
        EnvelopeDecoder().feed(encode_envelope(b"x", 0x80))


def test_data_after_end_stream_in_same_feed_is_refused() -> None:
    """A whole envelope after the end-of-stream envelope, in the same read, is refused."""
    wire = encode_envelope(b"{}", FLAG_END_STREAM) + encode_envelope(b"{}")
    with pytest.raises(RemoteProtocolError):
        EnvelopeDecoder().feed(wire)


def test_data_after_end_stream_in_later_feed_is_refused() -> None:
    """Bytes after the end-of-stream envelope, even one, in a later read, are refused."""
    decoder = EnvelopeDecoder()
    decoder.feed(encode_envelope(b"{}", FLAG_END_STREAM))
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"\x00")


def test_partial_header_after_end_stream_in_same_feed_is_refused() -> None:
    """Fewer than a header's bytes after the end-of-stream envelope are refused too."""
    with pytest.raises(RemoteProtocolError):
        EnvelopeDecoder().feed(encode_envelope(b"{}", FLAG_END_STREAM) + b"\x00\x00")


@pytest.mark.parametrize("leftover", [b"\x00", b"\x00\x00\x00\x00\x05ab"])
def test_close_with_leftover_bytes_raises(leftover: bytes) -> None:
    """EOF inside a header or inside a payload is truncation: close() raises."""
    decoder = EnvelopeDecoder()
    decoder.feed(encode_envelope(b"ok") + leftover)
    with pytest.raises(RemoteProtocolError):
        decoder.close()


def test_close_without_end_stream_is_clean_but_not_ended() -> None:
    """EOF on an envelope boundary does not raise; ``ended`` tells it was not the end."""
    decoder = EnvelopeDecoder()
    decoder.feed(encode_envelope(b"ok"))
    decoder.close()
    assert not decoder.ended


# --- properties ---------------------------------------------------------------


@PROPERTY
@given(
    bodies=st.lists(st.binary(max_size=200), max_size=6),
    end=st.none() | st.binary(max_size=50),
    cuts=st.lists(st.integers(0, 2048), max_size=12),
)
@example(bodies=[], end=None, cuts=[])
@example(bodies=[b""], end=b"", cuts=[1, 2, 3, 4])  # header split everywhere, empty payloads
@example(bodies=["你好".encode()], end=b"{}", cuts=[6, 7])  # split inside a character
@example(bodies=[b"a", b"b", b"c"], end=b"{}", cuts=[])  # several envelopes in one read
def test_any_split_yields_the_same_envelopes(
    bodies: list[bytes], end: bytes | None, cuts: list[int]
) -> None:
    """encode_envelope then any split, the whole, or one byte at a time give the envelopes
    back in order, the end-of-stream one included."""
    expected = [Envelope(0, body) for body in bodies]
    if end is not None:
        expected.append(Envelope(FLAG_END_STREAM, end))
    wire = b"".join(encode_envelope(env.payload, env.flags) for env in expected)
    assert feed_split(wire, cuts) == expected
    assert feed_split(wire, []) == expected
    assert feed_split(wire, list(range(len(wire)))) == expected


@PROPERTY
@given(
    wire=st.binary(max_size=64)
    | st.lists(
        st.sampled_from([b"\x00", b"\x02", b"\x01", b"\x00\x00\x00", b"\x03", b"{}", b"x"]),
        max_size=30,
    ).map(b"".join),
    cuts=st.lists(st.integers(0, 128), max_size=8),
)
@example(wire=b"\x02\x00\x00\x00\x00\x00", cuts=[5])
@example(wire=b"\x00\x00\x00\x00\x03ab", cuts=[])
def test_garbage_gives_envelopes_or_remote_protocol_error(wire: bytes, cuts: list[int]) -> None:
    """Any bytes give envelopes or RemoteProtocolError, never another exception, and the
    same outcome however they are split (with a small limit too)."""
    for limit in (1 << 20, 3):
        whole = outcome(wire, [], limit)
        assert outcome(wire, cuts, limit) == whole
        assert outcome(wire, list(range(len(wire))), limit) == whole
