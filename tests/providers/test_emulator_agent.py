"""Tests of the emulators' scripted agent (providers/emulator_agent.py) and its two hooks.

Prompts are built the way the relay builds them: neutral messages written in
the issue-14 prompt convention, merged by the real providers' ``build_prompt``
(StepChat's ``role:text`` lines, ChatGLM's tags and its pass-through text).
Then both emulators are driven over loopback, as their own tests do, to see a
``<tool_call>`` block arrive split across frames.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import httpcore
import jsonschema
import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.openai import ContentPart, Message
from providers.emulator_agent import (
    PromptMessage,
    agent_answer,
    read_prompt,
    schema_instance,
    split_prompt,
)
from providers.glm import prompt as glm_prompt
from providers.glm.emulator import GlmEmulator
from providers.step import prompt as step_prompt
from providers.step.emulator import StepEmulator
from tests.providers.glm.test_emulator import TOKENS, answer_of, chat, chat_body, login, sse_events
from tests.providers.step.test_emulator import (
    USER_TOKEN,
    Client,
    decode,
    ready,
    stream_reply,
    texts,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

# ---------------------------------------------------------------- the convention

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "description": "The time in a zone.", "parameters": {"type": "object"}}
AUTO = "Call a function only when it helps; otherwise answer in plain text."
REQUIRED = "You must call at least one function now."


def named(name: str) -> str:
    """The named tool choice line."""
    return f'You must call the function "{name}" now, and no other.'


def tools_instruction(tools: Sequence[dict[str, Any]], choice: str = AUTO) -> str:
    """The tools system text of the convention, with one choice line."""
    listed = "\n".join(orjson.dumps(tool).decode() for tool in tools)
    return (
        "# Tools\n"
        "You can call functions to answer. They are listed inside <tools></tools>,"
        " one JSON object per line:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a function, write one block per call, with JSON inside and nothing else"
        " in the block:\n"
        '<tool_call>{"name": "<function name>", "arguments": {<the arguments>}}</tool_call>\n'
        "Several blocks mean several calls made at once. After your calls, stop: the results"
        " come back in <tool_response> blocks.\n"
        f"{choice}"
    )


def json_instruction(schema: object = None) -> str:
    """The structured-output system text: json_object without a schema, else json_schema."""
    head = "Answer with one JSON document only: no prose before or after it,"
    head += " no Markdown code fence."
    if schema is None:
        return head + "\nThe document must be a JSON object."
    compact = orjson.dumps(schema).decode()
    return f"{head}\nIt must satisfy this JSON Schema:\n<json_schema>\n{compact}\n</json_schema>"


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """An assistant's earlier call, as the convention writes it back."""
    payload = orjson.dumps({"name": name, "arguments": arguments}).decode()
    return f"<tool_call>{payload}</tool_call>"


def response_text(*results: tuple[str, str, str]) -> str:
    """Tool results ``(name, id, content)`` as one user text."""
    return "\n".join(
        f'<tool_response name="{name}" id="{call_id}">\n{content}\n</tool_response>'
        for name, call_id, content in results
    )


def msg(role: str, text: str) -> Message:
    """A neutral message with one text part."""
    return Message(role, (ContentPart("text", text=text),), False)


def block(name: str, arguments: object) -> str:
    """The block the emulator writes: its own spacing, compact arguments."""
    return (
        f'<tool_call>{{"name": {orjson.dumps(name).decode()}, '
        f'"arguments": {orjson.dumps(arguments).decode()}}}</tool_call>'
    )


def step_merge(messages: Sequence[Message]) -> str:
    """StepChat's merged prompt."""
    return step_prompt.build_prompt(messages)


def glm_merge(messages: Sequence[Message]) -> str:
    """ChatGLM's merged prompt (tags)."""
    return glm_prompt.build_prompt(messages, reuse=False)


def glm_reference_merge(messages: Sequence[Message]) -> str:
    """ChatGLM's merged prompt with the reference's system tag spelling."""
    return glm_prompt.build_prompt(messages, reuse=False, system_tag="<|sytstem|>")


