"""Connect protocol envelopes (connectrpc.com), incrementally decoded.

A Connect server-streaming response body is a sequence of envelopes: one
flags byte, the payload length as a 4-byte big-endian unsigned integer, then
that many payload bytes (PROTOCOLS.md 2.5). Flag ``0x01`` marks a compressed
payload (never asked for, so refused here); flag ``0x02`` marks the one
end-of-stream envelope, whose JSON payload may carry an ``error`` object.

Theory of operation: :meth:`EnvelopeDecoder.feed` appends a read to one
buffer, cuts off every *whole* envelope it now holds, and keeps only the
unconsumed tail, deleting consumed bytes once per call so that the cost stays
linear however the bytes are split. Every complete envelope of every read is
returned, which is exactly what the reference's parser gets wrong (2.8: it
decodes at most one frame per read and loses the tail of answers).

Traps handled:
- a declared length over ``max_payload`` is refused before any of it is
  buffered (a non-Connect body such as a JSON 401 read as an envelope claims
  hundreds of megabytes and would otherwise hang the reader);
- anything after the end-of-stream envelope is a protocol error;
- EOF inside an envelope is truncation, reported by
  :meth:`EnvelopeDecoder.close`; :attr:`EnvelopeDecoder.ended` tells whether
  the end-of-stream envelope arrived.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.errors import RemoteProtocolError

#: flags byte then big-endian payload length (PROTOCOLS.md 2.5)
_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02

#: Default largest payload accepted: Step messages are small JSON objects.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Envelope:
    """One Connect envelope: its flags and its raw payload."""

    flags: int
    payload: bytes

    @property
    def end_stream(self) -> bool:
        """True for the end-of-stream envelope."""
        return bool(self.flags & FLAG_END_STREAM)


def encode_envelope(payload: bytes, flags: int = 0) -> bytes:
    """Frame ``payload`` as one Connect envelope.

    Args:
        payload: the message bytes (UTF-8 JSON for connect+json).
        flags: ``0`` for a message, :data:`FLAG_END_STREAM` for the last one.

    Returns:
        The 5-byte header followed by the payload.
    """
    return _HEADER.pack(flags, len(payload)) + payload


class EnvelopeDecoder:
    """Feed bytes as they arrive; get back every envelope they complete."""

    def __init__(self, max_payload: int = MAX_PAYLOAD_BYTES) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._ended = False

    @property
    def ended(self) -> bool:
        """True once the end-of-stream envelope was decoded."""
        return self._ended

    def feed(self, data: bytes | bytearray) -> list[Envelope]:
        """Add ``data`` and return the envelopes it completed, in order.

        Raises:
            RemoteProtocolError: a compressed envelope, a length over the
                limit, or bytes after the end-of-stream envelope. The decoder
                is then unusable.
        """
        buf = self._buf
        buf += data
        out: list[Envelope] = []
        pos = 0
        size_buf = len(buf)
        while size_buf - pos >= HEADER_SIZE:
            if self._ended:
                raise RemoteProtocolError("data after the Connect end-of-stream envelope")
            flags, size = _HEADER.unpack_from(buf, pos)
            if flags & FLAG_COMPRESSED:
                raise RemoteProtocolError("compressed Connect envelope was not asked for")
            if flags & ~(FLAG_COMPRESSED | FLAG_END_STREAM):
                raise RemoteProtocolError(f"unknown Connect envelope flags {flags:#04x}")
            if size > self._max_payload:
                raise RemoteProtocolError(f"Connect envelope of {size} bytes is over the limit")
            end = pos + HEADER_SIZE + size
            if end > size_buf:
                break  # partial envelope: wait for its remaining bytes
            out.append(Envelope(flags, bytes(buf[pos + HEADER_SIZE : end])))
            if flags & FLAG_END_STREAM:
                self._ended = True
            pos = end
        if self._ended and size_buf > pos:
            raise RemoteProtocolError("data after the Connect end-of-stream envelope")
        if pos:
            del buf[:pos]  # one deletion per feed keeps this linear
        return out

    def close(self) -> None:
        """Signal EOF.

        Whether a missing end-of-stream envelope is truncation is the
        caller's call (StepChat's ``doneEvent`` already says the answer is
        whole); see :attr:`ended`.

        Raises:
            RemoteProtocolError: the stream ended inside an envelope.
        """
        if self._buf:
            raise RemoteProtocolError("upstream stream ended inside a Connect envelope")
