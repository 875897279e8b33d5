"""ChatGLM answer snapshots in, incremental deltas out (sans-IO).

ChatGLM's chat stream (PROTOCOLS.md 3.9) is SSE whose every event is a JSON
*snapshot* of the assistant message so far: a top-level ``status``
(``init``/``finish``/``intervene``) and ``parts``, each part an array of content
items (``text``, ``think``, ``quote_result``, ``image``, ``code``,
``execution_output``) whose text fields are cumulative. The relay must turn that
into deltas (protocol/deltas.py). :class:`GlmStream` takes one SSE event's data
per :meth:`GlmStream.feed` and returns the deltas it completed.

Theory of operation
-------------------

*No global offset.* The reference (3.11) renders the whole snapshot to a
string and cuts it at ``len(emitted) - offset``; every decoration miscounted in
``offset`` drops or repeats characters (section 5, weaknesses 5-7). We keep,
instead, one small record per content item and diff each cumulative field on
its own, which is the RECOMMENDED ALGORITHM at the end of 3.11.

*Keying.* An item record lives under ``(part key, item index)`` and remembers
its ``type``. The part key is the part's ``logic_id`` when it has one (the live
site and our emulator send it). Without one it is ``(position in parts,
generation)``: the generation of a position advances when the part seen there
was finished and the part there now is not (a new part started after a
finished one, which is what layout (a) below looks like), or when its item
types stop being a prefix of each other (a different part took the place). A
record is replaced by a fresh one when the type at its index changes, or when
it was finished and the item there now is in progress again. Unknown item types
and structurally odd parts or items are skipped (lenient), never fatal.

*Both layouts* of 3.9 work: (a) an event carries only the active part(s), a
finished part is sent once with ``status: finish`` and then dropped; (b) every
event repeats all earlier parts. In (b) a repeated finished part maps to the
records it had and, having not grown, emits nothing; in (a) the next part at
the same position is a new generation. Both layouts of the same answer give
the same deltas, event by event.

*Diffing at the cost of the new text.* For each cumulative field (``text``,
``think``, ``code``) a record stores the length seen so far and the last
:data:`TAIL_CHARS` characters. A new value that is longer and still has that
tail at the same place extends the old one: only ``value[old_len:]`` goes out.
Any other value (shorter, or a different tail) is an upstream rewrite: nothing
is emitted, the new value is remembered, and later growth continues from it.
We check a bounded tail rather than the whole prefix because the upstream
already resends the whole text in every event (quadratic in bytes); comparing
the whole prefix again would add a second quadratic. The window is where
rewrites happen in practice (the last tokens being re-segmented or a marker
being completed). A rewrite further back goes unnoticed; then only the suffix
is emitted, so nothing already sent is repeated, at worst the client's earlier
text differs from the upstream's final one there. Per event the work is the
JSON parse, a constant per item, and the new text (:meth:`statistics` counts
the compared characters so tests can check that).

*Rendering.* ``text`` -> :class:`TextDelta` with citation markers
``【N†source】`` removed by a :class:`MarkerStripper` that holds back a short
tail after ``【`` while it could still become a marker (weakness 9).
``think`` (and the legacy ``text_thinking`` whose text is in ``text``) ->
:class:`ReasoningDelta` for every model unless silent; how reasoning is shown is
the relay's choice, and the reference's re-appending of the whole ``think``
value for models without ``think``/``zero`` in their name (weakness 6) is not
reproduced. ``quote_result`` -> one :class:`Citation` per hit once its part is
finished; ``image`` -> one :class:`ImageResult` per ``http(s)`` URL once its
part is finished (both de-duplicated by URL over the whole answer). ``code`` ->
text fenced as ```` ```python ````, closed when the item or its part finishes,
when another item starts writing text, or at the end. ``execution_output`` ->
its ``content`` plus a newline once its part is finished, unless it equals the
previous output (as the reference does).

*Separators.* Answer text from different items must not run together. Rule:
whenever non-empty answer text comes from another item than the previous
answer text did, one ``"\\n"`` goes first. Items write one after the other
(an item's text is complete before the next item's starts), so the answer text
is the renderings of the items that produce any, in order, joined with ``"\\n"``
(a text item renders as its text without markers, a code item as
```` ```python\\n{code}\\n```\\n ````, an execution output as its content plus
``"\\n"``). Reasoning uses the same rule among ``think`` items on its own
channel. Held-back marker text is flushed when its item finishes, when another
item writes text, and at the end, so it stays with its own item.

*End.* Top-level ``finish`` -> the event's parts are diffed like any other,
held text is flushed, an open fence is closed, then ``Finish("stop")``.
``intervene`` -> the same, then ``Finish("content_filter")`` carrying
``last_error.intervene_text`` (the encoder renders it; weakness 8). A JSON
error envelope instead of a snapshot (numeric ``code``/``status`` other than 0,
no ``parts``; 3.6) -> :class:`UpstreamError`, 401 for expired credentials.
After any of these the stream is finished and further events are ignored.
:meth:`GlmStream.close` at upstream EOF before that reports truncation as an
:class:`UpstreamError` (weaknesses 12, 13) after flushing held text.

*Errors.* Data that is not JSON, or JSON that is not an object, raises
:class:`RemoteProtocolError`; every other input gives deltas. Nothing else is
ever raised.

Known limits, both only without ``logic_id`` (positions are then all we have):
a part that replaces a finished part at the same position and is itself first
seen already finished, with the same item types, cannot be told from a
repetition of the old part (layout (b)); it is treated as the old part (its
text counts as a rewrite), which can lose it but never repeats text. And a
stream in layout (a) whose *final* event suddenly carries every part of the
answer would have its earlier parts taken for new ones at new positions and
repeated; the reference ignores the parts of the final event altogether, we
diff them because with ``logic_id`` that is safe and loses nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from protocol.deltas import (
    Citation,
    Delta,
    Finish,
    ImageResult,
    ReasoningDelta,
    TextDelta,
    UpstreamError,
)
from protocol.errors import RemoteProtocolError
from protocol.markers import MarkerStripper

#: The reference's stream rendering of one search hit (PROTOCOLS.md 3.11 step 5),
#: for renderers that want to show citations the way it did.
CITATION_LINE: Final = "检索 {title}({url}) ...\n"

#: A citation marker inside ChatGLM answer text (PROTOCOLS.md 3.9).
MARKER: Final = re.compile(r"【\d+†(?:source|来源|源)】")
#: Fully matches every proper prefix of a marker, so the stripper holds it back.
_PARTIAL_MARKER: Final = re.compile(
    r"【(?:\d+(?:†(?:s(?:o(?:u(?:r(?:c(?:e)?)?)?)?)?|来源?|源)?)?)?"
)
_MARKER_OPENER: Final = "【"

#: How many characters before the growth point are compared to tell growth from a rewrite.
TAIL_CHARS: Final = 32

#: Code-interpreter fences (PROTOCOLS.md 3.11 steps 7-8).
CODE_FENCE_OPEN: Final = "```python\n"
CODE_FENCE_CLOSE: Final = "\n```\n"
#: Between the texts of two different items (see "Separators" above).
SEPARATOR: Final = "\n"

# PROTOCOLS.md 3.9: top-level and part/item status values.
_FINISH: Final = "finish"
_INTERVENE: Final = "intervene"

_TRUNCATED_CODE: Final = "truncated"
_TRUNCATED_MESSAGE: Final = "upstream stream ended before the answer was complete"
# PROTOCOLS.md 3.6: 40102 (in a number or in the message) means the refresh token expired.
_EXPIRED_MARK: Final = "40102"

_REASONING_TYPES: Final = {"think": "think", "text_thinking": "text"}  # item type -> field
_IMAGE_SCHEMES: Final = ("http://", "https://")


@dataclass(frozen=True, slots=True)
class GlmModes:
    """How the requested model name asks the answer to be rendered (PROTOCOLS.md 3.10).

    Attributes:
        think: the model is a think/zero model. Reasoning is emitted whatever
            this says (deep-research models reason too); it is kept for the
            renderer, which may treat think models differently.
        silent: a "silent" model: search hits and reasoning are suppressed.
    """

    think: bool = False
    silent: bool = False


@dataclass(frozen=True, slots=True)
class GlmStreamStatistics:
    """Counters of one :class:`GlmStream`, for tests and metrics.

    Attributes:
        events: snapshots fed (``[DONE]`` and empty data not counted).
        compared_chars: characters compared to tell growth from rewrites.
        rewrites: cumulative values that did not extend the previous one.
    """

    events: int
    compared_chars: int
    rewrites: int


class _Cumulative:
    """The part of a cumulative text field we remember: its length and a short tail."""

    __slots__ = ("length", "tail")

    def __init__(self) -> None:
        self.length = 0
        self.tail = ""


class _Item:
    """State of one content item, keyed by (part key, item index)."""

    __slots__ = ("closed", "done", "fence_open", "field", "type")

    def __init__(self, item_type: str) -> None:
        self.type = item_type
        self.field = _Cumulative()
        #: The item or its part was seen finished.
        self.closed = False
        #: The once-per-item result (citations, images, execution output) went out.
        self.done = False
        #: A code fence this item opened is still open.
        self.fence_open = False


class _Slot:
    """What was last seen at one position of ``parts`` (parts without ``logic_id``)."""

    __slots__ = ("closed", "generation", "types")

    def __init__(self, types: tuple[str, ...], closed: bool) -> None:
        self.generation = 0
        self.types = types
        self.closed = closed


_PartKey = str | tuple[int, int]


def _is_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether one of two item-type sequences starts with the other."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _number(value: object) -> int | float | None:
    """``value`` if it is a JSON number (booleans are not), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


