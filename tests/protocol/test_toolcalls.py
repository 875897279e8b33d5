"""Tests of protocol/toolcalls.py: the tool-calling prompt convention (issue 14).

The parser is checked against a whole-text reference written here from the
rules of the module comment (cut the answer at its valid blocks, drop
decoration pieces, strip the fence lines that only surround calls), for
answers cut into any pieces.
"""

from __future__ import annotations

import re
from itertools import count, pairwise
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.deltas import TextDelta, ToolCallDelta
from protocol.errors import LocalProtocolError
from protocol.openai import (
    ChatRequest,
    ContentPart,
    Message,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
)
from protocol.toolcalls import (
    CALL_CLOSE,
    CALL_OPEN,
    MAX_FENCE_HOLD,
    ToolCallParser,
    default_call_id,
    needs_rendering,
    render_agent_prompt,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

PROPERTY = settings(max_examples=200, deadline=None)

Event = TextDelta | ToolCallDelta
NAMES = ("get_weather", "search", "f")


def counter_ids() -> Callable[[], str]:
    """Call ids ``call_0``, ``call_1``, ...: deterministic, for comparisons."""
    numbers = count()
    return lambda: f"call_{next(numbers)}"


def split(text: str, cuts: list[int]) -> list[str]:
    """Cut ``text`` at ``cuts`` (clamped to its length)."""
    bounds = [0, *sorted({min(cut, len(text)) for cut in cuts}), len(text)]
    return [text[start:end] for start, end in pairwise(bounds)]


def merged(events: list[Event]) -> list[Event]:
    """``events`` with consecutive TextDeltas joined (no empty text is allowed)."""
    out: list[Event] = []
    for event in events:
        assert not (isinstance(event, TextDelta) and not event.text), "empty TextDelta"
        if isinstance(event, TextDelta) and out and isinstance(out[-1], TextDelta):
            out[-1] = TextDelta(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def run(pieces: list[str], names: Collection[str] | None = None) -> list[Event]:
    """Feed ``pieces`` to a fresh parser, then close it; every event, text merged."""
    parser = ToolCallParser(names, new_id=counter_ids())
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.close()
    calls = sum(1 for e in events if isinstance(e, ToolCallDelta) and e.name)
    assert parser.calls == calls
    return merged(events)


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# --- the whole-text reference ------------------------------------------------------

H = r"[^\S\n]"
INFO = r"[A-Za-z0-9_+.#-]"
FENCE_OR_BLANK = re.compile(rf"{H}*(?:```{H}*{INFO}*{H}*)?")
BARE_FENCE = re.compile(rf"{H}*```{H}*")
INFO_FENCE = re.compile(rf"{H}*```{H}*{INFO}+{H}*")


def ref_call(content: str, names: Collection[str] | None) -> tuple[str, str] | None:
    """A block's name and arguments text, or None when it is malformed."""
    try:
        data = orjson.loads(content.strip())
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    name: str = data["name"]
    if not name or (names is not None and name not in names):
        return None
    arguments = data.get("arguments")
    if arguments is None:
        return name, "{}"
    if isinstance(arguments, dict):
        return name, orjson.dumps(arguments).decode()
    if isinstance(arguments, str):
        try:
            return (name, arguments) if isinstance(orjson.loads(arguments), dict) else None
        except orjson.JSONDecodeError:
            return None
    return None


def is_decoration(piece: str) -> bool:
    """Whitespace only, or (short enough) whitespace and fence lines."""
    if not piece or piece.isspace():
        return True
    return len(piece) <= MAX_FENCE_HOLD and all(
        FENCE_OR_BLANK.fullmatch(line) for line in piece.split("\n")
    )


def strip_closer(piece: str) -> str:
    """Drop a bare fence on the first non-blank line (a closer after a call)."""
    lines = piece.split("\n")
    first = next(i for i, line in enumerate(lines) if line.strip())
    end = sum(len(line) + 1 for line in lines[: first + 1])
    if first < len(lines) - 1 and BARE_FENCE.fullmatch(lines[first]) and end <= MAX_FENCE_HOLD:
        return piece[end:]
    return piece


def strip_opener(piece: str) -> str:
    """Drop a fence opener on the last non-blank line (and what follows: whitespace)."""
    lines = piece.split("\n")
    last = max(i for i, line in enumerate(lines) if line.strip())
    start = sum(len(line) + 1 for line in lines[:last])
    if last > 0 and INFO_FENCE.fullmatch(lines[last]) and len(piece) - start <= MAX_FENCE_HOLD:
        return piece[:start]
    return piece


def reference(answer: str, names: Collection[str] | None = None) -> list[Event]:
    """The events the whole ``answer`` gives, computed at once."""
    pieces = [""]
    calls: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = answer.find(CALL_OPEN, pos)
        end = answer.find(CALL_CLOSE, start + len(CALL_OPEN)) if start >= 0 else -1
        if end < 0:
            pieces[-1] += answer[pos:]
            break
        call = ref_call(answer[start + len(CALL_OPEN) : end], names)
        if call is None:
            pieces[-1] += answer[pos : end + len(CALL_CLOSE)]
        else:
            pieces[-1] += answer[pos:start]
            calls.append(call)
            pieces.append("")
        pos = end + len(CALL_CLOSE)
    texts = []
    for index, piece in enumerate(pieces):
        if calls and is_decoration(piece):
            piece = ""
        elif calls:
            # Both regions are computed on the piece as it came (they never overlap).
            head = len(piece) - len(strip_closer(piece)) if index > 0 else 0
            tail = len(strip_opener(piece)) if index < len(calls) else len(piece)
            piece = piece[head:tail]
        texts.append(piece)
    events: list[Event] = []
    for index, text in enumerate(texts):
        if text:
            events.append(TextDelta(text))
        if index < len(calls):
            name, arguments = calls[index]
            events += [ToolCallDelta(index, id=f"call_{index}", name=name),
                       ToolCallDelta(index, arguments_part=arguments)]
    return events


# --- strategies --------------------------------------------------------------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)
_ARGUMENTS = st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=3)
_WS = st.sampled_from(["", " ", "\n", "\n\n", "  \n\t"])


@st.composite
def valid_blocks(draw: st.DrawFn) -> str:
    """A well-formed call block in one of the accepted spellings."""
    name = draw(st.sampled_from(NAMES))
    arguments = draw(_ARGUMENTS)
    form = draw(st.sampled_from(["object", "string", "missing", "null"]))
    body: dict[str, Any] = {"name": name}
    if form == "object":
        body["arguments"] = arguments
    elif form == "string":
        body["arguments"] = orjson.dumps(arguments).decode()
    elif form == "null":
        body["arguments"] = None
    json_text = orjson.dumps(body).decode()
    if draw(st.booleans()):  # the spaced style of Python's json.dumps
        json_text = json_text.replace('":', '": ').replace(',"', ', "')
    return f"{CALL_OPEN}{draw(_WS)}{json_text}{draw(_WS)}{CALL_CLOSE}"


MALFORMED_BLOCKS = st.sampled_from([
    f"{CALL_OPEN}not json{CALL_CLOSE}",
    f'{CALL_OPEN}{{"arguments": {{}}}}{CALL_CLOSE}',  # no name
    f'{CALL_OPEN}{{"name": "unknown", "arguments": {{}}}}{CALL_CLOSE}',  # not offered
    f'{CALL_OPEN}{{"name": "f", "arguments": "not json"}}{CALL_CLOSE}',
    f'{CALL_OPEN}{{"name": "f", "arguments": [1]}}{CALL_CLOSE}',
    f'{CALL_OPEN}{{"name": ""}}{CALL_CLOSE}',
    f'{CALL_OPEN}["f"]{CALL_CLOSE}',
    f'{CALL_OPEN}{{"name": "f", "arguments": {{"a": "{CALL_CLOSE}"}}}}{CALL_CLOSE}',
    f'{CALL_OPEN}{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}',
    f'{CALL_OPEN}{{"name": "f", "arguments": {{',  # never closed
])

#: Filler heavy in the characters the parser decides on.
FILLER = st.lists(
    st.sampled_from([
        *"ab <>/_\n`{}\"!é阶 \t",
        "<tool_", "<tool_call", "</tool_call", "tool_call>", "```", "```xml\n", "\n```",
        "```json", "``", "\n\n", "   ",
    ]),
    max_size=8,
).map("".join)

SEGMENTS = st.one_of(FILLER, valid_blocks(), MALFORMED_BLOCKS, st.text(max_size=10),
                     st.sampled_from(["```xml\n", "\n```\n", "```\n", "\n", "Sure:\n"]))


@st.composite
def answers(draw: st.DrawFn) -> str:
    """An answer: text, fences, valid and malformed blocks in any order."""
    return "".join(draw(st.lists(SEGMENTS, max_size=7)))


# --- the properties ------------------------------------------------------------------


@PROPERTY
@given(answer=answers(), data=st.data())
@example(answer=f'```xml\n{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}\n```', data=None)
@example(answer=f'Sure:\n```json\n{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}\n```\nDone',
         data=None)
@example(answer=f'\n```\n{" " * 300}\n```xml\n{CALL_OPEN}{{"name":"f"}}{CALL_CLOSE}', data=None)
@example(answer=f'{CALL_OPEN}{{"name":"f"}}{CALL_CLOSE}\n```\n{" " * 300}!', data=None)
@example(answer=f'{CALL_OPEN}{{"name":"f"}}{CALL_CLOSE}{" " * 300}\n```\n!', data=None)
@example(answer=f'x\n```xml{" " * 300}\n{CALL_OPEN}{{"name":"f"}}{CALL_CLOSE}', data=None)
def test_any_split_gives_the_reference_events(answer: str, data: st.DataObject | None) -> None:
    """For any answer cut into any pieces, the events (text merged) are those of the
    whole-text reference: the same calls, in order, with the same text around them."""
    names = NAMES
    expected = reference(answer, names)
    assert run([answer], names) == expected
    assert run(list(answer), names) == expected
    if data is not None:
        cuts = data.draw(st.lists(st.integers(0, len(answer)), max_size=10), label="cuts")
        assert run(split(answer, cuts), names) == expected


@PROPERTY
@given(answer=st.text(), cuts=st.lists(st.integers(0, 200), max_size=10))
def test_any_text_parses_without_error(answer: str, cuts: list[int]) -> None:
    """Any text, cut anywhere, gives events and never an exception; without a valid block
    among it, the text comes back exactly as it came."""
    for names in (None, NAMES):
        events = run(split(answer, cuts), names)
        assert events == reference(answer, names)
        if not any(isinstance(e, ToolCallDelta) for e in events):
            assert text_of(events) == answer


@PROPERTY
@given(
    parts=st.lists(st.one_of(FILLER, MALFORMED_BLOCKS, st.text(max_size=10)), max_size=6),
    cuts=st.lists(st.integers(0, 300), max_size=10),
)
def test_malformed_blocks_degrade_to_their_raw_text(parts: list[str], cuts: list[int]) -> None:
    """An answer whose blocks are all malformed (bad JSON, no name, a name not offered,
    non-object arguments, a close tag inside a string, no close tag) comes out as text,
    equal to the raw input, whatever the cuts."""
    answer = "".join(parts)
    events = run(split(answer, cuts), NAMES)
    assert [e for e in events if isinstance(e, ToolCallDelta)] == []
    assert text_of(events) == answer


_PLAIN = st.text(st.characters(blacklist_characters="<"), max_size=30)


@PROPERTY
@given(
    prefix=_PLAIN,
    block=valid_blocks(),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    tag_cut=st.integers(0, len(CALL_OPEN) - 1),
)
def test_text_before_a_block_goes_out_before_the_block_ends(
    prefix: str, block: str, cuts: list[int], tag_cut: int
) -> None:
    """Text before a call is emitted as soon as it is fed (here it ends in "!", so none
    of it can be whitespace or a fence waiting to be dropped); only a suffix that may be
    the start of the open tag is held. The call comes out when its close tag does."""
    text = prefix + "!"
    parser = ToolCallParser(NAMES, new_id=counter_ids())
    events: list[Event] = []
    for piece in split(text, cuts):
        events += parser.feed(piece)
    assert merged(events) == [TextDelta(text)]
    assert parser.feed(CALL_OPEN[:tag_cut]) == []  # held: it may be the open tag
    events = parser.feed(block[tag_cut:-1])
    assert events == []  # a block goes out whole, when it is closed
    events = parser.feed(block[-1])
    assert [type(e) for e in events] == [ToolCallDelta, ToolCallDelta]
    assert parser.close() == []


@PROPERTY
@given(prefix=_PLAIN, partial=st.sampled_from(["<", "<tool", "<tool_call"]))
def test_a_false_open_tag_is_released_by_the_next_piece(prefix: str, partial: str) -> None:
    """A suffix that may be the open tag is held only until the next piece shows it is not."""
    parser = ToolCallParser()
    text = prefix + "!"
    assert merged(parser.feed(text + partial)) == [TextDelta(text)]
    assert merged(parser.feed("x")) == [TextDelta(partial + "x")]
    assert parser.close() == []


# --- examples ------------------------------------------------------------------------


def call(index: int, name: str, arguments: str) -> list[Event]:
    return [ToolCallDelta(index, id=f"call_{index}", name=name),
            ToolCallDelta(index, arguments_part=arguments)]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(
            f'{CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n'
            f"{CALL_CLOSE}\n",
            call(0, "get_weather", '{"city":"Paris"}'),
            id="one-call-no-text",
        ),
        pytest.param(
            f'\n{CALL_OPEN}{{"name": "f", "arguments": {{"a": 1}}}}{CALL_CLOSE}\n\n'
            f'{CALL_OPEN}{{"name": "search", "arguments": "{{\\"q\\": \\"x\\"}}"}}{CALL_CLOSE}',
            [*call(0, "f", '{"a":1}'), *call(1, "search", '{"q": "x"}')],
            id="parallel-calls-string-arguments-kept-as-written",
        ),
        pytest.param(
            f'{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}{CALL_OPEN}{{"name": "f", '
            f'"arguments": null}}{CALL_CLOSE}',
            [*call(0, "f", "{}"), *call(1, "f", "{}")],
            id="missing-or-null-arguments",
        ),
        pytest.param(
            f'Let me look.\n{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}\nThen I answer.',
            [TextDelta("Let me look.\n"), *call(0, "f", "{}"), TextDelta("\nThen I answer.")],
            id="text-around-a-call",
        ),
        pytest.param(
            f'```xml\n{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}\n{CALL_OPEN}{{"name": "f"}}'
            f"{CALL_CLOSE}\n```\n",
            [*call(0, "f", "{}"), *call(1, "f", "{}")],
            id="fence-around-blocks-dropped",
        ),
        pytest.param(
            f'Sure:\n```xml\n{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}\n```\nDone.',
            [TextDelta("Sure:\n"), *call(0, "f", "{}"), TextDelta("Done.")],
            id="fence-after-text-dropped",
        ),
        pytest.param(
            f'```python\nx = 1\n```\n{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}',
            [TextDelta("```python\nx = 1\n```\n"), *call(0, "f", "{}")],
            id="code-block-before-a-call-kept",
        ),
        pytest.param(
            f'{CALL_OPEN}{{"name": "nope"}}{CALL_CLOSE}\n{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}',
            [TextDelta(f'{CALL_OPEN}{{"name": "nope"}}{CALL_CLOSE}\n'), *call(0, "f", "{}")],
            id="unknown-name-is-text",
        ),
        pytest.param(" \n\n ", [TextDelta(" \n\n ")], id="whitespace-answer-kept"),
        pytest.param("```\n", [TextDelta("```\n")], id="fence-answer-kept"),
        pytest.param(
            f'{CALL_OPEN}{{"name": "f"}}',
            [TextDelta(f'{CALL_OPEN}{{"name": "f"}}')],
            id="unclosed-block-is-text",
        ),
        pytest.param(
            f'{CALL_OPEN}{{"name": "f", "arguments": {"{" * 300}{"}" * 300}}}{CALL_CLOSE}',
            [TextDelta(f'{CALL_OPEN}{{"name": "f", "arguments": {"{" * 300}{"}" * 300}}}'
                       f"{CALL_CLOSE}")],
            id="unwritable-nesting-is-text",
        ),
    ],
)
def test_answers(answer: str, expected: list[Event]) -> None:
    """Known answers give known events, whole and one character at a time."""
    assert run([answer], NAMES) == expected
    assert run(list(answer), NAMES) == expected


