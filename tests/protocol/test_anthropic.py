"""Tests for protocol.anthropic: Messages requests, stream events, whole messages, errors.

Sans-IO: plain functions, no event loop. The shapes are checked by the
client people run: the official ``anthropic`` SDK builds the request bodies
we parse (captured through an in-memory httpx transport), validates our
bodies with its pydantic types, and rebuilds messages from our events with
its own stream accumulator (``anthropic.lib.streaming``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message as SDKMessage
from anthropic.types import RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from protocol.anthropic import (
    KEEPALIVE,
    MessageAccumulator,
    MessageEncoder,
    count_tokens_body,
    error_body,
    error_type,
    message_id,
    parse_messages_request,
    stop_reason,
    tool_use_id,
)
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
from protocol.errors import LocalProtocolError, RequestError
from protocol.openai import (
    MAX_JSON_DEPTH,
    ChatRequest,
    ContentPart,
    Message,
    ToolCall,
    ToolChoice,
    ToolSpec,
    prompt_tokens,
)
from tests.protocol.wire import named_events, nested

PNG = "iVBORw0KGgo="
EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


def body(**fields: Any) -> bytes:
    """A Messages body: one user "hi", max_tokens 64, plus ``fields`` (None removes one)."""
    data: dict[str, Any] = {
        "model": "step",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
    data.update(fields)
    return orjson.dumps({k: v for k, v in data.items() if v is not None})


def user(content: Any) -> Any:
    """A user message (typed loosely: some tests send what the SDK's types forbid)."""
    return {"role": "user", "content": content}


def parse(**fields: Any) -> ChatRequest:
    return parse_messages_request(body(**fields))


def refused(**fields: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(**fields)
    assert caught.value.status == 400
    assert caught.value.kind == "invalid_request_error"
    return caught.value


# ---------------------------------------------------------------------------
# requests


def test_a_minimal_request_is_the_neutral_request() -> None:
    """Model, max_tokens and one user string become a ChatRequest with defaults elsewhere."""
    assert parse() == ChatRequest(
        model="step",
        messages=(Message("user", (ContentPart("text", text="hi"),), False),),
        stream=False,
        include_usage=False,
        conversation_id=None,
        use_search=None,
        max_tokens=64,
    )


def test_system_as_a_string_or_blocks_is_the_first_message() -> None:
    """``system`` goes first, as a system message; an empty one is no message. A system
    message among ``messages`` (the SDK's types allow one) stays where it is."""
    assert parse(system="Be brief.").messages[0] == Message(
        "system", (ContentPart("text", text="Be brief."),), False
    )
    blocks = [{"type": "text", "text": "A"}, {"type": "text", "text": "B", "cache_control": {}}]
    first = parse(system=blocks).messages[0]
    assert first == Message(
        "system", (ContentPart("text", text="A"), ContentPart("text", text="B")), True
    )
    assert [m.role for m in parse(system="").messages] == ["user"]
    in_messages = parse(messages=[{"role": "system", "content": "S"}, user("hi")]).messages
    assert in_messages[0] == Message("system", (ContentPart("text", text="S"),), False)


def test_text_image_and_document_blocks_become_parts() -> None:
    """Images become image_url parts (base64 as a data: URL), documents file or text parts."""
    content = [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                         "data": "JVBERi0="}},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/b.pdf"}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                         "data": "plain words"}},
        {"type": "document", "source": {"type": "content",
                                         "content": [{"type": "text", "text": "inner"}]}},
        {"type": "thinking", "thinking": "hmm", "signature": "x"},
        {"type": "search_result", "source": "s", "title": "t", "content": []},
    ]
    assert parse(messages=[user(content)]).messages == (
        Message("user", (
            ContentPart("text", text="look"),
            ContentPart("image_url", url=f"data:image/png;base64,{PNG}"),
            ContentPart("image_url", url="https://example.com/a.jpg"),
            ContentPart("file", url="data:application/pdf;base64,JVBERi0="),
            ContentPart("file", url="https://example.com/b.pdf"),
            ContentPart("text", text="plain words"),
            ContentPart("text", text="inner"),
        ), True),
    )