def glm_pass_through(messages: Sequence[Message]) -> str:
    """ChatGLM's pass-through text (a continued conversation): no tags at all."""
    return glm_prompt.build_prompt(messages, reuse=True)


MERGED = [step_merge, glm_merge, glm_reference_merge]
EVERY_SHAPE = [*MERGED, glm_pass_through]


def document(answer: str | None) -> Any:
    """The JSON document inside a scripted JSON answer (which must have the fenced form)."""
    assert answer is not None
    match = re.fullmatch(r"Here is the JSON:\n```json\n(.*)\n```\n", answer, re.DOTALL)
    assert match is not None, answer
    return orjson.loads(match.group(1))


# ---------------------------------------------------------------- splitting


def test_step_prompt_splits_into_messages_with_multi_line_texts() -> None:
    """A StepChat prompt comes back as its messages: a text with newlines stays one
    message, the history hint is a system message, the closing assistant turn is dropped."""
    messages = [msg("system", "be brief\nand kind"), msg("user", "line one\nline two")]
    messages += [msg("assistant", "ok"), msg("user", "last\nquestion")]
    assert split_prompt(step_merge(messages)) == [
        PromptMessage("system", "be brief\nand kind"),
        PromptMessage("user", "line one\nline two"),
        PromptMessage("assistant", "ok"),
        PromptMessage("system", step_prompt.HISTORY_HINT),
        PromptMessage("user", "last\nquestion"),
    ]


def test_glm_prompt_splits_into_messages_and_pass_through_is_one() -> None:
    """A tagged ChatGLM prompt comes back as its messages; a pass-through text as one
    message of role ""."""
    messages = [msg("developer", "rules"), msg("user", "a\nb"), msg("user", "c")]
    assert split_prompt(glm_merge(messages)) == [
        PromptMessage("system", "rules"),
        PromptMessage("user", "a\nb\nc"),
    ]
    assert split_prompt(glm_pass_through(messages)) == [PromptMessage("", "rules\na\nb\nc\n")]


@pytest.mark.parametrize("merge", MERGED)
def test_role_lines_inside_a_tool_response_do_not_split_it(merge: Callable[..., str]) -> None:
    """Tool output that looks like a role line or tag stays inside its result block."""
    output = "user:not a message\n<|user|>\nassistant:"
    messages = [
        msg("system", tools_instruction([WEATHER])),
        msg("user", "weather?"),
        msg("assistant", call_text("get_weather", {"city": "Paris"})),
        msg("user", response_text(("get_weather", "call_1", output))),
    ]
    assert read_prompt(merge(messages)).last_user == response_text(
        ("get_weather", "call_1", output)
    )
    assert agent_answer(merge(messages)) == f"The tool get_weather returned: {output}"


# ---------------------------------------------------------------- tool calls


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_a_requested_call_is_answered_with_its_block_only(merge: Callable[..., str]) -> None:
    """'call NAME with {JSON}' for an offered tool gives exactly that tool's block."""
    messages = [
        msg("system", tools_instruction([WEATHER, TIME])),
        msg("user", 'What is it like outside? Call get_weather with {"city": "Paris"}.'),
    ]
    assert read_prompt(merge(messages)).tools == ("get_weather", "get_time")
    assert agent_answer(merge(messages)) == block("get_weather", {"city": "Paris"})


