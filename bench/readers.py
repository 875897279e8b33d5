"""Sans-IO stream readers: response bytes in, a checked and timed record out.

Theory of operation
-------------------
A benchmark that only times streams rewards failure: a stream cut off after
two chunks is "fast". So every stream the benchmarks read goes through a
reader that *checks* it as well as timing it, and a stream counts as a
success only when the reader saw it end properly.

One reader per response, one :class:`StreamRecord` per reader. The I/O
layer (:mod:`bench.wire`) calls :meth:`feed` once per socket read with the
body bytes of that read and the ``time.monotonic_ns()`` taken right after
the read returned, and :meth:`finish` once the HTTP body ended (or broke).
The reader decodes frames, and for each frame that carries answer text it
appends that receipt time to ``chunk_ns``; in stamp mode it also extracts
every ``[ts:<monotonic_ns>]`` the provider emulator wrote into the text
(PROTOCOLS.md is silent on this: it is the emulators' ``--stamp`` knob), so
that latency is measured per frame, from the emulator's write to our read,
on one system-wide clock (Linux ``CLOCK_MONOTONIC``).

What counts as an error (:data:`ERROR_KINDS`), first one wins:

- ``inband_error``: an OpenAI error object inside the stream (``data:
  {"error": ...}`` or ``event: error``), or a Connect end-of-stream envelope
  carrying an error (PROTOCOLS.md 2.5): the server said it failed;
- ``bad_frame``: a frame that does not decode (JSON, SSE, envelope);
- ``data_after_done``: data events after ``[DONE]``;
- ``no_done``: the HTTP body ended cleanly but the stream never said it was
  complete (OpenAI: ``data: [DONE]``; StepChat: end-of-stream envelope);
- ``cut_off``: the body did not end cleanly (connection closed inside a
  chunked body, or inside an SSE event or a Connect envelope).

The I/O layer adds the kinds it alone can see: ``connect``, ``http_<status>``,
``not_sse``, ``bad_http`` and ``timeout``.

Hot path: one ``feed`` per read; per frame one JSON decode and, in stamp
mode, one regular-expression scan of the text. No per-frame allocation beyond
the decoded frame and two list appends.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from protocol.connect import EnvelopeDecoder
from protocol.errors import RemoteProtocolError
from protocol.sse import SSEDecoder

if TYPE_CHECKING:
    from collections.abc import Callable

#: The emulators' stamp: ``[ts:<time.monotonic_ns() at write>]``.
STAMP_RE = re.compile(r"\[ts:(\d+)\]")

#: Every error kind the readers and the I/O layer report.
ERROR_KINDS = (
    "connect",
    "http_<status>",
    "not_sse",
    "bad_http",
    "inband_error",
    "bad_frame",
    "data_after_done",
    "no_done",
    "cut_off",
    "timeout",
)

_DONE_DATA = "[DONE]"
_MAX_DETAIL_CHARS = 300


def extract_stamps(text: str) -> list[int]:
    """Every emulator stamp in ``text``, in order.

    Args:
        text: answer text; a relay may have merged several frames into one chunk.

    Returns:
        The ``monotonic_ns`` values; empty when there is none.
    """
    return [int(match) for match in STAMP_RE.findall(text)]


@dataclass(slots=True)
class StreamRecord:
    """What one stream did, filled in as it runs (times are ``monotonic_ns``).

    Attributes:
        start_ns: before the connection was opened (set by the I/O layer).
        first_ns: receipt of the first chunk with answer text.
        end_ns: when the stream ended, well or badly.
        chunk_ns: receipt time of each chunk with answer text.
        chars: characters of answer text received.
        stamps: emulator stamps, in order of receipt.
        stamp_ns: receipt time of each stamp (same length as ``stamps``).
        done: the stream said it was complete.
        error: the first error kind seen, or ``None``.
        detail: a short human-readable explanation of ``error``.
        notify: called once, at the first of: first chunk, completion, error
            (a waiter's wake-up; readers stay free of any event loop).
    """

    start_ns: int = 0
    first_ns: int | None = None
    end_ns: int | None = None
    chunk_ns: list[int] = field(default_factory=list)
    chars: int = 0
    stamps: list[int] = field(default_factory=list)
    stamp_ns: list[int] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    detail: str = ""
    notify: Callable[[], None] | None = None
    _notified: bool = field(default=False, init=False, repr=False)

    def _poke(self) -> None:
        if not self._notified:
            self._notified = True
            if self.notify is not None:
                self.notify()

    @property
    def ok(self) -> bool:
        """Complete and without error: the only streams whose timings count."""
        return self.done and self.error is None

    def fail(self, kind: str, detail: str = "", now_ns: int | None = None) -> None:
        """Record an error; the first one wins, later ones are ignored.

        Args:
            kind: one of :data:`ERROR_KINDS` (``http_<status>`` with the number).
            detail: a short explanation, cut to a few hundred characters.
            now_ns: the end time, if the stream has not ended yet.
        """
        if self.error is None:
            self.error = kind
            self.detail = detail[:_MAX_DETAIL_CHARS]
        if self.end_ns is None and now_ns is not None:
            self.end_ns = now_ns

    def timed_out(self, timeout_s: float) -> None:
        """The stream was not complete within ``timeout_s``: a ``timeout`` error."""
        self.done = False
        self.fail("timeout", f"no complete stream within {timeout_s:g} s", time.monotonic_ns())
        self._poke()

    def complete(self, now_ns: int) -> None:
        """The stream said it is complete (its end time is kept if already set)."""
        self.done = True
        if self.end_ns is None:
            self.end_ns = now_ns
        self._poke()

    def text_chunk(self, text: str, now_ns: int, stamps: bool) -> None:
        """Count one frame with answer text received at ``now_ns``."""
        if self.first_ns is None:
            self.first_ns = now_ns
            self._poke()
        self.chunk_ns.append(now_ns)
        self.chars += len(text)
        if stamps:
            for match in STAMP_RE.findall(text):
                self.stamps.append(int(match))
                self.stamp_ns.append(now_ns)


def _delta_text(message: dict[str, Any]) -> str:
    """Answer text of one OpenAI chunk: every choice's content and reasoning."""
    choices = message.get("choices")
    if not isinstance(choices, list):
        return ""
    parts: list[str] = []
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        for key in ("reasoning_content", "reasoning", "content"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                parts.append(value)
    return parts[0] if len(parts) == 1 else "".join(parts)


class OpenAIStreamReader:
    """Checks and times one OpenAI ``chat.completion.chunk`` SSE stream.

    Args:
        record: where results go; its ``start_ns`` is the caller's.
        stamps: extract emulator stamps from the text.
    """

    __slots__ = ("_decoder", "_ended", "_record", "_stamps")

    def __init__(self, record: StreamRecord, *, stamps: bool = False) -> None:
        self._record = record
        self._stamps = stamps
        self._decoder = SSEDecoder()
        self._ended = False

    def feed(self, data: bytes, now_ns: int) -> None:
        """Decode the body bytes of one read, received at ``now_ns``.

        Never raises: decoding problems are recorded as errors, and after an
        error the rest of the stream is ignored.
        """
        record = self._record
        if record.error is not None:
            return
        try:
            events = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            record.fail("bad_frame", str(exc), now_ns)
            return
        for event in events:
            if self._ended:
                record.fail("data_after_done", event.data[:80], now_ns)
                return
            if event.data == _DONE_DATA:
                self._ended = True
                record.complete(now_ns)
                continue
            try:
                message = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                record.fail("bad_frame", f"not JSON: {event.data[:80]!r}", now_ns)
                return
            if event.event == "error" or (isinstance(message, dict) and message.get("error")):
                record.fail("inband_error", event.data, now_ns)
                return
            if not isinstance(message, dict):
                record.fail("bad_frame", f"not a JSON object: {event.data[:80]!r}", now_ns)
                return
            text = _delta_text(message)
            if text:
                record.text_chunk(text, now_ns, self._stamps)

    def finish(self, *, complete: bool, now_ns: int) -> None:
        """The body ended: cleanly (``complete``) or not. Decides the outcome.

        Args:
            complete: the HTTP message ended as its framing says it should.
            now_ns: the time of the end.
        """
        settle_sse_end(
            self._record, self._decoder, ended=self._ended, complete=complete,
            missing="the stream ended without data: [DONE]", now_ns=now_ns,
        )


def settle_sse_end(
    record: StreamRecord,
    decoder: SSEDecoder,
    *,
    ended: bool,
    complete: bool,
    missing: str,
    now_ns: int,
) -> None:
    """Decide how an SSE stream that just ended counts (unless it has failed already).

    Cut off (the body or the last event unfinished) is ``cut_off``; complete
    without its end marker is ``no_done`` with ``missing`` as the detail;
    otherwise the stream ends now.
    """
    decoder.close()
    if record.error is not None:
        return
    if not complete or (decoder.truncated and not ended):
        record.done = False
        record.fail("cut_off", "the connection ended inside the stream", now_ns)
    elif not ended:
        record.fail("no_done", missing, now_ns)
    elif record.end_ns is None:
        record.end_ns = now_ns


class ConnectStreamReader:
    """Checks and times one StepChat ``SendMessageStream`` answer (PROTOCOLS.md 2.5, 2.7).

    ``textEvent.text`` is a chunk; a ``doneEvent`` or the successful
    end-of-stream envelope completes the stream; an end-of-stream envelope
    with an ``error`` is an ``inband_error``.

    Args:
        record: where results go; its ``start_ns`` is the caller's.
        stamps: extract emulator stamps from the text.
    """

    __slots__ = ("_decoder", "_record", "_stamps")

    def __init__(self, record: StreamRecord, *, stamps: bool = False) -> None:
        self._record = record
        self._stamps = stamps
        self._decoder = EnvelopeDecoder()

    def feed(self, data: bytes, now_ns: int) -> None:
        """Decode the body bytes of one read, received at ``now_ns``; never raises."""
        record = self._record
        if record.error is not None:
            return
        try:
            envelopes = self._decoder.feed(data)
        except RemoteProtocolError as exc:
            record.fail("bad_frame", str(exc), now_ns)
            return
        for envelope in envelopes:
            try:
                message = orjson.loads(envelope.payload)
            except orjson.JSONDecodeError:
                record.fail("bad_frame", f"not JSON: {envelope.payload[:80]!r}", now_ns)
                return
            if not isinstance(message, dict):
                record.fail("bad_frame", "envelope is not a JSON object", now_ns)
                return
            if message.get("error"):
                record.fail("inband_error", envelope.payload.decode("utf-8", "replace"), now_ns)
                return
            if envelope.end_stream:
                record.complete(now_ns)
                continue
            event = message.get("textEvent")
            if isinstance(event, dict):
                text = event.get("text")
                if isinstance(text, str) and text:
                    record.text_chunk(text, now_ns, self._stamps)
            elif "doneEvent" in message:
                record.complete(now_ns)

    def finish(self, *, complete: bool, now_ns: int) -> None:
        """The body ended: cleanly (``complete``) or not. Decides the outcome."""
        record = self._record
        if record.error is not None:
            return
        try:
            self._decoder.close()
        except RemoteProtocolError as exc:
            record.done = False
            record.fail("cut_off", str(exc), now_ns)
            return
        if not complete:
            record.done = False
            record.fail("cut_off", "the connection ended inside the stream", now_ns)
        elif not record.done:
            record.fail("no_done", "the stream ended without doneEvent or end-of-stream", now_ns)
        elif record.end_ns is None:
            record.end_ns = now_ns


class StreamReader(Protocol):
    """What the I/O layer needs of a reader (both readers here have it)."""

    def feed(self, data: bytes, now_ns: int) -> None:
        """Decode the body bytes of one read, received at ``now_ns``."""

    def finish(self, *, complete: bool, now_ns: int) -> None:
        """The body ended, cleanly (``complete``) or not."""