def test_tool_use_and_tool_result_become_calls_and_tool_messages() -> None:
    """An assistant's tool_use is a ToolCall (compact JSON input); a user's tool_result a
    tool message naming the call and its function, before the rest of that user message."""
    messages = [
        user("weather?"),
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "let me see", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris", "days": [1, 2]}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
        ]},
        user([
            {"type": "text", "text": "and here are the results"},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "12:00"}, {"type": "text", "text": "UTC"}]},
        ]),
        user([{"type": "tool_result", "tool_use_id": "toolu_9"}]),
    ]
    assert parse(messages=messages).messages == (
        Message("user", (ContentPart("text", text="weather?"),), False),
        Message("assistant", (ContentPart("text", text="Checking."),), True, tool_calls=(
            ToolCall("toolu_1", "get_weather", '{"city":"Paris","days":[1,2]}'),
            ToolCall("toolu_2", "get_time", "{}"),
        )),
        Message("tool", (ContentPart("text", text="sunny"),), False,
                tool_call_id="toolu_1", name="get_weather"),
        Message("tool", (ContentPart("text", text="12:00"), ContentPart("text", text="UTC")),
                True, tool_call_id="toolu_2", name="get_time"),
        Message("user", (ContentPart("text", text="and here are the results"),), True),
        Message("tool", (), False, tool_call_id="toolu_9"),
    )


def test_tools_tool_choice_stop_sequences_and_ignored_fields() -> None:
    """Client tools become ToolSpecs, tool_choice maps onto the neutral modes, stop_sequences
    onto stop (empty ones dropped); sampling, metadata, thinking, service_tier are accepted."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [
        {"name": "get_weather", "description": "Weather now.", "input_schema": schema},
        {"type": "custom", "name": "noop", "input_schema": {"type": "object"}},
    ]
    request = parse(
        tools=tools, tool_choice={"type": "tool", "name": "noop",
                                  "disable_parallel_tool_use": True},
        stop_sequences=["END", "", "\n\nHuman:"], stream=True, temperature=0.5, top_p=1,
        top_k=5, metadata={"user_id": "u"}, thinking={"type": "enabled", "budget_tokens": 2048},
        service_tier="auto", anthropic_version="ignored",
    )
    assert request.tools == (
        ToolSpec("get_weather", "Weather now.", schema),
        ToolSpec("noop", "", {"type": "object"}),
    )
    assert request.tool_choice == ToolChoice("function", "noop")
    assert request.stop == ("END", "\n\nHuman:")
    assert request.stream is True
    assert (request.temperature, request.top_p) == (0.5, 1.0)
    choices = {"auto": ToolChoice("auto"), "any": ToolChoice("required"),
               "none": ToolChoice("none")}
    for kind, expected in choices.items():
        assert parse(tools=tools, tool_choice={"type": kind}).tool_choice == expected
    assert parse(tools=tools).tool_choice == ToolChoice("auto")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": {"role": "user"}}, "messages"),
        ({"messages": ["hi"]}, "messages.0"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [user(None)]}, "messages.0.content"),
        ({"messages": [user([{"text": "x"}])]}, "messages.0.content.0.type"),
        ({"messages": [user([{"type": "text"}])]}, "messages.0.content.0.text"),
        ({"messages": [user([{"type": "image"}])]}, "messages.0.content.0.source"),
        ({"messages": [user([{"type": "image", "source": {
            "type": "base64", "media_type": "image/bmp", "data": PNG}}])]},
         "messages.0.content.0.source.media_type"),
        ({"messages": [user([{"type": "image", "source": {
            "type": "base64", "media_type": "image/png"}}])]},
         "messages.0.content.0.source.data"),
        ({"messages": [user([{"type": "image", "source": {"type": "file", "file_id": "f"}}])]},
         "messages.0.content.0.source.type"),
        ({"messages": [user([{"type": "document", "source": {
            "type": "base64", "media_type": "application\r\nx: y/pdf", "data": "QQ=="}}])]},
         "messages.0.content.0.source.data"),
        ({"messages": [user([{"type": "document", "source": {
            "type": "url", "url": "https://example.com/a%0Ab.pdf"}}])]},
         "messages.0.content.0.source.url"),
        ({"messages": [user([{"type": "tool_use", "id": "t", "name": "f", "input": {}}])]},
         "messages.0.content.0.type"),
        ({"messages": [{"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "t"}]}]}, "messages.0.content.0.type"),
        ({"messages": [{"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]}]},
         "messages.0.content.0.input"),
        ({"messages": [user([{"type": "tool_result"}])]}, "messages.0.content.0.tool_use_id"),
        ({"messages": [user([{"type": "tool_result", "tool_use_id": "t", "content": 5}])]},
         "messages.0.content.0.content"),
        ({"messages": [user([{"type": "tool_result", "tool_use_id": "t", "is_error": 1}])]},
         "messages.0.content.0.is_error"),
        ({"system": 5}, "system"),
        ({"system": [{"type": "image"}]}, "system.0.type"),
        ({"tools": {}}, "tools"),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({"tools": [{"input_schema": {}}]}, "tools.0.name"),
        ({"tools": [{"name": "f", "input_schema": {}, "description": 1}]}, "tools.0.description"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "tool", "name": "absent"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": "yes"}},
         "tool_choice.disable_parallel_tool_use"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"stop_sequences": ["END", 1]}, "stop_sequences"),
        ({"stream": "yes"}, "stream"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 1.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": False}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": 0.5}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"metadata": "m"}, "metadata"),
        ({"metadata": {"user_id": 5}}, "user_id"),
        ({"thinking": {"budget_tokens": 5}}, "thinking"),
        ({"service_tier": 1}, "service_tier"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(fields: dict[str, Any], param: str) -> None:
    """Each malformed field is an invalid_request_error whose param and message name it."""
    error = refused(**fields)
    assert error.param == param
    assert error.message.startswith(param + ": ")


def test_temperature_and_top_p_go_into_the_neutral_request_and_top_k_is_dropped() -> None:
    """temperature and top_p (0 to 1, ends included) are the neutral request's floats, for
    an OpenAI-compatible upstream; top_k has no OpenAI counterpart and goes nowhere; absent,
    they are None (issue 16)."""
    request = parse(temperature=0.2, top_p=0.9, top_k=40)
    assert (request.temperature, request.top_p) == (0.2, 0.9)
    assert not hasattr(request, "top_k")
    ends = parse(temperature=0, top_p=1)
    assert (ends.temperature, ends.top_p) == (0.0, 1.0)
    assert isinstance(ends.temperature, float)
    unset = parse(temperature=None)
    assert (unset.temperature, unset.top_p, unset.seed) == (None, None, None)


@pytest.mark.parametrize(("fields", "message"), [
    ({"temperature": 1.5}, "temperature: range: 0..1"),
    ({"top_p": -0.5}, "top_p: range: 0..1"),
    ({"temperature": "0.2"}, "temperature: Input should be a valid number"),
    ({"temperature": True}, "temperature: Input should be a valid number"),
])
def test_sampling_out_of_anthropics_range_is_a_400_in_its_words(
    fields: dict[str, Any], message: str
) -> None:
    """Anthropic's ranges, not OpenAI's: temperature 1.5 is refused though an OpenAI-compatible
    upstream would take it (issue 16)."""
    error = refused(**fields)
    assert error.message == message
    assert error.param == message.split(":", 1)[0]


@pytest.mark.parametrize(
    "name", ["", "get weather", "get.weather", "f\n", "f\r\nx: y", "f\x00", "f\x7f", "名前",
             "a" * 129],
)
def test_a_tool_name_outside_anthropics_rule_is_a_400_naming_it(name: str) -> None:
    """A client tool's name must match Anthropic's ^[a-zA-Z0-9_-]{1,128}$: an empty one, a
    space, a dot, control characters, other letters or 129 characters are a 400 naming
    tools.N.name, in Anthropic's words."""
    error = refused(tools=[{"name": "ok", "input_schema": {}},
                           {"name": name, "input_schema": {}}])
    assert error.param == "tools.1.name"
    assert error.message == "tools.1.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'"


