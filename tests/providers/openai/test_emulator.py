"""Tests of the OpenAI-compatible emulator, driven over loopback by httpcore and the openai SDK."""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import httpcore
import openai
import orjson
import pytest
import trio

from providers.openai.emulator import OpenAIBehavior, OpenAIEmulator, parse_args
from tests.providers.emulator_process import PROCESS_TIMEOUT_S, emulator_process

KEY = "sk-emu-good"
WEATHER = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}]


@pytest.fixture
async def emulator(nursery: trio.Nursery) -> OpenAIEmulator:
    """An emulator that accepts KEY and answers "Hello world!"."""
    emu = OpenAIEmulator(keys=[KEY, "sk-other"], behavior=OpenAIBehavior(answer="Hello world!"))
    await nursery.start(emu.serve)
    return emu


async def _post(url: str, body: dict[str, Any], key: str = KEY) -> httpcore.Response:
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request(
            "POST", url + "/chat/completions",
            headers=[(b"authorization", f"Bearer {key}".encode()),
                     (b"content-type", b"application/json")],
            content=orjson.dumps(body),
        )


def _events(body: bytes) -> list[Any]:
    out: list[Any] = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:]
            out.append(payload if payload == b"[DONE]" else orjson.loads(payload))
    return out


def _chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": content}], **extra}


