"""OpenAI's Responses API end to end: the official ``openai`` SDK -> relay -> emulators.

The SDK runs in a worker thread (``trio.to_thread.run_sync``), as in
``test_chat.py``, against a relay on loopback whose upstreams are the
StepChat and ChatGLM emulators: ``client.responses.create`` (whole and
streamed) and ``client.responses.stream`` (the SDK's accumulator). Raw
HTTP tests hold every byte to the SDK's pydantic types. Function calls and
structured output run through the chat service's answer shaping, answered by
the emulators' scripted agent (``providers/emulator_agent.py``). The chat service's
SSE writer is also run with this dialect's encoder on the autojump clock
(test_chat's harness) for the keep-alives and a stopped stream's last words.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import httpcore
import openai
import orjson
import pydantic
import pytest
import trio
import trio.testing
from openai.types.responses import Response, ResponseStreamEvent

from protocol.chunks import KEEPALIVE
from protocol.deltas import Finish, ReasoningDelta, TextDelta
from relay import chat
from relay.dialects.responses import RESPONSES
from tests.relay.conftest import GLM_TOKEN, STEP_CREDENTIAL, Running, post
from tests.relay.test_chat import _exchange, _Upstream, _Wire

if TYPE_CHECKING:
    from collections.abc import Callable

    from providers.glm.emulator import GlmEmulator
    from providers.step.emulator import StepEmulator

ANSWER = "阶跃星辰是一家人工智能公司。Hello, world!"
PATH = "/v1/responses"
EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
WEATHER: Any = [{
    "type": "function", "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}]
CALL = 'call get_weather with {"city": "Paris"}'


async def _run(relay: Running, call: Callable[[openai.OpenAI], Any],
               key: str = STEP_CREDENTIAL) -> Any:
    """``call(client)`` in a worker thread, with a fresh SDK client."""

    def run() -> Any:
        with openai.OpenAI(base_url=relay.base_url + "/v1", api_key=key, max_retries=0,
                           timeout=10) as client:
            return call(client)

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run)


def _events(body: bytes) -> list[dict[str, Any]]:
    """The data of each SSE event, each checked against the SDK's event types and its name."""
    events = []
    for block in body.split(b"\n\n"):
        if not block or block.startswith(b":"):
            continue
        name, data = block.split(b"\n")
        event = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + event["type"].encode()
        EVENTS.validate_python(event)
        events.append(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


def _body(text: str = "hi", *, model: str = "step", stream: bool = False,
          **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "input": text, "stream": stream, **extra})


@pytest.mark.parametrize(("model", "key", "answer"), [
    ("step", STEP_CREDENTIAL, ANSWER), ("glm-4", GLM_TOKEN, "你好，世界！")])
async def test_sdk_create_gets_the_whole_response(
    relay: Running, step: StepEmulator, model: str, key: str, answer: str
) -> None:
    """``responses.create`` without streaming: one message with the exact text, and usage."""
    step.behavior.answer = ANSWER
    result = await _run(relay, lambda client: client.responses.create(
        model=model, input="hi", instructions="Be brief."), key)
    assert result.output_text == answer
    assert (result.status, result.object, result.model) == ("completed", "response", model)
    assert result.id.startswith("resp_")
    assert result.instructions == "Be brief."
    assert result.usage.output_tokens > 0
    assert result.usage.input_tokens > 0


@pytest.mark.parametrize(("model", "key", "answer"), [
    ("step", STEP_CREDENTIAL, ANSWER), ("glm-4", GLM_TOKEN, "你好，世界！")])