def test_tool_names_within_anthropics_rule_are_kept() -> None:
    """Letters, digits, underscores and dashes, 1 to 128 of them, pass as sent."""
    names = ["f", "get_weather-2", "A" * 128]
    request = parse(tools=[{"name": name, "input_schema": {}} for name in names])
    assert [tool.name for tool in request.tools] == names


def test_missing_max_tokens_reads_as_anthropic_says_it() -> None:
    """Anthropic's own words for the most common mistake."""
    assert refused(max_tokens=None).message == "max_tokens: Field required"


def test_count_tokens_needs_no_max_tokens() -> None:
    """count_tokens bodies have no max_tokens; its answer is prompt_tokens of the request."""
    request = parse_messages_request(body(max_tokens=None, system="sys"),
                                     require_max_tokens=False)
    assert request.max_tokens is None
    assert orjson.loads(count_tokens_body(request)) == {"input_tokens": prompt_tokens(request)}
    assert prompt_tokens(request) > prompt_tokens(parse())


DEEP_FIELDS = [
    ({"tools": [{"name": "f", "input_schema": "@"}]}, "tools.0.input_schema"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "@"}]}, user("hi")]},
     "messages.0.content.0.input"),
]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1015])
@pytest.mark.parametrize(("fields", "param"), DEEP_FIELDS)
def test_a_schema_or_input_nested_too_deep_is_a_400_naming_it(
    fields: dict[str, Any], param: str, depth: int
) -> None:
    """An input_schema or a tool_use input deeper than MAX_JSON_DEPTH is a 400 (for
    count_tokens too). orjson reads 1024 levels but writes 254: a 300-level input was a 500
    from the parser itself, a 300-level schema a 500 from the token count."""
    raw = body(**fields).replace(b'"@"', nested(depth))
    for require_max_tokens in (True, False):
        with pytest.raises(RequestError) as caught:
            parse_messages_request(raw, require_max_tokens=require_max_tokens)
        assert caught.value.status == 400
        assert caught.value.param == param
        expected = f"{param}: Input should be nested at most {MAX_JSON_DEPTH} levels deep"
        assert caught.value.message == expected


