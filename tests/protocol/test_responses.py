"""Tests for protocol.responses (the request) and protocol.response_output (events, bodies).

Sans-IO: plain functions, no event loop. What clients accept is checked
with the installed ``openai`` SDK itself: its pydantic types validate every
event and every response object, its stream accumulator
(``ResponseStreamState``, what ``client.responses.stream`` runs) rebuilds the
response from our events, and its client reads our bytes through an
in-memory transport (no socket).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import openai
import orjson
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from protocol.deltas import (
    Citation,
    Delta,
    Finish,
    ImageResult,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    VideoResult,
)
from protocol.errors import LocalProtocolError, RequestError
from protocol.openai import (
    MAX_JSON_DEPTH,
    ChatRequest,
    ContentPart,
    Message,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
    prompt_tokens,
)
from protocol.response_output import (
    ResponseAccumulator,
    ResponseEncoder,
    response_echo,
    response_id,
)
from protocol.responses import ResponsesRequest, parse_responses_request
from tests.protocol.wire import SdkClient, named_events, nested

EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
Event = tuple[str, dict[str, Any]]


def parse(body: dict[str, Any]) -> ResponsesRequest:
    return parse_responses_request(orjson.dumps(body))


def refused(body: dict[str, Any] | bytes) -> RequestError:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(RequestError) as info:
        parse_responses_request(raw)
    assert info.value.status == 400
    assert info.value.kind == "invalid_request_error"
    return info.value


def text(value: str) -> ContentPart:
    return ContentPart("text", text=value)


# ---------------------------------------------------------------------------
# request


def test_a_string_input_is_one_user_message() -> None:
    """``input: "hi"`` is one user message; everything else takes its default."""
    request = parse({"model": "step", "input": "hi"})
    assert request == ResponsesRequest(
        model="step", messages=(Message("user", (text("hi"),), False),), stream=False,
        include_usage=False, conversation_id=None, use_search=None,
    )


def test_instructions_come_first_as_a_system_message() -> None:
    """``instructions`` become a system message before the input's messages."""
    request = parse({"input": [{"role": "user", "content": "hi"}], "instructions": "Be brief."})
    assert request.messages == (
        Message("system", (text("Be brief."),), False),
        Message("user", (text("hi"),), False),
    )
    assert request.instructions == "Be brief."
    assert request.model == ""


def test_message_items_keep_roles_and_parts() -> None:
    """Message items, typed or not, with string or part contents, become messages in order."""
    request = parse({"input": [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Look:"},
            {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto"},
            {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0=",
             "filename": "a.pdf"},
            {"type": "input_file", "file_url": "https://example.com/b.pdf"},
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        ]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Seen.", "annotations": []},
                     {"type": "refusal", "refusal": "no"}]},
        {"role": "system", "content": "More rules."},
    ]})
    assert request.messages == (
        Message("developer", (text("Rules."),), False),
        Message("user", (
            text("Look:"),
            ContentPart("image_url", url="https://example.com/a.png"),
            ContentPart("file", url="data:application/pdf;base64,JVBERi0=", name="a.pdf"),
            ContentPart("file", url="https://example.com/b.pdf"),
        ), True),
        Message("assistant", (text("Seen."),), True),
        Message("system", (text("More rules."),), False),
    )


def test_function_calls_join_the_assistant_turn_and_outputs_become_tool_messages() -> None:
    """A turn's text and calls make one assistant message; outputs name their call's function.

    Reasoning items between them are dropped; a call with no assistant text
    before it makes an assistant message of its own.
    """
    request = parse({"input": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_a", "name": "weather",
         "arguments": '{"city":"Paris"}', "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "call_b", "name": "weather",
         "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b",
         "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "function_call", "call_id": "call_c", "name": "clock", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_c", "output": "noon", "name": "time"},
    ]})
    assert request.messages == (
        Message("user", (text("Weather in Paris and Rome?"),), False),
        Message("assistant", (text("Checking."),), False, tool_calls=(
            ToolCall("call_a", "weather", '{"city":"Paris"}'),
            ToolCall("call_b", "weather", '{"city":"Rome"}'),
        )),
        Message("tool", (text("sunny"),), False, tool_call_id="call_a", name="weather"),
        Message("tool", (text("rain"),), True, tool_call_id="call_b", name="weather"),
        Message("assistant", (), False, tool_calls=(ToolCall("call_c", "clock", "{}"),)),
        Message("tool", (text("noon"),), False, tool_call_id="call_c", name="time"),
    )