async def test_sdk_create_streams_the_events(
    relay: Running, step: StepEmulator, model: str, key: str, answer: str
) -> None:
    """``responses.create(stream=True)``: OpenAI's event types in order, the deltas add up."""
    step.behavior.answer = ANSWER
    step.behavior.chunk_chars = 3

    def run(client: openai.OpenAI) -> list[Any]:
        return list(client.responses.create(model=model, input="hi", stream=True))

    events = await _run(relay, run, key)
    types = [event.type for event in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert types.count("response.output_text.delta") > 1
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == answer
    assert events[-1].response.output_text == answer
    assert {events[0].response.id} == {e.response.id for e in events if hasattr(e, "response")}


async def test_sdk_stream_helper_gets_reasoning_and_text(
    relay: Running, glm: GlmEmulator
) -> None:
    """``responses.stream`` over ChatGLM's thinking model: a reasoning item, then the message."""
    glm.behavior.think = "先想一想。"

    def run(client: openai.OpenAI) -> tuple[list[str], Any]:
        with client.responses.stream(model="glm-4-think", input="hi") as stream:
            kinds: list[str] = [event.type for event in stream]
            return kinds, stream.get_final_response()

    kinds, final = await _run(relay, run, GLM_TOKEN)
    assert "response.reasoning_text.delta" in kinds
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "先想一想。"
    assert final.output_text == "你好，世界！"
    assert final.usage.output_tokens_details.reasoning_tokens == 5


async def test_raw_stream_is_valid_sse_named_after_the_conversation(
    relay: Running, step: StepEmulator
) -> None:
    """Raw bytes: SSE headers, every event valid, numbered from 0, the id is resp_<chat id>."""
    step.behavior.answer = ANSWER
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(stream=True))
    headers = {key.lower(): value for key, value in response.headers}
    assert response.status == 200
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-cache"
    events = _events(response.content)
    assert [events[0]["type"], events[-1]["type"]] == ["response.created", "response.completed"]
    final = Response.model_validate(events[-1]["response"])
    assert final.id == "resp_" + step.record.chats_created[0]
    assert final.output_text == ANSWER


async def test_raw_whole_response_is_the_sdks_response_type(
    relay: Running, step: StepEmulator
) -> None:
    """Raw bytes, not streamed: a JSON response object the SDK's type validates."""
    step.behavior.answer = ANSWER
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(max_output_tokens=500,
                                                          metadata={"k": "v"}))
    assert response.status == 200
    final = Response.model_validate(orjson.loads(response.content))
    assert final.id == "resp_" + step.record.chats_created[0]
    assert (final.output_text, final.max_output_tokens, final.metadata) == (
        ANSWER, 500, {"k": "v"})


async def test_the_input_items_reach_the_upstream(relay: Running, step: StepEmulator) -> None:
    """Instructions and the input's messages go into the merged prompt in order."""
    body = orjson.dumps({"model": "step", "instructions": "Be brief.", "input": [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "first answer"}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "second question"}]},
    ]})
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, body)
    assert response.status == 200
    [message] = step.record.messages
    prompt = message["messageInfo"]["text"]
    positions = [prompt.index(text) for text in
                 ("Be brief.", "first question", "first answer", "second question")]
    assert positions == sorted(positions)


@pytest.mark.parametrize(("extra", "param", "says"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no stored responses"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "Only function tools"),
])
async def test_unsupported_requests_are_openai_400s(
    relay: Running, extra: dict[str, Any], param: str, says: str
) -> None:
    """What the relay cannot do is a 400 in OpenAI's error shape, naming the parameter."""

    def run(client: openai.OpenAI) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="step", input="hi", extra_body=extra)
        return info.value

    error = await _run(relay, run)
    assert error.status_code == 400
    assert isinstance(error.body, dict)
    assert (error.body["type"], error.body["param"]) == ("invalid_request_error", param)
    assert says in error.body["message"]


async def test_a_wrong_method_is_a_405_with_allow(relay: Running) -> None:
    """GET on the route: 405 with ``Allow: POST`` in OpenAI's error shape."""
    async with httpcore.AsyncConnectionPool() as pool:
        response = await pool.request("GET", relay.base_url + PATH)
    headers = {key.lower(): value for key, value in response.headers}
    assert response.status == 405
    assert b"POST" in headers[b"allow"]
    assert orjson.loads(response.content)["error"]["type"] == "invalid_request_error"