@pytest.mark.parametrize(("fields", "param"), DEEP_FIELDS)
def test_a_schema_or_input_nested_to_the_limit_is_parsed_and_counted(
    fields: dict[str, Any], param: str
) -> None:
    """At MAX_JSON_DEPTH levels the request parses and count_tokens answers."""
    request = parse_messages_request(body(**fields).replace(b'"@"', nested(MAX_JSON_DEPTH)))
    assert orjson.loads(count_tokens_body(request))["input_tokens"] > 0


@pytest.mark.parametrize("raw", [b"", b"[]", b"{", b'"x"', b"null", b'{"a": NaN}'])
def test_a_body_that_is_not_a_json_object_is_a_400(raw: bytes) -> None:
    """Not JSON, or not an object: a 400 with no param."""
    with pytest.raises(RequestError) as caught:
        parse_messages_request(raw)
    assert caught.value.param is None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(
        ["", "text", "image", "user", "assistant", "tool_use", "tool_result", "base64", "url",
         "document", "auto", "tool", "data:image/png;base64,QQ=="]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "role", "content", "text", "source", "id", "name", "input",
                         "tool_use_id", "media_type", "data", "url", "input_schema"]),
        inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(messages=JSON_VALUES, system=JSON_VALUES, tools=JSON_VALUES, choice=JSON_VALUES)
def test_any_json_gives_a_request_or_a_400(
    messages: Any, system: Any, tools: Any, choice: Any
) -> None:
    """Whatever the shapes, parsing gives a ChatRequest or a RequestError, nothing else."""
    with contextlib.suppress(RequestError):
        parse(messages=messages, system=system, tools=tools, tool_choice=choice)


class Capture:
    """An in-memory Anthropic API for the SDK: records request bodies, answers ``reply``."""

    def __init__(self, reply: bytes = b"", status: int = 200,
                 content_type: str = "application/json") -> None:
        self.bodies: list[bytes] = []

        def answer(request: httpx2.Request) -> httpx2.Response:
            self.bodies.append(request.read())
            return httpx2.Response(status, content=reply, headers={"content-type": content_type})

        self.client = anthropic.Anthropic(
            api_key="sk-test", base_url="http://127.0.0.1:9", max_retries=0,
            http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
        )


def test_the_sdk_s_own_request_bodies_parse() -> None:
    """What ``messages.create`` and ``count_tokens`` send (tools, images, tool results) parses."""
    reply = orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                          "content": [], "stop_reason": "end_turn", "stop_sequence": None,
                          "usage": {"input_tokens": 1, "output_tokens": 1}})
    capture = Capture(reply)
    capture.client.messages.create(
        model="step", max_tokens=100, system=[{"type": "text", "text": "sys"}],
        stop_sequences=["STOP"], metadata={"user_id": "u1"},
        tools=[{"name": "get_weather", "description": "d",
                "input_schema": {"type": "object", "properties": {}}}],
        tool_choice={"type": "any"},
        messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_a", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"}]},
        ],
    )
    request = parse_messages_request(capture.bodies[0])
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[2].tool_calls == (
        ToolCall("toolu_a", "get_weather", '{"city":"Paris"}'),
    )
    assert request.messages[3].name == "get_weather"
    assert request.tool_choice == ToolChoice("required")
    assert request.stop == ("STOP",)
    assert request.max_tokens == 100

    counted = Capture(b'{"input_tokens": 7}')
    result = counted.client.messages.count_tokens(
        model="step", messages=[{"role": "user", "content": "hi"}]
    )
    assert result.input_tokens == 7
    assert parse_messages_request(counted.bodies[0], require_max_tokens=False).max_tokens is None