def test_tools_choice_format_and_limits_map_onto_the_neutral_request() -> None:
    """Function tools, a named tool choice, a JSON schema format and max_output_tokens."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    request = parse({
        "input": "hi", "stream": True, "max_output_tokens": 64,
        "tools": [
            {"type": "function", "name": "weather", "description": "Forecast.",
             "parameters": schema, "strict": True},
            {"type": "function", "name": "clock", "parameters": None, "strict": None},
        ],
        "tool_choice": {"type": "function", "name": "clock"},
        "text": {"format": {"type": "json_schema", "name": "city", "schema": schema,
                            "strict": True}, "verbosity": "low"},
        "temperature": 0.5, "top_p": 1, "parallel_tool_calls": False, "store": False,
        "metadata": {"k": "v"}, "user": "u1", "truncation": "auto", "include": [],
        "reasoning": {"effort": "low"},
    })
    assert request.tools == (ToolSpec("weather", "Forecast.", schema), ToolSpec("clock"))
    assert request.tool_strict == (True, None)
    assert request.tool_choice == ToolChoice("function", "clock")
    assert request.response_format == ResponseFormat("json_schema", schema, "city", True)
    assert (request.stream, request.max_tokens) == (True, 64)
    assert (request.temperature, request.top_p, request.parallel_tool_calls, request.store,
            request.metadata, request.user, request.truncation) == (
        0.5, 1, False, False, (("k", "v"),), "u1", "auto")


def test_sampling_parameters_go_into_the_neutral_request() -> None:
    """temperature and top_p are the neutral request's (floats, for an OpenAI-compatible
    upstream) and still echoed; absent, they are None and echoed as null (issue 16)."""
    request = parse({"input": "hi", "temperature": 0.3, "top_p": 1})
    assert (request.temperature, request.top_p) == (0.3, 1.0)
    assert isinstance(request.top_p, float)
    echo = response_echo(request)
    assert (echo["temperature"], echo["top_p"]) == (0.3, 1.0)
    assert (parse({"input": "hi", "temperature": 2, "top_p": 0}).temperature) == 2.0
    unset = parse({"input": "hi", "top_p": None})
    assert (unset.temperature, unset.top_p) == (None, None)
    assert (unset.presence_penalty, unset.frequency_penalty, unset.seed) == (None, None, None)


@pytest.mark.parametrize(("fmt", "expected"), [
    ({"type": "text"}, None),
    ({"type": "json_object"}, ResponseFormat("json_object")),
    ({"type": "json_schema", "name": "x", "schema": {}}, ResponseFormat("json_schema", {}, "x")),
])
def test_text_formats(fmt: dict[str, Any], expected: ResponseFormat | None) -> None:
    """``text.format``: text is no format; JSON object and schema become ResponseFormat."""
    assert parse({"input": "x", "text": {"format": fmt}}).response_format == expected


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
def test_tool_choice_modes(choice: str) -> None:
    """The three string modes map one to one."""
    tools = [{"type": "function", "name": "f"}]
    assert parse({"input": "x", "tools": tools, "tool_choice": choice}).tool_choice == (
        ToolChoice(choice))  # type: ignore[arg-type]


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id",
     "keeps no stored responses"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "keeps no stored"),
    ({"input": "x", "background": True}, "background", "keeps no stored"),
    ({}, "input", "Missing required parameter: 'input'"),
    ({"input": 3}, "input", "expected a string or an array"),
    ({"input": []}, "input", "no message"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "no message"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type",
     "'item_reference'"),
    ({"input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type", "built-in tools"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "'tool'"),
    ({"input": [{"role": "user"}]}, "input[0].content", "Missing"),
    ({"input": [{"role": "user", "content": 1}]}, "input[0].content", "expected a string"),
    ({"input": ["hi"]}, "input[0]", "expected an object"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     "input[0].content[0].text", "Missing"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f1"}]}]},
     "input[0].content[0].file_id", "'file_id'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0].image_url", "Missing"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/p ng;base64,aGk="}]}]},
     "input[0].content[0].image_url", "Invalid"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f1"}]}]},
     "input[0].content[0].file_id", "'file_id'"),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
     "input[0].content[0].file_data", "Missing"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_file", "file_data": "data:text/plain,x", "filename": "a\nb"}]}]},
     "input[0].content[0].filename", "Invalid"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id", "Missing"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
     "input[0].arguments", "expected a string"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output",
     "Missing"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type",
     "Only function tools"),
    ({"input": "x", "tools": {}}, "tools", "expected an array"),
    ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name",
     "does not match"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": []}]},
     "tools[0].parameters", "JSON Schema"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice", "only allowed when"),
    ({"input": "x", "tool_choice": "sometimes"}, "tool_choice", "'sometimes'"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}],
      "tool_choice": {"type": "function", "name": "g"}}, "tool_choice.name", "'g'"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type",
     "built-in tools"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type", "'xml'"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
     "text.format.name", "Missing"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
     "text.format.schema", "Missing"),
    ({"input": "x", "text": []}, "text", "expected an object"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "positive integer"),
    ({"input": "x", "max_output_tokens": True}, "max_output_tokens", "positive integer"),
    ({"input": "x", "stream": "yes"}, "stream", "a boolean"),
    ({"input": "x", "temperature": "hot"}, "temperature", "a number"),
    ({"input": "x", "temperature": 2.5}, "temperature",
     "decimal above maximum value. Expected a value <= 2, but got 2.5 instead."),
    ({"input": "x", "temperature": -1}, "temperature", "Expected a value >= 0"),
    ({"input": "x", "top_p": 1.5}, "top_p", "Expected a value <= 1"),
    ({"input": "x", "top_p": [1]}, "top_p", "a number"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata.k", "a string"),
    ({"input": "x", "truncation": "sometimes"}, "truncation", "'sometimes'"),
    ({"input": "x", "include": "all"}, "include", "an array of strings"),
    ({"input": "x", "instructions": 5}, "instructions", "a string"),
])
def test_bad_requests_name_the_parameter(body: dict[str, Any], param: str, says: str) -> None:
    """Each malformed or unsupported field is a 400 whose ``param`` names it."""
    error = refused(body)
    assert error.param == param
    assert says in error.message


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"x"', b"NaN"])
def test_a_body_that_is_not_a_json_object_is_a_400(raw: bytes) -> None:
    """Invalid JSON, or JSON that is not an object, is a 400 without a param."""
    assert refused(raw).param is None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
    | st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "user",
                       "assistant", "input_text", "input_image", "function"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["type", "role", "content", "text", "call_id", "name",
                                       "arguments", "output", "image_url", "format"]),
                      children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(items=JSON_VALUES, tools=JSON_VALUES, choice=JSON_VALUES, text_config=JSON_VALUES)
def test_any_body_parses_or_is_a_request_error(
    items: object, tools: object, choice: object, text_config: object
) -> None:
    """Whatever the JSON, the parser returns a request or raises RequestError, nothing else."""
    body = {"input": items, "tools": tools, "tool_choice": choice, "text": text_config}
    with contextlib.suppress(RequestError):
        assert parse(body).messages


# ---------------------------------------------------------------------------
# stream


def encoder(request: ChatRequest | None = None, **kwargs: Any) -> ResponseEncoder:
    return ResponseEncoder(request or parse({"model": "m", "input": "hi"}),
                           response_id="resp_1", model="m", created_at=7, item_base="t", **kwargs)


def stream(batches: list[list[Delta]], request: ChatRequest | None = None) -> list[Event]:
    """A whole stream's events; ``start()`` is called after the first batch (as the relay may)."""
    enc = encoder(request)
    first = enc.encode(batches[0]) if batches else b""
    wire = enc.start() + first + b"".join(enc.encode(batch) for batch in batches[1:])
    events = named_events(wire)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    for _, data in events:
        EVENTS.validate_python(data)
    return events


