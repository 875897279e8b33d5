"""Tests for protocol.openai (and protocol.chunks, which it re-exports).

Sans-IO: plain functions, no event loop. The SDK tests hand our bytes to the
official ``openai`` client through an in-memory httpx transport (no socket),
so "byte-compatible with OpenAI" is checked by the client users run.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from protocol.deltas import (
    Citation,
    Delta,
    Finish,
    FinishReason,
    ImageResult,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    VideoResult,
)
from protocol.errors import (
    LocalProtocolError,
    NoAccountFree,
    RequestError,
    UpstreamTimeout,
)
from protocol.openai import (
    MAX_JSON_DEPTH,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REPLY,
    ChatRequest,
    ChunkEncoder,
    CompletionAccumulator,
    ContentPart,
    Message,
    ReasoningMode,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
    error_body,
    error_from_exception,
    estimate_tokens,
    models_body,
    parse_chat_request,
    prompt_tokens,
)
from tests.protocol.wire import SdkClient, data_events, nested

# ---------------------------------------------------------------------------
# helpers

USER = {"role": "user", "content": "hi"}


def body_of(**fields: Any) -> bytes:
    """A request body with one user message, plus ``fields``."""
    return orjson.dumps({"messages": [USER], **fields})


def chunks_of(wire: bytes) -> list[dict[str, Any]]:
    """The chunk objects of a stream (no [DONE], no error event)."""
    return [e for e in data_events(wire) if isinstance(e, dict) and "error" not in e]


def content_of(wire: bytes) -> str:
    """Everything a client appends to the visible answer."""
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks_of(wire) if c["choices"]
    )


def reasoning_of(wire: bytes) -> str:
    """Everything a client appends to the reasoning."""
    return "".join(
        c["choices"][0]["delta"].get("reasoning_content") or ""
        for c in chunks_of(wire)
        if c["choices"]
    )


def encoder(**kwargs: Any) -> ChunkEncoder:
    """An encoder with fixed id, model and created, already started."""
    options: dict[str, Any] = {"completion_id": "chat-1", "model": "step", "created": 1700000000}
    options.update(kwargs)
    enc = ChunkEncoder(**options)
    enc.start()
    return enc


def stream(deltas: list[Delta], **kwargs: Any) -> bytes:
    """The body of one stream: start plus one encode call."""
    options: dict[str, Any] = {"completion_id": "chat-1", "model": "step", "created": 1700000000}
    options.update(kwargs)
    enc = ChunkEncoder(**options)
    return enc.start() + enc.encode(deltas)


def completion(deltas: list[Delta], reasoning: ReasoningMode = "field") -> dict[str, Any]:
    """The non-stream body for ``deltas``, parsed."""
    acc = CompletionAccumulator(reasoning=reasoning)
    acc.add(deltas)
    body = acc.body(completion_id="chat-1", model="step", created=1700000000, prompt_tokens=5)
    parsed: dict[str, Any] = orjson.loads(body)
    return parsed


# ---------------------------------------------------------------------------
# parse_chat_request: accepted input


def test_minimal_request_gets_defaults() -> None:
    """A body with only messages gives model "", no stream, no usage, no extensions."""
    request = parse_chat_request(b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert request == ChatRequest(
        model="",
        messages=(Message("user", (ContentPart("text", text="hi"),), False),),
        stream=False,
        include_usage=False,
        conversation_id=None,
        use_search=None,
    )
    assert request.messages[0].text == "hi"


def test_top_level_fields_are_read() -> None:
    """model, stream, stream_options.include_usage and the extension fields are passed through."""
    request = parse_chat_request(
        body_of(
            model="glm-4",
            stream=True,
            stream_options={"include_usage": True},
            conversation_id="conv-9",
            use_search=False,
        )
    )
    assert (request.model, request.stream, request.include_usage) == ("glm-4", True, True)
    assert (request.conversation_id, request.use_search) == ("conv-9", False)


def test_null_optional_fields_mean_absent() -> None:
    """Null for every optional parameter is accepted and means its default."""
    nulls = [
        "model",
        "stream",
        "stream_options",
        "conversation_id",
        "use_search",
        "n",
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "tools",
        "user",
    ]
    request = parse_chat_request(body_of(**dict.fromkeys(nulls)))
    assert (request.model, request.stream, request.include_usage) == ("", False, False)
    # conversation_id is the exception: null says "new conversation, keep it"
    assert request.conversation_id == ""
    assert parse_chat_request(body_of()).conversation_id is None
    assert parse_chat_request(body_of(stream_options={})).include_usage is False
    assert (
        parse_chat_request(body_of(stream_options={"include_usage": None})).include_usage is False
    )


def test_ignored_parameters_with_right_types_are_accepted() -> None:
    """Sampling knobs and user of the right type are accepted (and ignored), next to the
    agents' fields (parsed: see the tests below)."""
    request = parse_chat_request(
        body_of(
            n=1,
            temperature=0.7,
            top_p=1,
            presence_penalty=-0.5,
            frequency_penalty=0,
            max_tokens=100,
            max_completion_tokens=1,
            stop=["\n", "END"],
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice="auto",
            user="u-1",
            response_format={"type": "text"},
        )
    )
    assert request.messages[0].text == "hi"
    assert parse_chat_request(body_of(stop="END")).stream is False


def test_sampling_parameters_are_kept_for_the_upstreams_that_take_them() -> None:
    """temperature, top_p, the penalties and seed are kept in the neutral request (floats,
    an integer seed); absent or null, they are None (issue 16)."""
    request = parse_chat_request(body_of(temperature=0, top_p=1, presence_penalty=-2,
                                         frequency_penalty=0.25, seed=-7))
    sampling = (request.temperature, request.top_p, request.presence_penalty,
                request.frequency_penalty, request.seed)
    assert sampling == (0.0, 1.0, -2.0, 0.25, -7)
    assert [type(value) for value in sampling] == [float, float, float, float, int]
    for unset in (parse_chat_request(body_of()), parse_chat_request(body_of(
            temperature=None, top_p=None, presence_penalty=None, frequency_penalty=None,
            seed=None))):
        assert (unset.temperature, unset.top_p, unset.presence_penalty,
                unset.frequency_penalty, unset.seed) == (None,) * 5


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 2), ("top_p", 0), ("presence_penalty", 2), ("frequency_penalty", -2),
    ("seed", 2**63 - 1), ("seed", -(2**63)),
])
def test_sampling_bounds_are_accepted(field: str, value: int) -> None:
    """OpenAI's ranges include their ends."""
    assert getattr(parse_chat_request(body_of(**{field: value})), field) == value