# ---------------------------------------------------------------------------
# stream


def encoder(**kwargs: Any) -> MessageEncoder:
    return MessageEncoder(message_id="msg_x", model="step", input_tokens=12, **kwargs)


def stream(batches: list[list[Delta]], **kwargs: Any) -> bytes:
    """``start()`` and every batch encoded, as the writer sends them."""
    enc = encoder(**kwargs)
    return enc.start() + b"".join(enc.encode(batch) for batch in batches)


START = ("message_start", {"type": "message_start", "message": {
    "id": "msg_x", "type": "message", "role": "assistant", "content": [], "model": "step",
    "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 1}}})
STOP = ("message_stop", {"type": "message_stop"})


def block_start(index: int, block: dict[str, Any]) -> tuple[str, Any]:
    return ("content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block})


def delta(index: int, kind: str, field: str, value: str) -> tuple[str, Any]:
    return ("content_block_delta", {"type": "content_block_delta", "index": index,
                                    "delta": {"type": kind, field: value}})


def text(index: int, value: str) -> tuple[str, Any]:
    return delta(index, "text_delta", "text", value)


def block_stop(index: int) -> tuple[str, Any]:
    return ("content_block_stop", {"type": "content_block_stop", "index": index})


def message_delta(reason: str, tokens: int, sequence: str | None = None) -> tuple[str, Any]:
    return ("message_delta", {"type": "message_delta",
                              "delta": {"stop_reason": reason, "stop_sequence": sequence},
                              "usage": {"output_tokens": tokens}})


TEXT_BLOCK = {"type": "text", "text": ""}


def test_a_text_answer_is_anthropic_s_event_sequence() -> None:
    """Text deltas of one batch make one text_delta; the end is stop, message_delta, stop."""
    wire = stream([[TextDelta("Hello"), TextDelta(", ")], [TextDelta("world!")], [Finish()]])
    assert named_events(wire) == [
        START,
        block_start(0, TEXT_BLOCK),
        text(0, "Hello, "),
        text(0, "world!"),
        block_stop(0),
        message_delta("end_turn", 4),  # 13 ASCII characters
        STOP,
    ]


def test_thinking_then_text_are_two_blocks() -> None:
    """Reasoning is a thinking block (empty signature), stopped when the text begins."""
    wire = stream([[ReasoningDelta("Let me think."), ReasoningDelta(" Done."),
                    TextDelta("42")], [Finish()]])
    assert named_events(wire) == [
        START,
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        delta(0, "thinking_delta", "thinking", "Let me think. Done."),
        block_stop(0),
        block_start(1, TEXT_BLOCK),
        text(1, "42"),
        block_stop(1),
        message_delta("end_turn", 6),
        STOP,
    ]


def test_tool_calls_are_tool_use_blocks_with_input_json_deltas() -> None:
    """Each call is a tool_use block (id toolu_ for call_), its arguments input_json_delta
    pieces; the end says tool_use."""
    wire = stream([
        [TextDelta("Checking.")],
        [ToolCallDelta(0, "call_abc", "get_weather"), ToolCallDelta(0, arguments_part='{"ci')],
        [ToolCallDelta(0, arguments_part='ty": "Paris"}'),
         ToolCallDelta(1, "call_def", "get_time", "{}")],
        [Finish("tool_calls")],
    ])
    assert named_events(wire) == [
        START,
        block_start(0, TEXT_BLOCK),
        text(0, "Checking."),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "toolu_abc", "name": "get_weather",
                        "input": {}}),
        delta(1, "input_json_delta", "partial_json", '{"ci'),
        delta(1, "input_json_delta", "partial_json", 'ty": "Paris"}'),
        block_stop(1),
        block_start(2, {"type": "tool_use", "id": "toolu_def", "name": "get_time",
                        "input": {}}),
        delta(2, "input_json_delta", "partial_json", "{}"),
        block_stop(2),
        message_delta("tool_use", 7),  # 9 + 17 + 2 = 28 ASCII characters
        STOP,
    ]


def test_a_stop_sequence_and_max_tokens_are_their_stop_reasons() -> None:
    """Finish(stop, stop_sequence) is stop_sequence with the sequence; length is max_tokens."""
    wire = stream([[TextDelta("Thought: x"), Finish("stop", stop_sequence="Observation:")]])
    assert named_events(wire) == [
        START, block_start(0, TEXT_BLOCK), text(0, "Thought: x"), block_stop(0),
        message_delta("stop_sequence", 3, "Observation:"), STOP,
    ]
    wire = stream([[TextDelta("abcd" * 4)], [Finish("length")]])
    assert named_events(wire)[-2:] == [message_delta("max_tokens", 4), STOP]


def test_an_empty_answer_has_no_block_and_one_output_token() -> None:
    """A Finish alone: message_delta and message_stop; output_tokens is at least 1."""
    assert named_events(stream([[Finish()]])) == [START, message_delta("end_turn", 1), STOP]


def test_a_content_filter_finish_is_a_refusal_with_its_text() -> None:
    """The filter's explanation is text after a blank line; the reason is refusal."""
    wire = stream([[TextDelta("Sure"), Finish("content_filter", text="Blocked.")]])
    assert named_events(wire) == [
        START, block_start(0, TEXT_BLOCK), text(0, "Sure\n\nBlocked."), block_stop(0),
        message_delta("refusal", 4), STOP,
    ]


def test_an_upstream_error_is_an_in_band_error_event_and_the_end() -> None:
    """Queued text goes out, then an error event of the status's type; nothing follows."""
    enc = encoder()
    wire = enc.start() + enc.encode([TextDelta("Hal"), UpstreamError("busy", "try later", 429),
                                     TextDelta("ignored")])
    assert named_events(wire) == [
        START, block_start(0, TEXT_BLOCK), text(0, "Hal"),
        ("error", {"type": "error", "error": {"type": "rate_limit_error",
                                              "message": "try later"}}),
    ]
    assert enc.finished
    assert enc.encode([TextDelta("more"), Finish()]) == b""
    assert enc.keepalive() == b""
    other = encoder()
    assert named_events(other.encode([UpstreamError("gone", "")])) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "gone"}}),
    ]


