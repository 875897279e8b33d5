"""The snapshot script of the ChatGLM emulator: what one answer looks like on the wire.

chatglm.cn streams an answer as SSE events whose data are *snapshots* of the
assistant message, not deltas (PROTOCOLS.md 3.9). This module builds those
snapshots, as JSON bytes, from a :class:`ScriptSpec`; the server in
``emulator.py`` frames them as SSE and decides when and how to write them.
It does no I/O, so every snapshot can be checked with plain functions.

Theory of operation. An answer is a sequence of parts, produced one after
the other, each with a ``logic_id`` (a UUID string) that stays the same
while the part grows:

1. ``think``: reasoning, cumulative in the item's ``think`` field.
2. ``quote_result``: a search part, first ``init`` with nothing in it, then
   ``finish`` with ``meta_data.metadata_list`` holding the hits.
3. ``text``: the answer, cumulative in ``text``, growing by ``chunk_chars``
   characters per event (so citation markers and multi-byte characters are
   cut wherever the arithmetic falls, as they are upstream).
4. ``code``: code-interpreter source, cumulative while the part is ``init``.
5. ``execution_output``: the code's output in ``content``, at part finish.
6. ``image``: ``image: [{"image_url": ...}]``, filled at part finish.

Every part is sent while it grows with part and item status ``init``, then
once with status ``finish`` and its final value. The last event has
top-level status ``finish``, or ``intervene`` with
``last_error.intervene_text`` (the content filter's explanation).

Two layouts (3.9), because the site's is not pinned down:
- ``active``: an event carries only the part being produced. A finished part
  is sent once with status ``finish`` and never again, and the final event
  carries no parts. This is the layout the reference's arithmetic assumes.
- ``cumulative``: every event repeats all finished parts (in their final
  form) before the active one, and the final event carries all parts.

Cost: the upstream itself is quadratic in bytes (an n-character answer sent
``chunk_chars`` at a time repeats every prefix), so is this. Everything else
is built once: finished parts are serialized once and their bytes reused, and
the event envelope is spliced from constant byte strings around one
``orjson.dumps`` of the growing part.

Stamp mode (benchmarks): the text part grows by ``[ts:<monotonic ns>]`` per
event instead of by slices of the answer. The events come from a generator,
so the stamp is read when the server asks for the next event, right before
it writes it.

Pacing: :meth:`SnapshotScript.paced` yields :data:`PAUSE` before every event
that starts or grows a part (the ones a slow upstream spaces out), and none
before a part's ``finish`` event or the final event. A server that sleeps on
each :data:`PAUSE` thus ends the answer right after its last frame, and
since the generator only builds an event when asked for it, a stamp read
after the pause is the time of the write.
"""

from __future__ import annotations

import enum
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

Layout = Literal["active", "cumulative"]


class Pace(enum.Enum):
    """The marker of :meth:`SnapshotScript.paced`."""

    PAUSE = "pause"


#: Yielded by :meth:`SnapshotScript.paced` before each event a server may delay.
PAUSE = Pace.PAUSE

#: PROTOCOLS.md 3.9: an inline citation marker, N counting from 1.
CITATION_MARKER = "【{n}†source】"

#: Sentence ends that always end a sentence (full-width, as Chinese text uses).
_HARD_ENDS = frozenset("。！？")
#: ASCII sentence ends: only followed by whitespace or the end of the text
#: ("3.5" and "example.com" are not sentence ends).
_SOFT_ENDS = frozenset(".!?")
_ENDS = _HARD_ENDS | _SOFT_ENDS

#: A role tag line of the merged prompt (PROTOCOLS.md 3.10), e.g. ``<|assistant|>``.
_ROLE_TAG = re.compile(r"<\|\w+\|>")


@dataclass(frozen=True, slots=True)
class ScriptSpec:
    """Everything one scripted answer consists of.

    Attributes:
        conversation_id: the conversation every event names.
        answer: the final answer text, citation markers included.
        chunk_chars: characters the text, think and code items grow per event.
        think: reasoning streamed first, or None for no think part.
        search_results: ``(title, url)`` hits for a quote_result part.
        code: code-interpreter source, or None for no code parts.
        execution_output: output of ``code`` (only sent when ``code`` is set).
        images: absolute image URLs for an image part.
        intervene_text: end with status ``intervene`` and this explanation.
        layout: ``active`` or ``cumulative`` (see the module comment).
        stamp_frames: stamp mode with this many text events, or None.
    """

    conversation_id: str
    answer: str
    chunk_chars: int = 4
    think: str | None = None
    search_results: tuple[tuple[str, str], ...] = ()
    code: str | None = None
    execution_output: str = ""
    images: tuple[str, ...] = ()
    intervene_text: str | None = None
    layout: Layout = "active"
    stamp_frames: int | None = None