def test_deep_but_writable_arguments_are_a_call() -> None:
    """Arguments nested 100 levels are written back compactly."""
    nested = '{"a":' * 100 + "1" + "}" * 100
    answer = f'{CALL_OPEN}{{"name": "f", "arguments": {nested}}}{CALL_CLOSE}'
    assert run([answer], NAMES) == call(0, "f", nested)


def test_names_none_accepts_any_name() -> None:
    """Without ``names``, any non-empty name is a call."""
    answer = f'{CALL_OPEN}{{"name": "anything"}}{CALL_CLOSE}'
    assert run([answer]) == call(0, "anything", "{}")


def test_whitespace_between_calls_waits_for_the_next_block() -> None:
    """Whitespace after a call is held: the next call shows it was only a separator."""
    parser = ToolCallParser(new_id=counter_ids())
    first = parser.feed(f'{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}\n')
    assert first == call(0, "f", "{}")
    assert parser.feed("\n  ") == []
    assert parser.feed(f'{CALL_OPEN}{{"name": "g"}}{CALL_CLOSE}') == call(1, "g", "{}")
    assert parser.close() == []
    assert parser.calls == 2


def test_feed_after_close_raises_and_close_is_idempotent() -> None:
    """Feeding a closed parser is a bug in the caller; closing twice is harmless."""
    parser = ToolCallParser()
    assert parser.feed("hi") == [TextDelta("hi")]
    assert parser.close() == []
    assert parser.close() == []
    with pytest.raises(LocalProtocolError):
        parser.feed("more")