def bare(events: list[Event]) -> list[Event]:
    """The events without their sequence numbers and type (those are checked in ``stream``)."""
    return [(kind, {k: v for k, v in data.items() if k not in ("type", "sequence_number")})
            for kind, data in events]


def sdk_rebuild(events: list[Event]) -> Any:
    """What the SDK's stream helper makes of the events: its final response, if completed."""
    state: ResponseStreamState[object] = ResponseStreamState(input_tools=openai.omit,
                                                             text_format=openai.omit)
    for _, data in events:
        state.handle_event(EVENTS.validate_python(data))
    return state._completed_response


REQUEST_ECHO: dict[str, Any] = {
    "instructions": None, "max_output_tokens": None, "metadata": {},
    "parallel_tool_calls": True, "store": True, "temperature": None,
    "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": None,
    "truncation": "disabled", "user": None,
}


def response(status: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "resp_1", "object": "response", "created_at": 7, "status": status,
        "background": False, "error": None, "incomplete_details": None, "model": "m",
        "output": [], "previous_response_id": None, "usage": None, **REQUEST_ECHO, **fields,
    }


def usage(output: int, reasoning: int = 0, input_tokens: int = 8) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output,
    }


def message(text: str, status: str = "completed", item_id: str = "msg_t_0") -> dict[str, Any]:
    content = [] if status == "in_progress" else [
        {"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
    return {"id": item_id, "type": "message", "status": status, "content": content,
            "role": "assistant"}


def text_part(value: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": value}


LIFECYCLE_START = [
    ("response.created", {"response": response("in_progress")}),
    ("response.in_progress", {"response": response("in_progress")}),
]


def test_text_stream_is_openais_event_sequence() -> None:
    """Text: created, in_progress, a message item with one delta per batch, done events, completed.

    ``start()`` comes after the first batch was encoded, yet its events
    carry sequence numbers 0 and 1 and the rest follow in order.
    """
    events = stream([[TextDelta("Hel"), TextDelta("lo")], [TextDelta(" world"), Finish()]])
    ids = {"item_id": "msg_t_0", "output_index": 0, "content_index": 0}
    done = message("Hello world")
    assert bare(events) == [
        *LIFECYCLE_START,
        ("response.output_item.added", {"output_index": 0, "item": message("", "in_progress")}),
        ("response.content_part.added", {**ids, "part": text_part("")}),
        ("response.output_text.delta", {**ids, "delta": "Hello", "logprobs": []}),
        ("response.output_text.delta", {**ids, "delta": " world", "logprobs": []}),
        ("response.output_text.done", {**ids, "text": "Hello world", "logprobs": []}),
        ("response.content_part.done", {**ids, "part": text_part("Hello world")}),
        ("response.output_item.done", {"output_index": 0, "item": done}),
        ("response.completed", {"response": response("completed", output=[done],
                                                     usage=usage(3))}),
    ]
    final = sdk_rebuild(events)
    assert final.output_text == "Hello world"
    assert final.status == "completed"


def test_reasoning_then_text_are_two_items() -> None:
    """Reasoning is a reasoning item with a reasoning_text part, then the text a message item."""
    events = stream([[ReasoningDelta("Let me "), ReasoningDelta("think.")],
                     [TextDelta("42"), Finish()]])
    rs = {"item_id": "rs_t_0", "output_index": 0, "content_index": 0}
    msg = {"item_id": "msg_t_1", "output_index": 1, "content_index": 0}
    reasoning_done = {"id": "rs_t_0", "type": "reasoning", "summary": [],
                      "content": [{"type": "reasoning_text", "text": "Let me think."}],
                      "status": "completed"}
    message_done = message("42", item_id="msg_t_1")
    assert bare(events) == [
        *LIFECYCLE_START,
        ("response.output_item.added", {"output_index": 0, "item": {
            "id": "rs_t_0", "type": "reasoning", "summary": [], "content": [],
            "status": "in_progress"}}),
        ("response.content_part.added", {**rs, "part": {"type": "reasoning_text", "text": ""}}),
        ("response.reasoning_text.delta", {**rs, "delta": "Let me think."}),
        ("response.reasoning_text.done", {**rs, "text": "Let me think."}),
        ("response.content_part.done",
         {**rs, "part": {"type": "reasoning_text", "text": "Let me think."}}),
        ("response.output_item.done", {"output_index": 0, "item": reasoning_done}),
        ("response.output_item.added",
         {"output_index": 1, "item": message("", "in_progress", "msg_t_1")}),
        ("response.content_part.added", {**msg, "part": text_part("")}),
        ("response.output_text.delta", {**msg, "delta": "42", "logprobs": []}),
        ("response.output_text.done", {**msg, "text": "42", "logprobs": []}),
        ("response.content_part.done", {**msg, "part": text_part("42")}),
        ("response.output_item.done", {"output_index": 1, "item": message_done}),
        ("response.completed", {"response": response(
            "completed", output=[reasoning_done, message_done], usage=usage(5, 4))}),
    ]
    final = sdk_rebuild(events)
    assert final.output_text == "42"
    assert final.output[0].content[0].text == "Let me think."


def fc(index: int, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": f"fc_t_{index}", "type": "function_call", "status": status,
            "arguments": arguments, "call_id": call_id, "name": name}


def test_function_calls_are_function_call_items() -> None:
    """Text, then two calls: each call an item with argument deltas, .done and item done."""
    tools = [{"type": "function", "name": "weather", "parameters": {"type": "object"},
              "strict": False}]
    request = parse({"model": "m", "input": "hi", "tools": tools, "tool_choice": "required"})
    events = stream([
        [TextDelta("Checking."), ToolCallDelta(0, "call_a", "weather"),
         ToolCallDelta(0, arguments_part='{"city":'), ToolCallDelta(0, arguments_part='"Paris"}')],
        [ToolCallDelta(1, "call_b", "weather", '{"city"'),
         ToolCallDelta(1, arguments_part=':"Rome"}'), Finish("tool_calls")],
    ], request)
    paris, rome = '{"city":"Paris"}', '{"city":"Rome"}'
    first = {"item_id": "fc_t_1", "output_index": 1}
    second = {"item_id": "fc_t_2", "output_index": 2}
    output = [message("Checking."), fc(1, "call_a", "weather", paris, "completed"),
              fc(2, "call_b", "weather", rome, "completed")]
    assert bare(events)[8:] == [
        ("response.output_item.added",
         {"output_index": 1, "item": fc(1, "call_a", "weather", "", "in_progress")}),
        ("response.function_call_arguments.delta", {**first, "delta": paris}),
        ("response.function_call_arguments.done", {**first, "arguments": paris}),
        ("response.output_item.done", {"output_index": 1, "item": output[1]}),
        ("response.output_item.added",
         {"output_index": 2, "item": fc(2, "call_b", "weather", "", "in_progress")}),
        ("response.function_call_arguments.delta", {**second, "delta": rome}),
        ("response.function_call_arguments.done", {**second, "arguments": rome}),
        ("response.output_item.done", {"output_index": 2, "item": output[2]}),
        ("response.completed", {"response": response(
            "completed", output=output, usage=usage(15, input_tokens=prompt_tokens(request)),
            tools=[{"type": "function", "name": "weather", "description": None,
                    "parameters": {"type": "object"}, "strict": False}],
            tool_choice="required")}),
    ]
    assert [kind for kind, _ in events[2:8]] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
    ]
    final = sdk_rebuild(events)
    assert [(item.call_id, item.arguments) for item in final.output[1:]] == [
        ("call_a", paris), ("call_b", rome)]


def test_length_ends_incomplete() -> None:
    """Finish("length"): the message is done as incomplete, then response.incomplete."""
    request = parse({"model": "m", "input": "hi", "max_output_tokens": 2})
    events = stream([[TextDelta("Hello wo"), Finish("length")]], request)
    cut = message("Hello wo", "incomplete")
    assert bare(events)[-2:] == [
        ("response.output_item.done", {"output_index": 0, "item": cut}),
        ("response.incomplete", {"response": response(
            "incomplete", output=[cut], usage=usage(2),
            incomplete_details={"reason": "max_output_tokens"}, max_output_tokens=2)}),
    ]
    assert sdk_rebuild(events) is None  # the SDK's get_final_response wants response.completed


def test_content_filter_ends_incomplete_with_its_text() -> None:
    """Finish("content_filter") with a text: the text joins the message, then incomplete."""
    events = stream([[TextDelta("Hi"), Finish("content_filter", text="Blocked.")]])
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "content_filter"}
    assert events[-1][1]["response"]["output"] == [message("Hi\n\nBlocked.", "incomplete")]


def test_an_upstream_error_in_band_fails_the_response() -> None:
    """An UpstreamError mid-answer: the item done as incomplete, ``error``, ``response.failed``."""
    events = stream([[TextDelta("Hel")], [UpstreamError("rate_limited", "slow down", 429),
                                          TextDelta("ignored")]])
    cut = message("Hel", "incomplete")
    assert bare(events)[-3:] == [
        ("response.output_item.done", {"output_index": 0, "item": cut}),
        ("error", {"code": "rate_limited", "message": "slow down", "param": None}),
        ("response.failed", {"response": response(
            "failed", output=[cut], usage=usage(1),
            error={"code": "rate_limit_exceeded", "message": "slow down"})}),
    ]
    Response.model_validate(events[-1][1]["response"])


def test_an_error_before_any_output_fails_with_server_error() -> None:
    """An error as the first event: no item, ``error`` then ``response.failed`` (server_error)."""
    events = stream([[UpstreamError("internal", "boom")]])
    assert [kind for kind, _ in events] == [
        "response.created", "response.in_progress", "error", "response.failed"]
    assert events[-1][1]["response"]["error"] == {"code": "server_error", "message": "boom"}


def test_citations_images_and_videos_are_message_text() -> None:
    """Citation lines (a blank line after a block), images and videos on their own lines."""
    events = stream([
        [Citation("A", "https://a"), Citation("B", "https://b"), TextDelta("Text")],
        [ImageResult("https://img"), VideoResult("c1", "https://vid"), Finish()],
    ], None)
    done = events[-1][1]["response"]["output"]
    assert done == [message(
        "检索 A - https://a ...\n检索 B - https://b ...\n\nText\n![图像](https://img)\n"
        "[video](https://vid)\n")]


def test_the_citation_line_is_the_providers() -> None:
    """The citation template given to the encoder renders each hit."""
    enc = encoder(citation_line="[{title}]({url})\n")
    events = named_events(enc.encode([Citation("A", "https://a"), Finish()]))
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == "[A](https://a)\n\n"
    assert enc.citations == [Citation("A", "https://a")]


def test_an_empty_answer_completes_with_no_output() -> None:
    """Finish alone: completed with an empty output and zero output tokens."""
    events = stream([[TextDelta(""), ReasoningDelta(""), Finish()]])
    assert bare(events)[2:] == [
        ("response.completed", {"response": response("completed", usage=usage(0))})]
    assert sdk_rebuild(events).output == []


def test_after_the_end_nothing_is_encoded() -> None:
    """Once finished, encode, keepalive and fail give nothing; start still gives its events."""
    enc = encoder()
    assert enc.keepalive() == b": keep-alive\n\n"
    enc.encode([TextDelta("x"), Finish(), TextDelta("y")])
    assert enc.finished
    assert enc.encode([TextDelta("z")]) == b""
    assert enc.keepalive() == b""
    assert enc.fail("server_shutting_down", "bye") == b""
    assert [kind for kind, _ in named_events(enc.start())] == [
        "response.created", "response.in_progress"]
    with pytest.raises(LocalProtocolError):
        enc.start()


def test_fail_ends_an_open_stream_as_failed() -> None:
    """The relay's last words: the open item done as incomplete, ``error``, ``response.failed``."""
    enc = encoder()
    wire = enc.start() + enc.encode([ToolCallDelta(0, "call_a", "f", "{")])
    wire += enc.fail("server_shutting_down", "the server is shutting down", 503)
    events = named_events(wire)
    assert [kind for kind, _ in events[-4:]] == [
        "response.function_call_arguments.done", "response.output_item.done", "error",
        "response.failed"]
    assert events[-2][1]["code"] == "server_shutting_down"
    assert events[-1][1]["response"]["output"] == [fc(0, "call_a", "f", "{", "incomplete")]


def test_arguments_of_a_call_that_is_not_open_are_a_local_error() -> None:
    """A ToolCallDelta without id for a call that is not the open one is a bug upstream of us."""
    with pytest.raises(LocalProtocolError):
        encoder().encode([ToolCallDelta(0, arguments_part="{}")])
    with pytest.raises(LocalProtocolError):
        encoder().encode([ToolCallDelta(0, "call_a", "f"), ToolCallDelta(1, arguments_part="{}")])


def test_the_response_is_named_after_the_conversation_until_its_id_is_sent() -> None:
    """completion_id takes a conversation id (``resp_`` prefixed) until start() sent the id."""
    enc = encoder()
    enc.completion_id = "chat42"
    assert enc.completion_id == "resp_chat42"
    enc.completion_id = "resp_chat42"  # the same id: nothing to change
    enc.encode([TextDelta("x")])  # item events do not carry the response id
    enc.completion_id = "chat43"
    assert named_events(enc.start())[0][1]["response"]["id"] == "resp_chat43"
    with pytest.raises(LocalProtocolError):
        enc.completion_id = "chat44"
    enc.completion_id = "chat43"  # unchanged: allowed


def test_response_ids() -> None:
    """A conversation id gets OpenAI's prefix, a response id stays, none gets a fresh id."""
    assert response_id("abc") == "resp_abc"
    assert response_id("resp_abc") == "resp_abc"
    fresh = {response_id("") for _ in range(3)}
    assert len(fresh) == 3
    assert all(value.startswith("resp_") and len(value) > 20 for value in fresh)


def test_a_plain_chat_request_echoes_openais_defaults() -> None:
    """A ChatRequest that is not a ResponsesRequest (e.g. rebuilt by the service) still echoes."""
    plain = ChatRequest(model="m", messages=(Message("user", (text("hi"),), False),),
                        stream=True, include_usage=False, conversation_id=None,
                        use_search=None, tools=(ToolSpec("f", "d"),),
                        tool_choice=ToolChoice("function", "f"),
                        response_format=ResponseFormat("json_object"), max_tokens=9)
    assert response_echo(plain) == {
        **REQUEST_ECHO, "max_output_tokens": 9, "text": {"format": {"type": "json_object"}},
        "tool_choice": {"type": "function", "name": "f"},
        "tools": [{"type": "function", "name": "f", "description": "d", "parameters": None,
                   "strict": None}],
    }
    events = stream([[TextDelta("x"), Finish()]], plain)
    Response.model_validate(events[-1][1]["response"])


@st.composite
def answers(draw: st.DrawFn) -> list[Delta]:
    """An answer: reasoning, text, citations and tool calls in any order, then a Finish."""
    pieces = st.text(max_size=6)
    deltas: list[Delta] = []
    calls = 0
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["text", "reasoning", "cite", "call"]))
        if kind == "text":
            deltas.append(TextDelta(draw(pieces)))
        elif kind == "reasoning":
            deltas.append(ReasoningDelta(draw(pieces)))
        elif kind == "cite":
            deltas.append(Citation("T", "https://t"))
        else:
            deltas.append(ToolCallDelta(calls, f"call_{calls}", "f"))
            deltas += [ToolCallDelta(calls, arguments_part=draw(pieces))
                       for _ in range(draw(st.integers(0, 3)))]
            calls += 1
    deltas.append(Finish(draw(st.sampled_from(["stop", "length", "tool_calls"]))))
    return deltas