@pytest.mark.parametrize(("field", "value", "code", "says"), [
    ("temperature", 2.5, "decimal_above_max_value", "Expected a value <= 2, but got 2.5"),
    ("temperature", -0.1, "decimal_below_min_value", "Expected a value >= 0, but got -0.1"),
    ("top_p", 1.01, "decimal_above_max_value", "Expected a value <= 1"),
    ("top_p", -1, "decimal_below_min_value", "Expected a value >= 0"),
    ("presence_penalty", -2.5, "decimal_below_min_value", "Expected a value >= -2"),
    ("frequency_penalty", 3, "decimal_above_max_value", "Expected a value <= 2"),
    ("temperature", 1e30, "decimal_above_max_value", "Expected a value <= 2"),
    ("seed", 2**63, "integer_above_max_value", f"but got {2**63} instead"),
    ("seed", 1.5, None, "Invalid type for 'seed': expected an integer."),
    ("seed", 7.0, None, "expected an integer"),
    ("seed", True, None, "expected an integer"),
    ("seed", "7", None, "expected an integer"),
    ("temperature", "0.2", None, "Invalid type for 'temperature': expected a number."),
])
def test_a_sampling_parameter_out_of_range_is_a_400_naming_it(
    field: str, value: object, code: str | None, says: str
) -> None:
    """A sampling parameter outside OpenAI's range, or of the wrong type, is a 400 whose
    param names it, with OpenAI's code for the range (issue 16)."""
    with pytest.raises(RequestError) as info:
        parse_chat_request(body_of(**{field: value}))
    error = info.value
    assert (error.status, error.kind, error.param, error.code) == (
        400, "invalid_request_error", field, code)
    assert says in error.message


def test_content_forms() -> None:
    """String content is one text part; null or missing (assistant, tool) gives no parts;
    arrays keep their parts."""
    request = parse_chat_request(
        orjson.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "assistant", "content": None, "tool_calls": []},
                    {"role": "tool", "tool_call_id": "call_1"},
                    {"role": "user", "content": []},
                    {"role": "developer", "content": [{"type": "text", "text": "x"}]},
                ]
            }
        )
    )
    system, assistant, tool, empty, developer = request.messages
    assert system == Message("system", (ContentPart("text", text="be brief"),), False)
    assert assistant == Message("assistant", (), False)
    assert tool == Message("tool", (), False, tool_call_id="call_1")
    assert empty == Message("user", (), True)
    assert developer == Message("developer", (ContentPart("text", text="x"),), True)
    assert assistant.text == ""


def test_content_parts_of_every_supported_form() -> None:
    """image_url and file parts give URLs (object or string form); other part types are dropped."""
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://a/x.png", "detail": "high"}},
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
        {"type": "file", "file_url": {"url": "https://a/doc.pdf"}},
        {"type": "file", "file_url": "https://a/b.txt"},
        {
            "type": "file",
            "file": {"file_data": "data:application/pdf;base64,QQ==", "filename": "r.pdf"},
        },
        {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}},
        {"type": "refusal", "refusal": "no"},
        {"type": "text", "text": "and this"},
    ]
    message = parse_chat_request(
        orjson.dumps({"messages": [{"role": "user", "content": parts}]})
    ).messages[0]
    assert message.is_list
    assert message.parts == (
        ContentPart("text", text="look"),
        ContentPart("image_url", url="https://a/x.png"),
        ContentPart("image_url", url="data:image/png;base64,AAAA"),
        ContentPart("file", url="https://a/doc.pdf"),
        ContentPart("file", url="https://a/b.txt"),
        ContentPart("file", url="data:application/pdf;base64,QQ==", name="r.pdf"),
        ContentPart("text", text="and this"),
    )
    assert message.text == "look\nand this"


def test_large_document_content_is_accepted() -> None:
    """A multi-megabyte message content (a pasted document) parses intact."""
    document = "长文档。" * 500_000 + "end"
    request = parse_chat_request(
        orjson.dumps({"messages": [{"role": "user", "content": document}]})
    )
    assert request.messages[0].text == document


# ---------------------------------------------------------------------------
# parse_chat_request: the agents' fields (issue 14)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": WEATHER_SCHEMA,
        "strict": True,
    },
}
WEATHER = ToolSpec("get_weather", "Weather now", WEATHER_SCHEMA)
PARIS = '{"city":"Paris"}'


def test_a_tool_loop_request_parses_into_the_neutral_fields() -> None:
    """A second-step tool loop request (tools, a named choice, structured output, stop, limits,
    an assistant's calls and their results) gives every neutral field, nothing dropped."""
    request = parse_chat_request(
        orjson.dumps(
            {
                "model": "glm-4",
                "messages": [
                    {"role": "user", "content": "weather in Paris and Oslo?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": PARIS},
                            },
                            {
                                "id": "call_2",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "not json"},
                            },
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                    {"role": "tool", "tool_call_id": "call_2", "name": "get_weather",
                     "content": [{"type": "text", "text": "9C"}]},
                ],
                "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "noop"}}],
                "tool_choice": {"type": "function", "function": {"name": "noop"}},
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "report", "schema": WEATHER_SCHEMA, "strict": True},
                },
                "stop": ["\nObservation:", "", "END"],
                "max_tokens": 300,
                "max_completion_tokens": 200,
            }
        )
    )
    assert request == ChatRequest(
        model="glm-4",
        messages=(
            Message("user", (ContentPart("text", text="weather in Paris and Oslo?"),), False),
            Message(
                "assistant",
                (),
                False,
                tool_calls=(
                    ToolCall("call_1", "get_weather", PARIS),
                    ToolCall("call_2", "get_weather", "not json"),
                ),
            ),
            Message("tool", (ContentPart("text", text="18C"),), False, tool_call_id="call_1"),
            Message(
                "tool",
                (ContentPart("text", text="9C"),),
                True,
                tool_call_id="call_2",
                name="get_weather",
            ),
        ),
        stream=False,
        include_usage=False,
        conversation_id=None,
        use_search=None,
        tools=(WEATHER, ToolSpec("noop")),
        tool_choice=ToolChoice("function", "noop"),
        response_format=ResponseFormat(
            "json_schema", schema=WEATHER_SCHEMA, name="report", strict=True
        ),
        stop=("\nObservation:", "END"),
        max_tokens=200,
    )


def test_legacy_functions_map_onto_tools() -> None:
    """functions, function_call, an assistant's function_call (id "") and function-role
    results give the same neutral fields as tools do."""
    request = parse_chat_request(
        orjson.dumps(
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "content": "Let me look.",
                        "function_call": {"name": "get_weather", "arguments": "{}"},
                    },
                    {"role": "function", "name": "get_weather", "content": "18C"},
                ],
                "functions": [WEATHER_TOOL["function"]],
                "function_call": {"name": "get_weather"},
            }
        )
    )
    assert request.tools == (WEATHER,)
    assert request.tool_choice == ToolChoice("function", "get_weather")
    assistant, result = request.messages[1:]
    assert assistant.tool_calls == (ToolCall("", "get_weather", "{}"),)
    assert assistant.text == "Let me look."
    assert result == Message("function", (ContentPart("text", text="18C"),), False,
                             name="get_weather")
    auto = parse_chat_request(body_of(functions=[{"name": "f"}], function_call="none"))
    assert (auto.tools, auto.tool_choice) == ((ToolSpec("f"),), ToolChoice("none"))


