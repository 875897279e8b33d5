"""Tests of protocol/http1.py: empty lines before a request, head size, framing, reasons, bearer."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.http1 import (
    MAX_EMPTY_LINES,
    REASONS,
    EmptyLines,
    bearer_token,
    has_both_lengths,
    head_size,
)

# --- EmptyLines --------------------------------------------------------------------------


def skip_split(wire: bytes, cuts: list[int]) -> bytes:
    """What reaches h11 when ``wire`` arrives cut at ``cuts`` (as relay.server feeds it)."""
    skipper, out, start = EmptyLines(), [], 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        out.append(skipper.skip(wire[start:cut]) if cut > start else b"")
        start = cut
        if out[-1]:
            out.append(wire[cut:])  # the head has begun: the rest goes to h11 as it is
            break
    return b"".join(out)


@given(
    lines=st.lists(st.sampled_from([b"\r\n", b"\n"]), max_size=MAX_EMPTY_LINES),
    rest=st.sampled_from([b"GET / HTTP/1.1\r\n\r\n", b"\rGET", b"x\r\n", b""]),
    data=st.data(),
)
def test_empty_lines_any_split_gives_the_same_bytes(
    lines: list[bytes], rest: bytes, data: st.DataObject
) -> None:
    """However the bytes are cut between reads, EmptyLines drops exactly the leading empty
    lines (up to its limit) and passes the rest unchanged; a CR that is not half of a CRLF is
    passed on for h11 to refuse."""
    wire = b"".join(lines) + rest
    cuts = data.draw(st.lists(st.integers(0, len(wire))), label="cuts")
    assert skip_split(wire, cuts) == skip_split(wire, list(range(len(wire)))) == rest


def test_a_crlf_cut_between_reads_is_one_empty_line() -> None:
    """A CR that ends a read is held back; the LF that starts the next completes the line."""
    skipper = EmptyLines(limit=1)
    assert skipper.skip(b"\r") == b""
    assert skipper.skip(b"\nGET") == b"GET"


def test_a_held_cr_before_a_request_line_is_passed_on() -> None:
    """A held CR followed by anything but LF is a bare CR: h11 gets it (and refuses it)."""
    skipper = EmptyLines()
    assert skipper.skip(b"\n\r") == b""
    assert skipper.skip(b"GET") == b"\rGET"


def test_empty_lines_over_the_limit_are_passed_on() -> None:
    """Past the limit, empty lines are left for h11 (which refuses them)."""
    skipper = EmptyLines(limit=2)
    assert skipper.skip(b"\r\n\n\r\nGET") == b"\r\nGET"


@given(st.binary(max_size=64), st.lists(st.integers(0, 64)))
def test_garbage_is_passed_on_as_a_suffix(wire: bytes, cuts: list[int]) -> None:
    """Whatever the bytes, what EmptyLines passes on is a suffix of them (nothing is made up)."""
    assert wire.endswith(skip_split(wire, [c for c in cuts if c <= len(wire)]))


# --- head size and framing ---------------------------------------------------------------

TOKENS = st.from_regex(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}\Z")
VALUES = st.from_regex(rb"\A[!-~]([ !-~]{0,20}[!-~])?\Z")


@given(
    method=TOKENS,
    target=st.from_regex(rb"\A/[!-~]{0,40}\Z"),
    headers=st.lists(st.tuples(TOKENS, VALUES), max_size=8),
)
def test_head_size_is_what_h11_writes(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """The size of a head h11 writes, give or take one byte (its count of the request line
    errs high by one: the limit is never under-counted)."""
    request = h11.Request(method=method, target=target, headers=[(b"host", b"x"), *headers])
    wire = h11.Connection(h11.CLIENT).send(request)
    assert wire is not None
    size = head_size(request.method, request.target, request.headers)
    assert len(wire) <= size <= len(wire) + 1


@pytest.mark.parametrize(
    ("headers", "both"),
    [
        ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], True),
        ([(b"transfer-encoding", b"chunked"), (b"host", b"x"), (b"content-length", b"0")], True),
        ([(b"content-length", b"5")], False),
        ([(b"transfer-encoding", b"chunked")], False),
        ([], False),
    ],
)
def test_has_both_lengths(headers: list[tuple[bytes, bytes]], both: bool) -> None:
    """True only when Content-Length and Transfer-Encoding are both there, in any order."""
    assert has_both_lengths(headers) is both


def test_reasons_are_the_standard_phrases() -> None:
    """Every standard status has its RFC 9110 phrase; an unknown status has none."""
    assert REASONS[200] == b"OK"
    assert REASONS[404] == b"Not Found"
    assert REASONS[100] == b"Continue"
    assert REASONS[431] == b"Request Header Fields Too Large"
    assert 599 not in REASONS


# --- Authorization: Bearer ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc", "abc"),
        (b"bearer abc", "abc"),
        (b"  Bearer   a,b  ", "a,b"),
        (b"Basic abc", None),
        (b"Bearer", None),
        (b"Bearer   ", None),
        (b"", None),
        (None, None),
    ],
)
def test_bearer_token(header: bytes | None, token: str | None) -> None:
    """The token after a case-insensitive ``Bearer``, trimmed; None for any other scheme."""
    assert bearer_token(header) == token