def batches_of(deltas: list[Delta], cuts: list[int]) -> list[list[Delta]]:
    edges = [0, *sorted(set(cuts)), len(deltas)]
    return [deltas[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=200, deadline=None)
@given(deltas=answers(), data=st.data())
def test_any_batching_gives_the_same_items_and_text(
    deltas: list[Delta], data: st.DataObject
) -> None:
    """However the events are cut into batches, the final response and the text are the same.

    (Citation blocks aside: a block of citations ends with the batch that
    holds it, as in the chat stream, so the draws cut no citation block.)
    """
    cuttable = [i for i in range(1, len(deltas))
                if not (isinstance(deltas[i - 1], Citation) and isinstance(deltas[i], Citation))]
    cuts = data.draw(st.lists(st.sampled_from(cuttable)), label="cuts") if cuttable else []
    one = stream([deltas])
    split = stream(batches_of(deltas, cuts))
    assert one[-1][0] == split[-1][0]
    assert one[-1][1]["response"] == split[-1][1]["response"]

    def deltas_text(events: list[Event]) -> dict[str, str]:
        texts: dict[str, str] = {}
        for kind, payload in events:
            if kind.endswith(".delta"):
                texts[payload["item_id"]] = texts.get(payload["item_id"], "") + payload["delta"]
        return texts

    assert deltas_text(one) == deltas_text(split)
    final = one[-1][1]["response"]
    for item in final["output"]:  # the deltas add up to each item's text
        if item["type"] == "function_call":
            assert deltas_text(one).get(item["id"], "") == item["arguments"]
        else:
            assert deltas_text(one).get(item["id"], "") == item["content"][0]["text"]
    if final["status"] == "completed":
        rebuilt = sdk_rebuild(one)
        assert rebuilt.model_dump(exclude={"output"}) == Response.model_validate(
            final).model_dump(exclude={"output"})
        assert len(rebuilt.output) == len(final["output"])


# ---------------------------------------------------------------------------
# whole answer


def whole(deltas: list[list[Delta]], request: ChatRequest | None = None) -> dict[str, Any]:
    acc = ResponseAccumulator(item_base="t")
    for batch in deltas:
        acc.add(batch)
    body = acc.body(request or parse({"model": "m", "input": "hi"}), response_id="resp_1",
                    model="m", created_at=7)
    value: dict[str, Any] = orjson.loads(body)
    Response.model_validate(value)
    return value


def test_the_whole_response_holds_the_streams_items() -> None:
    """Non-stream: the same items as the streamed response.completed, and the same usage."""
    answer: list[list[Delta]] = [
        [ReasoningDelta("Hmm."), TextDelta("Calling.")],
        [ToolCallDelta(0, "call_a", "f", '{"x":'), ToolCallDelta(0, arguments_part="1}"),
         Finish("tool_calls")],
    ]
    assert whole(answer) == stream(answer)[-1][1]["response"]


DEEP_SCHEMA_FIELDS = [
    ({"tools": [{"type": "function", "name": "f", "parameters": "@"}]}, "tools[0].parameters"),
    ({"text": {"format": {"type": "json_schema", "name": "f", "schema": "@", "strict": True}}},
     "text.format.schema"),
]


def deep_body(fields: dict[str, Any], depth: int) -> bytes:
    return orjson.dumps({"model": "m", "input": "hi", **fields}).replace(b'"@"', nested(depth))


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1015])
@pytest.mark.parametrize(("fields", "param"), DEEP_SCHEMA_FIELDS)
def test_a_schema_nested_too_deep_is_a_400_naming_it(
    fields: dict[str, Any], param: str, depth: int
) -> None:
    """A schema deeper than MAX_JSON_DEPTH is a 400. orjson reads 1024 levels but writes 254,
    and the response object echoes the tools and the format: a 300-level schema was a 500."""
    error = refused(deep_body(fields, depth))
    assert error.param == param
    assert f"nested more than {MAX_JSON_DEPTH} levels" in error.message


