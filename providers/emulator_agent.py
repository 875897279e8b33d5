"""What a cooperative model answers to an agent prompt: the emulators' scripted agent.

Sans-IO: prompt text in, answer text out. Both emulators (StepChat and
ChatGLM) call :func:`agent_answer` on the merged prompt they received, before
falling back to their demo answer, so that the official SDKs' tool loops and
structured output run end to end against them (issue 14).

Theory of operation
-------------------
The relay renders tools, tool history and structured-output instructions into
plain prompt messages with one fixed convention (the issue's "prompt
convention", :mod:`protocol.toolcalls` writes it); each provider then merges
the messages into one text. This module reads that text back:

1. :func:`split_prompt` undoes the merge. Three shapes arrive:

   - StepChat (``providers/step/prompt.py``): ``role:text`` lines; a text
     with newlines continues on lines without a role prefix until the next
     ``role:`` line; a ``system:`` history hint precedes the last message; the
     text ends with ``assistant:``.
   - ChatGLM merged (``providers/glm/prompt.py``): a tag line
     (``<|system|>``, ``<|user|>``, ``<|assistant|>``; ``<|sytstem|>`` is the
     reference's spelling) before each text.
   - ChatGLM pass-through (one message, or a continued conversation): the
     bare texts. It cannot be split; it comes back as one message of role
     ``""``, and its "last user text" is what follows the last instruction
     or call block in it (:func:`last_user_text`).

   The shape is told by both ends of the text (a tag line first and
   ``<|assistant|>`` last, or a ``role:`` first and ``assistant:`` last),
   never by a line in between, which may be anyone's text. Consecutive
   segments of one role are joined (a message with several text parts prints
   one line or tag per part). A ``<tool_response ...>`` block is never cut by
   a role line inside it: tool output may hold anything.

2. :func:`read_prompt` finds, in the system messages (the whole text for
   the pass-through shape), the offered tools (the JSON lines between
   ``<tools>`` and ``</tools>``), the tool choice line, the JSON instruction
   and its ``<json_schema>``; and the last user message's text.

3. :func:`agent_answer` decides, first match wins:

   a. the last user message asks ``call NAME with {JSON}`` (``call`` in any
      case, NAME an offered tool, optionally in backticks or quotes, JSON an
      object; several requests are parallel calls, and right after one
      request ``and NAME with {...}`` or ``, NAME with {...}`` needs no second
      ``call``): one ``<tool_call>`` block per request, joined by newlines,
      and nothing else (so the relay's answer has null content). With a
      named tool choice only requests for that tool count;
   b. the last user message holds ``<tool_response>`` blocks (results coming
      back) and no JSON was asked for: ``The tool N returned: CONTENT`` per
      result (CONTENT stripped), joined by a space;
   c. the choice line says a call is required (``You must call at least one
      function now.``, or ``You must call the function "X" now``) and no
      result came back: a call of X (or the first tool) with ``{}``;
   d. JSON was asked for: ``Here is the JSON:`` and the document in a
      ```` ```json ```` fence, so the relay's extraction has prose and a fence
      to remove. The document is :func:`schema_instance` of the schema, or
      without one ``{"answer": ...}`` holding the results' sentences or the
      last user text, shortened;
   e. otherwise None: not an agent prompt, the caller answers as before.

   Results come before a forced call so that a loop with ``tool_choice``
   ``"required"`` ends instead of calling forever.

Traps: every rule is a heuristic over text a client partly wrote, so any
input must give an answer or None, never an exception (property-tested).
Arguments are re-serialized compactly; a JSON number orjson cannot write
(an integer over 64 bits) keeps the client's text.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, assert_never

import orjson

if TYPE_CHECKING:
    from collections.abc import Callable

# --- the prompt convention (issue 14; protocol/toolcalls.py writes it) ------

TOOLS_OPEN = "<tools>"
TOOLS_CLOSE = "</tools>"
AUTO_LINE = "Call a function only when it helps; otherwise answer in plain text."
REQUIRED_LINE = "You must call at least one function now."
JSON_INSTRUCTION = "Answer with one JSON document only"
JSON_OBJECT_LINE = "The document must be a JSON object."
SCHEMA_OPEN = "<json_schema>"
SCHEMA_CLOSE = "</json_schema>"
CALL_CLOSE = "</tool_call>"

#: The named-choice line: ``You must call the function "X" now, and no other.``
_NAMED_RE = re.compile(r'You must call the function "([^"\n]+)" now')
#: A result block; attributes are read apart, so their order does not matter.
_RESPONSE_RE = re.compile(r"<tool_response\b([^>\n]*)>(.*?)</tool_response>", re.DOTALL)
_NAME_ATTR_RE = re.compile(r'\bname="([^"]*)"')
#: A call request: ``call NAME with {``; the JSON object is decoded from the brace.
_REQUEST_RE = re.compile(r"\bcall\s+[`'\"]?([\w.\-]+)[`'\"]?\s+with\s*(?=\{)", re.IGNORECASE)
#: Right after a request: another one sharing its ``call``, as in
#: ``call a with {...} and b with {...}`` (``,`` or ``and``; ``call`` optional).
_MORE_RE = re.compile(
    r"\s*(?:,\s*(?:and\s+)?|and\s+)(?:call\s+)?[`'\"]?([\w.\-]+)[`'\"]?\s+with\s*(?=\{)",
    re.IGNORECASE,
)

# --- the providers' merged prompts ----------------------------------------

#: providers/step/prompt.py build_prompt: ``{role}:{text}`` lines.
_STEP_ROLE_RE = re.compile(r"(system|developer|user|assistant|tool|function):")
#: The end of a StepChat prompt.
_STEP_END = "\nassistant:"
#: providers/glm/prompt.py build_prompt: one tag line per text.
_GLM_TAGS = {
    "<|system|>": "system",
    "<|sytstem|>": "system",  # the reference's spelling, kept as an option there
    "<|user|>": "user",
    "<|assistant|>": "assistant",
}
#: The end of a merged ChatGLM prompt.
_GLM_END = "\n<|assistant|>\n"
#: The opening tag of a result block, attributes required: the tools
#: instruction itself mentions a bare ``<tool_response>``.
_RESPONSE_OPEN_RE = re.compile(r"<tool_response\s[^>\n]*>")
_RESPONSE_CLOSE = "</tool_response>"

#: Roles whose text holds the relay's instructions.
_INSTRUCTION_ROLES = frozenset({"system", "developer", ""})

#: Longest quoted user text in a schema-less JSON answer, in characters.
_MAX_QUOTE_CHARS = 120
#: Deepest schema nesting followed ($ref hops included) before taking the
#: shortest way out: recursive schemas must end.
_MAX_SCHEMA_DEPTH = 12

_STRING_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "hostname": "example.com",
}

Choice = Literal["auto", "required", "function"]


@dataclass(frozen=True, slots=True)
class PromptMessage:
    """One message recovered from a merged prompt.

    Attributes:
        role: ``system``, ``user``, ``assistant`` (and StepChat's other
            role prefixes), or ``""`` for the unsplittable pass-through text.
        text: the message's text, its parts joined with newlines.
    """

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class AgentPrompt:
    """What a prompt asks of the agent.

    Attributes:
        tools: the offered functions' names, in order (empty: no tools).
        choice: ``auto``, ``required`` or ``function`` (then ``forced``).
        forced: the function a named choice requires.
        json_mode: the JSON instruction is present.
        schema: its JSON Schema, None without one (or when it does not parse).
        last_user: the last user message's text (``""`` if none).
    """

    tools: tuple[str, ...]
    choice: Choice
    forced: str
    json_mode: bool
    schema: Any
    last_user: str


@dataclass(frozen=True, slots=True)
class CallRequest:
    """One call the user asked for: the tool's name and its JSON object's text."""

    name: str
    arguments: str


# --- splitting the merged prompt ------------------------------------------


def split_prompt(prompt: str) -> list[PromptMessage]:
    """Undo a provider's merge (see the module comment).

    Args:
        prompt: the text the emulator received.

    Returns:
        The messages in order, consecutive ones of one role joined; the
        trailing empty ``assistant`` turn is dropped. Pass-through text is one
        message of role ``""``.
    """
    lines = prompt.split("\n")
    # the shape shows at both ends; a tag or role line in between may be anyone's text
    if lines[0] in _GLM_TAGS and prompt.endswith(_GLM_END):
        segments = _segments(lines, _glm_head)
    elif _STEP_ROLE_RE.match(prompt) and prompt.endswith(_STEP_END):
        segments = _segments(lines, _step_head)
    else:
        return [PromptMessage("", prompt)] if prompt.strip() else []
    merged: list[PromptMessage] = []
    for role, text in segments:
        if merged and merged[-1].role == role:
            merged[-1] = PromptMessage(role, merged[-1].text + "\n" + text)
        else:
            merged.append(PromptMessage(role, text))
    if merged and merged[-1].role == "assistant" and not merged[-1].text.strip():
        merged.pop()
    return merged


def _glm_head(line: str) -> tuple[str, str | None] | None:
    """A GLM tag line starts a segment whose text begins on the next line."""
    role = _GLM_TAGS.get(line)
    return None if role is None else (role, None)


def _step_head(line: str) -> tuple[str, str | None] | None:
    """A ``role:`` line starts a segment whose text begins after the colon."""
    match = _STEP_ROLE_RE.match(line)
    return None if match is None else (match.group(1), line[match.end() :])


def _segments(
    lines: list[str], head: Callable[[str], tuple[str, str | None] | None]
) -> list[tuple[str, str]]:
    """Cut ``lines`` into ``(role, text)`` segments at the lines ``head`` recognizes.

    A line inside an open ``<tool_response>`` block never starts a segment.
    Text before the first head line belongs to a ``user`` segment.
    """
    segments: list[tuple[str, list[str]]] = []
    open_response = False
    for line in lines:
        started = None if open_response else head(line)
        if started is not None:
            role, first = started
            segments.append((role, [] if first is None else [first]))
            line = first or ""
            if first is None:
                continue
        elif segments:
            segments[-1][1].append(line)
        else:
            segments.append(("user", [line]))
        opened = [tag.end() for tag in _RESPONSE_OPEN_RE.finditer(line)]
        if opened:
            open_response = line.find(_RESPONSE_CLOSE, opened[-1]) < 0
        elif _RESPONSE_CLOSE in line:
            open_response = False
    return [(role, _trim("\n".join(texts))) for role, texts in segments]


def _trim(text: str) -> str:
    """A segment's text without the newline its merge added after it."""
    return text.removesuffix("\n")