def test_citations_images_and_videos_are_text() -> None:
    """Citations are citation_line lines ending in one blank line; images and videos
    Markdown lines of their own, as the OpenAI encoder renders them."""
    wire = stream([
        [Citation("A", "https://a"), Citation("B", "https://b"), TextDelta("See")],
        [ImageResult("https://img/1.png")],
        [VideoResult("c1", "https://v/1.mp4")],
        [Finish()],
    ], citation_line="- {title} {url}\n")
    assert named_events(wire)[1:4] == [
        block_start(0, TEXT_BLOCK),
        text(0, "- A https://a\n- B https://b\n\nSee"),
        text(0, "\n![图像](https://img/1.png)\n"),
    ]
    assert named_events(wire)[4] == text(0, "[video](https://v/1.mp4)\n")
    enc = encoder()
    enc.encode([Citation("A", "https://a")])
    assert enc.citations == [Citation("A", "https://a")]


def test_start_may_come_after_encode_and_names_the_message() -> None:
    """The id can change until message_start was made, then it cannot."""
    enc = encoder()
    first = enc.encode([TextDelta("x")])
    enc.completion_id = "conv42"
    assert enc.completion_id == "msg_conv42"
    enc.completion_id = "msg_conv42"  # the same name: harmless
    assert named_events(enc.start())[0][1]["message"]["id"] == "msg_conv42"
    with pytest.raises(LocalProtocolError):
        enc.completion_id = "other"
    with pytest.raises(LocalProtocolError):
        enc.start()
    assert named_events(first)[0] == block_start(0, TEXT_BLOCK)
    assert enc.keepalive() == KEEPALIVE == b'event: ping\ndata: {"type": "ping"}\n\n'


def test_arguments_of_a_call_whose_block_closed_are_a_local_error() -> None:
    """Anthropic cannot reopen a block: such a piece is a bug of the producer."""
    enc = encoder()
    enc.encode([ToolCallDelta(0, "call_a", "f"), TextDelta("x")])
    with pytest.raises(LocalProtocolError):
        enc.encode([ToolCallDelta(0, arguments_part="{}")])


def test_ids_and_error_types() -> None:
    """Message and tool_use ids keep their prefixes; statuses map to Anthropic's types."""
    assert message_id("c1") == "msg_c1"
    assert message_id("").startswith("msg_")
    assert message_id("") != message_id("")
    assert tool_use_id("call_x") == "toolu_x"
    assert tool_use_id("toolu_y") == "toolu_y"
    assert tool_use_id("z") == "toolu_z"
    assert tool_use_id("").startswith("toolu_")
    assert {status: error_type(status) for status in
            (400, 401, 403, 404, 405, 408, 413, 429, 500, 502, 503, 504, 529)} == {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
        413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
        503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
    }
    assert orjson.loads(error_body("api_error", "boom")) == {
        "type": "error", "error": {"type": "api_error", "message": "boom"}}
    assert stop_reason(Finish("stop", stop_sequence="X")) == ("stop_sequence", "X")


