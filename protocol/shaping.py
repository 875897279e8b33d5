"""Answer shaping: stop sequences, max_tokens, tool calls and JSON output over web chats.

The web chats behind the relay have none of the knobs an agent relies on:
no ``stop``, no ``max_tokens``, no tools, no JSON mode. The relay emulates
them on the answer text as it streams by (issue 14): the model is told in
the prompt how to call tools and to answer with JSON (:mod:`protocol.toolcalls`
renders that), and this module cuts, parses and trims what comes back.
Everything here is sans-IO: text or neutral events (:mod:`protocol.deltas`)
in, text or events out, no clock and no socket.

Theory of operation
-------------------
One :class:`AnswerShaper` per answer wraps the provider's event stream. Each
upstream batch goes through one :meth:`AnswerShaper.feed` call, whose result
the dialect encoder writes in one go, as with an unshaped stream. Answer text
(:class:`~protocol.deltas.TextDelta`) runs through four stages, in this
order, each one optional:

1. :class:`StopMatcher` on the raw text: the client's stop sequences. It
   must see the text before anything is removed from it, as the model wrote it.
2. :class:`TokenBudget`: ``max_tokens``, counted with the ``usage``
   estimator (:func:`protocol.chunks.estimate_tokens`) on the text that
   survived the stop matcher: what the model "generated" for the client.
3. :class:`protocol.toolcalls.ToolCallParser`: ``<tool_call>`` blocks
   become :class:`~protocol.deltas.ToolCallDelta` events, the rest stays text.
4. :class:`JsonExtractor`: with ``response_format``, the text is trimmed to
   the one JSON document (a Markdown code fence and prose around it go).

Each stage holds back only what it cannot decide yet (a possible start of
a stop sequence, of a ``<tool_call>`` block), so text reaches the client
as soon as it is known to be final, and every stage gives the same output
however the upstream split its text: the property each stage's tests check,
and hence the shaper's.

Other events (reasoning, citations, images, videos) are not answer text:
they pass straight through, in order, and nothing held is flushed for them
(so held text may come out after a later citation; the encoders render
each kind on its own). Reasoning does not count against ``max_tokens``.

The end of the answer, in order of precedence:

- the budget runs out (the text is cut, or it is full so that not one more
  character would fit): the text up to the limit, then ``Finish("length")``;
- a stop sequence matches: the text before it, then ``Finish("stop",
  stop_sequence=...)``;
- the upstream's own ``Finish``: every stage flushes what it held, then
  ``Finish("tool_calls")`` if a tool call went out, else the upstream's
  finish (its reason and text);
- an ``UpstreamError`` passes through as it is: the answer failed, so held
  text is dropped rather than flushed.

The budget wins over a stop sequence so that the outcome does not depend
on splits: text that exactly fills the budget ends the answer with
``"length"`` as soon as it is seen, whether or not the stop sequence after
it arrived in the same read. On a shaper's own finish the later stages are
closed (a half-written tool block degrades to text, as at the upstream's
end), and :attr:`AnswerShaper.done` tells the chat service to stop reading
the upstream: everything after the end is ignored.

Structured output is checked, not only trimmed: :func:`json_output_error`
says why a whole answer is not the JSON the client asked for (the chat
service answers a non-streamed one with a 502 ``invalid_json_output``).
A streamed answer cannot be taken back, so it is only trimmed.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, assert_never

import orjson

# The estimator's own two halves, so the running count is exactly
# estimate_tokens(all text so far) without keeping the text.
from protocol.chunks import char_counts, counts_to_tokens
from protocol.deltas import (
    Citation,
    Finish,
    ImageResult,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    VideoResult,
)
from protocol.toolcalls import ToolCallParser, default_call_id

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from protocol.deltas import Delta
    from protocol.openai import ChatRequest, ResponseFormat

__all__ = [
    "AnswerShaper",
    "JsonExtractor",
    "StopMatcher",
    "TokenBudget",
    "json_output_error",
]

#: The longest message :func:`json_output_error` returns, in characters.
MAX_MESSAGE_CHARS = 500


# ---------------------------------------------------------------------------
# stop sequences


class StopMatcher:
    """Find the first of the client's stop sequences in a text that arrives in pieces.

    The match is the one a search of the whole text would find: the
    occurrence that starts earliest, and of those starting at the same place
    the longest (stops ``"ab"`` and ``"abc"`` over ``"xabc"`` match
    ``"abc"``). Empty stop sequences are ignored.

    Theory of operation: :meth:`feed` joins the held tail with the new text
    (the *buffer*) and finds two positions in it. ``found`` is the start of
    the best complete occurrence of a stop (``str.find`` per stop).
    ``pending`` is the earliest position from which the rest of the buffer
    is a proper prefix of some stop: a match may still start there once
    more text comes. A complete occurrence is final only if it starts
    before ``pending``; otherwise a match starting earlier, or a longer one
    starting at the same place, may still appear. So the buffer up to the
    earlier of the two goes out, and the tail from ``pending`` is held.
    Text before ``pending`` can never be part of a match: no occurrence
    starts there, and none can grow from there. The held tail is shorter
    than the longest stop, so each call costs the new text plus that bound.

    At the end of the text (:meth:`flush`) the pending starts are dead, and
    a complete occurrence behind one of them is the match after all (stops
    ``"abc"`` and ``"b"`` over ``"ab"`` match ``"b"``).
    """

    __slots__ = ("_ends", "_held", "_matched", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        """
        Args:
            stops: the stop sequences (the request's ``stop``); ``""`` is ignored.
        """
        self._stops = tuple(dict.fromkeys(stop for stop in stops if stop))
        # Per stop: for each character, the lengths (longest first) of the
        # stop's proper prefixes that end with it. A tail of the text can be
        # such a prefix only if it ends with the text's last character.
        self._ends: list[tuple[str, dict[str, list[int]]]] = []
        for stop in self._stops:
            ends: dict[str, list[int]] = {}
            for size in range(len(stop) - 1, 0, -1):
                ends.setdefault(stop[size - 1], []).append(size)
            self._ends.append((stop, ends))
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop sequence that matched, ``None`` while none has."""
        return self._matched

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add ``text``.

        Args:
            text: the next piece of the answer.

        Returns:
            The text that can be emitted now (before any stop sequence),
            and the stop sequence that matched in this call, or ``None``.
            A match is reported once; after it every call returns
            ``("", None)`` (:attr:`matched` keeps it).
        """
        if self._matched is not None:
            return "", None
        if not self._stops:
            return text, None
        buf = self._held + text
        found, stop = self._best_occurrence(buf)
        pending = self._pending_start(buf)
        if stop is not None and found < pending:
            self._held = ""
            self._matched = stop
            return buf[:found], stop
        self._held = buf[pending:]
        return buf[:pending], None

    def flush(self) -> tuple[str, str | None]:
        """End of the text: return what was held back, cut at a stop sequence if one is in it.

        Returns:
            As :meth:`feed`: the text to emit and the stop sequence that
            matched in it (or ``None``). The matcher holds nothing afterwards.
        """
        buf, self._held = self._held, ""
        if self._matched is not None or not buf:
            return "", None
        found, stop = self._best_occurrence(buf)
        if stop is None:
            return buf, None
        self._matched = stop
        return buf[:found], stop

    def _best_occurrence(self, buf: str) -> tuple[int, str | None]:
        """The start and the stop of the earliest (then longest) occurrence in ``buf``."""
        best, best_stop = len(buf), None
        for stop in self._stops:
            at = buf.find(stop, 0, best + len(stop))  # none can beat an earlier start
            if at < 0:
                continue
            if at < best or (best_stop is not None and len(stop) > len(best_stop)):
                best, best_stop = at, stop
        return best, best_stop

    def _pending_start(self, buf: str) -> int:
        """The earliest position whose rest of ``buf`` is a proper prefix of a stop."""
        pending = len(buf)
        if not buf:
            return pending
        last = buf[-1]
        for stop, ends in self._ends:
            # the longest tail of buf that is a proper prefix of stop; every
            # shorter candidate starts later, so the first hit is the earliest
            for size in ends.get(last, ()):
                if len(buf) - size >= pending:
                    break
                if size <= len(buf) and stop.startswith(buf[len(buf) - size :]):
                    pending = len(buf) - size
                    break
        return pending


# ---------------------------------------------------------------------------
# max_tokens


class TokenBudget:
    """Cut the answer text at ``max_tokens``, counted as ``usage`` counts them.

    The count of the text emitted so far is exactly
    :func:`protocol.chunks.estimate_tokens` of all of it: ASCII characters
    are four to a token, rounded up over the whole text, and every other
    character is one token. The budget keeps the two character counts, not
    the text, so each call costs only its own text.

    That estimate never decreases as a character is added (an ASCII one
    adds 0 or 1, any other adds 1), so "the longest prefix within the
    budget" is well defined: :meth:`take` walks the text only when it does
    not fit whole, and cuts before the first character that would overflow;
    every longer prefix would overflow too. The budget is *exhausted* once
    text was cut, or once it is full so that not one more character can fit
    (the count equals ``max_tokens`` and no ASCII token is partly filled):
    either way the answer can have nothing more, which the shaper reports at
    once as ``finish_reason: "length"``, whatever the next read holds.
    """

    __slots__ = ("_ascii", "_exhausted", "_max", "_other")

    def __init__(self, max_tokens: int) -> None:
        """
        Args:
            max_tokens: the most tokens the emitted text may count (0: none).
        """
        self._max = max_tokens
        self._ascii = 0
        self._other = 0
        self._exhausted = max_tokens <= 0

    @property
    def tokens(self) -> int:
        """The estimate of all text taken so far."""
        return counts_to_tokens(self._ascii, self._other)

    @property
    def exhausted(self) -> bool:
        """True once no more text can be taken."""
        return self._exhausted

    def take(self, text: str) -> tuple[str, bool]:
        """Take as much of ``text`` as the budget allows.

        Args:
            text: the next piece of the answer.

        Returns:
            The part of ``text`` within the budget (all of it, a prefix, or
            ``""``), and whether the budget is now exhausted. Once it is,
            every call returns ``("", True)``.
        """
        if self._exhausted:
            return "", True
        ascii_chars, other_chars = char_counts(text)
        ascii_total, other_total = self._ascii + ascii_chars, self._other + other_chars
        if counts_to_tokens(ascii_total, other_total) <= self._max:
            self._ascii, self._other = ascii_total, other_total
        else:
            text = self._cut(text)  # updates the counts; happens once per answer
            self._exhausted = True
        if counts_to_tokens(self._ascii, self._other) >= self._max and self._ascii % 4 == 0:
            self._exhausted = True  # full: even one ASCII character would overflow
        return text, self._exhausted

    def _cut(self, text: str) -> str:
        """The longest prefix of ``text`` that fits, its characters counted in."""
        ascii_total, other_total = self._ascii, self._other
        for end, char in enumerate(text):
            if char.isascii():
                if counts_to_tokens(ascii_total + 1, other_total) > self._max:
                    text = text[:end]
                    break
                ascii_total += 1
            else:
                if counts_to_tokens(ascii_total, other_total + 1) > self._max:
                    text = text[:end]
                    break
                other_total += 1
        self._ascii, self._other = ascii_total, other_total
        return text


# ---------------------------------------------------------------------------
# JSON output


class _JsonState(enum.Enum):
    BEFORE = "before"  # no bracket yet: prose or a code fence, held raw for close()
    INSIDE = "inside"  # in the document: every character goes out
    AFTER = "after"  # the document's last bracket went out: the rest is dropped


#: Outside strings, the characters that matter to the document's extent.
_STRUCTURE = re.compile(r'[\[\]{}"]')
#: Inside a string, the characters that can end it or escape its end.
_IN_STRING = re.compile(r'["\\]')


class JsonExtractor:
    """Trim an answer to the JSON document in it, as the answer arrives.

    Models asked for JSON often wrap it: ``Here it is:`` then a Markdown
    code fence (```` ```json ```` ... ```` ``` ````), or a closing remark.
    The document is taken to begin at the first ``{`` or ``[`` of the
    answer and to end at the bracket that closes that one; everything
    before and after goes, a fence included.

    Theory of operation: a three-state scanner (:class:`_JsonState`).
    Before the first bracket nothing goes out, but the text is kept, so
    that an answer with no bracket at all comes back whole from
    :meth:`close` for the caller's validation to quote. Inside the
    document every character goes out at once, and the scanner tracks the
    bracket depth outside strings, and inside a string whether the next
    character is escaped (a backslash may end one piece and its escaped
    quote begin the next). It jumps between the characters that matter
    with a regular expression, so it never loops per character in Python.
    When the depth returns to 0 the document is complete and the rest of
    the answer is dropped. Brackets are counted, not paired: a ``]`` that
    closes a ``{`` is invalid JSON that the validation will report anyway.
    """

    __slots__ = ("_depth", "_escaped", "_in_string", "_prose", "_state")

    def __init__(self) -> None:
        self._state = _JsonState.BEFORE
        self._prose: list[str] = []  # the text before the first bracket
        self._depth = 0
        self._in_string = False
        self._escaped = False  # in a string, the previous character was a backslash

    def feed(self, text: str) -> str:
        """Add ``text``.

        Args:
            text: the next piece of the answer.

        Returns:
            The part of ``text`` that is certainly part of the JSON
            document (``""`` before the document and after it).
        """
        match self._state:
            case _JsonState.AFTER:
                return ""
            case _JsonState.BEFORE:
                starts = [at for at in (text.find("{"), text.find("[")) if at >= 0]
                if not starts:
                    self._prose.append(text)
                    return ""
                start = min(starts)
                self._prose.clear()
                self._state = _JsonState.INSIDE
                self._depth = 1
                return text[start : self._scan(text, start + 1)]
            case _JsonState.INSIDE:
                return text[: self._scan(text, 0)]
            case _:
                assert_never(self._state)

    def close(self) -> str:
        """End of the answer.

        Returns:
            The whole answer if it held no ``{`` or ``[`` at all (it is no
            JSON document, and the caller's validation will say so with the
            text), else ``""``: the document went out already (complete or
            cut short, which the validation will report too).
        """
        prose = "".join(self._prose)
        self._prose.clear()
        self._state = _JsonState.AFTER
        return prose

    def _scan(self, text: str, pos: int) -> int:
        """Follow the document through ``text`` from ``pos``; return where it ends in ``text``."""
        while True:
            if self._in_string:
                if self._escaped:
                    if pos >= len(text):
                        return pos
                    self._escaped = False
                    pos += 1  # the escaped character, whatever it is
                found = _IN_STRING.search(text, pos)
                if found is None:
                    return len(text)
                pos = found.end()
                if found.group() == "\\":
                    self._escaped = True
                else:
                    self._in_string = False
                continue
            found = _STRUCTURE.search(text, pos)
            if found is None:
                return len(text)
            pos = found.end()
            match found.group():
                case '"':
                    self._in_string = True
                case "{" | "[":
                    self._depth += 1
                case _:  # "}" or "]"
                    self._depth -= 1
                    if self._depth == 0:
                        self._state = _JsonState.AFTER
                        return pos


def json_output_error(text: str, fmt: ResponseFormat) -> str | None:
    """Why ``text`` is not the structured output ``fmt`` asks for.

    ``json_object`` wants a JSON object. ``json_schema`` wants any JSON
    document and, when ``fmt.strict``, one that satisfies ``fmt.schema``
    under the Draft 2020-12 rules (the ``jsonschema`` library; formats are
    not asserted, and no ``$ref`` is fetched from the network). A schema
    the validator cannot use (itself invalid, an unresolvable ``$ref``, a
    pattern Python cannot compile) means the answer cannot be checked, and
    it passes: the client's schema is not the upstream's failure.

    Args:
        text: the whole answer text (after :class:`JsonExtractor`).
        fmt: the request's ``response_format``.

    Returns:
        ``None`` if the text is acceptable, else a short message for a
        human (the caller adds the raw text).
    """
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"the answer is not valid JSON ({exc})"[:MAX_MESSAGE_CHARS]
    if fmt.type == "json_object":
        if not isinstance(document, dict):
            return f"the answer is JSON but not an object (it is {_json_kind(document)})"
        return None
    if not fmt.strict or fmt.schema is None:
        return None
    # imported here: jsonschema and its dependencies cost every process ~3.6 MB of RSS,
    # and only a strict structured answer needs them
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    try:
        Draft202012Validator.check_schema(fmt.schema)
        error = best_match(Draft202012Validator(fmt.schema).iter_errors(document))
    except Exception:  # SchemaError, referencing's Unresolvable, re.error, RecursionError...
        return None  # the client's schema broke the validator: cannot check
    if error is None:
        return None
    where = "".join(f"[{part!r}]" for part in error.absolute_path) or " (the document)"
    message = f"the answer does not satisfy the JSON Schema at{where}: {error.message}"
    return message[:MAX_MESSAGE_CHARS]


def _json_kind(document: object) -> str:
    """A JSON value's kind, for a message."""
    match document:
        case list():
            return "an array"
        case str():
            return "a string"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case None:
            return "null"
        case _:
            return "a value"


# ---------------------------------------------------------------------------
# the shaper


class AnswerShaper:
    """One per answer: the provider's events in, the events the client asked for out.

    See the module's theory of operation for the stages and the end of the answer.
    """

    __slots__ = ("_budget", "_calls", "_done", "_extractor", "_parser", "_stop", "_text")

    def __init__(
        self, request: ChatRequest, *, new_id: Callable[[], str] = default_call_id
    ) -> None:
        """
        Args:
            request: the request being answered: its ``stop``, ``max_tokens``,
                ``tools`` with ``tool_choice``, and ``response_format``
                decide the stages.
            new_id: makes each tool call's id (``call_...``).
        """
        stops = [stop for stop in request.stop if stop]
        self._stop = StopMatcher(stops) if stops else None
        self._budget = TokenBudget(request.max_tokens) if request.max_tokens is not None else None
        self._parser: ToolCallParser | None = None
        choice = request.tool_choice
        if request.tools and choice.mode != "none":
            names = [choice.name] if choice.mode == "function" else [t.name for t in request.tools]
            self._parser = ToolCallParser(names, new_id)
        self._extractor = JsonExtractor() if request.response_format is not None else None
        self._calls = 0  # tool calls emitted (first deltas of a call)
        self._text: list[str] = []
        self._done = False

    @staticmethod
    def needed(request: ChatRequest) -> bool:
        """Whether ``request`` asks for any shaping (if not, the events can pass as they are)."""
        return bool(
            any(request.stop)
            or request.max_tokens is not None
            or (request.tools and request.tool_choice.mode != "none")
            or request.response_format is not None
        )

    @property
    def done(self) -> bool:
        """True once a ``Finish`` or an ``UpstreamError`` went out; later input is ignored."""
        return self._done

    @property
    def text(self) -> str:
        """The answer text emitted so far (for the JSON check of a whole answer)."""
        return "".join(self._text)

    def feed(self, batch: Sequence[Delta]) -> list[Delta]:
        """Shape one upstream batch.

        Args:
            batch: the events of one upstream read, in order.

        Returns:
            The events to send, in order (``[]`` once :attr:`done`). The
            last of them is a ``Finish`` or an ``UpstreamError`` when the
            answer ended in this batch, by the upstream's doing or by ours.
        """
        out: list[Delta] = []
        for delta in batch:
            if self._done:
                break
            match delta:
                case TextDelta(text=text):
                    self._on_text(text, out)
                case ReasoningDelta() | Citation() | ImageResult() | VideoResult():
                    out.append(delta)
                case ToolCallDelta():
                    self._calls += 1 if delta.id else 0
                    out.append(delta)
                case Finish():
                    self._on_finish(delta, out)
                case UpstreamError():
                    self._done = True
                    out.append(delta)
                case _:
                    assert_never(delta)
        return out

    def _on_text(self, text: str, out: list[Delta]) -> None:
        matched = None
        if self._stop is not None:
            text, matched = self._stop.feed(text)
        self._after_stop(text, matched, None, out)

    def _on_finish(self, finish: Finish, out: list[Delta]) -> None:
        text, matched = self._stop.flush() if self._stop is not None else ("", None)
        self._after_stop(text, matched, finish, out)

    def _after_stop(
        self, text: str, matched: str | None, upstream: Finish | None, out: list[Delta]
    ) -> None:
        """The budget and the later stages for ``text``, then the end if there is one.

        Args:
            text: what the stop matcher let through.
            matched: the stop sequence it matched, if it did.
            upstream: the upstream's ``Finish``, when this is the end of its text.
            out: where the events go.
        """
        exhausted = False
        if self._budget is not None:
            text, exhausted = self._budget.take(text)
        self._emit(text, out)
        if exhausted:
            finish = Finish("length")
        elif matched is not None:
            finish = Finish("stop", stop_sequence=matched)
        elif upstream is not None:
            finish = upstream
        else:
            return
        self._close_stages(out)
        if upstream is not None and self._calls and not (exhausted or matched is not None):
            finish = Finish("tool_calls", text=upstream.text)
        out.append(finish)
        self._done = True

    def _emit(self, text: str, out: list[Delta]) -> None:
        """Answer text through the tool-call parser and the JSON extractor."""
        if not text:
            return
        if self._parser is None:
            self._emit_answer(text, out)
            return
        self._emit_parsed(self._parser.feed(text), out)

    def _emit_parsed(self, events: Sequence[TextDelta | ToolCallDelta], out: list[Delta]) -> None:
        for event in events:
            match event:
                case TextDelta(text=text):
                    self._emit_answer(text, out)
                case ToolCallDelta():
                    self._calls += 1 if event.id else 0
                    out.append(event)
                case _:
                    assert_never(event)

    def _emit_answer(self, text: str, out: list[Delta]) -> None:
        """Text that is answer content: through the JSON extractor, then out."""
        if self._extractor is not None:
            text = self._extractor.feed(text)
        if text:
            self._text.append(text)
            out.append(TextDelta(text))

    def _close_stages(self, out: list[Delta]) -> None:
        """The end of the answer text: the parser's and the extractor's held text."""
        if self._parser is not None:
            self._emit_parsed(self._parser.close(), out)
        if self._extractor is not None:
            text = self._extractor.close()
            if text:
                self._text.append(text)
                out.append(TextDelta(text))
