"""End to end: what agents and their SDKs need from the relay (issue 14).

``GET /v1/models/{id}``, Anthropic's ``x-api-key`` header, and the chat
service's shaping of answers (tool calls, stop sequences, max_tokens,
structured output), driven through the official ``openai`` SDK and raw
HTTP against the StepChat and ChatGLM emulators.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import openai
import orjson
import pytest
import trio

from tests.relay.conftest import (
    GLM_TOKEN,
    STEP_CREDENTIAL,
    RelayFactory,
    Running,
    chat_body,
    post,
    sse_events,
    sse_text,
)

if TYPE_CHECKING:
    from providers.glm.emulator import GlmEmulator
    from providers.step.emulator import StepEmulator


def _sdk(relay: Running, api_key: str = STEP_CREDENTIAL) -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.base_url + "/v1", api_key=api_key, max_retries=0,
                         timeout=10)


async def test_models_retrieve_names_the_owner(relay: Running) -> None:
    """The SDK's models.retrieve gets a listed id, an owned (unlisted) id, and a 404."""
    def run() -> tuple[str, str, str, str, int, str | None]:
        with _sdk(relay) as client:
            step = client.models.retrieve("step-v1")
            glm = client.models.retrieve("glm-4-plus")
            try:
                client.models.retrieve("no-such-model")
            except openai.NotFoundError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                return (step.id, step.owned_by, glm.id, glm.owned_by, exc.status_code,
                        body.get("code"))
            raise AssertionError("an unknown model was found")

    with trio.fail_after(10):
        got = await trio.to_thread.run_sync(functools.partial(run))
    assert got == ("step-v1", "step", "glm-4-plus", "glm", 404, "model_not_found")


async def test_model_ids_with_slashes_and_escapes_share_one_route(relay: Running) -> None:
    """/v1/models/<id> is one route: escaped ids are decoded, metrics keep one label."""
    def run() -> str:
        with _sdk(relay) as client:
            return client.models.retrieve("step-v1").id

    await trio.to_thread.run_sync(run)
    rendered = relay.app.metrics.render().decode()
    assert 'route="/v1/models/{id}"' in rendered
    assert "step-v1" not in rendered


@pytest.mark.parametrize("header", [b"x-api-key", b"authorization"])
async def test_relay_keys_may_come_as_x_api_key(
    relay_factory: RelayFactory, header: bytes
) -> None:
    """With RELAY_API_KEYS set, Anthropic's x-api-key is accepted like a Bearer key."""
    relay = await relay_factory(api_keys="sk-relay", step_tokens=STEP_CREDENTIAL)
    value = b"sk-relay" if header == b"x-api-key" else b"Bearer sk-relay"
    with trio.fail_after(10):
        good = await post(relay.base_url, "/v1/chat/completions", chat_body(),
                          headers=[(header, value)])
        wrong = await post(relay.base_url, "/v1/chat/completions", chat_body(),
                           headers=[(b"x-api-key", b"sk-wrong")])
    assert good.status == 200, good.content
    assert orjson.loads(good.content)["choices"][0]["message"]["content"] == "Hello world!"
    assert wrong.status == 401


# --- answers shaped by the chat service -------------------------------------------------

WEATHER = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]
CALL = 'call get_weather with {"city": "Paris"}'
PROVIDERS = [("step", STEP_CREDENTIAL), ("glm-4", GLM_TOKEN)]


@pytest.fixture
async def scripted(step: StepEmulator, glm: GlmEmulator) -> None:
    """Both emulators answer as their scripted agent (tool calls, results, JSON).

    Named as an argument: pytest-trio does not run an async fixture named only in
    ``usefixtures``.
    """
    step.behavior.answer = None
    glm.behavior.answer = None


