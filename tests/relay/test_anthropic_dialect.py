"""Anthropic's Messages API end to end: the official ``anthropic`` SDK -> relay -> emulators.

The SDK runs in a worker thread (``trio.to_thread.run_sync``), as the
``openai`` SDK does in ``test_chat.py``, against a relay on loopback whose
upstreams are the StepChat and ChatGLM emulators. It sends its key as
``x-api-key`` (in open mode the key is the upstream credential), reads our
``message`` objects with its pydantic types, rebuilds streamed messages
with its ``MessageStream`` and raises its own exceptions for our errors.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import anthropic
import httpcore
import orjson
import pytest
import trio
import trio.testing

from protocol.anthropic import KEEPALIVE, parse_messages_request
from protocol.deltas import Finish, TextDelta
from protocol.openai import prompt_tokens
from relay import chat
from relay.dialects.anthropic import ANTHROPIC_MESSAGES
from tests.relay.conftest import GLM_TOKEN, STEP_CREDENTIAL, RelayFactory, Running, post
from tests.relay.test_chat import _exchange, _Upstream, _Wire

if TYPE_CHECKING:
    from collections.abc import Callable

    from anthropic.types import Message

    from providers.glm.emulator import GlmEmulator
    from providers.step.emulator import StepEmulator

ANSWER = "阶跃星辰是一家人工智能公司。Hello, world!"
PATH = "/v1/messages"
HI: Any = [{"role": "user", "content": "hi"}]
WEATHER: Any = [{
    "name": "get_weather",
    "description": "The weather in a city now.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                     "required": ["city"]},
}]
CALL: Any = [{"role": "user", "content": 'call get_weather with {"city": "Paris"}'}]
#: the chat service renders tools into the prompt and parses the answer's calls (the lead's
#: AnswerShaper integration in relay/chat.py); until it lands the upstream sees no tools


def _client(relay: Running, key: str = STEP_CREDENTIAL) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=relay.base_url, api_key=key, max_retries=0, timeout=10)


async def _run(relay: Running, call: Callable[[anthropic.Anthropic], Any],
               key: str = STEP_CREDENTIAL) -> Any:
    """``call(client)`` in a worker thread, with a fresh SDK client."""

    def run() -> Any:
        with _client(relay, key) as client:
            return call(client)

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run)


def _create(model: str, messages: Any = HI, **extra: Any) -> Callable[[anthropic.Anthropic], Any]:
    return lambda client: client.messages.create(
        model=model, max_tokens=1024, messages=messages, **extra
    )


class Streamed:
    """What the SDK's MessageStream gave: the text pieces and the final message."""

    def __init__(self, texts: list[str], final: Message) -> None:
        self.texts = texts
        self.final = final


def _stream(model: str, messages: Any = HI, **extra: Any) -> Callable[[anthropic.Anthropic], Any]:
    def run(client: anthropic.Anthropic) -> Streamed:
        with client.messages.stream(model=model, max_tokens=1024, messages=messages,
                                    **extra) as stream:
            texts = list(stream.text_stream)
            return Streamed(texts, stream.get_final_message())

    return run


async def test_create_and_stream_text_from_stepchat(relay: Running, step: StepEmulator) -> None:
    """``messages.create`` and ``messages.stream`` give the emulator's exact text, end_turn,
    an id named after the upstream chat, and estimated usage."""
    step.behavior.answer = ANSWER
    step.behavior.chunk_chars = 3
    message = await _run(relay, _create("step"))
    streamed = await _run(relay, _stream("step"))
    assert [(block.type, block.text) for block in message.content] == [("text", ANSWER)]
    assert (message.type, message.role, message.model) == ("message", "assistant", "step")
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert message.id == "msg_" + step.record.chats_created[0]
    request = parse_messages_request(orjson.dumps({"model": "step", "max_tokens": 1,
                                                   "messages": HI}))
    assert message.usage.input_tokens == prompt_tokens(request)
    assert message.usage.output_tokens > 1
    assert "".join(streamed.texts) == ANSWER
    assert len(streamed.texts) > 1  # it did stream
    final = streamed.final
    assert [(block.type, block.text) for block in final.content] == [("text", ANSWER)]
    assert final.stop_reason == "end_turn"
    assert final.id == "msg_" + step.record.chats_created[1]
    assert final.usage == message.usage