# ---------------------------------------------------------------------------
# the SDK rebuilds what we send; the stream and the whole message agree


def rebuild(wire: bytes) -> dict[str, Any]:
    """The message the SDK's stream accumulator builds from our events (each one validated)."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for _, data in named_events(wire):
        event = EVENTS.validate_python(data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    result: dict[str, Any] = snapshot.to_dict()
    return result


def whole(batches: list[list[Delta]]) -> dict[str, Any]:
    acc = MessageAccumulator()
    for batch in batches:
        acc.add(batch)
    raw = acc.body(message_id="msg_x", model="step", input_tokens=12)
    SDKMessage.model_validate_json(raw)
    result: dict[str, Any] = orjson.loads(raw)
    return result


AGENT_ANSWER: list[list[Delta]] = [
    [ReasoningDelta("The user wants weather.")],
    [TextDelta("Let me check "), TextDelta("Paris and 东京.")],
    [ToolCallDelta(0, "call_1", "get_weather"), ToolCallDelta(0, arguments_part='{"city":')],
    [ToolCallDelta(0, arguments_part=' "Paris"}'), ToolCallDelta(1, "call_2", "get_weather")],
    [ToolCallDelta(1, arguments_part='{"city": "东京"}')],
    [Finish("tool_calls")],
]


def test_the_sdk_rebuilds_the_whole_message_from_the_stream() -> None:
    """Thinking, text and two tool uses: the SDK's snapshot equals our whole message."""
    rebuilt = rebuild(stream(AGENT_ANSWER))
    expected = whole(AGENT_ANSWER)
    assert rebuilt["content"] == expected["content"] == [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": ""},
        {"type": "text", "text": "Let me check Paris and 东京."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "东京"}},
    ]
    for key in ("id", "model", "stop_reason", "stop_sequence", "usage"):
        assert rebuilt[key] == expected[key], key
    assert expected["stop_reason"] == "tool_use"


def test_the_sdk_s_message_stream_and_create_read_our_bodies() -> None:
    """``messages.stream`` over our SSE bytes and ``messages.create`` over our whole body."""
    sse = Capture(stream(AGENT_ANSWER), content_type="text/event-stream")
    with sse.client.messages.stream(model="step", max_tokens=9, messages=[user("hi")]) as s:
        texts = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(texts) == "Let me check Paris and 东京."
    assert final.stop_reason == "tool_use"
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use",
                                                       "tool_use"]
    acc = MessageAccumulator()
    acc.add([TextDelta("Hi"), Finish("stop", stop_sequence="##")])
    plain = Capture(acc.body(message_id="msg_q", model="step", input_tokens=3))
    message = plain.client.messages.create(model="step", max_tokens=9, messages=[user("hi")])
    assert (message.id, message.content[0].type, message.stop_reason, message.stop_sequence) == (
        "msg_q", "text", "stop_sequence", "##")


def test_the_sdk_raises_our_errors() -> None:
    """An in-band error event and a 400 error body both become the SDK's exceptions."""
    failing = Capture(stream([[TextDelta("a"), UpstreamError("boom", "broken", 502)]]),
                      content_type="text/event-stream")
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        failing.client.messages.stream(model="s", max_tokens=9, messages=[user("x")]) as s,
    ):
        s.until_done()
    assert caught.value.body == {"type": "error", "error": {"type": "api_error",
                                                             "message": "broken"}}
    refused = Capture(error_body("invalid_request_error", "max_tokens: Field required"), 400)
    with pytest.raises(anthropic.BadRequestError) as bad:
        refused.client.messages.create(model="s", max_tokens=9, messages=[user("x")])
    assert "max_tokens: Field required" in bad.value.message
    assert bad.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}