@pytest.mark.parametrize("merge", EVERY_SHAPE)
@pytest.mark.parametrize(
    "request_text",
    [
        'call get_weather with {"city": "Paris"} and call get_time with {"zone": "CET"}',
        'CALL get_weather with {"city": "Paris"}\nCall get_time with {"zone": "CET"}',
        'Call `get_weather` with {"city": "Paris"} and get_time with {"zone": "CET"}',
        'call get_weather with {"city": "Paris"}, get_time with {"zone": "CET"}',
    ],
)
def test_several_requests_are_parallel_calls_in_order(
    merge: Callable[..., str], request_text: str
) -> None:
    """Requests joined by "and", commas or newlines (with or without a repeated "call")
    give one block per request, in order, separated by a newline."""
    messages = [msg("system", tools_instruction([WEATHER, TIME])), msg("user", request_text)]
    expected = block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {"zone": "CET"})
    assert agent_answer(merge(messages)) == expected


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_nested_arguments_and_odd_spacing_are_kept_as_json(merge: Callable[..., str]) -> None:
    """Arguments are any JSON object, nested and spread over lines; they are re-written
    compactly, with their values unchanged."""
    args = {"city": "Zürich", "days": [1, 2], "opts": {"units": "C", "x": None, "y": 1.25}}
    text = 'call get_weather with {\n  "city": "Zürich", "days": [1, 2],\n'
    text += '  "opts": {"units": "C", "x": null, "y": 1.25}\n}'
    messages = [msg("system", tools_instruction([WEATHER])), msg("user", text)]
    answer = agent_answer(merge(messages))
    assert answer == block("get_weather", args)
    inner = re.fullmatch(r"<tool_call>(.*)</tool_call>", answer or "")
    assert inner is not None
    assert orjson.loads(inner.group(1)) == {"name": "get_weather", "arguments": args}


@pytest.mark.parametrize("merge", EVERY_SHAPE)
@pytest.mark.parametrize(
    "request_text",
    [
        'call get_news with {"topic": "rain"}',  # not an offered tool
        "call get_weather with [1, 2]",  # not an object
        'call get_weather with {"city": ',  # not JSON
        "What is the weather in Paris?",  # no request
    ],
)
def test_no_valid_request_under_auto_choice_is_not_an_agent_answer(
    merge: Callable[..., str], request_text: str
) -> None:
    """With tools offered under the auto choice, a text without a valid request for an
    offered tool gets None (the demo answer)."""
    messages = [msg("system", tools_instruction([WEATHER])), msg("user", request_text)]
    assert agent_answer(merge(messages)) is None


@pytest.mark.parametrize("merge", MERGED)
def test_only_the_last_user_message_is_read_for_requests(merge: Callable[..., str]) -> None:
    """A request in an earlier user message is history: it is not called again."""
    messages = [
        msg("system", tools_instruction([WEATHER])),
        msg("user", 'call get_weather with {"city": "Paris"}'),
        msg("assistant", "It is sunny."),
        msg("user", "Thanks, and what should I wear?"),
    ]
    assert agent_answer(merge(messages)) is None


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_required_choice_calls_the_first_tool_without_a_request(
    merge: Callable[..., str],
) -> None:
    """'You must call at least one function now.' and no request: the first tool with {}."""
    messages = [msg("system", tools_instruction([WEATHER, TIME], REQUIRED)), msg("user", "hi")]
    assert agent_answer(merge(messages)) == block("get_weather", {})


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_named_choice_calls_that_tool_and_no_other(merge: Callable[..., str]) -> None:
    """A named choice calls its tool: with the requested arguments when the user asked
    for it, with {} when the user asked for nothing or for another tool."""
    system = msg("system", tools_instruction([WEATHER, TIME], named("get_time")))
    asked = msg("user", 'call get_time with {"zone": "UTC"}')
    other = msg("user", 'call get_weather with {"city": "Oslo"}')
    assert agent_answer(merge([system, asked])) == block("get_time", {"zone": "UTC"})
    assert agent_answer(merge([system, other])) == block("get_time", {})
    assert agent_answer(merge([system, msg("user", "hello")])) == block("get_time", {})


# ---------------------------------------------------------------- tool results


def loop_messages(choice: str = AUTO) -> list[Message]:
    """A tool loop's second request: the calls and their results came back."""
    calls = [call_text("get_weather", {"city": "Paris"}), call_text("get_time", {"zone": "CET"})]
    results = [("get_weather", "call_a", "  sunny, 21 °C \n"), ("get_time", "call_b", "12:00")]
    return [
        msg("system", tools_instruction([WEATHER, TIME], choice)),
        msg("user", 'call get_weather with {"city": "Paris"} and get_time with {"zone": "CET"}'),
        msg("assistant", "\n".join(calls)),
        msg("user", response_text(*results)),
    ]