async def test_an_upstream_failure_before_text_is_an_error_status(
    relay: Running, step: StepEmulator
) -> None:
    """The upstream fails at once: streamed or not, the SDK gets a 502, no response events."""
    step.behavior.create_error = (500, "internal", "boom")

    def run(client: openai.OpenAI) -> list[int]:
        statuses = []
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                client.responses.create(model="step", input="hi", stream=stream)
            statuses.append(info.value.status_code)
        return statuses

    assert await _run(relay, run) == [502, 502]


@pytest.mark.parametrize("failure", ["drop", "error"])
async def test_an_upstream_failing_mid_answer_fails_the_response_in_band(
    relay: Running, step: StepEmulator, failure: str
) -> None:
    """The upstream drops the connection, or reports an error, after some text: the text so
    far, then ``error`` and ``response.failed`` (never response.completed)."""
    step.behavior.answer = "abcdefghij"
    step.behavior.chunk_chars = 2
    if failure == "drop":
        step.behavior.drop_after = 2
    else:
        step.behavior.answer = "abcd"
        step.behavior.end_error = ("internal", "boom")
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(stream=True))
    events = _events(response.content)
    assert [event["type"] for event in events[-3:]] == [
        "response.output_item.done", "error", "response.failed"]
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == "server_error"
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"
    assert failed.output_text == "abcd"
    assert "response.completed" not in [event["type"] for event in events]


async def test_a_silent_upstream_gets_keepalives(autojump_clock: trio.testing.MockClock) -> None:
    """The chat service's SSE writer with this dialect's encoder (test_chat's harness, on the
    autojump clock): response.created and in_progress in the head at commit_timeout, a comment
    after every sse_keepalive of silence, then the answer's events."""
    wire = _Wire()
    ex, settings = _exchange(wire)  # commit after 5 s, keep alive every 15 s
    request = RESPONSES.parse(_body(stream=True))
    encoder = RESPONSES.stream(request, model="step", conversation_id="c1", reasoning="tags",
                               citation_line="{title} {url}\n")
    upstream = _Upstream([(40.0, [[ReasoningDelta("r"), TextDelta("a")]]), (0.0, [[Finish()]])])
    await chat._serve_stream(ex, upstream, encoder, settings, chat.Outcome(), 0.0)
    (at, head), *_ = wire.writes
    assert at == 5.0
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: text/event-stream; charset=utf-8\r\n" in head.lower()
    assert b'"id":"resp_c1"' in head
    written = b"".join(data for _, data in wire.writes)
    assert written.count(KEEPALIVE) == 2
    assert re.findall(rb"event: ([\w.]+)\n", written) == [
        b"response.created", b"response.in_progress",
        b"response.output_item.added", b"response.content_part.added",
        b"response.reasoning_text.delta", b"response.reasoning_text.done",
        b"response.content_part.done", b"response.output_item.done",
        b"response.output_item.added", b"response.content_part.added",
        b"response.output_text.delta", b"response.output_text.done",
        b"response.content_part.done", b"response.output_item.done", b"response.completed",
    ]
    _events(_unchunked(written[written.index(b"\r\n\r\n") + 4:]))