async def test_stream_with_usage_and_reasoning(emulator: OpenAIEmulator) -> None:
    """A streamed answer: role chunk, reasoning_content deltas, content deltas, finish,
    a usage chunk with no choices (include_usage), then [DONE]; every chunk names the model."""
    emulator.behavior.reasoning = "Think."
    with trio.fail_after(5):
        reply = await _post(emulator.base_url, _chat(
            stream=True, stream_options={"include_usage": True}))
    assert reply.status == 200
    events = _events(reply.content)
    assert events[-1] == b"[DONE]"
    chunks = events[:-1]
    assert all(c["model"] == "m1" and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Think."
    assert "".join(d.get("content") or "" for d in deltas) == "Hello world!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert all("usage" in c for c in chunks)
    assert emulator.record.streams_finished == 1
    assert emulator.record.chats[0].key == KEY


async def test_whole_completion(emulator: OpenAIEmulator) -> None:
    """Without stream, one chat.completion object with usage."""
    with trio.fail_after(5):
        reply = await _post(emulator.base_url, _chat())
    body = orjson.loads(reply.content)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world!"}
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    assert emulator.record.completions == 1


@pytest.mark.parametrize(
    ("key", "behavior", "status", "code"),
    [
        ("sk-wrong", OpenAIBehavior(), 401, "invalid_api_key"),
        ("sk-other", OpenAIBehavior(busy_keys={"sk-other"}), 429, "rate_limit_exceeded"),
        (KEY, OpenAIBehavior(http_error=(400, "invalid_request_error", "bad")), 400, None),
        (KEY, OpenAIBehavior(http_error=(500, "server_error", "boom")), 500, None),
    ],
)
async def test_errors_carry_openai_error_bodies(
    emulator: OpenAIEmulator, key: str, behavior: OpenAIBehavior, status: int, code: str | None
) -> None:
    """A wrong key is 401, a busy key 429, http_error its status: each with OpenAI's error body."""
    emulator.behavior = behavior
    with trio.fail_after(5):
        reply = await _post(emulator.base_url, _chat(stream=True), key)
    assert reply.status == status
    error = orjson.loads(reply.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert emulator.record.streams_started == 0


async def test_stamped_frames_carry_the_write_time(emulator: OpenAIEmulator) -> None:
    """stamp=True: stamp_frames content deltas, each [ts:<monotonic_ns>] of its write, in order."""
    emulator.behavior = OpenAIBehavior(stamp=True, stamp_frames=5, frame_delay_s=0.001)
    before = time.monotonic_ns()
    with trio.fail_after(5):
        reply = await _post(emulator.base_url, _chat(stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in _events(reply.content)[:-1] if c["choices"])
    stamps = [int(s) for s in re.findall(r"\[ts:(\d+)\]", text)]
    assert len(stamps) == 5
    assert stamps == sorted(stamps)
    assert stamps[0] >= before


async def test_drop_and_stall(emulator: OpenAIEmulator) -> None:
    """drop_after cuts the body after N deltas; stall_after goes silent until the client leaves."""
    emulator.behavior.drop_after = 1
    with trio.fail_after(5), pytest.raises(httpcore.RemoteProtocolError):
        await _post(emulator.base_url, _chat(stream=True))
    emulator.behavior = OpenAIBehavior(stall_after=1)
    with trio.move_on_after(0.3):
        await _post(emulator.base_url, _chat(stream=True))
    await emulator.wait_until(lambda r: r.streams_aborted == 1)
    assert emulator.record.streams_finished == 1


async def test_in_band_error(emulator: OpenAIEmulator) -> None:
    """end_error: an error event instead of the finish chunk, then [DONE]."""
    emulator.behavior.end_error = ("server_error", "upstream overloaded")
    with trio.fail_after(5):
        reply = await _post(emulator.base_url, _chat(stream=True))
    events = _events(reply.content)
    assert events[-2] == {"error": {"message": "upstream overloaded", "type": "server_error",
                                    "param": None, "code": None}}


async def test_openai_sdk_native_tool_loop(emulator: OpenAIEmulator) -> None:
    """The SDK's tool loop against the emulator: a native call, then an answer from its result."""
    url = emulator.base_url

    def run() -> tuple[str, str, str | None, str | None]:
        with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=10) as client:
            messages: list[Any] = [
                {"role": "user", "content": 'call get_weather with {"city": "Paris"}'}]
            first = client.chat.completions.create(
                model="m1", messages=messages, tools=WEATHER)  # type: ignore[arg-type]
            call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
            assert call.type == "function"
            messages += [first.choices[0].message,
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
            stream = client.chat.completions.create(
                model="m1", messages=messages, tools=WEATHER, stream=True)  # type: ignore[arg-type]
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)  # type: ignore[union-attr]
            assert isinstance(call, openai.types.chat.ChatCompletionMessageFunctionToolCall)
            return (call.function.name, call.function.arguments,
                    first.choices[0].finish_reason, text)

    with trio.fail_after(10):
        name, arguments, finish, text = await trio.to_thread.run_sync(run)
    assert (name, orjson.loads(arguments), finish) == ("get_weather", {"city": "Paris"},
                                                       "tool_calls")
    assert text == "The tool get_weather returned: sunny"


async def test_streamed_tool_call_deltas(emulator: OpenAIEmulator) -> None:
    """Streamed, a call opens with id and name; its arguments follow in pieces."""
    emulator.behavior.chunk_chars = 4
    body = _chat('call get_weather with {"city": "Paris"}', tools=WEATHER, stream=True)
    with trio.fail_after(5):
        reply = await _post(emulator.base_url, body)
    deltas = [c["choices"][0] for c in _events(reply.content)[:-1] if c["choices"]]
    calls = [d["delta"]["tool_calls"][0] for d in deltas if "tool_calls" in d["delta"]]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert calls[0]["id"].startswith("call_")
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Paris"}'
    assert deltas[-1]["finish_reason"] == "tool_calls"


async def test_models_list(emulator: OpenAIEmulator) -> None:
    """GET /v1/models lists the emulator's models; it too wants a key."""
    def run() -> list[str]:
        with openai.OpenAI(base_url=emulator.base_url, api_key=KEY, max_retries=0) as client:
            return [m.id for m in client.models.list()]

    with trio.fail_after(10):
        assert await trio.to_thread.run_sync(run) == ["emu-chat", "emu-reasoner"]


def test_parse_args() -> None:
    """The command line sets the knobs the benchmark uses."""
    options = parse_args(["--stamp", "--frames", "7", "--frame-delay-s", "0.02", "--key", "k1",
                          "--key", "k2", "--no-record", "--pack-all", "--stall-after", "3"])
    assert options.keys == ("k1", "k2")
    assert not options.keep_record
    behavior = options.behavior
    assert (behavior.stamp, behavior.stamp_frames, behavior.frame_delay_s) == (True, 7, 0.02)
    assert (behavior.pack_all, behavior.stall_after) == (True, 3)


async def test_main_serves_until_sigterm() -> None:
    """python -m providers.openai.emulator prints its /v1 base URL and stops on SIGTERM."""
    with trio.fail_after(PROCESS_TIMEOUT_S):
        async with emulator_process("providers.openai.emulator", "--key", KEY,
                                    "--answer", "cli") as child:
            assert child.base_url.endswith("/v1")
            reply = await _post(child.base_url, _chat())
            assert orjson.loads(reply.content)["choices"][0]["message"]["content"] == "cli"
            assert await child.stop(signal.SIGTERM) == 0