# --- reading the agent's instructions ---------------------------------------


def read_prompt(prompt: str) -> AgentPrompt:
    """What ``prompt`` offers and asks (see the module comment, step 2).

    Never raises: unreadable tool lines or schemas are skipped.
    """
    messages = split_prompt(prompt)
    instructions = "\n".join(m.text for m in messages if m.role in _INSTRUCTION_ROLES)
    tools = _tool_names(instructions)
    named = _NAMED_RE.search(instructions)
    choice: Choice = "auto"
    forced = ""
    if named is not None:
        choice, forced = "function", named.group(1)
    elif REQUIRED_LINE in instructions:
        choice = "required"
    json_mode = JSON_INSTRUCTION in instructions
    schema = _block_json(instructions, SCHEMA_OPEN, SCHEMA_CLOSE) if json_mode else None
    return AgentPrompt(
        tools=tools,
        choice=choice,
        forced=forced,
        json_mode=json_mode,
        schema=schema,
        last_user=last_user_text(messages),
    )


def last_user_text(messages: list[PromptMessage]) -> str:
    """The text of the last ``user`` message (``""`` if none).

    For pass-through text (one message of role ``""``) it is what follows the
    last instruction line or ``</tool_call>`` block, which is as close as a
    text without role marks allows.
    """
    for message in reversed(messages):
        if message.role == "user":
            return message.text
        if message.role == "":
            return _bare_tail(message.text)
    return ""