@pytest.mark.parametrize(("model", "key"), PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_tool_loop(
    scripted: None, relay: Running, model: str, key: str, stream: bool) -> None:
    """The openai SDK's tool loop: the call comes back as tool_calls with finish_reason
    tool_calls and no content; the tool's result sent back gets an answer that uses it."""
    def run() -> tuple[str | None, list[tuple[str, str, str]], str | None, str]:
        with _sdk(relay, key) as client:
            messages: list[Any] = [{"role": "user", "content": CALL}]
            if stream:
                with client.chat.completions.stream(model=model, messages=messages,
                                                    tools=WEATHER) as events:
                    first = events.get_final_completion()
            else:
                first = client.chat.completions.create(model=model, messages=messages,
                                                       tools=WEATHER)
            choice = first.choices[0]
            calls = [(c.id, c.function.name, c.function.arguments)
                     for c in choice.message.tool_calls or [] if c.type == "function"]
            messages.append(choice.message.model_dump(exclude_none=True))
            messages += [{"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"}
                         for call_id, _, _ in calls]
            second = client.chat.completions.create(model=model, messages=messages,
                                                    tools=WEATHER)
            return (choice.finish_reason, calls, choice.message.content or None,
                    second.choices[0].message.content or "")

    with trio.fail_after(20):
        reason, calls, content, answer = await trio.to_thread.run_sync(run)
    assert reason == "tool_calls"
    assert content is None
    [(call_id, name, arguments)] = calls
    assert call_id.startswith("call_")
    assert (name, orjson.loads(arguments)) == ("get_weather", {"city": "Paris"})
    assert answer == "The tool get_weather returned: sunny, 21 C"


async def test_parallel_calls_stream_as_indexed_deltas(
    scripted: None, relay: Running) -> None:
    """Two calls asked at once arrive as tool_calls deltas with indexes 0 and 1."""
    body = chat_body('call get_weather with {"city": "Paris"} and get_weather with '
                     '{"city": "Oslo"}', stream=True, tools=WEATHER)
    with trio.fail_after(10):
        response = await post(relay.base_url, "/v1/chat/completions", body)
    chunks = [orjson.loads(e) for e in sse_events(response.content) if e != b"[DONE]"]
    deltas = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    names = {d["index"]: d["function"]["name"] for d in deltas if "id" in d}
    arguments = {i: "".join(d["function"].get("arguments", "") for d in deltas
                            if d["index"] == i) for i in names}
    assert names == {0: "get_weather", 1: "get_weather"}
    assert [orjson.loads(arguments[i]) for i in (0, 1)] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_ends_the_answer_and_the_upstream(
    relay: Running, step: StepEmulator, stream: bool
) -> None:
    """A stop sequence split across upstream frames: the text before it, finish_reason
    stop, the upstream stream left early, the conversation still deleted."""
    step.behavior.text_frames = ["Thought: look", " it up\nObs", "ervation: 42", " and more"] + [
        " filler"] * 50
    step.behavior.frame_delay_s = 0.01
    with trio.fail_after(10):
        response = await post(relay.base_url, "/v1/chat/completions",
                              chat_body(stream=stream, stop=["Observation:", "never"]))
        await relay.settled()
    if stream:
        chunks = [orjson.loads(e) for e in sse_events(response.content) if e != b"[DONE]"]
        text = sse_text(response.content)
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = orjson.loads(response.content)["choices"][0]
        text, reason = choice["message"]["content"], choice["finish_reason"]
    assert (text, reason) == ("Thought: look it up\n", "stop")
    assert step.record.streams_aborted == 1
    assert step.record.streams_finished == 0
    assert len(step.record.chats_deleted) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_cuts_with_length(
    relay: Running, step: StepEmulator, stream: bool
) -> None:
    """max_tokens cuts the answer at the estimate's limit: finish_reason length, cleanup."""
    step.behavior.answer = "one two three four five six seven eight nine ten " * 20
    with trio.fail_after(10):
        response = await post(relay.base_url, "/v1/chat/completions",
                              chat_body(stream=stream, max_tokens=5,
                                        stream_options={"include_usage": True} if stream
                                        else None))
        await relay.settled()
    if stream:
        chunks = [orjson.loads(e) for e in sse_events(response.content) if e != b"[DONE]"]
        text = sse_text(response.content)
        reason = next(c["choices"][0]["finish_reason"] for c in chunks
                      if c["choices"] and c["choices"][0]["finish_reason"])
        usage = chunks[-1]["usage"]
    else:
        whole = orjson.loads(response.content)
        text, reason = whole["choices"][0]["message"]["content"], whole["choices"][0][
            "finish_reason"]
        usage = whole["usage"]
    assert reason == "length"
    assert 0 < len(text) < len(step.behavior.answer) // 4
    assert step.behavior.answer.startswith(text)
    assert usage["completion_tokens"] <= 5
    assert len(step.record.chats_deleted) == 1


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                           "temperature": {"type": "integer"}},
          "required": ["city", "temperature"], "additionalProperties": False}