LOOP_ANSWER = "The tool get_weather returned: sunny, 21 °C The tool get_time returned: 12:00"


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_tool_results_are_answered_in_plain_text(merge: Callable[..., str]) -> None:
    """Results coming back give one sentence per result, content stripped, in order."""
    assert agent_answer(merge(loop_messages())) == LOOP_ANSWER


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_tool_results_end_a_required_loop(merge: Callable[..., str]) -> None:
    """With a required or named choice, results are still answered in text: a loop
    that keeps sending the choice ends instead of calling forever."""
    assert agent_answer(merge(loop_messages(REQUIRED))) == LOOP_ANSWER
    assert agent_answer(merge(loop_messages(named("get_time")))) == LOOP_ANSWER


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_results_without_tools_offered_are_answered_too(merge: Callable[..., str]) -> None:
    """A follow-up with tool_choice none (no tools instruction) still reads the results."""
    messages = [msg("user", response_text(("lookup", "call_9", "42")))]
    messages.insert(0, msg("assistant", call_text("lookup", {})))
    assert agent_answer(merge(messages)) == "The tool lookup returned: 42"


# ---------------------------------------------------------------- structured output


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_json_object_answers_the_last_user_text_in_a_fence(merge: Callable[..., str]) -> None:
    """json_object without a schema: the shortened last user text under "answer", in
    prose and a json fence, the document indented."""
    long_text = "Tell me about Paris. " + "x" * 200
    messages = [msg("system", json_instruction()), msg("user", long_text)]
    answer = agent_answer(merge(messages))
    quoted = " ".join(long_text.split())[:119] + "…"
    doc = orjson.dumps({"answer": quoted}, option=orjson.OPT_INDENT_2).decode()
    assert answer == f"Here is the JSON:\n```json\n{doc}\n```\n"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 10},
        "age": {"type": "integer", "minimum": 50, "maximum": 60},
        "score": {"type": "number", "exclusiveMaximum": 1},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user"]},
        "kind": {"const": "person"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "nick": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
        "active": {"type": "boolean"},
        "nothing": {"type": "null"},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}
PYDANTIC = {
    "$defs": {
        "Pet": {
            "properties": {
                "name": {"title": "Name", "type": "string"},
                "species": {"$ref": "#/$defs/Species"},
            },
            "required": ["name", "species"],
            "title": "Pet",
            "type": "object",
        },
        "Species": {"enum": ["cat", "dog"], "title": "Species", "type": "string"},
    },
    "properties": {
        "owner": {"title": "Owner", "type": "string"},
        "pets": {"items": {"$ref": "#/$defs/Pet"}, "title": "Pets", "type": "array"},
        "best": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}], "default": None},
    },
    "required": ["owner", "pets"],
    "title": "Household",
    "type": "object",
}
RECURSIVE = {
    "definitions": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer", "multipleOf": 5},
                "next": {"anyOf": [{"$ref": "#/definitions/node"}, {"type": "null"}]},
                "children": {"type": "array", "items": {"$ref": "#/definitions/node"}},
            },
            "required": ["value", "next"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/definitions/node",
}
COMBINED = {
    "allOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"properties": {"b": {"type": ["string", "null"]}}, "required": ["b"]},
    ],
    "properties": {
        "shape": {
            "oneOf": [
                {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"]},
                {"type": "string"},
            ]
        },
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
        "when": {"type": "string", "format": "date-time"},
    },
}


@pytest.mark.parametrize("merge", EVERY_SHAPE)
@pytest.mark.parametrize("schema", [PERSON, PYDANTIC, RECURSIVE, COMBINED])
def test_json_schema_answers_a_valid_instance(merge: Callable[..., str], schema: Any) -> None:
    """With a schema the document satisfies it (formats checked too): enums, consts,
    bounds, $defs and definitions refs, recursion, allOf, anyOf/oneOf, tuples."""
    messages = [msg("system", json_instruction(schema)), msg("user", "a household, please")]
    doc = document(agent_answer(merge(messages)))
    jsonschema.validate(doc, schema, format_checker=jsonschema.FormatChecker())