async def test_create_and_stream_text_from_chatglm(relay: Running, glm: GlmEmulator) -> None:
    """The same against ChatGLM: system and history reach the upstream in its merged prompt."""
    glm.behavior.answer = ANSWER
    glm.behavior.chunk_chars = 3
    history: Any = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": [{"type": "text", "text": "你好！"}]},
        {"role": "user", "content": [{"type": "text", "text": "再见"}]},
    ]
    message = await _run(relay, _create("glm-4", history, system="你是助手"), GLM_TOKEN)
    streamed = await _run(relay, _stream("glm-4-plus"), GLM_TOKEN)
    assert message.content[0].text == ANSWER
    assert message.stop_reason == "end_turn"
    assert message.id == "msg_" + glm.record.conversations_created[0]
    assert glm.record.streams[0]["messages"][0]["content"][0]["text"] == (
        "<|system|>\n你是助手\n<|user|>\n你好\n<|assistant|>\n你好！\n<|user|>\n再见\n<|assistant|>\n"
    )
    assert "".join(streamed.texts) == ANSWER
    assert streamed.final.content[0].text == ANSWER
    assert streamed.final.stop_reason == "end_turn"


async def test_reasoning_is_a_thinking_block(relay: Running, glm: GlmEmulator) -> None:
    """A think model's reasoning comes as a thinking block before the text, both ways."""
    glm.behavior.think = "用户在打招呼。"
    glm.behavior.answer = ANSWER
    message = await _run(relay, _create("glm-4-think"), GLM_TOKEN)
    streamed = await _run(relay, _stream("glm-4-think"), GLM_TOKEN)
    for final in (message, streamed.final):
        assert [block.type for block in final.content] == ["thinking", "text"]
        assert final.content[0].thinking == "用户在打招呼。"
        assert final.content[1].text == ANSWER
    assert "".join(streamed.texts) == ANSWER


async def test_a_bad_request_is_the_sdk_s_bad_request_error(relay: Running) -> None:
    """A body without max_tokens is a 400 in Anthropic's shape; the SDK raises BadRequestError
    and nothing goes upstream."""

    def run(client: anthropic.Anthropic) -> anthropic.BadRequestError:
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.post("/v1/messages", cast_to=object, body={"model": "step", "messages": HI})
        return caught.value

    error = await _run(relay, run)
    assert error.status_code == 400
    assert error.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                     "message": "max_tokens: Field required"}}


async def test_route_errors_are_in_anthropic_s_shape(relay: Running) -> None:
    """A 405 (with Allow), bad JSON and a refused credential: Anthropic's error objects."""
    with trio.fail_after(5):
        wrong_method = await _get(relay, PATH)
        bad_json = await post(relay.base_url, PATH, b"{nope",
                              [(b"x-api-key", STEP_CREDENTIAL.encode())])
        no_key = await post(relay.base_url, PATH, orjson.dumps(
            {"model": "step", "max_tokens": 5, "messages": HI}), [])
    assert wrong_method.status == 405
    assert dict(wrong_method.headers)[b"allow"] == b"POST"
    for response, status, kind in ((wrong_method, 405, "invalid_request_error"),
                                   (bad_json, 400, "invalid_request_error"),
                                   (no_key, 401, "authentication_error")):
        assert response.status == status
        body = orjson.loads(response.content)
        assert body["type"] == "error"
        assert body["error"]["type"] == kind
        assert set(body["error"]) == {"type", "message"}


async def _get(relay: Running, path: str) -> httpcore.Response:
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request("GET", relay.base_url + path)


async def test_upstream_failures_are_api_errors(relay: Running, step: StepEmulator) -> None:
    """An upstream error: a 502 api_error for a whole message; mid-stream, after the text,
    an in-band error event that the SDK's stream raises."""
    step.behavior.end_error = ("internal", "boom")

    def whole(client: anthropic.Anthropic) -> anthropic.APIStatusError:
        with pytest.raises(anthropic.APIStatusError) as caught:
            _create("step")(client)
        return caught.value

    def streamed(client: anthropic.Anthropic) -> tuple[str, anthropic.APIStatusError]:
        texts: list[str] = []
        with (
            pytest.raises(anthropic.APIStatusError) as caught,
            client.messages.stream(model="step", max_tokens=9, messages=HI) as stream,
        ):
            texts.extend(stream.text_stream)
        return "".join(texts), caught.value

    error = await _run(relay, whole)
    assert error.status_code == 502
    assert error.body["error"]["type"] == "api_error"
    text, in_band = await _run(relay, streamed)
    assert text == "Hello world!"
    assert in_band.body["error"]["type"] == "api_error"
    assert "boom" in in_band.body["error"]["message"]


