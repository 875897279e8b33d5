"""HTTP/1.1 details the relay's server needs beyond what h11 does: pure functions of bytes.

h11 parses and frames; these are the rules around it that ``relay.server``
(and ``relay.access``) apply, kept here so they are tested without a socket:

- :class:`EmptyLines`: the empty lines a client may send before a request
  line (RFC 9112 2.2), dropped before h11 sees them;
- :func:`head_size`: the size of a head that arrived whole (h11 bounds only
  an incomplete one);
- :func:`has_both_lengths`: ``Content-Length`` with ``Transfer-Encoding``, a
  request smuggling pattern (RFC 9112 6.1);
- :data:`REASONS`: the standard reason phrase of every status (h11 sends none
  unless told);
- :func:`bearer_token`: the token of an ``Authorization: Bearer`` header
  (RFC 6750 2.1).
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

#: RFC 9110 15: the standard reason phrase of every status (h11 sends none unless told)
REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
#: RFC 9112 2.2: empty lines skipped before a request line (more is not a client's mistake)
MAX_EMPTY_LINES = 8
_LF, _CR = 10, 13


class EmptyLines:
    """Drops the empty lines a client sends before a request line (RFC 9112 2.2).

    Sans-IO, fed the bytes of one connection as they arrive until the first
    byte of a request line; h11 itself answers "no request line received" to
    a head that starts with one. A line end is CRLF or a bare LF (RFC 9112
    2.2 allows a recipient to take LF alone); a CR that ends one read may be
    half of a CRLF, so it is held for the next. At most ``limit`` lines are
    dropped; the rest are left for h11 to refuse.
    """

    __slots__ = ("_cr", "_limit", "_lines")

    def __init__(self, limit: int = MAX_EMPTY_LINES) -> None:
        self._limit = limit
        self._lines = 0
        self._cr = False  # the last read ended with a CR

    def skip(self, data: bytes) -> bytes:
        """``data`` without the empty lines it starts with.

        Returns:
            What is left: ``b""`` if ``data`` held only empty lines (or a CR
            held back); otherwise the bytes from the first one that is not
            part of an empty line (or from the first line over the limit).
        """
        if self._cr:
            self._cr = False
            data = b"\r" + data
        pos, end = 0, len(data)
        while pos < end and self._lines < self._limit:  # at most 2 * limit steps
            byte = data[pos]
            if byte == _LF:
                pos += 1
            elif byte == _CR and pos + 1 == end:
                self._cr = True  # maybe half of a CRLF: decided by the next read
                return b""
            elif byte == _CR and data[pos + 1] == _LF:
                pos += 2
            else:
                break  # a request line (or a bare CR, which h11 refuses)
            self._lines += 1
        return data[pos:] if pos else data


def has_both_lengths(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a head carries both Content-Length and Transfer-Encoding (h11: lower case)."""
    length = coding = False
    for name, _ in headers:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            coding = True
    return length and coding


def head_size(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of a request head as sent, give or take optional whitespace."""
    size = len(method) + len(target) + 13  # " ", " HTTP/1.1\r\n"
    for name, value in headers:
        size += len(name) + len(value) + 4  # ": ", "\r\n"
    return size + 2  # the blank line


def bearer_token(header: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


#: what a client's ``X-Request-Id`` may hold to be used as ours: printable ASCII
#: that cannot break a header or a log line, and not too long
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def sane_request_id(value: bytes | None) -> str | None:
    """A client's ``X-Request-Id`` if it is safe to echo and log, else None.

    Accepted: 1 to 128 characters of letters, digits and ``._:/+=@-`` (UUIDs,
    ULIDs, nginx's ``$request_id``, trace ids). Anything else (spaces,
    quotes, control characters, non-ASCII) is replaced by an id of our own.
    """
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value.decode("ascii")
    return None