def _bare_tail(text: str) -> str:
    ends = [CALL_CLOSE, AUTO_LINE, REQUIRED_LINE, SCHEMA_CLOSE, JSON_OBJECT_LINE]
    cut = max((text.rfind(end) + len(end) for end in ends if end in text), default=0)
    named = list(_NAMED_RE.finditer(text))
    if named:
        line_end = text.find("\n", named[-1].end())
        cut = max(cut, len(text) if line_end < 0 else line_end)
    return text[cut:].strip("\n")


def _block_lines(text: str, open_line: str, close_line: str) -> list[str] | None:
    """The lines between a line ``open_line`` and the next line ``close_line``."""
    lines = text.split("\n")
    try:
        start = lines.index(open_line) + 1
        end = lines.index(close_line, start)
    except ValueError:
        return None
    return lines[start:end]


def _tool_names(instructions: str) -> tuple[str, ...]:
    lines = _block_lines(instructions, TOOLS_OPEN, TOOLS_CLOSE) or []
    names: list[str] = []
    for line in lines:
        try:
            spec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return tuple(names)


def _block_json(text: str, open_line: str, close_line: str) -> Any:  # noqa: ANN401 (JSON)
    lines = _block_lines(text, open_line, close_line)
    if lines is None:
        return None
    try:
        return orjson.loads("\n".join(lines))
    except orjson.JSONDecodeError:
        return None


