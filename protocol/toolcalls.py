"""Tool calling over web chats: the prompt convention, rendered and parsed (sans-IO).

The web chats behind the relay (StepChat, ChatGLM) have no native tools, so
tool calling is emulated with a fixed prompt convention (issue 14). This
module holds both of its halves, so the renderer and the parser cannot drift
apart, and exports the convention's exact strings (:data:`CALL_OPEN`,
:data:`TOOLS_INTRO`, ...) for the emulators and the tests.

Rendering (:func:`render_agent_prompt`). The client's request becomes plain
prompt messages, which every provider already knows how to merge:

- the tools instruction: a ``system`` message, first: :data:`TOOLS_INTRO`,
  the tools as compact JSON, one per line, between :data:`TOOLS_OPEN` and
  :data:`TOOLS_CLOSE`, :data:`TOOLS_USAGE`, then one line saying what
  ``tool_choice`` asks (:data:`CHOICE_AUTO`, :data:`CHOICE_REQUIRED`,
  :data:`CHOICE_FUNCTION`). ``tool_choice: "none"`` offers no tools at all;
- the structured-output instruction (``response_format``): a ``system``
  message after it (:data:`JSON_INSTRUCTION`, then
  :data:`JSON_OBJECT_LINE` or :data:`JSON_SCHEMA_LINE` and the schema
  between :data:`SCHEMA_OPEN` and :data:`SCHEMA_CLOSE`);
- an earlier assistant message's ``tool_calls`` become ``<tool_call>``
  blocks in its text, written the way the model is asked to write them;
- consecutive tool results (roles ``tool`` and legacy ``function``) become
  one ``user`` message of ``<tool_response name=".." id="..">`` blocks. Its
  non-text parts, like a user message's, are kept: providers upload the
  files of the last message.

The history is rendered even when ``tool_choice`` is ``"none"``: the
conversation is what it is. ``tools`` stay on the request (the answer
shaper needs their names); no message keeps a tool role or ``tool_calls``.

Parsing (:class:`ToolCallParser`). The model answers in text that arrives in
arbitrary pieces. A call is a block: :data:`CALL_OPEN`, a JSON object
``{"name": str, "arguments": object | str holding a JSON object}`` (missing
or null arguments mean ``{}``), :data:`CALL_CLOSE`; whitespace around the
JSON is allowed, several blocks are parallel calls. The answer is cut at
the *valid* blocks into text pieces: the text before the first call,
between two calls and after the last. Theory of operation:

- Text is emitted at once, minus what may still turn out to be something
  else: a suffix that is a proper prefix of :data:`CALL_OPEN` (at most ten
  characters), and the fence and whitespace "decoration" described below.
  So text before a call reaches the client before the call is complete.
- From an open tag on, the block is buffered until the first
  :data:`CALL_CLOSE` after it (a close tag inside a JSON string ends the
  block too: the block is then malformed). A complete block is valid when
  its JSON is an object with a non-empty string ``name`` (one of ``names``,
  when given) and acceptable arguments. A valid block becomes two
  :class:`~protocol.deltas.ToolCallDelta`: index, id and name, then the
  arguments' JSON text (compact, or the arguments string as the model wrote
  it). Anything else, and a block still open at :meth:`~ToolCallParser.close`,
  is malformed and goes out as text, raw, exactly as it came: a model's
  slip is never an error. Scanning resumes after a malformed block's close
  tag, so its insides are never parsed as blocks.
- Decoration is dropped. A piece made only of whitespace and Markdown fence
  lines (```` ```xml ````, ```` ``` ````) is dropped when the answer has
  calls (a pure tool-call answer yields no text at all) and emitted when it
  has none (at close, or with the first character that makes it text).
  In a piece of real text, a fence opener (```` ``` ```` with a language
  word) on the last non-blank line before a call, with the whitespace after
  it, is dropped, and so is a bare closing fence on the first non-blank line
  after a call: ``Sure:\\n```xml\\n<tool_call>...</tool_call>\\n```\\nDone``
  gives the text ``Sure:\\n`` and ``Done``. Fences elsewhere are text.
  Fences and whitespace are held back only while they may be decoration,
  and fence decoration only up to :data:`MAX_FENCE_HOLD` characters (a
  longer candidate is text): whitespace alone is held however long it is.
- Any split of the text gives the same calls and the same text (the text
  may be cut into different :class:`~protocol.deltas.TextDelta` pieces),
  because every decision depends on the text seen, never on where the
  pieces were cut.
- Linear time. The open tag is found with ``str.find`` on the held suffix
  plus the new text; a block remembers its last few characters so a close
  tag cut between pieces is found without searching the block again; the
  decoration checks look at most :data:`MAX_FENCE_HOLD` characters per
  piece (whitespace runs are checked only where they grow).
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson

from protocol.deltas import TextDelta, ToolCallDelta
from protocol.errors import LocalProtocolError
from protocol.openai import ContentPart, Message

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable

    from protocol.openai import ChatRequest, ResponseFormat, ToolCall, ToolChoice, ToolSpec

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "CHOICE_AUTO",
    "CHOICE_FUNCTION",
    "CHOICE_REQUIRED",
    "JSON_INSTRUCTION",
    "JSON_OBJECT_LINE",
    "JSON_SCHEMA_LINE",
    "MAX_FENCE_HOLD",
    "RESPONSE_CLOSE",
    "RESPONSE_OPEN",
    "SCHEMA_CLOSE",
    "SCHEMA_OPEN",
    "TOOLS_CLOSE",
    "TOOLS_INTRO",
    "TOOLS_OPEN",
    "TOOLS_USAGE",
    "ToolCallParser",
    "default_call_id",
    "json_instruction",
    "needs_rendering",
    "render_agent_prompt",
    "tool_call_block",
    "tool_response_block",
    "tools_instruction",
]

# The convention (issue 14, "Shared interface"): the emulators match these strings.
TOOLS_OPEN = "<tools>"
TOOLS_CLOSE = "</tools>"
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
#: A result block's open tag; ``format`` it with ``name`` and ``id``.
RESPONSE_OPEN = '<tool_response name="{name}" id="{id}">'
RESPONSE_CLOSE = "</tool_response>"
SCHEMA_OPEN = "<json_schema>"
SCHEMA_CLOSE = "</json_schema>"

#: The tools instruction's lines before the tool list.
TOOLS_INTRO = (
    "# Tools\n"
    "You can call functions to answer. They are listed inside <tools></tools>, "
    "one JSON object per line:"
)
#: The tools instruction's lines after the tool list, before the choice line.
TOOLS_USAGE = (
    "To call a function, write one block per call, with JSON inside and nothing else "
    "in the block:\n"
    '<tool_call>{"name": "<function name>", "arguments": {<the arguments>}}</tool_call>\n'
    "Several blocks mean several calls made at once. After your calls, stop: the results "
    "come back in <tool_response> blocks."
)
CHOICE_AUTO = "Call a function only when it helps; otherwise answer in plain text."
CHOICE_REQUIRED = "You must call at least one function now."
#: ``format`` it with ``name``.
CHOICE_FUNCTION = 'You must call the function "{name}" now, and no other.'

JSON_INSTRUCTION = (
    "Answer with one JSON document only: no prose before or after it, no Markdown code fence."
)
JSON_OBJECT_LINE = "The document must be a JSON object."
JSON_SCHEMA_LINE = "It must satisfy this JSON Schema:"

#: The longest fence decoration (fence lines with the whitespace around them)
#: held back to see whether it only surrounds calls, in characters.
MAX_FENCE_HOLD = 256

_TOOL_ROLES = frozenset({"tool", "function"})


# ---------------------------------------------------------------------------
# Rendering


def needs_rendering(request: ChatRequest) -> bool:
    """Whether :func:`render_agent_prompt` has anything to do for ``request``.

    True when tools are offered (``tool_choice`` other than ``"none"``), a
    message carries tool calls or is a tool result (roles ``tool`` and
    ``function``), or structured output is asked for.
    """
    if request.tools and request.tool_choice.mode != "none":
        return True
    if request.response_format is not None:
        return True
    return any(m.tool_calls or m.role in _TOOL_ROLES for m in request.messages)


def tools_instruction(tools: Iterable[ToolSpec], choice: ToolChoice) -> str:
    """The tools instruction's text (no trailing newline).

    Args:
        tools: the functions offered, listed in this order.
        choice: the client's ``tool_choice``; its mode picks the last line
            (``"none"`` is the caller's business: it renders no instruction).
    """
    lines = [TOOLS_INTRO, TOOLS_OPEN]
    for tool in tools:
        spec: dict[str, Any] = {"name": tool.name}
        if tool.description:
            spec["description"] = tool.description
        if tool.parameters is not None:
            spec["parameters"] = tool.parameters
        lines.append(_compact(spec))
    lines += [TOOLS_CLOSE, TOOLS_USAGE]
    if choice.mode == "function":
        lines.append(CHOICE_FUNCTION.format(name=choice.name))
    elif choice.mode == "required":
        lines.append(CHOICE_REQUIRED)
    else:
        lines.append(CHOICE_AUTO)
    return "\n".join(lines)


def json_instruction(response_format: ResponseFormat) -> str:
    """The structured-output instruction's text (no trailing newline).

    A ``json_schema`` format without a schema is asked for as a JSON object.
    """
    if response_format.type == "json_schema" and response_format.schema is not None:
        schema = _compact(response_format.schema)
        return "\n".join((JSON_INSTRUCTION, JSON_SCHEMA_LINE, SCHEMA_OPEN, schema, SCHEMA_CLOSE))
    return f"{JSON_INSTRUCTION}\n{JSON_OBJECT_LINE}"


def tool_call_block(call: ToolCall) -> str:
    """One earlier call as the model would have written it.

    The arguments go in as the JSON value they hold, or as the string itself
    when it is not JSON (a client may replay whatever a model produced).
    """
    try:
        arguments: Any = orjson.loads(call.arguments)
        body = orjson.dumps({"name": call.name, "arguments": arguments})
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # not JSON, or too deep to write
        body = orjson.dumps({"name": call.name, "arguments": call.arguments})
    return f"{CALL_OPEN}{body.decode()}{CALL_CLOSE}"


def tool_response_block(name: str, call_id: str, content: str) -> str:
    """One tool result block: open tag, newline, ``content``, newline, close tag."""
    return f"{RESPONSE_OPEN.format(name=name, id=call_id)}\n{content}\n{RESPONSE_CLOSE}"


def _compact(value: object) -> str:
    """``value`` as compact JSON text.

    orjson writes at most 254 levels of nesting; a deeper client document
    (orjson reads up to 1024) is written by the standard library instead.
    """
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _system(text: str) -> Message:
    return Message("system", (ContentPart("text", text=text),), False)


def render_agent_prompt(request: ChatRequest) -> ChatRequest:
    """Render tools, tool history and structured output into plain prompt messages.

    Args:
        request: the client's request, as a dialect parsed it.

    Returns:
        A copy of ``request`` whose messages follow the convention (module
        comment): the instruction ``system`` messages first, assistant tool
        calls as ``<tool_call>`` blocks, each run of tool results as one
        ``user`` message of ``<tool_response>`` blocks (the name taken from
        the matching earlier call when the result has none). User messages
        are kept as they are, files included. ``tools``, ``tool_choice`` and
        ``response_format`` are kept.
    """
    messages: list[Message] = []
    if request.tools and request.tool_choice.mode != "none":
        messages.append(_system(tools_instruction(request.tools, request.tool_choice)))
    if request.response_format is not None:
        messages.append(_system(json_instruction(request.response_format)))

    names: dict[str, str] = {}  # call id -> function name, from the history
    results: list[str] = []
    result_files: list[ContentPart] = []

    def flush_results() -> None:
        if results:
            text = ContentPart("text", text="\n".join(results))
            messages.append(Message("user", (text, *result_files), bool(result_files)))
            results.clear()
            result_files.clear()

    for message in request.messages:
        if message.role in _TOOL_ROLES:
            name = message.name or names.get(message.tool_call_id, "")
            results.append(tool_response_block(name, message.tool_call_id, message.text))
            result_files.extend(part for part in message.parts if part.type != "text")
            continue
        flush_results()
        if message.tool_calls:
            for call in message.tool_calls:
                names[call.id] = call.name
            blocks = "\n".join(tool_call_block(call) for call in message.tool_calls)
            content = message.text
            text = f"{content}\n{blocks}" if content else blocks
            messages.append(Message("assistant", (ContentPart("text", text=text),), False))
        else:
            messages.append(message)
    flush_results()
    return replace(request, messages=tuple(messages))


# ---------------------------------------------------------------------------
# Parsing


def default_call_id() -> str:
    """A fresh call id, ``call_`` and 24 hex digits, as OpenAI's look."""
    return "call_" + uuid.uuid4().hex[:24]


# Fence lines. A line is what lies between two "\n"; horizontal whitespace is
# any whitespace but "\n" (so a "\r" before the "\n" is allowed).
_H = r"[^\S\n]"
_INFO = r"[A-Za-z0-9_+.#-]"  # a language word: xml, json, c++, c#, objective-c
#: A blank line or a fence line, complete.
_DECORATION_LINE = re.compile(rf"{_H}*(?:```{_H}*{_INFO}*{_H}*)?")
#: A line still being written that may become a blank or fence line.
_PARTIAL_LINE = re.compile(rf"{_H}*(?:`{{1,2}}|```{_H}*{_INFO}*{_H}*)?")
#: An opening fence: a fence line with a language word.
_OPENER_LINE = re.compile(rf"{_H}*```{_H}*{_INFO}+{_H}*")
#: An opener line and the whitespace after it, up to the end of the piece.
_OPENER_TAIL = re.compile(rf"{_H}*```{_H}*{_INFO}+{_H}*(?:\n\s*)?")
#: Whitespace then a bare fence line, with its newline: a closer after a call.
_CLOSER = re.compile(rf"\s*```{_H}*\n")


def _decoration_prefix(text: str, complete: bool) -> bool:
    """Whether ``text`` is (``complete``) or may become whitespace and fence lines."""
    *lines, last = text.split("\n")
    if not all(_DECORATION_LINE.fullmatch(line) for line in lines):
        return False
    return bool((_DECORATION_LINE if complete else _PARTIAL_LINE).fullmatch(last))


def _opener_start(text: str, line_start: bool) -> int:
    """Where a tail of ``text`` that may be a fence opener before a call begins.

    Args:
        text: held and new text of a text piece, not empty.
        line_start: ``text[0]`` begins a line.

    Returns:
        The index of the tail to hold, ``len(text)`` if none: the last
        non-blank line when it is an opener followed by a newline and only
        whitespace, or else the last line when it may still become an opener.
        A tail is at most :data:`MAX_FENCE_HOLD` characters.
    """
    if not text[-1].isspace() and text.find("`", text.rfind("\n") + 1) < 0:
        return len(text)  # the common case: a last line with text and no backtick
    base = max(0, len(text) - MAX_FENCE_HOLD)
    window = text[base:]
    starts_line = text[base - 1] == "\n" if base else line_start
    end = len(window.rstrip())
    if end and "\n" in window[end:]:
        start = window.rfind("\n", 0, end) + 1
        if (start or starts_line) and _OPENER_LINE.fullmatch(window, start, end):
            return base + start
    start = window.rfind("\n") + 1
    if (start or starts_line) and _PARTIAL_LINE.fullmatch(window, start):
        return base + start
    return len(text)


class _Mode(enum.Enum):
    TEXT = enum.auto()  # between blocks
    BLOCK = enum.auto()  # after an open tag, looking for the close tag
    CLOSED = enum.auto()  # close() was called


class ToolCallParser:
    """Split a model's answer into text and tool calls, as it arrives.

    One parser per answer. Feed each piece of answer text to :meth:`feed`
    and call :meth:`close` at the end; the events of all calls, in order,
    are the answer. The rules are in the module comment.
    """

    __slots__ = (
        "_after_call",
        "_block",
        "_block_tail",
        "_calls",
        "_held_tag",
        "_line_start",
        "_mode",
        "_names",
        "_new_id",
        "_out",
        "_pending",
        "_pending_space",
        "_piece_is_text",
        "_text",
    )

    def __init__(
        self, names: Collection[str] | None = None, new_id: Callable[[], str] = default_call_id
    ) -> None:
        """
        Args:
            names: the functions that may be called; a block naming another
                is malformed (text). ``None``: any name.
            new_id: makes each call's id (tests pass a counter).
        """
        self._names = None if names is None else frozenset(names)
        self._new_id = new_id
        self._mode = _Mode.TEXT
        self._calls = 0
        #: TEXT: a suffix of the text that is a proper prefix of CALL_OPEN.
        self._held_tag = ""
        #: BLOCK: the text after the open tag, and its last few characters.
        self._block: list[str] = []
        self._block_tail = ""
        # The current piece (the text since the last call, or the start).
        #: Some of it went out: it is text, not decoration.
        self._piece_is_text = False
        #: It follows a call.
        self._after_call = False
        #: Held text: the whole piece while it may be decoration, else a tail
        #: that may be a fence opener (at most MAX_FENCE_HOLD characters).
        self._pending: list[str] = []
        #: The pending decoration is whitespace only (or empty).
        self._pending_space = True
        #: The last character that went out ended a line (or none did yet).
        self._line_start = True
        # The events of the running call, text merged.
        self._out: list[TextDelta | ToolCallDelta] = []
        self._text: list[str] = []

    @property
    def calls(self) -> int:
        """The number of calls emitted so far."""
        return self._calls

    def feed(self, text: str) -> list[TextDelta | ToolCallDelta]:
        """Add a piece of the answer.

        Args:
            text: the next piece, of any length (``""`` is fine).

        Returns:
            What the text completed: answer text (at most one ``TextDelta``
            between calls) and the two ``ToolCallDelta`` of each call whose
            block it closed.

        Raises:
            LocalProtocolError: the parser was closed.
        """
        if self._mode is _Mode.CLOSED:
            raise LocalProtocolError("ToolCallParser.feed() after close()")
        buf = self._held_tag + text if self._held_tag else text
        self._held_tag = ""
        pos = 0
        while pos < len(buf):
            if self._mode is _Mode.BLOCK:
                pos = self._block_feed(buf, pos)
                continue
            found = buf.find(CALL_OPEN, pos)
            if found < 0:
                hold = _tag_prefix_start(buf, pos)
                self._piece_text(buf[pos:hold])
                self._held_tag = buf[hold:]
                break
            self._piece_text(buf[pos:found])
            self._mode = _Mode.BLOCK
            pos = found + len(CALL_OPEN)
        return self._take()

    def close(self) -> list[TextDelta | ToolCallDelta]:
        """End of the answer: emit what was held.

        A block without its close tag is malformed: its raw text goes out.
        Decoration is emitted if the answer has no call, else dropped.
        Afterwards :meth:`feed` raises; a second ``close()`` returns ``[]``.
        """
        if self._mode is _Mode.CLOSED:
            return []
        if self._mode is _Mode.BLOCK:
            self._piece_text(CALL_OPEN + "".join(self._block))
        elif self._held_tag:
            self._piece_text(self._held_tag)
        self._held_tag = ""
        self._block = []
        self._end_piece(before_call=False)
        self._mode = _Mode.CLOSED
        return self._take()

    # -- blocks

    def _block_feed(self, buf: str, pos: int) -> int:
        """Add ``buf[pos:]`` to the open block; return where to go on in ``buf``."""
        tail = self._block_tail
        window = tail + buf[pos:] if tail else buf[pos:]
        found = window.find(CALL_CLOSE)
        if found < 0:
            self._block.append(buf[pos:])
            self._block_tail = window[-(len(CALL_CLOSE) - 1) :]
            return len(buf)
        # The close tag starts `found` characters into the window, which
        # begins len(tail) characters before buf[pos].
        end = pos - len(tail) + found  # in buf; negative: inside what was kept
        block = "".join(self._block)
        content = block[: len(block) + end - pos] if end < pos else block + buf[pos:end]
        self._block = []
        self._block_tail = ""
        self._mode = _Mode.TEXT
        self._end_block(content)
        return end + len(CALL_CLOSE)

    def _end_block(self, content: str) -> None:
        """A complete block: a call, or text if malformed."""
        call = self._parse_call(content)
        if call is None:
            self._piece_text(CALL_OPEN + content + CALL_CLOSE)
            return
        name, arguments = call
        self._end_piece(before_call=True)
        self._flush_text()
        index = self._calls
        self._calls += 1
        self._out.append(ToolCallDelta(index, id=self._new_id(), name=name))
        self._out.append(ToolCallDelta(index, arguments_part=arguments))
        self._after_call = True

    def _parse_call(self, content: str) -> tuple[str, str] | None:
        """The name and arguments' JSON text of a block's content, None if malformed."""
        try:
            data = orjson.loads(content.strip())
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        name = data.get("name")
        if not isinstance(name, str) or not name:
            return None
        if self._names is not None and name not in self._names:
            return None
        arguments = data.get("arguments")
        if arguments is None:
            return name, "{}"
        if isinstance(arguments, dict):
            try:
                return name, orjson.dumps(arguments).decode()
            except orjson.JSONEncodeError:  # nested deeper than orjson writes
                return None
        if isinstance(arguments, str):
            try:
                parsed = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                return None
            return (name, arguments) if isinstance(parsed, dict) else None
        return None

    # -- pieces

    def _piece_text(self, text: str) -> None:
        """Add text of the current piece (known not to be a tag)."""
        if not text:
            return
        if not self._piece_is_text:
            if self._pending_space and text.isspace():
                self._pending.append(text)  # whitespace only, held however long
                return
            held = "".join(self._pending) + text
            if len(held) <= MAX_FENCE_HOLD and _decoration_prefix(held, complete=False):
                self._pending = [held]
                self._pending_space = False
                return
            text = self._become_text(held)
        elif self._pending:
            text = self._pending[0] + text  # a text piece holds one short tail
        hold = _opener_start(text, self._line_start)
        self._emit(text[:hold])
        self._pending = [text[hold:]] if hold < len(text) else []

    def _become_text(self, held: str) -> str:
        """The piece turns out to be text: what to emit of its held start."""
        self._piece_is_text = True
        self._pending = []
        self._pending_space = True
        if self._after_call:
            match = _CLOSER.match(held)
            if match and match.end() <= MAX_FENCE_HOLD:
                return held[match.end() :]  # a line start, as every piece start is
        return held

    def _end_piece(self, before_call: bool) -> None:
        """The current piece ends, with a call (``before_call``) or the answer."""
        held = "".join(self._pending)
        self._pending = []
        if not self._piece_is_text and held:
            if self._pending_space or _decoration_prefix(held, complete=True):
                if not (before_call or self._calls):
                    self._emit(held)  # an answer without calls keeps its whitespace
                held = ""
            else:  # it ends as text: a fence line left incomplete
                text = self._become_text(held)
                hold = _opener_start(text, self._line_start)
                self._emit(text[:hold])
                held = text[hold:]
        if held and not (before_call and _OPENER_TAIL.fullmatch(held)):
            self._emit(held)
        # The next piece starts.
        self._piece_is_text = False
        self._pending_space = True
        self._line_start = True

    # -- output

    def _emit(self, text: str) -> None:
        if text:
            self._text.append(text)
            self._line_start = text[-1] == "\n"

    def _flush_text(self) -> None:
        if self._text:
            self._out.append(TextDelta("".join(self._text)))
            self._text = []

    def _take(self) -> list[TextDelta | ToolCallDelta]:
        self._flush_text()
        out, self._out = self._out, []
        return out


def _tag_prefix_start(buf: str, pos: int) -> int:
    """Where the longest suffix of ``buf[pos:]`` that is a proper prefix of CALL_OPEN begins."""
    for start in range(max(pos, len(buf) - len(CALL_OPEN) + 1), len(buf)):
        if CALL_OPEN.startswith(buf[start:]):
            return start
    return len(buf)