def test_tools_win_over_legacy_functions() -> None:
    """With both tools and functions (and tool_choice and function_call) the new fields count."""
    request = parse_chat_request(
        body_of(
            tools=[WEATHER_TOOL],
            functions=[{"name": "old"}],
            tool_choice="required",
            function_call={"name": "old"},
        )
    )
    assert (request.tools, request.tool_choice) == ((WEATHER,), ToolChoice("required"))


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, ToolChoice("auto")),
        ("auto", ToolChoice("auto")),
        ("none", ToolChoice("none")),
        ("required", ToolChoice("required")),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            ToolChoice("function", "get_weather"),
        ),
    ],
)
def test_tool_choice_forms(tool_choice: Any, expected: ToolChoice) -> None:
    """Each of OpenAI's tool_choice forms gives its ToolChoice; absent or null means auto."""
    request = parse_chat_request(body_of(tools=[WEATHER_TOOL], tool_choice=tool_choice))
    assert request.tool_choice == expected


@pytest.mark.parametrize("fields", [{"tool_choice": "none"}, {"tool_choice": "auto"},
                                    {"function_call": "none"}, {"function_call": "auto"},
                                    {"tools": [], "tool_choice": "auto"}])
def test_none_and_auto_need_no_tools(fields: dict[str, Any]) -> None:
    """tool_choice "none" or "auto" without tools passes silently (clients always send it)."""
    request = parse_chat_request(body_of(**fields))
    assert request.tools == ()
    assert request.tool_choice.mode in ("none", "auto")


def test_tool_optional_fields_may_be_null() -> None:
    """A function's description, parameters and strict may be null or absent."""
    tool = {"type": "function",
            "function": {"name": "a-B_9", "description": None, "parameters": None, "strict": None}}
    assert parse_chat_request(body_of(tools=[tool])).tools == (ToolSpec("a-B_9"),)
    assert parse_chat_request(body_of(tools=[])).tools == ()
    long_name = "x" * 64
    tool = {"type": "function", "function": {"name": long_name}}
    assert parse_chat_request(body_of(tools=[tool])).tools == (ToolSpec(long_name),)


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, ResponseFormat("json_object")),
        ({"type": "json_schema", "json_schema": {"name": "n"}}, ResponseFormat("json_schema",
                                                                               name="n")),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "n", "description": "d", "schema": {"type": "object"},
                                "strict": None},
            },
            ResponseFormat("json_schema", schema={"type": "object"}, name="n"),
        ),
    ],
)
def test_response_format_forms(response_format: Any, expected: ResponseFormat | None) -> None:
    """text is free text (None); json_object and json_schema give their ResponseFormat."""
    request = parse_chat_request(body_of(response_format=response_format))
    assert request.response_format == expected


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (None, ()),
        ("", ()),
        ("END", ("END",)),
        ([], ()),
        (["a", "", "b", "c"], ("a", "b", "c")),
        (["1", "2", "3", "4"], ("1", "2", "3", "4")),
    ],
)
def test_stop_forms(stop: Any, expected: tuple[str, ...]) -> None:
    """stop is a string or up to four; empty sequences are dropped."""
    assert parse_chat_request(body_of(stop=stop)).stop == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 5, "max_completion_tokens": 9}, 5),
        ({"max_tokens": None, "max_completion_tokens": 9}, 9),
    ],
)
def test_max_tokens_takes_the_smaller_limit(fields: dict[str, Any], expected: int | None) -> None:
    """max_tokens and max_completion_tokens both limit the answer; the smaller one wins."""
    assert parse_chat_request(body_of(**fields)).max_tokens == expected


def test_prompt_tokens_count_tool_calls_and_offered_tools() -> None:
    """An assistant's calls count by name and arguments, offered tools by their JSON; tools
    that tool_choice "none" hides do not count."""
    call = {"id": "c", "type": "function", "function": {"name": "abcd", "arguments": "{}"}}
    messages = [USER, {"role": "assistant", "tool_calls": [call]}]
    plain = parse_chat_request(orjson.dumps({"messages": messages}))
    base = TOKENS_PER_REPLY + 2 * TOKENS_PER_MESSAGE + estimate_tokens("hi")
    assert prompt_tokens(plain) == base + 1 + 1
    tool = {"type": "function", "function": {"name": "f"}}
    offered = parse_chat_request(orjson.dumps({"messages": messages, "tools": [tool]}))
    tools_json = '[{"name":"f","description":"","parameters":null}]'
    assert prompt_tokens(offered) == base + 2 + estimate_tokens(tools_json)
    hidden = parse_chat_request(
        orjson.dumps({"messages": messages, "tools": [tool], "tool_choice": "none"})
    )
    assert prompt_tokens(hidden) == base + 2


def body_with(fields: dict[str, Any], document: bytes) -> bytes:
    """``body_of(**fields)`` with the string ``"@"`` replaced by ``document``."""
    return body_of(**fields).replace(b'"@"', document)


DEEP_SCHEMA_FIELDS = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "@"}}]},
     "tools[0].function.parameters"),
    ({"functions": [{"name": "f", "parameters": "@"}]}, "functions[0].parameters"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "f", "schema": "@", "strict": True}}},
     "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1015])
@pytest.mark.parametrize(("fields", "param"), DEEP_SCHEMA_FIELDS)
def test_a_schema_nested_too_deep_is_a_400_naming_it(
    fields: dict[str, Any], param: str, depth: int
) -> None:
    """A schema deeper than MAX_JSON_DEPTH is a 400. orjson reads 1024 levels but writes 254,
    and the relay writes schemas back (the token count, the prompt): a 300-level schema was a
    500 from prompt_tokens."""
    with pytest.raises(RequestError) as info:
        parse_chat_request(body_with(fields, nested(depth)))
    assert info.value.status == 400
    assert info.value.param == param
    assert f"nested more than {MAX_JSON_DEPTH} levels" in info.value.message


@pytest.mark.parametrize(("fields", "param"), DEEP_SCHEMA_FIELDS)
def test_a_schema_nested_to_the_limit_is_accepted_and_counted(
    fields: dict[str, Any], param: str
) -> None:
    """A schema exactly MAX_JSON_DEPTH levels deep parses, and its tokens can be counted."""
    request = parse_chat_request(body_with(fields, nested(MAX_JSON_DEPTH)))
    assert prompt_tokens(request) > 0


# ---------------------------------------------------------------------------
# parse_chat_request: rejected input

BAD_JSON = [
    b"",
    b"not json",
    b"[1, 2]",
    b'"messages"',
    b"null",
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    b'{"messages": [{"role": "user", "content": "\xff"}]}',
    b'{"messages": [',
]


@pytest.mark.parametrize("body", BAD_JSON)
def test_invalid_json_is_a_400_without_param(body: bytes) -> None:
    """A body that is not a JSON object (or uses NaN/Infinity, or bad UTF-8) is 400, param None."""
    with pytest.raises(RequestError) as info:
        parse_chat_request(body)
    assert info.value.status == 400
    assert info.value.param is None
    assert "invalid JSON body" in info.value.message


def _msg(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


def _part(part: Any) -> dict[str, Any]:
    return _msg([{"type": "text", "text": "ok"}, part])


def _tools(*tools: Any, **fields: Any) -> dict[str, Any]:
    return {"messages": [USER], "tools": list(tools), **fields}


def _fn(name: Any = "f", **fields: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **fields}}


def _history(message: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [USER, message]}


def _call(**fields: Any) -> dict[str, Any]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    call.update(fields)
    return _history({"role": "assistant", "tool_calls": [call]})