# --- the requests, results and answers -----------------------------------


def requested_calls(text: str, tools: tuple[str, ...]) -> list[CallRequest]:
    """Every ``call NAME with {JSON}`` in ``text`` naming an offered tool, in order.

    NAME matches an offered tool exactly or, failing that, ignoring case.
    A request whose JSON is not an object is skipped.
    """
    by_fold = {name.casefold(): name for name in tools}
    # the stdlib decoder, not orjson: only it decodes one value from inside a text
    decoder = json.JSONDecoder()
    calls: list[CallRequest] = []
    pos = 0
    chained = False  # the previous request ended at pos: "and NAME with {...}" may follow
    while True:
        match = _MORE_RE.match(text, pos) if chained else None
        if match is None:
            match = _REQUEST_RE.search(text, pos)
        if match is None:
            return calls
        pos = match.end()
        chained = False
        said = match.group(1)
        name = said if said in tools else by_fold.get(said.casefold())
        if name is None:
            continue
        try:
            value, end = decoder.raw_decode(text, match.end())
        except (ValueError, RecursionError):
            continue
        if not isinstance(value, dict):
            continue
        calls.append(CallRequest(name, _compact(value, text[match.end() : end])))
        pos = end
        chained = True


def _compact(value: dict[str, Any], raw: str) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # an integer over 64 bits: keep the client's text
        return raw


def call_block(name: str, arguments: str) -> str:
    """One call in the convention: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``."""
    quoted = orjson.dumps(name).decode()
    return f'<tool_call>{{"name": {quoted}, "arguments": {arguments}}}</tool_call>'


def tool_results(text: str) -> list[tuple[str, str]]:
    """The ``(name, content)`` of every ``<tool_response>`` block, content stripped."""
    results = []
    for match in _RESPONSE_RE.finditer(text):
        name = _NAME_ATTR_RE.search(match.group(1))
        results.append((name.group(1) if name else "", match.group(2).strip()))
    return results


def results_sentence(results: list[tuple[str, str]]) -> str:
    """``The tool N returned: CONTENT`` per result, joined by a space."""
    return " ".join(f"The tool {name} returned: {content}" for name, content in results)


def json_answer(document: object) -> str:
    """The document as a model wraps it: a sentence, then a ``json`` fence."""
    body = orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
    return f"Here is the JSON:\n```json\n{body}\n```\n"


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_QUOTE_CHARS else text[: _MAX_QUOTE_CHARS - 1] + "…"


def agent_answer(prompt: str) -> str | None:
    """The scripted answer to an agent prompt, or None (see the module comment, step 3).

    Args:
        prompt: the merged prompt the emulator received.

    Returns:
        The answer text, or None when the prompt asks nothing of an agent:
        the caller then answers as it did before.
    """
    agent = read_prompt(prompt)
    calls = requested_calls(agent.last_user, agent.tools) if agent.tools else []
    if agent.choice == "function":
        calls = [call for call in calls if call.name == agent.forced]
    if calls:
        return "\n".join(call_block(call.name, call.arguments) for call in calls)
    results = tool_results(agent.last_user)
    if results and not agent.json_mode:
        return results_sentence(results)
    if agent.tools and not results:
        match agent.choice:
            case "function":
                return call_block(agent.forced, "{}")
            case "required":
                return call_block(agent.tools[0], "{}")
            case "auto":
                pass
            case _:
                assert_never(agent.choice)
    if agent.json_mode:
        if agent.schema is not None:
            try:
                return json_answer(schema_instance(agent.schema))
            except orjson.JSONEncodeError:  # a const nested past orjson's limit
                pass
        quote = results_sentence(results) if results else agent.last_user
        return json_answer({"answer": _shorten(quote)})
    return None