def test_schema_instance_values_are_the_documented_ones() -> None:
    """Every property is filled: strings "example" (padded to minLength), integers 42
    moved into bounds, numbers 1.5 moved into bounds, one array item, enum/const first."""
    assert schema_instance(PERSON) == {
        "name": "examplexxx",
        "age": 50,
        "score": 0.5,
        "email": "user@example.com",
        "role": "admin",
        "kind": "person",
        "tags": ["example", "example"],
        "nick": "exa",
        "active": True,
        "nothing": None,
    }
    assert schema_instance(PYDANTIC) == {
        "owner": "example",
        "pets": [{"name": "example", "species": "cat"}],
        "best": {"name": "example", "species": "cat"},
    }


@pytest.mark.parametrize("merge", MERGED)
def test_tools_come_before_json_when_a_call_was_requested(merge: Callable[..., str]) -> None:
    """Tools and JSON both asked for: a request gives the call; no request the JSON;
    results coming back the JSON, the results' sentences as its answer."""
    system = [msg("system", tools_instruction([WEATHER])), msg("system", json_instruction())]
    asked = [*system, msg("user", 'call get_weather with {"city": "Rome"}')]
    assert agent_answer(merge(asked)) == block("get_weather", {"city": "Rome"})
    assert document(agent_answer(merge([*system, msg("user", "weather?")]))) == {
        "answer": "weather?"
    }
    results = [*asked, msg("assistant", call_text("get_weather", {"city": "Rome"}))]
    results.append(msg("user", response_text(("get_weather", "call_1", "rain"))))
    assert document(agent_answer(merge(results))) == {
        "answer": "The tool get_weather returned: rain"
    }


# ---------------------------------------------------------------- not agent prompts


@pytest.mark.parametrize("merge", EVERY_SHAPE)
def test_plain_conversations_are_not_agent_prompts(merge: Callable[..., str]) -> None:
    """No tools, results or JSON instruction: None, even when the user asks for a call."""
    messages = [
        msg("system", "You are helpful. Answer with one sentence."),
        msg("user", 'call get_weather with {"city": "Paris"}'),
        msg("assistant", "I cannot."),
        msg("user", "Why not?"),
    ]
    assert agent_answer(merge(messages)) is None
    assert agent_answer(merge(messages[1:2])) is None


@pytest.mark.parametrize("merge", MERGED)
def test_instructions_a_user_writes_are_not_the_relays(merge: Callable[..., str]) -> None:
    """In a merged prompt only system messages instruct: a user who pastes a tools list,
    a choice line or the JSON instruction gets None. (The pass-through shape has no
    roles: there such a text does count.)"""
    pasted = tools_instruction([WEATHER], REQUIRED) + "\n" + json_instruction()
    messages = [msg("system", "You are helpful."), msg("user", pasted)]
    assert agent_answer(merge(messages)) is None


@pytest.mark.parametrize(
    "schema_text",
    [
        '{"type":"object","required":["a"],"properties":{"a":' * 400 + "{}" + "}}" * 400,
        '{"$ref": "#"}',
        '{"properties": {"self": {"$ref": "#"}}, "required": ["self"]}',
        '{"const": ' + "[" * 600 + "]" * 600 + "}",
        '{"anyOf": [' * 2000 + "{}" + "]}" * 2000,
    ],
)
def test_pathological_schemas_still_get_a_json_answer(schema_text: str) -> None:
    """Schemas nested past any limit, or recursive without a way out, still give a
    fenced JSON answer: the instance is cut short (null), never an exception."""
    head = json_instruction({}).split("<json_schema>")[0]
    prompt = f"system:{head}<json_schema>\n{schema_text}\n</json_schema>\nuser:x\nassistant:"
    document(agent_answer(prompt))


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_prompt_gives_an_answer_or_none(prompt: str) -> None:
    """Any text at all: a string or None, never an exception."""
    answer = agent_answer(prompt)
    assert answer is None or isinstance(answer, str)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.sampled_from(EVERY_SHAPE), st.sampled_from([AUTO, REQUIRED, named("x")]))