@pytest.mark.parametrize(("fields", "param"), DEEP_SCHEMA_FIELDS)
def test_a_schema_nested_to_the_limit_is_echoed(fields: dict[str, Any], param: str) -> None:
    """At MAX_JSON_DEPTH levels the request parses, and the stream and the whole response
    (which echo the schema) can be written."""
    request = parse_responses_request(deep_body(fields, MAX_JSON_DEPTH))
    answer: list[list[Delta]] = [[TextDelta("{}"), Finish()]]
    assert whole(answer, request) == stream(answer, request)[-1][1]["response"]


def test_the_whole_response_lists_citations_after_the_text() -> None:
    """Citations are listed once each after the answer, as a whole chat completion lists them."""
    body = whole([[Citation("A", "https://a"), TextDelta("Answer."), Citation("A2", "https://a"),
                   Citation("B", "https://b"), Finish()]])
    assert body["output"] == [message(
        "Answer.\n\n搜索结果来自：\nA - https://a\nB - https://b")]


def test_citations_without_text_make_a_message() -> None:
    """Citations and a tool call, no text: the list is a message item of its own, at the end."""
    body = whole([[Citation("A", "https://a"), ToolCallDelta(0, "call_a", "f", "{}"),
                   Finish("tool_calls")]])
    assert body["output"] == [fc(0, "call_a", "f", "{}", "completed"),
                              message("搜索结果来自：\nA - https://a", item_id="msg_t_1")]