def test_default_call_id_looks_like_openai_ids() -> None:
    """Ids are ``call_`` and 24 lowercase hex digits, fresh each time."""
    ids = {default_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


def test_parser_uses_default_ids() -> None:
    """A parser built without ``new_id`` gives OpenAI-style ids."""
    parser = ToolCallParser()
    first, _ = parser.feed(f'{CALL_OPEN}{{"name": "f"}}{CALL_CLOSE}')
    assert isinstance(first, ToolCallDelta)
    assert re.fullmatch(r"call_[0-9a-f]{24}", first.id)


# --- rendering ---------------------------------------------------------------------

WEATHER = ToolSpec(
    "get_weather",
    "Current weather of a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def text_message(role: str, text: str) -> Message:
    return Message(role, (ContentPart("text", text=text),), False)


def request(messages: list[Message], **fields: Any) -> ChatRequest:
    return ChatRequest("m", tuple(messages), False, False, None, None, **fields)


def test_render_tools_history_and_results() -> None:
    """Tools, an earlier call and its results become the exact prompt of the convention:
    the tools instruction first, the call as a block, the results in one user message."""
    req = request(
        [
            text_message("system", "Be brief."),
            text_message("user", "Weather in Paris and Rome?"),
            Message("assistant", (), False, tool_calls=(
                ToolCall("call_a", "get_weather", '{"city": "Paris"}'),
                ToolCall("call_b", "get_weather", "city=Rome"),
            )),
            Message("tool", (ContentPart("text", text="18 C"),), False, tool_call_id="call_a"),
            Message("tool", (ContentPart("text", text="21 C"),), False, tool_call_id="call_b",
                    name="get_weather"),
            text_message("user", "Thanks. Which is warmer?"),
        ],
        tools=(WEATHER, ToolSpec("now")),
    )
    assert needs_rendering(req)
    rendered = render_agent_prompt(req)
    assert rendered.tools == req.tools
    assert rendered.tool_choice == req.tool_choice
    assert [(m.role, m.text) for m in rendered.messages] == [
        ("system",
         "# Tools\n"
         "You can call functions to answer. They are listed inside <tools></tools>, one JSON "
         "object per line:\n"
         "<tools>\n"
         '{"name":"get_weather","description":"Current weather of a city.","parameters":'
         '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}\n'
         '{"name":"now"}\n'
         "</tools>\n"
         "To call a function, write one block per call, with JSON inside and nothing else in "
         "the block:\n"
         '<tool_call>{"name": "<function name>", "arguments": {<the arguments>}}</tool_call>\n'
         "Several blocks mean several calls made at once. After your calls, stop: the results "
         "come back in <tool_response> blocks.\n"
         "Call a function only when it helps; otherwise answer in plain text."),
        ("system", "Be brief."),
        ("user", "Weather in Paris and Rome?"),
        ("assistant",
         '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>\n'
         '<tool_call>{"name":"get_weather","arguments":"city=Rome"}</tool_call>'),
        ("user",
         '<tool_response name="get_weather" id="call_a">\n18 C\n</tool_response>\n'
         '<tool_response name="get_weather" id="call_b">\n21 C\n</tool_response>'),
        ("user", "Thanks. Which is warmer?"),
    ]
    assert all(not m.tool_calls and m.role not in ("tool", "function")
               for m in rendered.messages)


TOOLS_USAGE_TEXT = (
    "To call a function, write one block per call, with JSON inside and nothing else in the "
    "block:\n"
    '<tool_call>{"name": "<function name>", "arguments": {<the arguments>}}</tool_call>\n'
    "Several blocks mean several calls made at once. After your calls, stop: the results come "
    "back in <tool_response> blocks."
)


def test_render_json_schema_after_tools_with_named_choice() -> None:
    """A named tool_choice gets its line; the schema instruction follows the tools one."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    req = request(
        [text_message("user", "go")],
        tools=(ToolSpec("now"),),
        tool_choice=ToolChoice("function", "now"),
        response_format=ResponseFormat("json_schema", schema, "answer", strict=True),
    )
    first, second, user = render_agent_prompt(req).messages
    assert first.text.endswith(
        '\n{"name":"now"}\n</tools>\n' + TOOLS_USAGE_TEXT
        + '\nYou must call the function "now" now, and no other.'
    )
    assert second == text_message(
        "system",
        "Answer with one JSON document only: no prose before or after it, no Markdown code "
        "fence.\nIt must satisfy this JSON Schema:\n<json_schema>\n"
        '{"type":"object","properties":{"n":{"type":"integer"}}}\n</json_schema>',
    )
    assert user == req.messages[0]


def test_render_required_choice_and_json_object() -> None:
    """``required`` gets its line; json_object asks for an object."""
    req = request(
        [text_message("user", "go")],
        tools=(ToolSpec("now"),),
        tool_choice=ToolChoice("required"),
        response_format=ResponseFormat("json_object"),
    )
    tools, json_message, _ = render_agent_prompt(req).messages
    assert tools.text.endswith("\nYou must call at least one function now.")
    assert json_message.text == (
        "Answer with one JSON document only: no prose before or after it, no Markdown code "
        "fence.\nThe document must be a JSON object."
    )


def test_render_choice_none_keeps_the_history_only() -> None:
    """With tool_choice "none" no tools are offered, but earlier calls and results are
    still rendered; assistant content comes before its blocks."""
    req = request(
        [
            text_message("user", "hi"),
            Message("assistant", (ContentPart("text", text="Checking."),), False,
                    tool_calls=(ToolCall("c1", "now", "{}"),)),
            Message("function", (ContentPart("text", text="noon"),), False, name="now"),
        ],
        tools=(ToolSpec("now"),),
        tool_choice=ToolChoice("none"),
    )
    assert needs_rendering(req)
    assert [(m.role, m.text) for m in render_agent_prompt(req).messages] == [
        ("user", "hi"),
        ("assistant", 'Checking.\n<tool_call>{"name":"now","arguments":{}}</tool_call>'),
        ("user", '<tool_response name="now" id="">\nnoon\n</tool_response>'),
    ]


def test_render_keeps_files_of_user_and_tool_messages() -> None:
    """Image and file parts of user messages are kept as they are, and those of tool
    results are kept on the merged results message."""
    image = ContentPart("image_url", url="https://example.com/a.png")
    file = ContentPart("file", url="data:text/plain;base64,aGk=", name="a.txt")
    user = Message("user", (ContentPart("text", text="look"), image), True)
    req = request(
        [
            user,
            Message("assistant", (), False, tool_calls=(ToolCall("c1", "read", "{}"),)),
            Message("tool", (ContentPart("text", text="here"), file), True, tool_call_id="c1"),
        ],
        tools=(ToolSpec("read"),),
    )
    _, kept, _, results = render_agent_prompt(req).messages
    assert kept is user
    assert results.role == "user"
    assert results.parts == (
        ContentPart("text", text='<tool_response name="read" id="c1">\nhere\n</tool_response>'),
        file,
    )
    assert results.is_list


def test_needs_rendering() -> None:
    """Only tools offered, tool history or structured output need rendering."""
    plain = [text_message("user", "hi")]
    assert not needs_rendering(request(plain))
    assert not needs_rendering(request(plain, tools=(ToolSpec("f"),),
                                       tool_choice=ToolChoice("none")))
    assert not needs_rendering(request(plain, stop=("x",), max_tokens=3))
    assert needs_rendering(request(plain, tools=(ToolSpec("f"),)))
    assert needs_rendering(request(plain, response_format=ResponseFormat("json_object")))
    assert needs_rendering(request([Message("tool", (), False, tool_call_id="c")]))
    history = Message("assistant", (), False, tool_calls=(ToolCall("c", "f", "{}"),))
    assert needs_rendering(request([history]))


def test_rendered_call_blocks_parse_back() -> None:
    """A call rendered into the history is a block the parser reads back as that call."""
    req = request([Message("assistant", (), False,
                           tool_calls=(ToolCall("c", "f", '{"x": [1, 2]}'),))])
    (assistant,) = render_agent_prompt(req).messages
    assert run([assistant.text]) == call(0, "f", '{"x":[1,2]}')