def cite(answer: str, hits: int) -> str:
    """Put citation markers into ``answer``, one per sentence.

    The marker goes before the sentence's closing punctuation, as in the
    site's example ``智谱是一家AI公司【1†source】。`` (3.9); the numbers cycle
    through ``1..hits``. Text without a sentence end gets one marker at its
    end.

    Args:
        answer: the plain answer.
        hits: the number of search results; 0 leaves the answer unchanged.

    Returns:
        The answer with markers.
    """
    if hits <= 0 or not answer:
        return answer
    out: list[str] = []
    start = 0  # where the text not yet copied to ``out`` begins
    n = 0  # markers placed so far
    words = False  # the current sentence has more than punctuation and spaces
    for i, char in enumerate(answer):
        if char in _ENDS and words and _ends_sentence(answer, i):
            out.append(answer[start:i])
            out.append(CITATION_MARKER.format(n=n % hits + 1))
            n += 1
            start = i
            words = False
        elif not (char.isspace() or char in _ENDS):
            words = True
    if n == 0:
        return answer + CITATION_MARKER.format(n=1)
    out.append(answer[start:])
    return "".join(out)


def _ends_sentence(text: str, i: int) -> bool:
    """Whether the run of sentence-end characters starting at ``i`` ends a sentence."""
    j = i
    while j < len(text) and text[j] in _ENDS:
        j += 1
    run = text[i:j]
    return any(c in _HARD_ENDS for c in run) or j == len(text) or text[j].isspace()


def grow(text: str, step: int) -> Iterator[str]:
    """The prefixes of ``text`` a cumulative field shows, ``step`` characters apart.

    The last one is ``text`` itself; an empty text gives one empty prefix.
    """
    step = max(1, step)
    for end in range(step, len(text), step):
        yield text[:end]
    yield text


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt of a 3.7 stream body: the last message's text items, joined by newlines.

    Malformed bodies give "".
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return ""
    content = messages[-1].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            item["text"]
            for item in content
            if isinstance(item, dict)
            and item.get("type") == "text"
            and isinstance(item.get("text"), str)
        )
    return ""


def prompt_last_line(body: dict[str, Any]) -> str:
    """The last meaningful line of the user's prompt in a 3.7 stream body.

    Role tag lines of a merged prompt (``<|assistant|>``) are skipped, so the
    result is what the user actually wrote last. Malformed bodies give "".
    """
    text = prompt_text(body)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not _ROLE_TAG.fullmatch(line):
            return line
    return ""


def demo_answer(line: str) -> str:
    """The emulator's default answer: two sentences quoting the prompt's last line."""
    quoted = line or "……"
    return (
        f"你好！这是 ChatGLM 模拟器的回答，你说的是：「{quoted}」。"
        "This answer comes from the local emulator, not from chatglm.cn."
    )


def default_think(line: str) -> str:
    """Reasoning text for ``chat_mode`` zero/deep_research when none was scripted."""
    return f"用户说的是「{line or '……'}」。先理解问题，再给出简短的回答。"


def drawing_answer(line: str) -> str:
    """The text the drawing assistant sends along with its image."""
    return f"好的，已经按照「{line or '……'}」画好了。"


def new_logic_id() -> str:
    """A fresh part ``logic_id``: a UUID string, as the site's look."""
    return str(uuid.uuid4())


def _part(
    logic_id: str, status: str, item: dict[str, Any], meta: dict[str, Any] | None = None
) -> bytes:
    """One serialized part holding a single content item."""
    return orjson.dumps(
        {
            "logic_id": logic_id,
            "role": "assistant",
            "status": status,
            "meta_data": meta if meta is not None else {},
            "content": [item],
        }
    )


class _Envelope:
    """Splices parts into event JSON; remembers finished parts for the cumulative layout."""

    __slots__ = ("_cumulative", "_done", "_head")

    def __init__(self, conversation_id: str, layout: Layout) -> None:
        self._head = b'{"conversation_id":' + orjson.dumps(conversation_id) + b',"status":'
        self._cumulative = layout == "cumulative"
        self._done = b""  # finished parts, comma-joined (cumulative layout only)

    def progress(self, part: bytes) -> bytes:
        """An in-progress event (status ``init``) showing ``part`` as active."""
        parts = self._done + b"," + part if self._done else part
        return self._head + b'"init","last_error":{},"parts":[' + parts + b"]}"

    def finished(self, part: bytes) -> bytes:
        """The event that shows ``part`` finished; in cumulative layout it stays."""
        event = self.progress(part)
        if self._cumulative:
            self._done = self._done + b"," + part if self._done else part
        return event

    def final(self, status: str, last_error: dict[str, Any]) -> bytes:
        """The last event: top-level ``finish`` or ``intervene``."""
        return (
            self._head
            + orjson.dumps(status)
            + b',"last_error":'
            + orjson.dumps(last_error)
            + b',"parts":['
            + self._done
            + b"]}"
        )