def test_the_whole_response_of_a_cut_answer_is_incomplete() -> None:
    """Finish("length") without streaming: status incomplete, max_output_tokens the reason."""
    body = whole([[TextDelta("Hello"), Finish("length")]])
    assert (body["status"], body["incomplete_details"]) == (
        "incomplete", {"reason": "max_output_tokens"})
    assert body["output"] == [message("Hello", "incomplete")]


def test_the_accumulator_state() -> None:
    """text, finished and error follow what was added; nothing is added after the end."""
    acc = ResponseAccumulator(item_base="t")
    acc.add([TextDelta("a"), ToolCallDelta(0, "call_a", "f"), TextDelta("b")])
    assert (acc.text, acc.finished, acc.error) == ("ab", False, None)
    with pytest.raises(LocalProtocolError):
        acc.body(parse({"input": "x"}), response_id="r", model="m", created_at=0)
    acc.add([UpstreamError("internal", "boom"), TextDelta("c")])
    acc.add([Finish()])
    assert (acc.text, acc.finished, acc.error) == ("ab", False, UpstreamError("internal", "boom"))
    with pytest.raises(LocalProtocolError):
        acc.body(parse({"input": "x"}), response_id="r", model="m", created_at=0)


def test_usage_counts_the_prompt_and_every_item() -> None:
    """input_tokens is the chat estimate of the request; output counts text, reasoning, calls."""
    request = parse({"input": "你好", "instructions": "Answer in English, please."})
    body = whole([[ReasoningDelta("思考"), TextDelta("Hi"), Finish()]], request)
    assert body["usage"] == usage(3, 2, input_tokens=prompt_tokens(request))
    assert body["instructions"] == "Answer in English, please."