def test_the_whole_message_shapes() -> None:
    """Citations join the text as the references' list; an empty answer has one empty text
    block; arguments that are not a JSON object are kept under "arguments"."""
    cited = whole([[TextDelta("Answer"), Citation("A", "https://a"), Citation("A2", "https://a"),
                    Citation("B", "https://b"), Finish()]])
    assert cited["content"] == [{"type": "text", "text":
                                 "Answer\n\n搜索结果来自：\nA - https://a\nB - https://b"}]
    assert whole([[Finish()]])["content"] == [{"type": "text", "text": ""}]
    assert whole([[Finish()]])["usage"] == {"input_tokens": 12, "output_tokens": 1}
    odd = whole([[ToolCallDelta(0, "call_1", "f", "[1]"), ToolCallDelta(1, "call_2", "g"),
                  Finish("tool_calls")]])
    assert [block["input"] for block in odd["content"]] == [{"arguments": "[1]"}, {}]
    media = whole([[TextDelta("x"), ImageResult("https://i"), VideoResult("c", "https://v"),
                    Finish("content_filter", text="Filtered.")]])
    assert media["content"][0]["text"] == (
        "x\n![图像](https://i)\n[video](https://v)\n\n\nFiltered."
    )
    assert media["stop_reason"] == "refusal"


def test_the_accumulator_closes_at_the_end_and_refuses_an_early_body() -> None:
    """After Finish or UpstreamError nothing is added; a body needs a Finish and no error."""
    acc = MessageAccumulator()
    with pytest.raises(LocalProtocolError):
        acc.body(message_id="m", model="s", input_tokens=0)
    acc.add([TextDelta("a"), UpstreamError("x", "y"), TextDelta("b")])
    assert acc.text == "a"
    assert acc.error == UpstreamError("x", "y")
    with pytest.raises(LocalProtocolError):
        acc.body(message_id="m", model="s", input_tokens=0)
    done = MessageAccumulator()
    done.add([TextDelta("a"), Finish(), TextDelta("b")])
    done.add([TextDelta("c")])
    assert (done.finished, done.text) == (True, "a")


DELTAS = st.one_of(
    st.builds(TextDelta, st.text(max_size=8)),
    st.builds(ReasoningDelta, st.text(max_size=8)),
    st.builds(Citation, st.text(max_size=4), st.sampled_from(["https://a", "https://b"])),
    st.builds(ImageResult, st.just("https://i")),
)


REASONS: list[FinishReason] = ["stop", "length", "tool_calls", "content_filter"]


@st.composite
def answers(draw: st.DrawFn) -> list[Delta]:
    """Text, reasoning, citations and images in any order, then whole tool calls, then a Finish."""
    out: list[Delta] = draw(st.lists(DELTAS, max_size=8))
    for index in range(draw(st.integers(0, 2))):
        values = st.integers(-999, 999) | st.text(max_size=4)
        arguments = orjson.dumps(draw(st.dictionaries(st.text(max_size=3), values,
                                                      max_size=3))).decode()
        cuts = sorted(draw(st.lists(st.integers(0, len(arguments)), max_size=3)))
        pieces = [arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)],
                                                 strict=True)]
        out.append(ToolCallDelta(index, f"call_{index}", f"fn{index}"))
        out += [ToolCallDelta(index, arguments_part=piece) for piece in pieces]
    reason = draw(st.sampled_from(REASONS))
    out.append(Finish(reason, stop_sequence=draw(st.sampled_from(["", "END"]))
                      if reason == "stop" else ""))
    return out


@settings(max_examples=200, deadline=None)
@given(answer=answers(), data=st.data())
def test_any_batching_gives_the_same_message_as_the_whole_answer(
    answer: list[Delta], data: st.DataObject
) -> None:
    """However the events are split into batches, the SDK rebuilds the same message from the
    stream (citations aside: each batch's run of them ends in a blank line, as in the OpenAI
    encoder); it is the whole message when the answer thinks before it says anything (the
    whole message has one thinking block, first) and cites nothing (citations are inline
    lines in the stream, a trailing list in the whole message), but for the whole
    message's empty text block."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(answer)), max_size=5), label="cuts"))
    batches = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True)]
    one = rebuild(stream([answer]))
    split = rebuild(stream(batches))
    if not any(isinstance(d, Citation) for d in answer):  # a run of citations ends per batch
        assert split == one
    # the whole message puts all thinking first: compare answers that think before they say
    shown = [d for d in answer if not isinstance(d, TextDelta | ReasoningDelta) or d.text]
    said = next((i for i, d in enumerate(shown) if isinstance(d, TextDelta | ImageResult)),
                len(shown))
    thinks_first = not any(isinstance(d, ReasoningDelta) for d in shown[said:])
    if thinks_first and not any(isinstance(d, Citation) for d in shown):
        expected = whole([answer])
        content = [block for block in expected["content"] if block != TEXT_BLOCK]
        assert one["content"] == content
        assert one["stop_reason"] == expected["stop_reason"]
        assert one["stop_sequence"] == expected["stop_sequence"]