@pytest.mark.parametrize(("model", "key"), PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
async def test_structured_output_is_the_document_alone(
    scripted: None, relay: Running, model: str, key: str, stream: bool
) -> None:
    """json_schema: the emulator wraps its document in prose and a fence; the client gets
    the document alone, which satisfies the schema."""
    body = {"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "Weather in Paris as JSON"}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "weather", "schema": SCHEMA, "strict": True}}}
    with trio.fail_after(10):
        response = await post(relay.base_url, "/v1/chat/completions", orjson.dumps(body),
                              headers=[(b"authorization", b"Bearer " + key.encode())])
    assert response.status == 200, response.content
    if stream:
        text = sse_text(response.content)
    else:
        text = orjson.loads(response.content)["choices"][0]["message"]["content"]
    assert orjson.loads(text) == {"city": "example", "temperature": 42}


async def test_openai_sdk_parse_with_a_pydantic_format(
    scripted: None, relay: Running) -> None:
    """The SDK's chat.completions.parse with a pydantic model gets a parsed object."""
    import pydantic

    class Weather(pydantic.BaseModel):
        city: str
        temperature: int

    def run() -> Weather | None:
        with _sdk(relay) as client:
            completion = client.chat.completions.parse(
                model="step", messages=[{"role": "user", "content": "Weather in Paris"}],
                response_format=Weather)
            return completion.choices[0].message.parsed

    with trio.fail_after(10):
        parsed = await trio.to_thread.run_sync(run)
    assert parsed == Weather(city="example", temperature=42)


async def test_non_json_answer_to_a_json_request_is_a_502(
    relay: Running, step: StepEmulator
) -> None:
    """Not streamed, an answer with no JSON in it is a 502 invalid_json_output that shows
    the raw text, not a 200 carrying garbage; the conversation is still deleted."""
    step.behavior.answer = "Sorry, I cannot do JSON today."
    with trio.fail_after(10):
        response = await post(relay.base_url, "/v1/chat/completions", chat_body(
            response_format={"type": "json_object"}))
        await relay.settled()
    assert response.status == 502
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "invalid_json_output"
    assert "Sorry, I cannot do JSON today." in error["message"]
    assert len(step.record.chats_deleted) == 1


async def test_strict_schema_violation_is_a_502(relay: Running, step: StepEmulator) -> None:
    """With strict, valid JSON that breaks the schema is refused too."""
    step.behavior.answer = '```json\n{"city": "Paris"}\n```'
    body = chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "weather", "schema": SCHEMA, "strict": True}})
    with trio.fail_after(10):
        response = await post(relay.base_url, "/v1/chat/completions", body)
    assert response.status == 502
    assert orjson.loads(response.content)["error"]["code"] == "invalid_json_output"


async def test_provider_prefixes_force_the_provider_on_every_dialect(
    relay: Running, step: StepEmulator, glm: GlmEmulator
) -> None:
    """/glm/v1/messages and /step/v1/responses pick their provider whatever the model
    (Anthropic's and OpenAI's clients send their own model names)."""
    messages = orjson.dumps({"model": "claude-sonnet-4", "max_tokens": 64,
                             "messages": [{"role": "user", "content": "hi"}]})
    responses = orjson.dumps({"model": "gpt-4o", "input": "hi"})
    with trio.fail_after(10):
        anthropic_glm = await post(relay.base_url, "/glm/v1/messages", messages,
                                   headers=[(b"x-api-key", GLM_TOKEN.encode())])
        openai_step = await post(relay.base_url, "/step/v1/responses", responses)
    assert anthropic_glm.status == 200, anthropic_glm.content
    assert orjson.loads(anthropic_glm.content)["content"][0]["text"] == "你好，世界！"
    assert openai_step.status == 200, openai_step.content
    output = orjson.loads(openai_step.content)["output"]
    assert output[-1]["content"][0]["text"] == "Hello world!"