# ---------------------------------------------------------------------------
# the SDK's client reading our bytes


def test_the_sdk_stream_helper_rebuilds_the_response_from_our_bytes() -> None:
    """``client.responses.stream`` over our SSE bytes: text events and the final response."""
    enc = encoder()
    wire = enc.start() + enc.encode([ReasoningDelta("r"), TextDelta("Hello ")])
    wire += enc.encode([TextDelta("world"), Finish()])
    sdk = SdkClient(wire, "text/event-stream")
    with sdk.client.responses.stream(model="m", input="hi") as events:
        deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
        final = events.get_final_response()
    assert deltas == ["Hello ", "world"]
    assert final.output_text == "Hello world"
    assert final.id == "resp_1"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert orjson.loads(sdk.requests[0])["stream"] is True


def test_the_sdk_reads_our_whole_response() -> None:
    """``client.responses.create`` without streaming: output_text, usage, a function call."""
    acc = ResponseAccumulator(item_base="t")
    acc.add([TextDelta("Sure."), ToolCallDelta(0, "call_a", "f", "{}"), Finish("tool_calls")])
    body = acc.body(parse({"input": "x"}), response_id="resp_9", model="m", created_at=1)
    sdk = SdkClient(body, "application/json")
    result = sdk.client.responses.create(model="m", input="x")
    assert result.output_text == "Sure."
    assert result.output[1].type == "function_call"
    assert result.usage is not None
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens


class City(pydantic.BaseModel):
    city: str


def test_the_sdks_structured_output_request_and_parse() -> None:
    """``responses.parse(text_format=City)``: its request asks for City's JSON schema (strict),
    and our whole response's text is parsed into a City."""
    acc = ResponseAccumulator(item_base="t")
    acc.add([TextDelta('{"city": "Paris"}'), Finish()])
    body = acc.body(parse({"input": "x"}), response_id="resp_9", model="m", created_at=1)
    sdk = SdkClient(body, "application/json")
    result = sdk.client.responses.parse(model="m", input="Where?", text_format=City)
    assert result.output_parsed == City(city="Paris")
    fmt = parse_responses_request(sdk.requests[0]).response_format
    assert fmt is not None
    assert (fmt.type, fmt.name, fmt.strict) == ("json_schema", "City", True)
    assert fmt.schema["properties"] == {"city": {"title": "City", "type": "string"}}


def test_our_output_items_sent_back_as_input_parse() -> None:
    """The SDK's tool loop sends our output items back (reasoning, message, function_call) with
    a function_call_output: that request parses into the conversation the upstream needs."""
    acc = ResponseAccumulator(item_base="t")
    acc.add([ReasoningDelta("Need the weather."), TextDelta("Checking."),
             ToolCallDelta(0, "call_a", "weather", '{"city":"Paris"}'), Finish("tool_calls")])
    body = acc.body(parse({"input": "x"}), response_id="resp_9", model="m", created_at=1)
    sdk = SdkClient(body, "application/json")
    first = sdk.client.responses.create(model="m", input="Weather in Paris?")
    sdk.client.responses.create(model="m", input=[
        {"role": "user", "content": "Weather in Paris?"}, *first.output,  # type: ignore[list-item]
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
    ])
    assert parse_responses_request(sdk.requests[1]).messages == (
        Message("user", (text("Weather in Paris?"),), False),
        Message("assistant", (text("Checking."),), True,
                tool_calls=(ToolCall("call_a", "weather", '{"city":"Paris"}'),)),
        Message("tool", (text("sunny"),), False, tool_call_id="call_a", name="weather"),
    )
