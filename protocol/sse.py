"""Server-Sent Events: an incremental decoder and an encoder.

ChatGLM streams its answer as an SSE body (PROTOCOLS.md 3.9), and the relay
streams OpenAI chunks to its clients as SSE (1.5). This module is the wire
format only: bytes in, :class:`SSEEvent` out, and back.

Theory of operation (decoder). The parsing rules are those of the WHATWG HTML
standard, section 9.2.6 "Interpreting an event stream"
(https://html.spec.whatwg.org/multipage/server-sent-events.html):

- The stream is split into lines. A line ends in CRLF, a lone LF or a lone CR.
- A UTF-8 byte order mark at the very start of the stream is skipped, once.
- A line that starts with ``:`` is a comment. Otherwise the text before the
  first ``:`` is the field name and the text after it the value, minus one
  leading space; a line without ``:`` is a field name with an empty value.
- ``data`` appends the value and a LF to the data buffer; ``event`` sets the
  event type; ``id`` sets the last event id unless the value contains NUL;
  ``retry`` is taken only if it is all ASCII digits; other fields are ignored.
- A blank line dispatches: with an empty data buffer nothing is dispatched;
  otherwise one trailing LF is removed from the data and the event goes out
  with type "message" unless ``event`` named another. Either way the data
  buffer and the event type are reset. The last event id is *not* reset: it
  stays in effect for every later event until another ``id`` line changes it.
- At EOF a pending event (no blank line after it) is discarded.

Invariants and how they are kept:

- Any split of the bytes gives the same events. Line ends are ASCII, so lines
  are cut on bytes and only *complete* lines are decoded from UTF-8 (with
  ``errors="replace"``): a character cut between two reads is never decoded
  in halves. The two split-sensitive traps are a ``\\r`` that ends one read
  and may be the first half of a ``\\r\\n`` (remembered in ``_skip_lf``; a
  leading ``\\n`` of the next read is then dropped), and a BOM cut between
  reads (up to two bytes are held until it is clear whether they are one).
- Linear time however the bytes are split. With nothing pending, a read is
  parsed where it is and only its unfinished last line is copied into the
  buffer; otherwise the read is appended to the buffer. The decoder
  remembers how many bytes of the pending partial line it has already
  searched for a line end (``_scanned``) and never searches them again;
  line ends are found with ``find`` (C ``memchr``), once per line end, never
  with a per-byte Python loop; consumed bytes are deleted once per
  :meth:`SSEDecoder.feed`.
- Few copies. Snapshot streams (ChatGLM) send lines of tens of kilobytes,
  so a line is never sliced out: its field name is compared in place and a
  ``data`` value is decoded straight from the buffer (one copy, into the
  ``str``); an event with one data line gets that very ``str``.
- Bounded memory. A line (complete or not) or a pending event's data over
  ``max_event_bytes`` raises :class:`~protocol.errors.RemoteProtocolError`.
- Any input gives events or :class:`~protocol.errors.RemoteProtocolError`,
  nothing else (h11's fuzzing invariant).

Deviations, both deliberate: ``retry`` values of more than
:data:`MAX_RETRY_DIGITS` digits are ignored (Python refuses to convert
thousands of digits, and no sane reconnection time is that long); and a
``retry`` is reported on the event it came with (:attr:`SSEEvent.retry`) as
well as kept in :attr:`SSEDecoder.reconnection_time`, so a ``retry`` sent in
an event without data is visible there only.

The encoder writes ``data:`` lines with one space after the colon, one line
per line of the payload, and ends each event with a blank line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import LocalProtocolError, RemoteProtocolError

#: Default bound on one line or one pending event's data, in bytes.
MAX_EVENT_BYTES = 16 * 1024 * 1024

#: Longest ``retry`` value honoured, in decimal digits (see the module docstring).
MAX_RETRY_DIGITS = 18

_BOM = b"\xef\xbb\xbf"  # U+FEFF in UTF-8; WHATWG: skipped once at stream start
_CR = b"\r"
_LF = b"\n"
_LF_BYTE = 0x0A
_SPACE = 0x20
#: WHATWG SSE: CRLF, a lone LF and a lone CR all end a line.
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event.

    Attributes:
        data: the data lines joined with LF (one trailing LF removed).
        event: the ``event:`` field, ``"message"`` when absent or empty.
        id: the last event id in effect when the event was dispatched, or
            None if no ``id:`` line was ever seen on this stream.
        retry: the ``retry:`` value (milliseconds) if one came with this event.
    """

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed bytes as they arrive; get back every event they complete.

    Attributes:
        truncated: set by :meth:`close`: True if the stream ended with data
            lines of an undispatched event pending, or inside a line.
    """

    __slots__ = (
        "_bom_checked",
        "_buf",
        "_closed",
        "_data",
        "_data_bytes",
        "_event_type",
        "_last_id",
        "_max_event_bytes",
        "_reconnection_time",
        "_retry",
        "_scanned",
        "_skip_lf",
        "truncated",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        """
        Args:
            max_event_bytes: the longest line, and the largest data of one
                pending event, accepted from the peer, in bytes.
        """
        self._max_event_bytes = max_event_bytes
        self._buf = bytearray()
        # Bytes at the start of _buf (all of the pending partial line) that
        # are known to hold neither CR nor LF: the next search starts there.
        self._scanned = 0
        self._skip_lf = False  # the last read ended in CR: drop a leading LF
        self._bom_checked = False
        self._closed = False
        # The pending event: data lines, their size, type and retry.
        self._data: list[str] = []
        self._data_bytes = 0
        self._event_type = ""
        self._retry: int | None = None
        self._last_id: str | None = None
        self._reconnection_time: int | None = None
        self.truncated = False

    @property
    def last_event_id(self) -> str | None:
        """The last event id set by the stream so far, or None."""
        return self._last_id

    @property
    def reconnection_time(self) -> int | None:
        """The last valid ``retry`` value seen on the stream (ms), or None."""
        return self._reconnection_time

    def feed(self, data: bytes | bytearray) -> list[SSEEvent]:
        """Add ``data`` and return the events it completed, in order.

        Args:
            data: the next bytes of the stream, split anywhere.

        Returns:
            Every event whose terminating blank line is in ``data``; possibly
            none. Bytes of an unfinished line or event stay buffered.

        Raises:
            RemoteProtocolError: a line or an event's data is over
                ``max_event_bytes``. The decoder is then unusable.
            LocalProtocolError: called after :meth:`close`.
        """
        if self._closed:
            raise LocalProtocolError("SSE decoder fed after close()")
        buf: bytes | bytearray
        if self._buf or not self._bom_checked:
            buf = self._buf
            buf += data
            if not self._bom_checked:
                if len(buf) < len(_BOM) and _BOM.startswith(buf):
                    return []  # maybe the start of a BOM: wait for its other bytes
                if buf.startswith(_BOM):
                    del buf[: len(_BOM)]  # once per stream, so this copy is fine
                self._bom_checked = True
        else:
            buf = data  # nothing pending: parse the read itself, keep only its tail
        n = len(buf)
        limit = self._max_event_bytes
        out: list[SSEEvent] = []
        pos = 0
        # Positions of the next CR and next LF at or after the current
        # search start, or n if there is none in the buffer. Each is searched
        # for again only once consumed (< pos), so every byte is searched at
        # most once per kind of line end and the cost stays linear.
        cr_at = buf.find(_CR, self._scanned)
        cr_at = n if cr_at < 0 else cr_at
        lf_at = buf.find(_LF, self._scanned)
        lf_at = n if lf_at < 0 else lf_at
        while True:
            if self._skip_lf:
                if pos == n:
                    break  # keep _skip_lf: the LF may come with the next read
                self._skip_lf = False
                if buf[pos] == _LF_BYTE:
                    pos += 1  # WHATWG: the second half of a CRLF split across reads
            if cr_at < pos:
                cr_at = buf.find(_CR, pos)
                cr_at = n if cr_at < 0 else cr_at
            if lf_at < pos:
                lf_at = buf.find(_LF, pos)
                lf_at = n if lf_at < 0 else lf_at
            end = min(cr_at, lf_at)
            if end - pos > limit:
                raise RemoteProtocolError(f"SSE line over {limit} bytes")
            if end == n:
                break  # a partial line (or nothing): wait for its line end
            if end > pos:
                self._process_field(buf, pos, end)
            else:
                event = self._dispatch()
                if event is not None:
                    out.append(event)
            if end == lf_at:
                pos = end + 1
            elif end + 1 == n:
                pos = end + 1
                self._skip_lf = True  # a CR at the end of the read: maybe CRLF
            else:
                pos = end + 2 if buf[end + 1] == _LF_BYTE else end + 1
        if buf is self._buf:
            if pos:
                del buf[:pos]  # one deletion per feed keeps this linear
        elif pos < n:
            self._buf += memoryview(buf)[pos:]  # the partial line, copied once
        self._scanned = len(self._buf)  # what is left holds no line end
        return out

    def close(self) -> list[SSEEvent]:
        """Signal EOF.

        WHATWG: an event whose blank line never came is discarded, so this
        never returns an event. Whether the stream was cut short is in
        :attr:`truncated` afterwards: data lines were pending, or the stream
        ended inside a line. Calling it again does nothing more.

        Returns:
            An empty list (kept so callers treat ``feed`` and ``close`` alike).
        """
        if not self._closed:
            self._closed = True
            self.truncated = bool(self._data) or bool(self._buf)
            self._buf = bytearray()
            self._data = []
            self._data_bytes = 0
        return []

    def _process_field(self, buf: bytes | bytearray, start: int, end: int) -> None:
        """Apply the non-blank line ``buf[start:end]`` to the pending event (WHATWG 9.2.6).

        The line is read in place: a ``data`` value is decoded straight from
        the buffer, so its bytes are copied once (into the str), not sliced
        out first. Snapshot streams send tens of kilobytes per line.
        """
        colon = buf.find(b":", start, end)
        if colon == start:
            return  # a comment, such as a keep-alive
        if colon < 0:
            name_end = value_start = end
        else:
            name_end = colon
            value_start = colon + 2 if colon + 1 < end and buf[colon + 1] == _SPACE else colon + 1
        name = bytes(buf[start:name_end])
        if name == b"data":
            size = end - value_start
            self._data_bytes += size + 1  # the value and its LF
            if self._data_bytes > self._max_event_bytes:
                raise RemoteProtocolError(f"SSE event data over {self._max_event_bytes} bytes")
            with memoryview(buf) as view:
                self._data.append(str(view[value_start:end], "utf-8", "replace"))
            return
        value = bytes(buf[value_start:end])  # other fields are short
        match name:
            case b"event":
                self._event_type = value.decode("utf-8", "replace")
            case b"id" if b"\0" not in value:  # WHATWG: an id with NUL is ignored
                self._last_id = value.decode("utf-8", "replace")
            case b"retry" if value.isdigit() and len(value) <= MAX_RETRY_DIGITS:
                # WHATWG: only ASCII digits count; bytes.isdigit() is ASCII-only
                # (str.isdigit() would accept other scripts' digits).
                self._retry = self._reconnection_time = int(value)
            case _:
                pass  # any other field name is ignored

    def _dispatch(self) -> SSEEvent | None:
        """A blank line: build the pending event, if it has data, and reset."""
        event: SSEEvent | None = None
        if self._data:
            event = SSEEvent(
                "\n".join(self._data),  # the same as the buffer minus its last LF
                self._event_type or "message",
                self._last_id,
                self._retry,
            )
            self._data = []
            self._data_bytes = 0
        self._event_type = ""
        self._retry = None
        return event


def _check_field(name: str, value: bytes, forbidden: bytes = b"\r\n") -> None:
    """Refuse a field value that would break out of its line."""
    for char in forbidden:
        if char in value:
            raise LocalProtocolError(f"SSE {name} must not contain {bytes([char])!r}")


def encode_event(data: bytes, *, event: bytes | None = None, id: bytes | None = None) -> bytes:
    """Encode one event.

    Args:
        data: the payload. Each line of it (split at CRLF, CR or LF) becomes
            its own ``data:`` line, so a decoder gets the lines back joined
            with LF (SSE cannot carry a CR in data).
        event: the event type, or None for the default ``message``.
        id: the event id, or None to leave the last event id unchanged.

    Returns:
        The event, ending with a blank line.

    Raises:
        LocalProtocolError: ``event`` or ``id`` contains CR or LF, or ``id``
            contains NUL (a decoder would ignore it).
    """
    parts: list[bytes] = []
    if event is not None:
        _check_field("event", event)
        parts.append(b"event: " + event + b"\n")
    if id is not None:
        _check_field("id", id, b"\r\n\0")
        parts.append(b"id: " + id + b"\n")
    parts.extend(b"data: " + line + b"\n" for line in _LINE_END.split(data))
    parts.append(b"\n")
    return b"".join(parts)


def encode_data(data: bytes) -> bytes:
    """Encode one single-line ``message`` event: the hot path for JSON chunks.

    Args:
        data: the payload; it must hold no CR or LF (compact JSON never does).

    Returns:
        ``b"data: " + data + b"\\n\\n"``.

    Raises:
        LocalProtocolError: ``data`` contains CR or LF.
    """
    if b"\n" in data or b"\r" in data:
        raise LocalProtocolError("encode_data() got a line break; use encode_event()")
    return b"data: " + data + b"\n\n"


def encode_comment(text: bytes = b"") -> bytes:
    """Encode a comment, which clients ignore: the keep-alive of idle streams.

    Args:
        text: the comment text, without CR or LF.

    Returns:
        ``b": " + text + b"\\n\\n"``.

    Raises:
        LocalProtocolError: ``text`` contains CR or LF.
    """
    _check_field("comment", text)
    return b": " + text + b"\n\n"


#: The OpenAI end-of-stream sentinel event.
DONE = b"data: [DONE]\n\n"