class _Output:
    """Collects one feed's deltas, merging adjacent text (or reasoning) pieces."""

    __slots__ = ("_deltas", "_kind", "_pieces")

    def __init__(self) -> None:
        self._deltas: list[Delta] = []
        self._kind: type[TextDelta] | type[ReasoningDelta] | None = None
        self._pieces: list[str] = []

    def text(self, piece: str) -> None:
        self._add(TextDelta, piece)

    def reasoning(self, piece: str) -> None:
        self._add(ReasoningDelta, piece)

    def other(self, delta: Delta) -> None:
        self._settle()
        self._deltas.append(delta)

    def result(self) -> list[Delta]:
        self._settle()
        return self._deltas

    def _add(self, kind: type[TextDelta] | type[ReasoningDelta], piece: str) -> None:
        if self._kind is not kind:
            self._settle()
            self._kind = kind
        self._pieces.append(piece)

    def _settle(self) -> None:
        if self._kind is not None:
            self._deltas.append(self._kind("".join(self._pieces)))
            self._kind = None
            self._pieces = []


class GlmStream:
    """One per upstream response: SSE event data in, deltas out.

    Attributes:
        conversation_id: the first non-empty ``conversation_id`` seen ("" before).
        finished: a ``finish``/``intervene`` snapshot or an error envelope arrived,
            or :meth:`close` was called; later events are ignored.
    """

    def __init__(self, modes: GlmModes = GlmModes()) -> None:
        """
        Args:
            modes: rendering modes derived from the requested model name.
        """
        self.modes = modes
        self.conversation_id = ""
        self.finished = False
        self._stripper = MarkerStripper(MARKER, _PARTIAL_MARKER, _MARKER_OPENER)
        self._items: dict[tuple[_PartKey, int], _Item] = {}
        self._slots: dict[int, _Slot] = {}
        self._cur: _Item | None = None  # the item whose text the stripper holds / fence is open
        self._last_text: _Item | None = None  # the item that emitted answer text last
        self._last_reasoning: _Item | None = None  # the item that emitted reasoning last
        self._last_exec = ""
        self._citation_urls: set[str] = set()
        self._image_urls: set[str] = set()
        self._out = _Output()
        self._events = 0
        self._compared = 0
        self._rewrites = 0

    # ------------------------------------------------------------------ public

    def feed(self, data: str) -> list[Delta]:
        """Take one SSE event's data (one JSON snapshot); return the deltas it completed.

        Args:
            data: the event's data field. ``[DONE]`` and empty data give nothing.

        Returns:
            The new deltas, adjacent text (and reasoning) pieces merged. After a
            :class:`Finish` or :class:`UpstreamError` the stream is finished
            and every later call returns ``[]``.

        Raises:
            RemoteProtocolError: ``data`` is not JSON or not a JSON object. The
                stream is left as it was, so a caller may go on or give up.
        """
        if self.finished or not data or data == "[DONE]" or data.isspace():
            return []
        try:
            snapshot = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RemoteProtocolError("ChatGLM stream event is not JSON") from exc
        if not isinstance(snapshot, dict):
            raise RemoteProtocolError("ChatGLM stream event is not a JSON object")
        self._events += 1
        self._out = out = _Output()

        conversation_id = snapshot.get("conversation_id")
        if not self.conversation_id and isinstance(conversation_id, str):
            self.conversation_id = conversation_id

        parts = snapshot.get("parts")
        if parts is None:
            error = self._error_envelope(snapshot)
            if error is not None:
                self.finished = True
                out.other(error)
                return out.result()
        if isinstance(parts, list):
            for position, part in enumerate(parts):
                if isinstance(part, dict):
                    self._part(position, part)

        status = snapshot.get("status")
        if status in (_FINISH, _INTERVENE):
            self._leave_current()
            self.finished = True
            if status == _FINISH:
                out.other(Finish("stop"))
            else:
                last_error = snapshot.get("last_error")
                text = last_error.get("intervene_text") if isinstance(last_error, dict) else None
                out.other(Finish("content_filter", text=text if isinstance(text, str) else ""))
        return out.result()

    def close(self) -> list[Delta]:
        """The upstream stream ended (EOF).

        Returns:
            ``[]`` if the answer was already finished; otherwise any held-back
            text followed by ``UpstreamError("truncated", ...)``. The stream is
            finished afterwards.
        """
        if self.finished:
            return []
        self.finished = True
        self._out = out = _Output()
        held = self._stripper.flush()  # the stripper only holds text while _cur is set
        if held and self._cur is not None:
            self._put(self._cur, held)
        out.other(UpstreamError(_TRUNCATED_CODE, _TRUNCATED_MESSAGE, 502))
        return out.result()

    def statistics(self) -> GlmStreamStatistics:
        """A snapshot of this stream's counters."""
        return GlmStreamStatistics(self._events, self._compared, self._rewrites)

    # --------------------------------------------------------------- snapshots

    @staticmethod
    def _error_envelope(snapshot: dict[str, Any]) -> UpstreamError | None:
        """The 3.6 error envelope in place of a snapshot, or None if this is not one."""
        code = _number(snapshot.get("code"))
        if not code:
            code = _number(snapshot.get("status"))
        if not code:
            return None
        if isinstance(code, float) and code.is_integer():
            code = int(code)
        message = snapshot.get("message")
        if not isinstance(message, str):
            message = ""
        expired = code in (401, 40102) or _EXPIRED_MARK in message
        return UpstreamError(str(code), message or f"ChatGLM error {code}", 401 if expired else 502)

    def _part_key(self, position: int, part: dict[str, Any], done: bool) -> _PartKey:
        """The part's logic_id, else its position and that position's generation."""
        logic_id = part.get("logic_id")
        if isinstance(logic_id, str) and logic_id:
            return logic_id
        content = part.get("content")
        types = (
            tuple(
                t if isinstance(item, dict) and isinstance(t := item.get("type"), str) else ""
                for item in content
            )
            if isinstance(content, list)
            else ()
        )
        slot = self._slots.get(position)
        if slot is None:
            self._slots[position] = slot = _Slot(types, done)
        else:
            if (slot.closed and not done) or not _is_prefix(slot.types, types):
                slot.generation += 1  # a new part took this position
            slot.types = types
            slot.closed = done
        return (position, slot.generation)

    def _part(self, position: int, part: dict[str, Any]) -> None:
        """Diff one part of a snapshot against the records of its items."""
        part_done = part.get("status") == _FINISH
        key = self._part_key(position, part, part_done)
        content = part.get("content")
        if not isinstance(content, list):
            return
        for index, item in enumerate(content):
            if not isinstance(item, dict):
                continue
            item_type = item.get("type")
            if not isinstance(item_type, str):
                continue
            done = part_done or item.get("status") == _FINISH
            record = self._items.get((key, index))
            if record is None or record.type != item_type or (record.closed and not done):
                self._items[(key, index)] = record = _Item(item_type)
            self._item(record, item, part, part_done)
            if done and not record.closed:
                record.closed = True
                if record is self._cur:
                    self._leave_current()  # flush held marker text, close a code fence

    def _item(
        self, record: _Item, item: dict[str, Any], part: dict[str, Any], part_done: bool
    ) -> None:
        """Emit what one item adds (PROTOCOLS.md 3.9 item table)."""
        item_type = record.type
        if item_type == "text":
            suffix = self._grow(record, item.get("text"))
            if suffix:
                self._text(record, suffix, strip=True)
        elif item_type in _REASONING_TYPES:
            suffix = self._grow(record, item.get(_REASONING_TYPES[item_type]))
            if suffix and not self.modes.silent:
                self._reason(record, suffix)
        elif item_type == "code":
            suffix = self._grow(record, item.get("code"))
            if suffix:
                if not record.fence_open:
                    self._text(record, CODE_FENCE_OPEN, strip=False)
                    record.fence_open = True
                self._text(record, suffix, strip=False)
        elif not part_done or record.done:
            return  # the kinds below mean something once, when their part finished
        elif item_type == "quote_result":
            record.done = True
            if not self.modes.silent:
                self._citations(part, item)
        elif item_type == "image":
            record.done = True
            self._images(item)
        elif item_type == "execution_output":
            content = item.get("content")
            if isinstance(content, str):
                record.done = True
                if content and content != self._last_exec:
                    self._last_exec = content
                    self._text(record, content + "\n", strip=False)

    def _citations(self, part: dict[str, Any], item: dict[str, Any]) -> None:
        """One Citation per new hit URL in the part's (or item's) ``meta_data.metadata_list``."""
        for holder in (part, item):
            meta = holder.get("meta_data")
            hits = meta.get("metadata_list") if isinstance(meta, dict) else None
            if not isinstance(hits, list):
                continue
            for hit in hits:
                if not isinstance(hit, dict):
                    continue
                title, url = hit.get("title"), hit.get("url")
                if (
                    isinstance(title, str)
                    and isinstance(url, str)
                    and url
                    and url not in self._citation_urls
                ):
                    self._citation_urls.add(url)
                    self._out.other(Citation(title, url))

    def _images(self, item: dict[str, Any]) -> None:
        """One ImageResult per new http(s) ``image[].image_url``."""
        images = item.get("image")
        if not isinstance(images, list):
            return
        for image in images:
            url = image.get("image_url") if isinstance(image, dict) else None
            if (
                isinstance(url, str)
                and url.startswith(_IMAGE_SCHEMES)
                and url not in self._image_urls
            ):
                self._image_urls.add(url)
                self._out.other(ImageResult(url))

    # ----------------------------------------------------------------- diffing

    def _grow(self, record: _Item, value: object) -> str:
        """The new suffix of a cumulative field, or "" (no growth, or a rewrite).

        Compares at most :data:`TAIL_CHARS` characters, at the old end of the value.
        """
        if not isinstance(value, str):
            return ""
        field = record.field
        length, tail = field.length, field.tail
        new_length = len(value)
        if new_length >= length:
            self._compared += len(tail)
            if value.startswith(tail, length - len(tail)):
                if new_length == length:
                    return ""
                field.length = new_length
                field.tail = value[max(0, new_length - TAIL_CHARS) :]
                return value[length:]
        # Shorter, or different where the old value ended: the upstream rewrote
        # it. Emit nothing and continue from the new value (3.11).
        self._rewrites += 1
        field.length = new_length
        field.tail = value[max(0, new_length - TAIL_CHARS) :]
        return ""

    # ---------------------------------------------------------------- emitting

    def _text(self, record: _Item, piece: str, *, strip: bool) -> None:
        """Emit answer text of ``record``; ``strip`` removes citation markers."""
        if record is not self._cur:
            self._leave_current()
            self._cur = record
        self._put(record, self._stripper.feed(piece) if strip else piece)

    def _leave_current(self) -> None:
        """The current text item stops writing: flush its held text, close its fence."""
        current = self._cur
        if current is None:
            return
        self._cur = None
        held = self._stripper.flush()
        if held:
            self._put(current, held)
        if current.fence_open:
            current.fence_open = False
            self._put(current, CODE_FENCE_CLOSE)

    def _put(self, record: _Item, text: str) -> None:
        """Append text to the answer, after a separator if another item wrote before."""
        if not text:
            return
        if self._last_text is not record:
            if self._last_text is not None:
                self._out.text(SEPARATOR)
            self._last_text = record
        self._out.text(text)

    def _reason(self, record: _Item, text: str) -> None:
        """Append reasoning text, after a separator if another item reasoned before."""
        if self._last_reasoning is not record:
            if self._last_reasoning is not None:
                self._out.reasoning(SEPARATOR)
            self._last_reasoning = record
        self._out.reasoning(text)