def _growing(
    env: _Envelope, logic_id: str, kind: str, field: str, text: str, step: int
) -> Iterator[bytes | Pace]:
    """A part whose one item grows cumulatively in ``field``, then finishes."""
    for prefix in grow(text, step):
        yield PAUSE
        yield env.progress(_part(logic_id, "init", {"type": kind, "status": "init", field: prefix}))
    yield env.finished(_part(logic_id, "finish", {"type": kind, "status": "finish", field: text}))


class SnapshotScript:
    """The events of one answer: :meth:`progress` events, then one :meth:`final` event.

    The final event is separate so that a server can tell it is the last
    one before building it (and, say, free the account first) without
    reading ahead, which would take stamp mode's stamps too early.
    """

    __slots__ = ("_clock_ns", "_env", "_logic_ids", "_spec")

    def __init__(
        self,
        spec: ScriptSpec,
        *,
        logic_ids: Callable[[], str] = new_logic_id,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """
        Args:
            spec: what to answer.
            logic_ids: makes each part's ``logic_id`` (tests pass a counter).
            clock_ns: the stamp clock of stamp mode.
        """
        self._spec = spec
        self._env = _Envelope(spec.conversation_id, spec.layout)
        self._logic_ids = logic_ids
        self._clock_ns = clock_ns

    def progress(self) -> Iterator[bytes]:
        """Every event before the last (top-level status ``init``), built lazily.

        Yields:
            One compact JSON object (no newlines) per event.
        """
        for event in self.paced():
            if isinstance(event, bytes):
                yield event

    def paced(self) -> Iterator[bytes | Pace]:
        """The events of :meth:`progress`, with :data:`PAUSE` before each delayable one.

        Yields:
            :data:`PAUSE` before an event that starts or grows a part; the
            events as in :meth:`progress`.
        """
        spec, env, logic_ids = self._spec, self._env, self._logic_ids
        step = spec.chunk_chars
        if spec.think is not None:
            yield from _growing(env, logic_ids(), "think", "think", spec.think, step)
        if spec.search_results:
            logic_id = logic_ids()
            yield PAUSE
            yield env.progress(_part(logic_id, "init", {"type": "quote_result", "status": "init"}))
            hits = [{"title": title, "url": url} for title, url in spec.search_results]
            item: dict[str, Any] = {"type": "quote_result", "status": "finish"}
            yield env.finished(_part(logic_id, "finish", item, {"metadata_list": hits}))
        if spec.stamp_frames is not None:
            yield from _stamped(env, logic_ids(), spec.stamp_frames, self._clock_ns)
        else:
            yield from _growing(env, logic_ids(), "text", "text", spec.answer, step)
        if spec.code is not None:
            yield from _growing(env, logic_ids(), "code", "code", spec.code, step)
            logic_id = logic_ids()
            item = {"type": "execution_output", "status": "init", "content": ""}
            yield PAUSE
            yield env.progress(_part(logic_id, "init", item))
            item = {
                "type": "execution_output",
                "status": "finish",
                "content": spec.execution_output,
            }
            yield env.finished(_part(logic_id, "finish", item))
        if spec.images:
            logic_id = logic_ids()
            item = {"type": "image", "status": "init", "image": []}
            yield PAUSE
            yield env.progress(_part(logic_id, "init", item))
            item = {
                "type": "image",
                "status": "finish",
                "image": [{"image_url": u} for u in spec.images],
            }
            yield env.finished(_part(logic_id, "finish", item))

    def final(self) -> bytes:
        """The last event: top-level ``finish``, or ``intervene`` with its explanation.

        In the cumulative layout it carries every part, so call it after
        :meth:`progress` is exhausted.
        """
        if self._spec.intervene_text is not None:
            return self._env.final("intervene", {"intervene_text": self._spec.intervene_text})
        return self._env.final("finish", {})


def snapshot_events(
    spec: ScriptSpec,
    *,
    logic_ids: Callable[[], str] = new_logic_id,
    clock_ns: Callable[[], int] = time.monotonic_ns,
) -> Iterator[bytes]:
    """Every event of one answer in order, the final one included (see :class:`SnapshotScript`)."""
    script = SnapshotScript(spec, logic_ids=logic_ids, clock_ns=clock_ns)
    yield from script.progress()
    yield script.final()


def _stamped(
    env: _Envelope, logic_id: str, frames: int, clock_ns: Callable[[], int]
) -> Iterator[bytes | Pace]:
    """Stamp mode's text part: each event appends the time it was built."""
    text = ""
    for _ in range(frames):
        yield PAUSE
        text += f"[ts:{clock_ns()}]"
        yield env.progress(
            _part(logic_id, "init", {"type": "text", "status": "init", "text": text})
        )
    yield env.finished(
        _part(logic_id, "finish", {"type": "text", "status": "finish", "text": text})
    )


def last_parts(events: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last value of every part, by ``logic_id``, in order of first appearance.

    What a client that follows the recommended algorithm of 3.11 keeps; tests
    and the demo use it to read an answer back from parsed events.
    """
    parts: dict[str, dict[str, Any]] = {}
    for event in events:
        for part in event.get("parts", []):
            parts[part["logic_id"]] = part
    return parts
