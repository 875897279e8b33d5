"""StepChat answers: Connect envelopes of SendMessageStream in, deltas out.

Sans-IO. The I/O layer decodes the response body with
:class:`protocol.connect.EnvelopeDecoder` and hands every envelope to one
:class:`StepStream`, which returns the provider-neutral deltas of
:mod:`protocol.deltas` (PROTOCOLS.md 2.5, 2.7).

Theory of operation. Each envelope carries one JSON object. An ordinary
message is read with the reference's order of precedence, first match wins:

1. ``error`` with a truthy ``code``: the upstream failed -> UpstreamError;
2. ``pipelineEvent``: only ``eventSearch.results`` matters -> one Citation
   per well-formed hit, each URL at most once per answer;
3. ``textEvent`` with a non-empty ``text``: the next *incremental* piece of
   the answer -> TextDelta, citation markers removed;
4. ``doneEvent``: the answer is complete -> Finish("stop");
5. anything else (bookkeeping we do not use) is ignored.

The end-of-stream envelope (flag 0x02) closes the response: ``{}`` is
success, ``{"error": {"code", "message"}}`` a failure raised after the stream
started (HTTP status 200 then). A StepChat answer normally ends with a
``doneEvent`` followed by ``{}``; that pair gives one Finish.

Invariants:
- any envelope gives a list of deltas or raises RemoteProtocolError, never
  anything else (h11's invariant); a translator that raised is unusable;
- every answer ends with exactly one Finish or UpstreamError, and nothing
  follows it; no TextDelta is ever empty;
- a truncated answer never looks complete (section 5, weakness 13): EOF
  without ``doneEvent`` or end-of-stream gives UpstreamError("truncated").

Traps:
- Citation markers ``<web_ID>``, ``<url_ID>``, ``<unknown_ID>`` are removed
  in stream mode too (weakness 9), and a marker may be cut between two
  ``textEvent``s. :class:`protocol.markers.MarkerStripper` holds back a
  tail that could still become a marker (at most 40 characters), so text
  waits only while it really might be one; it is flushed before the final
  delta, so nothing held is lost.
- The reference ignores the envelope flags and parses the end-of-stream
  envelope like a message, which is why ``error.code`` is among its
  "events"; we honour the flag, and still treat an ordinary message with a
  truthy ``error.code`` as a failure, as the reference does.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Any

import orjson

from protocol.connect import FLAG_END_STREAM
from protocol.deltas import Citation, Finish, TextDelta, UpstreamError
from protocol.errors import RemoteProtocolError
from protocol.markers import MarkerStripper

if TYPE_CHECKING:
    from protocol.connect import Envelope
    from protocol.deltas import Delta

#: PROTOCOLS.md 2.7: how the reference renders one search hit in stream mode
#: ("searching {title} - {url} ..."); the OpenAI encoder formats Citations with it.
CITATION_LINE = "检索 {title} - {url} ...\n"

#: PROTOCOLS.md 2.7: one whole citation marker; ID = ASCII letters and digits.
MARKER = re.compile(r"<(?:web|url|unknown)_[A-Za-z0-9]+>")

#: Fully matches every proper prefix of a marker (and every longer unfinished
#: ID): "<", "<w", "<we", "<web", "<web_", "<web_3f", "<u", "<ur", "<un", ...
MARKER_PREFIX = re.compile(
    r"<(?:"
    r"w(?:e(?:b(?:_[A-Za-z0-9]*)?)?)?"
    r"|u(?:r(?:l(?:_[A-Za-z0-9]*)?)?|n(?:k(?:n(?:o(?:w(?:n(?:_[A-Za-z0-9]*)?)?)?)?)?)?)?"
    r")?"
)

#: Longest piece of text held back while it might still become a marker.
MAX_MARKER_HOLD_CHARS = 40

#: Longest upstream error message passed on, in characters.
_MAX_MESSAGE_CHARS = 500
#: Longest upstream error code kept.
_MAX_CODE_CHARS = 64

#: HTTP status the client sees for a Connect error code (2.5); 502 otherwise.
_STATUS_OF_CODE = {
    "unauthenticated": 401,
    "resource_exhausted": 429,
    "deadline_exceeded": 504,
}


class _State(enum.Enum):
    """Where one answer is."""

    #: answer text may still arrive
    OPEN = enum.auto()
    #: a doneEvent arrived; only the success end-of-stream envelope may follow
    DONE = enum.auto()
    #: an ordinary message carried an error; only the end-of-stream envelope may follow
    FAILED = enum.auto()
    #: the end-of-stream envelope arrived, or close() was called
    CLOSED = enum.auto()


def _upstream_error(error: object) -> UpstreamError | None:
    """The UpstreamError an ``error`` member describes, if its ``code`` is truthy."""
    if not isinstance(error, dict):
        return None
    code: Any = error.get("code")
    if not code:
        return None
    if not isinstance(code, str):
        # JavaScript truthiness (2.7): a number still names a failure
        code = str(code) if isinstance(code, int | float) else "unknown"
    code = code[:_MAX_CODE_CHARS]
    message: Any = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"StepChat reported the error {code!r}"
    elif len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
    return UpstreamError(code, message, _STATUS_OF_CODE.get(code, 502))


class StepStream:
    """One per upstream response: envelopes in, deltas out."""

    __slots__ = ("_seen_urls", "_state", "_stripper")

    def __init__(self) -> None:
        self._state = _State.OPEN
        self._stripper = MarkerStripper(MARKER, MARKER_PREFIX, "<", max_hold=MAX_MARKER_HOLD_CHARS)
        self._seen_urls: set[str] = set()

    @property
    def finished(self) -> bool:
        """True once a Finish or UpstreamError was produced."""
        return self._state is not _State.OPEN

    def feed(self, envelope: Envelope) -> list[Delta]:
        """Translate one envelope.

        Args:
            envelope: the next envelope of the response, in order.

        Returns:
            The deltas it produced, possibly none. After a Finish or
            UpstreamError the translator is :attr:`finished`.

        Raises:
            RemoteProtocolError: the payload is not a JSON object, or an
                envelope came after the answer ended (other than the
                end-of-stream envelope that follows a ``doneEvent`` or an
                error). The translator must not be used afterwards.
        """
        try:
            message = orjson.loads(envelope.payload)
        except orjson.JSONDecodeError as exc:
            raise RemoteProtocolError("StepChat stream message is not JSON") from exc
        if not isinstance(message, dict):
            raise RemoteProtocolError("StepChat stream message is not a JSON object")
        if envelope.flags & FLAG_END_STREAM:
            return self._end_stream(message)
        if self._state is not _State.OPEN:
            raise RemoteProtocolError(
                f"StepChat stream message after the answer ended ({self._state.name})"
            )

        failure = _upstream_error(message.get("error"))
        if failure is not None:
            self._state = _State.FAILED
            return self._flushed([failure])
        pipeline = message.get("pipelineEvent")
        if isinstance(pipeline, dict):
            return self._citations(pipeline)
        text_event = message.get("textEvent")
        if isinstance(text_event, dict):
            text = text_event.get("text")
            if isinstance(text, str) and text:
                text = self._stripper.feed(text)
                return [TextDelta(text)] if text else []
        if isinstance(message.get("doneEvent"), dict):
            self._state = _State.DONE
            return self._flushed([Finish("stop")])
        return []

    def close(self, *, ended: bool) -> list[Delta]:
        """The upstream response ended (EOF).

        Args:
            ended: whether the end-of-stream envelope arrived
                (:attr:`protocol.connect.EnvelopeDecoder.ended`).

        Returns:
            Nothing if the answer already ended; otherwise any held-back
            text, then Finish("stop") if the end-of-stream envelope arrived
            (but was not fed), else UpstreamError("truncated"). The
            translator is :attr:`finished` afterwards.
        """
        if self._state is not _State.OPEN:
            self._state = _State.CLOSED
            return []
        self._state = _State.CLOSED
        if ended:
            return self._flushed([Finish("stop")])
        return self._flushed(
            [UpstreamError("truncated", "upstream stream ended before the answer was complete")]
        )

    def _end_stream(self, message: dict[str, Any]) -> list[Delta]:
        """Handle the end-of-stream envelope's payload (2.5)."""
        state, self._state = self._state, _State.CLOSED
        if state is _State.CLOSED:
            raise RemoteProtocolError("StepChat stream has a second end-of-stream envelope")
        error = message.get("error")
        if state is _State.FAILED:
            return []  # the failure was already reported
        if error is None:
            if state is _State.DONE:
                return []  # the usual doneEvent, then {}
            return self._flushed([Finish("stop")])
        if state is not _State.OPEN:
            raise RemoteProtocolError(
                f"StepChat stream failed after the answer ended ({state.name})"
            )
        failure = _upstream_error(error)
        if failure is None:
            failure = UpstreamError("unknown", "StepChat ended the stream with an unreadable error")
        return self._flushed([failure])

    def _flushed(self, last: list[Delta]) -> list[Delta]:
        """Held-back text (if any) followed by ``last``."""
        held = self._stripper.flush()
        return [TextDelta(held), *last] if held else last

    def _citations(self, pipeline: dict[str, Any]) -> list[Delta]:
        """One Citation per new, well-formed search hit of a pipelineEvent."""
        search = pipeline.get("eventSearch")
        results = search.get("results") if isinstance(search, dict) else None
        if not isinstance(results, list):
            return []
        out: list[Delta] = []
        seen = self._seen_urls
        for hit in results:
            if not isinstance(hit, dict):
                continue
            title, url = hit.get("title"), hit.get("url")
            if isinstance(title, str) and isinstance(url, str) and url and url not in seen:
                seen.add(url)
                out.append(Citation(title, url))
        return out