def test_any_user_text_under_tools_and_json_gives_an_answer_or_none(
    text: str, merge: Callable[..., str], choice: str
) -> None:
    """Any user text in an agent prompt: a string or None, never an exception."""
    messages = [
        msg("system", tools_instruction([WEATHER], choice)),
        msg("system", json_instruction(PERSON)),
        msg("user", text),
    ]
    answer = agent_answer(merge(messages))
    assert answer is None or isinstance(answer, str)


def _bounded_integers() -> st.SearchStrategy[dict[str, Any]]:
    def build(low: int, width: int, keys: tuple[str | None, str | None], step: int | None) -> Any:
        schema: dict[str, Any] = {"type": "integer"}
        if keys[0] is not None:
            schema[keys[0]] = low
        if keys[1] is not None:
            schema[keys[1]] = low + width
        if step is not None:
            schema["multipleOf"] = step
            if keys[0] is not None and keys[1] is not None:
                schema[keys[1]] = low + max(width, 2 * step + 2)
        return schema

    lows = st.sampled_from([None, "minimum", "exclusiveMinimum"])
    highs = st.sampled_from([None, "maximum", "exclusiveMaximum"])
    return st.builds(
        build,
        st.integers(-1000, 1000),
        st.integers(2, 200),
        st.tuples(lows, highs),
        st.none() | st.integers(1, 9),
    )


def _bounded_numbers() -> st.SearchStrategy[dict[str, Any]]:
    def build(low: float, width: float, keys: tuple[str | None, str | None]) -> Any:
        schema: dict[str, Any] = {"type": "number"}
        if keys[0] is not None:
            schema[keys[0]] = low
        if keys[1] is not None:
            schema[keys[1]] = low + width
        return schema

    lows = st.sampled_from([None, "minimum", "exclusiveMinimum"])
    highs = st.sampled_from([None, "maximum", "exclusiveMaximum"])
    return st.builds(
        build,
        st.floats(-1e6, 1e6),
        st.floats(0.001, 1e3),
        st.tuples(lows, highs),
    )


def _strings() -> st.SearchStrategy[dict[str, Any]]:
    def build(low: int | None, width: int | None) -> Any:
        schema: dict[str, Any] = {"type": "string"}
        if low is not None:
            schema["minLength"] = low
        if width is not None:
            schema["maxLength"] = (low or 0) + width
        return schema

    return st.builds(build, st.none() | st.integers(0, 20), st.none() | st.integers(0, 20))


JSON_SCALARS = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5)
LEAVES = st.one_of(
    _strings(),
    _bounded_integers(),
    _bounded_numbers(),
    st.sampled_from([{"type": "boolean"}, {"type": "null"}, {}, {"format": "email"}]),
    st.lists(JSON_SCALARS, min_size=1, max_size=3).map(lambda values: {"enum": values}),
    JSON_SCALARS.map(lambda value: {"const": value}),
)