# --- schema instances -------------------------------------------------------


def schema_instance(schema: object) -> object:
    """A deterministic document that satisfies ``schema`` (for the schemas models get).

    Objects get every property of ``properties`` (and any other ``required``
    name, as a string); strings are ``"example"`` (or a value of their
    ``format``, fitted to ``minLength``/``maxLength``), integers 42, numbers
    1.5 (both moved into ``minimum``/``maximum``), booleans true; arrays hold
    one item of ``items`` (``minItems`` of them if more); ``const`` and the
    first ``enum`` value win; ``anyOf``/``oneOf`` take their first branch,
    ``allOf`` is merged; ``$ref`` into ``$defs``/``definitions`` (any local
    JSON pointer) is followed. Past a depth of 12 the shortest way out is
    taken (a branch without ``$ref``, a ``null`` type, required properties
    only, no optional array items), so a recursive schema ends; past 24 a
    ``$ref`` and past 48 any subschema gives null. ``pattern``,
    ``uniqueItems`` and a fractional ``multipleOf`` are not honoured.

    Args:
        schema: a JSON Schema (draft 2020-12 or older), as parsed JSON.

    Returns:
        The instance as parsed JSON.
    """
    return _instance(schema, schema, 0)


def _resolve(root: object, ref: str) -> object | None:
    """A local ``#/...`` JSON pointer into ``root``; None if it is not one or leads nowhere."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for raw in ref[2:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def _pick_branch(branches: list[Any], deep: bool) -> object:
    """The first branch; past the depth limit the first one that cannot recurse."""
    if deep:
        for branch in branches:
            if not _refers(branch):
                return branch
    return branches[0]


def _refers(schema: object) -> bool:
    """Whether ``schema`` holds a ``$ref`` anywhere (so it may recurse).

    A loop over a stack, not recursion: a schema may be nested as deep as
    JSON allows, deeper than Python's recursion limit.
    """
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "$ref" in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _instance(schema: object, root: object, depth: int) -> object:
    if schema is False:
        return None  # nothing is valid; null is as good as anything
    if not isinstance(schema, dict):
        return "example"  # true or a malformed schema: anything goes
    if depth >= 4 * _MAX_SCHEMA_DEPTH:
        return None  # a schema nested deeper than any model is asked to fill: give up
    deep = depth >= _MAX_SCHEMA_DEPTH
    rest = dict(schema)
    ref = rest.pop("$ref", None)
    if isinstance(ref, str):
        target = _resolve(root, ref)
        if not isinstance(target, dict) or depth >= 2 * _MAX_SCHEMA_DEPTH:
            return None
        return _instance({**target, **rest}, root, depth + 1)
    if "const" in rest:
        return rest["const"]
    enum = rest.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf"):
        branches = rest.pop(key, None)
        if isinstance(branches, list) and branches:
            return _instance({**rest, **_as_dict(_pick_branch(branches, deep))}, root, depth + 1)
    every = rest.pop("allOf", None)
    if isinstance(every, list) and every:
        for branch in every:
            rest = _merge(rest, _as_dict(branch))
        return _instance(rest, root, depth + 1)
    kind = rest.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        non_null = [k for k in kinds if k != "null"]
        kind = "null" if deep and "null" in kinds else next(iter(non_null or kinds), None)
    if kind is None:
        if any(k in rest for k in ("properties", "required", "additionalProperties")):
            kind = "object"
        elif any(k in rest for k in ("items", "prefixItems")):
            kind = "array"
        elif "format" in rest:
            kind = "string"
    match kind:
        case "object":
            return _object(rest, root, depth)
        case "array":
            return _array(rest, root, depth)
        case "string":
            return _string(rest)
        case "integer":
            return _integer(rest)
        case "number":
            return _number(rest)
        case "boolean":
            return True
        case "null":
            return None
        case _:
            return "example"


def _as_dict(branch: object) -> dict[str, Any]:
    return branch if isinstance(branch, dict) else {}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``allOf``: properties and required lists are united, other keys overwritten."""
    merged = {**base, **extra}
    props = {**_as_dict(base.get("properties")), **_as_dict(extra.get("properties"))}
    if props:
        merged["properties"] = props
    required = [*_list(base.get("required")), *_list(extra.get("required"))]
    if required:
        merged["required"] = list(dict.fromkeys(r for r in required if isinstance(r, str)))
    return merged


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _object(schema: dict[str, Any], root: object, depth: int) -> dict[str, Any]:
    props = _as_dict(schema.get("properties"))
    required = _list(schema.get("required"))
    if depth >= _MAX_SCHEMA_DEPTH:  # the shortest way out: required properties only
        props = {name: sub for name, sub in props.items() if name in required}
    out: dict[str, Any] = {name: _instance(sub, root, depth + 1) for name, sub in props.items()}
    for name in required:
        if isinstance(name, str) and name not in out:
            out[name] = "example"
    return out