def _unchunked(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's data."""
    data: list[bytes] = []
    pos = 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            return b"".join(data)
        data.append(body[end + 2:end + 2 + size])
        pos = end + 2 + size + 2


async def test_last_words_fail_the_response(autojump_clock: trio.testing.MockClock) -> None:
    """What a stopped stream ends with: ``error`` (server_shutting_down), ``response.failed``."""
    ex, settings = _exchange(_Wire())
    encoder = RESPONSES.stream(RESPONSES.parse(_body(stream=True)), model="step",
                               conversation_id="", reasoning="field", citation_line="")
    writer = chat.SSEWriter(ex, encoder, settings)
    assert ex.last_words is not None
    events = _events(encoder.start() + ex.last_words())
    assert [event["type"] for event in events] == [
        "response.created", "response.in_progress", "error", "response.failed"]
    assert events[2]["code"] == "server_shutting_down"
    assert events[3]["response"]["status"] == "failed"
    assert not writer.committed


@pytest.mark.parametrize(("model", "key"), [("step", STEP_CREDENTIAL), ("glm-4", GLM_TOKEN)])
async def test_function_call_loop(
    relay: Running, step: StepEmulator, glm: GlmEmulator, model: str, key: str
) -> None:
    """The SDK's function-calling loop: a function_call item (create and stream), then the
    function_call_output sent back gets a text answer that uses it."""
    step.behavior.answer = glm.behavior.answer = None  # the emulators' scripted agent answers

    def run(client: openai.OpenAI) -> tuple[Any, Any, Any]:
        first = client.responses.create(model=model, input=CALL, tools=WEATHER)
        with client.responses.stream(model=model, input=CALL, tools=WEATHER) as stream:
            streamed = stream.get_final_response()
        calls = [item for item in first.output if item.type == "function_call"]
        assert calls, first.output_text
        call = calls[0]
        follow_up: Any = [{"role": "user", "content": CALL}, *[item.model_dump(exclude_none=True)
                                                          for item in first.output],
                     {"type": "function_call_output", "call_id": call.call_id,
                      "output": "sunny, 21 C"}]
        answer = client.responses.create(model=model, input=follow_up, tools=WEATHER)
        return first, streamed, answer

    first, streamed, answer = await _run(relay, run, key)
    for final in (first, streamed):
        [call] = [item for item in final.output if item.type == "function_call"]
        assert (call.name, orjson.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
        assert call.call_id.startswith("call_")
        assert final.status == "completed"
    assert "sunny, 21 C" in answer.output_text


async def test_max_output_tokens_cuts_the_answer(relay: Running, step: StepEmulator) -> None:
    """max_output_tokens: the answer is cut, the response incomplete (max_output_tokens)."""
    step.behavior.answer = ANSWER
    result = await _run(relay, lambda client: client.responses.create(
        model="step", input="hi", max_output_tokens=2))
    assert result.status == "incomplete"
    assert result.incomplete_details.reason == "max_output_tokens"
    assert len(result.output_text) < len(ANSWER)


class City(pydantic.BaseModel):
    city: str


@pytest.mark.parametrize(("model", "key"), [("step", STEP_CREDENTIAL), ("glm-4", GLM_TOKEN)])
async def test_structured_output(
    relay: Running, step: StepEmulator, glm: GlmEmulator, model: str, key: str
) -> None:
    """``responses.parse(text_format=City)``: the answer is the JSON document alone, parsed
    (the emulators wrap it in prose and a code fence; the chat service strips them)."""
    step.behavior.answer = glm.behavior.answer = None  # the emulators' scripted agent answers
    result = await _run(relay, lambda client: client.responses.parse(
        model=model, input="Which city is the capital of France?", text_format=City), key)
    assert isinstance(result.output_parsed, City)
    assert orjson.loads(result.output_text) == result.output_parsed.model_dump()


async def test_raw_streamed_function_call_events(
    relay: Running, step: StepEmulator
) -> None:
    """A call streamed as raw bytes: a function_call item, its argument deltas adding up to
    the arguments, ``.done``, the item done, then response.completed; every event valid."""
    step.behavior.answer = None  # the emulator's scripted agent answers
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, _body(CALL, stream=True, tools=WEATHER))
    events = _events(response.content)
    kinds = [event["type"] for event in events]
    added = kinds.index("response.output_item.added")
    assert events[added]["item"]["type"] == "function_call"
    assert events[added]["item"]["name"] == "get_weather"
    assert kinds[added + 1:] == [
        *["response.function_call_arguments.delta"] * (len(kinds) - added - 4),
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    arguments = "".join(event["delta"] for event in events
                        if event["type"] == "response.function_call_arguments.delta")
    assert orjson.loads(arguments) == {"city": "Paris"}
    final = Response.model_validate(events[-1]["response"])
    assert [item.type for item in final.output] == ["function_call"]