async def test_count_tokens_and_api_keys(relay_factory: RelayFactory, step: StepEmulator) -> None:
    """With RELAY_API_KEYS, count_tokens and messages need one of them (as x-api-key);
    count_tokens answers the relay's estimate of the prompt and asks no upstream."""
    relay = await relay_factory(api_keys="k1", step_tokens="d9@t3")
    messages: Any = [{"role": "user", "content": "What is the weather in Paris today?"}]
    counted = await _run(relay, lambda client: client.messages.count_tokens(
        model="step", system="Be brief.", messages=messages), key="k1")
    request = parse_messages_request(orjson.dumps(
        {"model": "step", "system": "Be brief.", "messages": messages}), require_max_tokens=False)
    assert counted.input_tokens == prompt_tokens(request)
    assert step.record.chats_created == []

    def refused(client: anthropic.Anthropic) -> list[int]:
        statuses: list[int] = []
        for call in (lambda: client.messages.count_tokens(model="step", messages=messages),
                     lambda: _create("step")(client)):
            with pytest.raises(anthropic.AuthenticationError) as caught:
                call()
            statuses.append(caught.value.status_code)
        return statuses

    assert await _run(relay, refused, key="wrong") == [401, 401]
    message = await _run(relay, _create("step"), key="k1")
    assert message.content[0].text == "Hello world!"


async def test_a_silent_upstream_gets_pings(autojump_clock: trio.testing.MockClock) -> None:
    """The chat service's SSE writer with this dialect's encoder (test_chat's harness, on the
    autojump clock): a silent upstream gets the head with message_start at commit_timeout,
    then a ping after every sse_keepalive of silence, then the events of the answer."""
    wire = _Wire()
    ex, settings = _exchange(wire)  # commit after 5 s, keep alive every 15 s
    request = ANTHROPIC_MESSAGES.parse(orjson.dumps({"model": "step", "max_tokens": 9,
                                                     "messages": HI, "stream": True}))
    encoder = ANTHROPIC_MESSAGES.stream(request, model="step", conversation_id="c1",
                                        reasoning="field", citation_line="{title} {url}\n")
    upstream = _Upstream([(40.0, [[TextDelta("a")]]), (0.0, [[Finish()]])])
    await chat._serve_stream(ex, upstream, encoder, settings, chat.Outcome(), 0.0)
    head = wire.writes[0][1]
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: text/event-stream; charset=utf-8\r\n" in head.lower()
    written = b"".join(data for _, data in wire.writes)
    assert written.count(KEEPALIVE) == 2
    assert re.findall(rb"event: (\w+)\n", written) == [
        b"message_start", b"ping", b"ping", b"content_block_start", b"content_block_delta",
        b"content_block_stop", b"message_delta", b"message_stop",
    ]
    assert b'"id":"msg_c1"' in head


@pytest.mark.parametrize(("model", "key"), [("step", STEP_CREDENTIAL), ("glm-4", GLM_TOKEN)])
async def test_tool_use_loop(
    relay: Running, step: StepEmulator, glm: GlmEmulator, model: str, key: str
) -> None:
    """The SDK's tool loop: a tool_use block (create and stream), then the tool_result sent
    back gets a text answer that uses it."""
    step.behavior.answer = glm.behavior.answer = None  # the emulators' scripted agent answers
    message = await _run(relay, _create(model, CALL, tools=WEATHER), key)
    streamed = await _run(relay, _stream(model, CALL, tools=WEATHER), key)
    for final in (message, streamed.final):
        assert final.stop_reason == "tool_use"
        [use] = [block for block in final.content if block.type == "tool_use"]
        assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
        assert use.id.startswith("toolu_")
    use = message.content[-1]
    follow_up = [*CALL, {"role": "assistant", "content": [block.model_dump()
                                                          for block in message.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "sunny, 21 C"}]}]
    answer = await _run(relay, _create(model, follow_up, tools=WEATHER), key)
    assert answer.stop_reason == "end_turn"
    assert "sunny, 21 C" in answer.content[0].text


async def test_stop_sequences_and_max_tokens(relay: Running, step: StepEmulator) -> None:
    """A stop sequence cuts the text before it (stop_sequence named); max_tokens cuts at the
    limit (stop_reason max_tokens)."""
    step.behavior.answer = "Thought: look it up\nObservation: more text"
    stopped = await _run(relay, _create("step", stop_sequences=["Observation:"]))
    assert stopped.content[0].text == "Thought: look it up\n"
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "Observation:")
    cut = await _run(relay, lambda client: client.messages.create(
        model="step", max_tokens=2, messages=HI))
    assert cut.stop_reason == "max_tokens"