AGENT_BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    # tools
    (_tools("f"), "tools[0]"),
    (_tools(_fn(), {"function": {"name": "g"}}), "tools[1].type"),
    (_tools({"type": "code_interpreter"}), "tools[0].type"),
    (_tools({"type": "custom", "custom": {"name": "x"}}), "tools[0].type"),
    (_tools({"type": "function"}), "tools[0].function"),
    (_tools({"type": "function", "function": "f"}), "tools[0].function"),
    (_tools(_fn(None)), "tools[0].function.name"),
    (_tools(_fn(3)), "tools[0].function.name"),
    (_tools(_fn("")), "tools[0].function.name"),
    (_tools(_fn("get weather")), "tools[0].function.name"),
    (_tools(_fn("a.b")), "tools[0].function.name"),
    (_tools(_fn("ü")), "tools[0].function.name"),
    (_tools(_fn("x" * 65)), "tools[0].function.name"),
    (_tools(_fn(description=1)), "tools[0].function.description"),
    (_tools(_fn(parameters="{}")), "tools[0].function.parameters"),
    (_tools(_fn(parameters=[])), "tools[0].function.parameters"),
    (_tools(_fn(strict="yes")), "tools[0].function.strict"),
    ({"messages": [USER], "functions": {"name": "f"}}, "functions"),
    ({"messages": [USER], "functions": [{"name": "a b"}]}, "functions[0].name"),
    ({"messages": [USER], "functions": [None]}, "functions[0]"),
    # tool_choice and function_call
    (_tools(_fn(), tool_choice="any"), "tool_choice"),
    (_tools(_fn(), tool_choice=1), "tool_choice"),
    (_tools(_fn(), tool_choice={"function": {"name": "f"}}), "tool_choice.type"),
    (_tools(_fn(), tool_choice={"type": "allowed_tools"}), "tool_choice.type"),
    (_tools(_fn(), tool_choice={"type": "function"}), "tool_choice.function"),
    (_tools(_fn(), tool_choice={"type": "function", "function": {}}), "tool_choice.function.name"),
    (_tools(_fn(), tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    ({"messages": [USER], "tool_choice": "required"}, "tool_choice"),
    (_tools(tool_choice="required"), "tool_choice"),
    ({"messages": [USER], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tool_choice"),
    ({"messages": [USER], "function_call": {"name": "f"}}, "function_call"),
    ({"messages": [USER], "functions": [{"name": "f"}], "function_call": "required"},
     "function_call"),
    ({"messages": [USER], "functions": [{"name": "f"}], "function_call": {"name": "g"}},
     "function_call"),
    ({"messages": [USER], "functions": [{"name": "f"}], "function_call": {}},
     "function_call.name"),
    ({"messages": [USER], "functions": [{"name": "f"}], "function_call": ["f"]},
     "function_call"),
    # response_format
    ({"messages": [USER], "response_format": "json_object"}, "response_format"),
    ({"messages": [USER], "response_format": {}}, "response_format.type"),
    ({"messages": [USER], "response_format": {"type": "json"}}, "response_format.type"),
    ({"messages": [USER], "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ({"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format.json_schema.name"),
    ({"messages": [USER],
      "response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
     "response_format.json_schema.name"),
    ({"messages": [USER],
      "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": "{}"}}},
     "response_format.json_schema.schema"),
    ({"messages": [USER],
      "response_format": {"type": "json_schema", "json_schema": {"name": "n", "strict": 1}}},
     "response_format.json_schema.strict"),
    # stop and max_tokens
    ({"messages": [USER], "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ({"messages": [USER], "max_tokens": 5, "max_completion_tokens": -1}, "max_completion_tokens"),
    # messages: calls and results
    (_history({"role": "assistant", "tool_calls": {"id": "c1"}}), "messages[1].tool_calls"),
    (_history({"role": "assistant", "tool_calls": ["c1"]}), "messages[1].tool_calls[0]"),
    (_call(id=None), "messages[1].tool_calls[0].id"),
    (_call(id=5), "messages[1].tool_calls[0].id"),
    (_call(type=None), "messages[1].tool_calls[0].type"),
    (_call(type="custom"), "messages[1].tool_calls[0].type"),
    (_call(function=None), "messages[1].tool_calls[0].function"),
    (_call(function={"arguments": "{}"}), "messages[1].tool_calls[0].function.name"),
    (_call(function={"name": "f"}), "messages[1].tool_calls[0].function.arguments"),
    (_call(function={"name": "f", "arguments": {"a": 1}}),
     "messages[1].tool_calls[0].function.arguments"),
    (_history({"role": "assistant", "function_call": {"name": "f"}}),
     "messages[1].function_call.arguments"),
    (_history({"role": "assistant", "function_call": "f"}), "messages[1].function_call"),
    (_history({"role": "tool", "content": "18C"}), "messages[1].tool_call_id"),
    (_history({"role": "tool", "tool_call_id": 1, "content": "18C"}), "messages[1].tool_call_id"),
    (_history({"role": "tool", "tool_call_id": "c", "name": 2, "content": "x"}),
     "messages[1].name"),
    (_history({"role": "function", "content": "18C"}), "messages[1].name"),
]


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": {"role": "user"}}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [USER, "hello"]}, "messages[1]"),
    ({"messages": [USER, USER, None]}, "messages[2]"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [USER, {"role": "user", "content": None}]}, "messages[1].content"),
    ({"messages": [{"role": "system", "content": None}, USER]}, "messages[0].content"),
    ({"messages": [{"role": "developer"}, USER]}, "messages[0].content"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role"),
    ({"messages": [USER, {"role": "wizard", "content": "hi"}]}, "messages[1].role"),
    ({"messages": [{"role": "User", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "", "content": "hi"}]}, "messages[0].role"),
    (_part({"type": "image_url", "image_url": {"url": "data:a/b\r\nX: 1;base64,aGk="}}),
     "messages[0].content[1].image_url.url"),
    (_part({"type": "image_url", "image_url": "data:image/p ng;base64,aGk="}),
     "messages[0].content[1].image_url"),
    (_part({"type": "file", "file_url": {"url": "https://e.com/a%0d%0ab.pdf"}}),
     "messages[0].content[1].file_url.url"),
    (_part({"type": "file", "file": "data:text/plain\x00,hi"}), "messages[0].content[1].file"),
    (_part({"type": "file", "file": {"file_data": "data:a/b\n,x", "filename": "a.txt"}}),
     "messages[0].content[1].file.file_data"),
    (_part({"type": "file", "file": {"file_data": "data:,x", "filename": "a\r\nb.txt"}}),
     "messages[0].content[1].file.filename"),
    ({"messages": [USER, {"role": "user", "content": 5}]}, "messages[1].content"),
    (_msg({"type": "text", "text": "hi"}), "messages[0].content"),
    (_msg(True), "messages[0].content"),
    (_msg(["hi"]), "messages[0].content[0]"),
    (_part({"text": "no type"}), "messages[0].content[1].type"),
    (_part({"type": 3}), "messages[0].content[1].type"),
    (_part({"type": "text"}), "messages[0].content[1].text"),
    (_part({"type": "text", "text": None}), "messages[0].content[1].text"),
    (_part({"type": "text", "text": ["a"]}), "messages[0].content[1].text"),
    (_part({"type": "image_url"}), "messages[0].content[1].image_url"),
    (_part({"type": "image_url", "image_url": {}}), "messages[0].content[1].image_url"),
    (_part({"type": "image_url", "image_url": {"url": 7}}), "messages[0].content[1].image_url"),
    (_part({"type": "image_url", "image_url": ["u"]}), "messages[0].content[1].image_url"),
    (_part({"type": "file"}), "messages[0].content[1].file"),
    (_part({"type": "file", "file_url": {"href": "x"}}), "messages[0].content[1].file_url"),
    (_part({"type": "file", "file_url": 3}), "messages[0].content[1].file_url"),
    (_part({"type": "file", "file": 3}), "messages[0].content[1].file"),
    (_part({"type": "file", "file": {"file_id": "file-1"}}), "messages[0].content[1].file"),
    (_part({"type": "file", "file": {"file_data": 1}}), "messages[0].content[1].file"),
    (
        _part({"type": "file", "file": {"file_data": "data:,x", "filename": 2}}),
        "messages[0].content[1].file",
    ),
    ({"messages": [USER], "model": 4}, "model"),
    ({"messages": [USER], "stream": "yes"}, "stream"),
    ({"messages": [USER], "stream": 1}, "stream"),
    ({"messages": [USER], "stream_options": True}, "stream_options"),
    ({"messages": [USER], "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"messages": [USER], "conversation_id": 12}, "conversation_id"),
    ({"messages": [USER], "use_search": "on"}, "use_search"),
    ({"messages": [USER], "n": 2}, "n"),
    ({"messages": [USER], "n": 0}, "n"),
    ({"messages": [USER], "n": "1"}, "n"),
    ({"messages": [USER], "n": True}, "n"),
    ({"messages": [USER], "temperature": "hot"}, "temperature"),
    ({"messages": [USER], "temperature": True}, "temperature"),
    ({"messages": [USER], "top_p": [1]}, "top_p"),
    ({"messages": [USER], "presence_penalty": "0"}, "presence_penalty"),
    ({"messages": [USER], "frequency_penalty": {}}, "frequency_penalty"),
    ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
    ({"messages": [USER], "max_tokens": -5}, "max_tokens"),
    ({"messages": [USER], "max_tokens": 1.5}, "max_tokens"),
    ({"messages": [USER], "max_tokens": "10"}, "max_tokens"),
    ({"messages": [USER], "max_tokens": True}, "max_tokens"),
    ({"messages": [USER], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [USER], "stop": 1}, "stop"),
    ({"messages": [USER], "stop": ["a", 2]}, "stop"),
    ({"messages": [USER], "tools": {"type": "function"}}, "tools"),
    ({"messages": [USER], "user": 42}, "user"),
    *AGENT_BAD_REQUESTS,
]


def test_tool_choice_errors_say_what_is_wrong() -> None:
    """A choice that needs tools says tools are needed (OpenAI's words); a named function that
    is not offered is named."""
    with pytest.raises(RequestError) as info:
        parse_chat_request(body_of(tool_choice="required"))
    assert "'tool_choice' is only allowed when 'tools' are specified" in info.value.message
    with pytest.raises(RequestError) as info:
        parse_chat_request(
            body_of(tools=[_fn()], tool_choice={"type": "function", "function": {"name": "g"}})
        )
    assert "'g'" in info.value.message


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
def test_invalid_parameter_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    """Each malformed parameter gives a 400 invalid_request_error whose param names it exactly."""
    with pytest.raises(RequestError) as info:
        parse_chat_request(orjson.dumps(body))
    error = info.value
    assert (error.status, error.kind, error.param) == (400, "invalid_request_error", param)
    assert error.message


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_every_openai_role_is_accepted(role: str) -> None:
    """Each of OpenAI's six roles parses (only other strings are refused)."""
    # what OpenAI requires of the tool roles besides content
    extra = {"tool": {"tool_call_id": "call_1"}, "function": {"name": "f"}}.get(role, {})
    message = {"role": role, "content": "x", **extra}
    request = parse_chat_request(orjson.dumps({"messages": [message]}))
    assert request.messages[0].role == role


def test_file_id_error_says_what_to_send_instead() -> None:
    """An OpenAI uploaded-file reference is refused with a message that names the alternatives."""
    with pytest.raises(RequestError) as info:
        parse_chat_request(orjson.dumps(_part({"type": "file", "file": {"file_id": "f"}})))
    assert "file_data" in info.value.message
    assert "file_url" in info.value.message


# ---------------------------------------------------------------------------
# token estimates


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("a", 1),
        (" ", 1),
        ("abcd", 1),
        ("abcde", 2),
        ("Hello, world!", 4),  # 13 ASCII characters -> ceil(13 / 4)
        ("你", 1),
        ("你好世界", 4),
        ("你好 world", 2 + 2),  # 2 CJK + ceil(6 / 4)
        ("héllo", 1 + 1),  # é counts 1, "hllo" is 4 ASCII characters
        ("Привет", 6),
    ],
)
def test_estimate_tokens(text: str, tokens: int) -> None:
    """ASCII counts ~4 characters a token (rounded up), other characters 1 each, "" is 0."""
    assert estimate_tokens(text) == tokens


def test_prompt_tokens_counts_every_message_plus_overhead() -> None:
    """The prompt estimate is the texts' estimates plus a fixed overhead per message and reply."""
    request = parse_chat_request(
        orjson.dumps(
            {
                "messages": [
                    {"role": "system", "content": "abcd"},
                    {"role": "user", "content": "你好"},
                ]
            }
        )
    )
    assert prompt_tokens(request) == TOKENS_PER_REPLY + 2 * TOKENS_PER_MESSAGE + 1 + 2
    assert TOKENS_PER_MESSAGE > 0


# ---------------------------------------------------------------------------
# error and model bodies


def test_error_body_shape() -> None:
    """error_body gives OpenAI's {"error": {message, type, param, code}}, nulls included."""
    assert orjson.loads(error_body("bad", "invalid_request_error", param="messages")) == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "messages",
            "code": None,
        }
    }
    assert orjson.loads(error_body("busy", "rate_limit_error", code="no_account")) == {
        "error": {
            "message": "busy",
            "type": "rate_limit_error",
            "param": None,
            "code": "no_account",
        }
    }


def test_error_from_exception_uses_the_exception_fields() -> None:
    """error_from_exception copies message, kind, param and code from the RelayError."""
    error = orjson.loads(error_from_exception(RequestError("no messages", param="messages")))
    assert error["error"] == {
        "message": "no messages",
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }
    busy = orjson.loads(error_from_exception(NoAccountFree("all busy", code="busy")))["error"]
    assert (busy["type"], busy["code"]) == ("rate_limit_error", "busy")
    late = orjson.loads(error_from_exception(UpstreamTimeout("slow")))["error"]
    assert late["type"] == "upstream_error"


def test_models_body_shape() -> None:
    """models_body lists every (id, owned_by) pair as a model object, in order."""
    body = orjson.loads(models_body([("step-v1", "step"), ("glm-4", "glm")], 1700))
    assert body == {
        "object": "list",
        "data": [
            {"id": "step-v1", "object": "model", "created": 1700, "owned_by": "step"},
            {"id": "glm-4", "object": "model", "created": 1700, "owned_by": "glm"},
        ],
    }
    assert orjson.loads(models_body(iter(()), 0)) == {"object": "list", "data": []}


# ---------------------------------------------------------------------------
# ChunkEncoder


def test_start_chunk_is_the_assistant_role() -> None:
    """start() gives one chunk in OpenAI's shape with delta {"role": "assistant", "content": ""}."""
    enc = ChunkEncoder(completion_id="chat-1", model="step", created=1700000000)
    assert data_events(enc.start()) == [
        {
            "id": "chat-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "step",
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    ]
    assert not enc.finished


def test_completion_id_settable_until_used() -> None:
    """The id may change until a chunk carried it; start() twice raises LocalProtocolError."""
    enc = ChunkEncoder(completion_id="", model="glm", created=1)
    assert enc.encode([]) == b""  # no bytes: the id is still free
    enc.completion_id = "conv-1"
    assert enc.completion_id == "conv-1"
    assert data_events(enc.start())[0]["id"] == "conv-1"
    with pytest.raises(LocalProtocolError):
        enc.start()
    enc.completion_id = "conv-1"  # the same value again is harmless
    with pytest.raises(LocalProtocolError):
        enc.completion_id = "conv-2"
    assert chunks_of(enc.encode([TextDelta("x")]))[0]["id"] == "conv-1"


def test_id_fixed_by_the_first_encoded_chunk() -> None:
    """A chunk encoded before start() fixes the id too: changing it then raises."""
    enc = ChunkEncoder(completion_id="a", model="glm", created=1)
    enc.encode([TextDelta("x")])
    with pytest.raises(LocalProtocolError):
        enc.completion_id = "b"


def test_encode_may_come_before_start() -> None:
    """The relay may encode a read (even the end) before start(); the bytes are the same."""
    early = ChunkEncoder(completion_id="c", model="m", created=1)
    data = early.encode([TextDelta("all"), Finish()])
    assert early.finished
    wire = early.start() + data
    assert wire == stream([TextDelta("all"), Finish()], completion_id="c", model="m", created=1)
    assert data_events(wire)[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_consecutive_text_deltas_make_one_chunk() -> None:
    """Several TextDelta in one call give one content chunk with their texts joined."""
    enc = encoder()
    wire = enc.encode([TextDelta("Hel"), TextDelta("lo"), TextDelta(""), TextDelta(", 世界")])
    chunks = chunks_of(wire)
    assert len(chunks) == 1
    assert chunks[0]["choices"][0] == {
        "index": 0,
        "delta": {"content": "Hello, 世界"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert enc.encode([]) == b""
    assert enc.encode([TextDelta("")]) == b""


def test_reasoning_field_mode_keeps_order_between_kinds() -> None:
    """In field mode reasoning goes to reasoning_content, merged per run, order kept."""
    wire = encoder().encode(
        [ReasoningDelta("think "), ReasoningDelta("hard"), TextDelta("A"), ReasoningDelta("more")]
    )
    deltas = [c["choices"][0]["delta"] for c in chunks_of(wire)]
    assert deltas == [
        {"reasoning_content": "think hard"},
        {"content": "A"},
        {"reasoning_content": "more"},
    ]


def test_reasoning_tags_mode_opens_and_closes_think() -> None:
    """In tags mode reasoning is content inside <think>, closed before the first answer text."""
    enc = encoder(reasoning="tags")
    first = enc.encode([ReasoningDelta("step 1")])
    second = enc.encode([ReasoningDelta(", step 2"), TextDelta("Answer")])
    third = enc.encode([TextDelta(" more"), Finish()])
    assert content_of(first) == "<think>\nstep 1"
    assert content_of(second) == ", step 2\n</think>\n\nAnswer"
    assert content_of(third) == " more"
    assert reasoning_of(first + second + third) == ""


def test_reasoning_tags_closed_before_finish() -> None:
    """In tags mode an open <think> block is closed before the final chunk."""
    wire = encoder(reasoning="tags").encode([ReasoningDelta("hmm"), Finish()])
    assert content_of(wire) == "<think>\nhmm\n</think>\n\n"
    assert data_events(wire)[-2]["choices"][0]["finish_reason"] == "stop"


def test_reasoning_tags_closed_before_citations() -> None:
    """In tags mode a citation is content: it closes the think block, new reasoning reopens one."""
    wire = encoder(reasoning="tags").encode(
        [ReasoningDelta("a"), Citation("T", "https://t"), ReasoningDelta("b")]
    )
    assert content_of(wire) == "<think>\na\n</think>\n\n检索 T - https://t ...\n\n<think>\nb"


def test_citations_render_as_one_block_and_are_kept() -> None:
    """Consecutive citations render one line each plus one blank line, and are kept structured."""
    enc = encoder()
    cites = [Citation("One", "https://1"), Citation("Two", "https://2")]
    wire = enc.encode([*cites, TextDelta("Answer"), Citation("Three", "https://3")])
    assert content_of(wire) == (
        "检索 One - https://1 ...\n检索 Two - https://2 ...\n\nAnswer检索 Three - https://3 ...\n\n"
    )
    assert enc.citations == [*cites, Citation("Three", "https://3")]


def test_citation_line_is_configurable() -> None:
    """citation_line is a format template with title and url."""
    wire = encoder(citation_line="- [{title}]({url})\n").encode([Citation("T", "https://u")])
    assert content_of(wire) == "- [T](https://u)\n\n"


def test_images_and_videos_render_as_links() -> None:
    """An ImageResult is a markdown image line, a VideoResult a markdown link line."""
    wire = encoder().encode(
        [ImageResult("https://img/1.png"), VideoResult("conv", "https://v/1.mp4", "https://c")]
    )
    assert content_of(wire) == "![图像](https://img/1.png)\n[video](https://v/1.mp4)\n"


@pytest.mark.parametrize("reason", ["stop", "length", "content_filter"])
def test_finish_gives_final_chunk_then_done(reason: FinishReason) -> None:
    """Finish gives an empty delta with the finish reason, then [DONE], and nothing after."""
    enc = encoder()
    events = data_events(enc.encode([TextDelta("x"), Finish(reason), TextDelta("late")]))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
    ]
    assert len(events) == 3  # content, final, [DONE]: no usage chunk unless asked
    assert "usage" not in events[-2]
    assert enc.finished
    assert enc.encode([TextDelta("later")]) == b""
    assert enc.keepalive() == b""


def test_finish_text_follows_content_after_a_blank_line() -> None:
    """Finish text is content before the final chunk, after a blank line if content went out."""
    after = encoder().encode([TextDelta("Partial"), Finish("content_filter", "Blocked.")])
    alone = encoder().encode([Finish("content_filter", "Blocked.")])
    assert content_of(after) == "Partial\n\nBlocked."
    assert content_of(alone) == "Blocked."
    reasoning_only = encoder().encode([ReasoningDelta("r"), Finish("stop", "Note")])
    assert content_of(reasoning_only) == "Note"


def test_usage_chunk_when_asked() -> None:
    """With include_usage, a chunk with empty choices and the token estimates precedes [DONE]."""
    enc = encoder(include_usage=True, prompt_tokens=11)
    events = data_events(
        enc.encode([ReasoningDelta("你好"), TextDelta("abcdefgh")]) + enc.encode([Finish()])
    )
    usage_chunk = events[-2]
    assert events[-1] == "[DONE]"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    assert usage_chunk["id"] == "chat-1"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert enc.completion_tokens == 4


def test_upstream_error_is_in_band_then_done() -> None:
    """UpstreamError flushes pending content, then an error event and [DONE]; never as content."""
    enc = encoder(include_usage=True)
    wire = enc.encode(
        [TextDelta("part"), UpstreamError("resource_exhausted", "quota used up"), TextDelta("x")]
    )
    events = data_events(wire)
    assert events[0]["choices"][0]["delta"] == {"content": "part"}
    assert events[1] == {
        "error": {
            "message": "quota used up",
            "type": "upstream_error",
            "param": None,
            "code": "resource_exhausted",
        }
    }
    assert events[2:] == ["[DONE]"]
    assert "quota" not in content_of(wire)
    assert enc.finished
    assert enc.encode([Finish()]) == b""


def test_keepalive_is_an_sse_comment() -> None:
    """keepalive() is an SSE comment that clients ignore."""
    enc = encoder()
    assert enc.keepalive() == b": keep-alive\n\n"
    assert data_events(enc.keepalive()) == [": keep-alive"]


def test_id_created_model_identical_in_every_chunk() -> None:
    """Every chunk repeats the id, created and model given, JSON-escaped correctly."""
    model = 'odd "model"\\ 名字\n'
    enc = ChunkEncoder(
        completion_id='id-"1"', model=model, created=42, reasoning="field", include_usage=True
    )
    wire = enc.start() + enc.encode(
        [
            ReasoningDelta("r"),
            TextDelta("t"),
            Citation("c", "u"),
            ImageResult("i"),
            Finish("length", "cut"),
        ]
    )
    chunks = chunks_of(wire)
    assert len(chunks) == 5  # role, reasoning, content (merged), final, usage
    for chunk in chunks:
        assert (chunk["id"], chunk["created"], chunk["model"]) == ('id-"1"', 42, model)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["system_fingerprint"] is None
    assert data_events(wire)[-1] == "[DONE]"
    assert wire.count(b"data: [DONE]") == 1


def test_text_needing_escapes_round_trips() -> None:
    """Quotes, backslashes, newlines, control characters and emoji in text survive encoding."""
    text = 'a"b\\c\nd\te\x00f 😀 </script>\u2028'
    assert content_of(encoder().encode([TextDelta(text)])) == text


def test_sdk_reads_a_stream() -> None:
    """The official openai client reads our stream: role, reasoning, content, finish and usage."""
    enc = ChunkEncoder(completion_id="c9", model="glm-4", created=5, include_usage=True)
    wire = enc.start() + enc.encode(
        [ReasoningDelta("why"), TextDelta("Hi"), Citation("T", "https://t")]
    )
    wire += enc.keepalive() + enc.encode([Finish("stop")])
    with SdkClient(wire, "text/event-stream") as client:
        chunks = list(
            client.chat.completions.create(
                model="glm-4", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    assert all(isinstance(c, ChatCompletionChunk) and c.id == "c9" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hi检索 T - https://t ...\n\n"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.completion_tokens


def test_sdk_raises_on_in_band_error() -> None:
    """The official openai client raises APIError with our message on an in-band error."""
    enc = encoder()
    wire = enc.encode([TextDelta("a")]) + enc.encode([UpstreamError("busy", "try later")])
    with SdkClient(wire, "text/event-stream") as client:
        received: list[ChatCompletionChunk] = []
        with pytest.raises(openai.APIError, match="try later"):
            received.extend(
                client.chat.completions.create(
                    model="step", messages=[{"role": "user", "content": "x"}], stream=True
                )
            )
    assert len(received) == 1


class City(pydantic.BaseModel):
    city: str


class Report(pydantic.BaseModel):
    summary: str


def test_sdk_tool_loop_requests_parse() -> None:
    """A tool loop with the openai SDK's helpers (a pydantic tool, a pydantic response format):
    it parses our completion's call, and the next request it builds (its own assistant message
    sent back, a tool result) parses into the neutral fields."""
    acc = CompletionAccumulator()
    acc.add([
        ToolCallDelta(0, "call_1", "City", '{"city": '),
        ToolCallDelta(0, arguments_part='"Oslo"}'),
        Finish("tool_calls"),
    ])
    body = acc.body(completion_id="c1", model="step", created=3, prompt_tokens=2)
    sdk = SdkClient(body, "application/json")
    tools = [openai.pydantic_function_tool(City)]
    with sdk as client:
        messages: list[Any] = [{"role": "user", "content": "weather in Oslo?"}]
        first = client.chat.completions.parse(
            model="step", messages=messages, tools=tools, response_format=Report,
            stop="Observation:", max_completion_tokens=64,
        )
        message = first.choices[0].message
        assert message.tool_calls is not None
        assert message.tool_calls[0].function.parsed_arguments == City(city="Oslo")
        messages += [message, {"role": "tool", "tool_call_id": "call_1", "content": "-3C"}]
        client.chat.completions.parse(
            model="step", messages=messages, tools=tools, response_format=Report,
            tool_choice="none",
        )
    first_request, second = (parse_chat_request(raw) for raw in sdk.requests)
    assert first_request.tools == second.tools
    assert [tool.name for tool in first_request.tools] == ["City"]
    assert first_request.tools[0].parameters["properties"] == {
        "city": {"title": "City", "type": "string"}
    }
    assert first_request.response_format is not None
    assert (first_request.response_format.type, first_request.response_format.name,
            first_request.response_format.strict) == ("json_schema", "Report", True)
    assert (first_request.stop, first_request.max_tokens) == (("Observation:",), 64)
    assert second.tool_choice == ToolChoice("none")
    assert second.messages[1:] == (
        Message("assistant", (), False,
                tool_calls=(ToolCall("call_1", "City", '{"city": "Oslo"}'),)),
        Message("tool", (ContentPart("text", text="-3C"),), False, tool_call_id="call_1"),
    )


# ---------------------------------------------------------------------------
# CompletionAccumulator


def test_completion_shape() -> None:
    """body() is OpenAI's chat.completion with the text, the finish reason and usage estimates."""
    body = completion([TextDelta("Hello"), TextDelta(" world"), Finish("stop")])
    assert body == {
        "id": "chat-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "step",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello world"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


@pytest.mark.parametrize("reason", ["stop", "length", "content_filter"])
def test_completion_finish_reasons(reason: FinishReason) -> None:
    """The finish reason of the Finish delta is the choice's finish_reason."""
    assert completion([TextDelta("x"), Finish(reason)])["choices"][0]["finish_reason"] == reason


def test_completion_reasoning_field_mode() -> None:
    """Field mode puts reasoning in message.reasoning_content, present only with reasoning."""
    message = completion([ReasoningDelta("a"), ReasoningDelta("b"), TextDelta("c"), Finish()])[
        "choices"
    ][0]["message"]
    assert message == {"role": "assistant", "content": "c", "reasoning_content": "ab"}
    plain = completion([TextDelta("c"), Finish()])["choices"][0]["message"]
    assert "reasoning_content" not in plain


def test_completion_reasoning_tags_mode() -> None:
    """Tags mode prefixes the content with one <think> block holding all reasoning."""
    message = completion(
        [ReasoningDelta("a"), TextDelta("c"), ReasoningDelta("b"), Finish()], reasoning="tags"
    )["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "<think>\nab\n</think>\n\nc"}


def test_completion_citations_appendix_drops_duplicate_urls() -> None:
    """Citations become the trailing 搜索结果来自 list, duplicate URLs dropped, order kept."""
    acc = CompletionAccumulator()
    acc.add([Citation("A", "https://a"), TextDelta("Answer")])
    acc.add([Citation("B", "https://b"), Citation("A again", "https://a"), Finish()])
    assert len(acc.citations) == 3
    body = orjson.loads(acc.body(completion_id="x", model="m", created=1, prompt_tokens=0))
    assert body["choices"][0]["message"]["content"] == (
        "Answer\n\n搜索结果来自：\nA - https://a\nB - https://b"
    )


def test_completion_images_and_finish_text() -> None:
    """Images are inline markdown in order; the finish text follows after a blank line."""
    acc = CompletionAccumulator()
    acc.add([TextDelta("Here:"), ImageResult("https://i/1"), ImageResult("https://i/2")])
    acc.add([VideoResult("c", "https://v"), Finish("content_filter", "Stopped.")])
    assert acc.images == ["https://i/1", "https://i/2"]
    assert acc.videos == [VideoResult("c", "https://v")]
    assert (
        acc.text
        == "Here:\n![图像](https://i/1)\n![图像](https://i/2)\n[video](https://v)\n\n\nStopped."
    )
    only = CompletionAccumulator()
    only.add([Finish("content_filter", "Stopped.")])
    assert only.text == "Stopped."


def test_accumulator_state() -> None:
    """finished and error track the end; later deltas are ignored; body() needs a clean finish."""
    acc = CompletionAccumulator()
    acc.add([TextDelta("a")])
    assert (acc.finished, acc.error, acc.text) == (False, None, "a")
    with pytest.raises(LocalProtocolError):
        acc.body(completion_id="x", model="m", created=1, prompt_tokens=0)
    acc.add([TextDelta("b"), Finish(), TextDelta("ignored")])
    acc.add([TextDelta("ignored too")])
    assert (acc.finished, acc.text) == (True, "ab")

    failed = CompletionAccumulator()
    failed.add([TextDelta("a"), UpstreamError("x", "boom", 503), TextDelta("b")])
    assert failed.error == UpstreamError("x", "boom", 503)
    assert not failed.finished
    assert failed.text == "a"
    with pytest.raises(LocalProtocolError):
        failed.body(completion_id="x", model="m", created=1, prompt_tokens=0)


def test_sdk_reads_a_completion() -> None:
    """The official openai client parses our non-stream body, reasoning_content included."""
    acc = CompletionAccumulator()
    acc.add([ReasoningDelta("why"), TextDelta("Hi"), Finish("length")])
    body = acc.body(completion_id="c1", model="step", created=3, prompt_tokens=2)
    with SdkClient(body, "application/json") as client:
        result = client.chat.completions.create(
            model="step", messages=[{"role": "user", "content": "x"}]
        )
    assert isinstance(result, ChatCompletion)
    assert result.choices[0].message.content == "Hi"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.total_tokens == 2 + estimate_tokens("why") + estimate_tokens("Hi")


# ---------------------------------------------------------------------------
# properties

texts = st.text(max_size=12)
finishes = st.builds(
    Finish, st.sampled_from(["stop", "length", "content_filter", "tool_calls"]),
    st.text(max_size=8),
)


def encode_batched(deltas: list[Delta], cuts: list[int], **kwargs: Any) -> bytes:
    """Encode ``deltas`` split into batches at ``cuts``."""
    enc = ChunkEncoder(completion_id="c", model="m", created=1, **kwargs)
    wire, start = enc.start(), 0
    for cut in sorted(set(cuts)):
        wire += enc.encode(deltas[start:cut])
        start = cut
    return wire + enc.encode(deltas[start:])


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(texts, max_size=8),
    finish=finishes,
    mode=st.sampled_from(["field", "tags"]),
    data=st.data(),
)
def test_any_batching_gives_the_accumulators_content(
    pieces: list[str], finish: Finish, mode: ReasoningMode, data: st.DataObject
) -> None:
    """For text deltas and a Finish, any batching streams exactly the accumulator's content."""
    deltas: list[Delta] = [*map(TextDelta, pieces), finish]
    cuts = data.draw(st.lists(st.integers(0, len(deltas)), max_size=6), label="cuts")
    wire = encode_batched(deltas, cuts, reasoning=mode)
    whole = encode_batched(deltas, [], reasoning=mode)
    acc = CompletionAccumulator(reasoning=mode)
    acc.add(deltas)
    assert content_of(wire) == content_of(whole) == acc.text
    events = data_events(wire)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    assert events[-2]["choices"][0]["finish_reason"] == finish.reason


deltas_any = st.lists(
    st.one_of(
        st.builds(TextDelta, texts),
        st.builds(ReasoningDelta, texts),
        st.builds(Citation, texts, texts),
        st.builds(ImageResult, texts),
        st.builds(VideoResult, texts, texts),
        st.builds(ToolCallDelta, st.integers(0, 2), texts, texts, texts),
        finishes,
        st.builds(UpstreamError, texts, texts),
    ),
    max_size=10,
)


@settings(max_examples=200, deadline=None)
@given(deltas=deltas_any, mode=st.sampled_from(["field", "tags"]), data=st.data())
def test_any_deltas_give_well_formed_events(
    deltas: list[Delta], mode: ReasoningMode, data: st.DataObject
) -> None:
    """Any deltas in any batching give valid chunks; [DONE] comes once, last, only after an end."""
    cuts = data.draw(st.lists(st.integers(0, len(deltas)), max_size=6), label="cuts")
    wire = encode_batched(deltas, cuts, reasoning=mode, include_usage=True)
    events = data_events(wire)
    ended = any(isinstance(d, Finish | UpstreamError) for d in deltas)
    assert (events[-1] == "[DONE]") == ended
    assert events.count("[DONE]") == (1 if ended else 0)
    for event in events:
        if isinstance(event, dict) and "error" not in event:
            ChatCompletionChunk.model_validate(event)
            assert (event["id"], event["model"], event["created"]) == ("c", "m", 1)
    whole = encode_batched(deltas, [], reasoning=mode, include_usage=True)
    assert reasoning_of(wire) == reasoning_of(whole)
    if not any(isinstance(d, Citation) for d in deltas):
        # Only a citation block's closing blank line depends on the batching.
        assert content_of(wire) == content_of(whole)


def test_stream_image_after_text_starts_its_own_line() -> None:
    """An image that follows text without a newline is put on a line of its own."""
    encoder = ChunkEncoder(completion_id="x", model="m", created=1)
    out = encoder.encode([TextDelta("画好了："), ImageResult("https://i/1"), ImageResult("https://i/2")])
    contents = [
        orjson.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in out.split(b"\n")
        if line.startswith(b"data: {")
    ]
    assert "".join(contents) == "画好了：\n![图像](https://i/1)\n![图像](https://i/2)\n"