def _children(child: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    names = st.sampled_from(["a", "b", "c", "d"])

    def obj(props: dict[str, Any], required: list[str], closed: bool) -> Any:
        return {
            "type": "object",
            "properties": props,
            "required": [name for name in required if name in props],
            "additionalProperties": not closed,
        }

    def arr(items: Any, low: int, extra: int | None) -> Any:
        schema: dict[str, Any] = {"type": "array", "items": items, "minItems": low}
        if extra is not None:
            schema["maxItems"] = low + extra
        return schema

    return st.one_of(
        st.builds(obj, st.dictionaries(names, child, max_size=4), st.lists(names), st.booleans()),
        st.builds(arr, child, st.integers(0, 3), st.none() | st.integers(0, 2)),
        st.lists(child, min_size=1, max_size=3).map(lambda branches: {"anyOf": branches}),
        child.filter(lambda s: isinstance(s.get("type"), str)).map(
            lambda s: {**s, "type": [s["type"], "null"]}
        ),
    )


SCHEMAS = st.recursive(LEAVES, _children, max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(SCHEMAS)
def test_schema_instances_satisfy_random_schemas(schema: dict[str, Any]) -> None:
    """Nested objects, arrays, anyOf, nullable types, enums, consts, bounded integers
    (with multipleOf), bounded numbers (exclusive too) and string lengths: the instance
    is valid (draft 2020-12, formats checked)."""
    instance = schema_instance(schema)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(
        instance
    )


# ---------------------------------------------------------------- the emulators over HTTP

TOOLS_PROMPT = [
    msg("system", tools_instruction([WEATHER, TIME])),
    msg("user", 'Call get_weather with {"city": "Paris"}'),
]
TOOLS_ANSWER = block("get_weather", {"city": "Paris"})


@pytest.fixture
async def step_emulator(nursery: trio.Nursery) -> StepEmulator:
    """A running StepChat emulator in demo mode (no scripted answer)."""
    emulator = StepEmulator(tokens=[USER_TOKEN])
    await nursery.start(emulator.serve)
    return emulator


@pytest.fixture
async def step_client(step_emulator: StepEmulator) -> AsyncIterator[Client]:
    """A raw client of ``step_emulator``."""
    stream = await trio.open_tcp_stream("127.0.0.1", step_emulator.port)
    async with stream:
        yield Client(stream)


async def test_step_emulator_streams_a_call_split_across_frames(step_client: Client) -> None:
    """StepChat: a tool prompt (merged by the real build_prompt) streams the call block in
    several textEvent frames of chunk_chars characters that join to the block."""
    with trio.fail_after(5):
        session, chat_id = await ready(step_client)
        reply = await stream_reply(step_client, session, chat_id, step_merge(TOOLS_PROMPT))
    frames = texts(decode(reply.body))
    assert "".join(frames) == TOOLS_ANSWER
    assert len(frames) > 2
    assert all(len(frame) <= 6 for frame in frames)


async def test_step_emulator_scripted_answer_wins(
    step_emulator: StepEmulator, step_client: Client
) -> None:
    """StepChat: a test's behavior.answer is sent even for an agent prompt."""
    step_emulator.behavior.answer = "scripted"
    with trio.fail_after(5):
        session, chat_id = await ready(step_client)
        reply = await stream_reply(step_client, session, chat_id, step_merge(TOOLS_PROMPT))
    assert "".join(texts(decode(reply.body))) == "scripted"


@pytest.fixture
async def glm_emulator(nursery: trio.Nursery) -> AsyncIterator[GlmEmulator]:
    """A running ChatGLM emulator in demo mode (no scripted answer)."""
    emulator = GlmEmulator(tokens=TOKENS)
    await nursery.start(emulator.serve)
    yield emulator
    assert emulator.record.handler_errors == []


@pytest.fixture
async def pool() -> AsyncIterator[httpcore.AsyncConnectionPool]:
    """An httpcore pool for the ChatGLM calls."""
    async with httpcore.AsyncConnectionPool() as connection_pool:
        yield connection_pool


async def test_glm_emulator_streams_a_call_split_across_snapshots(
    glm_emulator: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """ChatGLM: a tool prompt (merged by the real build_prompt) grows the call block over
    several snapshots, some of them ending inside the block, and ends with the whole block,
    without citation markers even when search results are scripted."""
    glm_emulator.behavior.search_results = [("Weather", "https://example.com/")]
    with trio.fail_after(5):
        access = await login(pool, glm_emulator)
        response = await chat(pool, glm_emulator, access, chat_body(glm_merge(TOOLS_PROMPT)))
    events = sse_events(response.content)
    assert answer_of(events) == TOOLS_ANSWER
    snapshots = [
        item["text"]
        for event in events
        for part in event["parts"]
        for item in part["content"]
        if item["type"] == "text"
    ]
    partial = [text for text in snapshots if text != TOOLS_ANSWER]
    assert len(partial) > 2
    assert all(TOOLS_ANSWER.startswith(text) for text in partial)


async def test_glm_emulator_scripted_answer_wins(
    glm_emulator: GlmEmulator, pool: httpcore.AsyncConnectionPool
) -> None:
    """ChatGLM: a test's behavior.answer is sent even for an agent prompt."""
    glm_emulator.behavior.answer = "scripted"
    with trio.fail_after(5):
        access = await login(pool, glm_emulator)
        response = await chat(pool, glm_emulator, access, chat_body(glm_merge(TOOLS_PROMPT)))
    assert answer_of(sse_events(response.content)) == "scripted"