def _array(schema: dict[str, Any], root: object, depth: int) -> list[Any]:
    prefix = schema.get("prefixItems")
    items = schema.get("items")
    if isinstance(items, list):  # draft 4-7 tuple form
        prefix, items = items, schema.get("additionalItems")
    out = [_instance(sub, root, depth + 1) for sub in _list(prefix)]
    low = schema.get("minItems")
    high = schema.get("maxItems")
    count = max(len(out), low if isinstance(low, int) else 0)
    if not out and items is not False and depth < _MAX_SCHEMA_DEPTH:
        count = max(count, 1)
    if isinstance(high, int) and not isinstance(high, bool):
        count = min(count, max(high, len(out)))
    while len(out) < count:
        out.append(_instance(items if items is not None else True, root, depth + 1))
    return out


def _string(schema: dict[str, Any]) -> str:
    fmt = schema.get("format")
    text = _STRING_FORMATS.get(fmt, "example") if isinstance(fmt, str) else "example"
    low = schema.get("minLength")
    high = schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text += "x" * (low - len(text))
    if isinstance(high, int) and len(text) > high:
        text = text[: max(high, 0)]
    return text


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None, bool, bool]:
    """``(low, high, low_exclusive, high_exclusive)`` from any draft's keywords."""
    def num(key: str) -> float | None:
        value = schema.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None

    low, high = num("minimum"), num("maximum")
    low_ex = high_ex = False
    ex_low, ex_high = num("exclusiveMinimum"), num("exclusiveMaximum")
    if ex_low is not None and (low is None or ex_low >= low):
        low, low_ex = ex_low, True
    if ex_high is not None and (high is None or ex_high <= high):
        high, high_ex = ex_high, True
    if schema.get("exclusiveMinimum") is True:  # draft 4: a flag on minimum
        low_ex = low is not None
    if schema.get("exclusiveMaximum") is True:
        high_ex = high is not None
    return low, high, low_ex, high_ex


def _integer(schema: dict[str, Any]) -> int:
    low, high, low_ex, high_ex = _bounds(schema)
    least = None if low is None else math.floor(low) + 1 if low_ex else math.ceil(low)
    most = None if high is None else math.ceil(high) - 1 if high_ex else math.floor(high)
    value = 42 if least is None else max(42, least)
    if most is not None:
        value = min(value, most)
    step = schema.get("multipleOf")
    if isinstance(step, int) and not isinstance(step, bool) and step > 0 and value % step:
        up = value - value % step + step
        value = up if most is None or up <= most else value - value % step
    return value


def _number(schema: dict[str, Any]) -> float | int:
    step = schema.get("multipleOf")
    if isinstance(step, int) and not isinstance(step, bool):
        return _integer(schema)  # an integral step: an integral value fits best
    low, high, low_ex, high_ex = _bounds(schema)
    value = 1.5
    if low is not None and (value < low or (low_ex and value <= low)):
        value = low + 0.5 if low_ex else low
    if high is not None and (value > high or (high_ex and value >= high)):
        value = high - 0.5 if high_ex else high
        if low is not None and (value < low or (low_ex and value <= low)):
            value = (low + high) / 2
    return value
