"""End to end: the passthrough provider (an OpenAI-compatible upstream) through the relay.

An :class:`~providers.openai.emulator.OpenAIEmulator` is the upstream
``deepseek`` of the relay's settings (two keys, a listed model and a
prefix); the official ``openai`` and ``anthropic`` SDKs talk to the relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anthropic
import openai
import orjson
import pytest
import trio

from providers.openai.emulator import OpenAIBehavior, OpenAIEmulator
from relay import config, registry
from tests.relay.conftest import RelayFactory, Running, post, sse_events, sse_text

if TYPE_CHECKING:
    from collections.abc import Callable

KEYS = ("sk-up-1", "sk-up-2")
ANSWER = "Hello from upstream!"
WEATHER: Any = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]
CALL = 'call get_weather with {"city": "Paris"}'


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> OpenAIEmulator:
    """An OpenAI-compatible upstream that accepts both keys."""
    emulator = OpenAIEmulator(keys=KEYS, behavior=OpenAIBehavior(answer=ANSWER, chunk_chars=5))
    await nursery.start(emulator.serve)
    return emulator


def upstreams(emulator: OpenAIEmulator, keys: tuple[str, ...] = KEYS) -> list[dict[str, Any]]:
    return [{"name": "deepseek", "base_url": emulator.base_url, "api_keys": list(keys),
             "models": ["deepseek-chat", "deepseek-reasoner"], "prefix": "deepseek/"}]


@pytest.fixture
async def relay(relay_factory: RelayFactory, upstream: OpenAIEmulator) -> Running:
    """A relay in open mode with the upstream configured."""
    return await relay_factory(openai_upstreams=upstreams(upstream))


async def in_thread(call: Callable[[], Any]) -> Any:
    with trio.fail_after(15):
        return await trio.to_thread.run_sync(call)


def sdk(relay: Running, key: str = "sk-anything") -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.base_url + "/v1", api_key=key, max_retries=0, timeout=10)


def chat(model: str = "deepseek-chat", content: str = "hi", **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                         **extra})


# --- chat completions ------------------------------------------------------------------


async def test_streamed_text_with_usage_and_reasoning(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """Streamed through the SDK: the upstream's text and reasoning_content, its usage
    (include_usage), finish_reason stop; the model name is the one asked for."""
    upstream.behavior.reasoning = "Let me think."

    def run() -> tuple[str, str, Any, str | None, set[str]]:
        with sdk(relay) as client:
            chunks = list(client.chat.completions.create(
                model="deepseek-reasoner", messages=[{"role": "user", "content": "hi"}],
                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                            for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return text, reasoning, chunks[-1].usage, finish, {c.model for c in chunks}

    text, reasoning, usage, finish, models = await in_thread(run)
    assert (text, reasoning, finish) == (ANSWER, "Let me think.", "stop")
    assert usage is not None
    assert usage.completion_tokens > 0
    assert models == {"deepseek-reasoner"}
    assert upstream.record.chats[0].key == KEYS[0]


async def test_whole_answer(relay: Running, upstream: OpenAIEmulator) -> None:
    """Not streamed: one chat.completion with the upstream's text and usage."""
    def run() -> Any:
        with sdk(relay) as client:
            return client.chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "hi"}])

    completion = await in_thread(run)
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "deepseek-chat"
    assert completion.usage.total_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_native_tool_loop(relay: Running, upstream: OpenAIEmulator, stream: bool) -> None:
    """The SDK's tool loop: the upstream's native call comes back as tool_calls (finish
    tool_calls), the result sent back is answered from it; the upstream saw the tools and
    the tool message natively, not a rendered prompt."""
    upstream.behavior.answer = None

    def run() -> tuple[Any, Any, Any]:
        client: Any
        with sdk(relay) as client:
            messages: list[Any] = [{"role": "user", "content": CALL}]
            if stream:
                chunks = list(client.chat.completions.create(
                    model="deepseek-chat", messages=messages, tools=WEATHER, stream=True))
                deltas = [c.choices[0] for c in chunks if c.choices]
                parts = [tc for d in deltas for tc in d.delta.tool_calls or []]
                call = {"id": parts[0].id, "type": "function",
                        "function": {"name": parts[0].function.name,
                                     "arguments": "".join(p.function.arguments or ""
                                                          for p in parts)}}
                finish = deltas[-1].finish_reason
            else:
                first = client.chat.completions.create(
                    model="deepseek-chat", messages=messages, tools=WEATHER)
                tool = first.choices[0].message.tool_calls[0]
                call = {"id": tool.id, "type": "function",
                        "function": {"name": tool.function.name,
                                     "arguments": tool.function.arguments}}
                finish = first.choices[0].finish_reason
            messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
            second = client.chat.completions.create(
                model="deepseek-chat", messages=messages, tools=WEATHER)
            return call, finish, second.choices[0].message.content

    call, finish, text = await in_thread(run)
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert finish == "tool_calls"
    assert text == "The tool get_weather returned: sunny"
    sent = upstream.record.chats[1].body
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": call["id"],
                                    "content": "sunny"}


async def test_prefix_routing(relay: Running, upstream: OpenAIEmulator) -> None:
    """deepseek/x goes upstream as x and is answered as deepseek/x, streamed and not."""
    whole = await post(relay.base_url, "/v1/chat/completions", chat("deepseek/x"))
    streamed = await post(relay.base_url, "/v1/chat/completions", chat("deepseek/x", stream=True))
    assert whole.status == 200, whole.content
    assert orjson.loads(whole.content)["model"] == "deepseek/x"
    assert streamed.status == 200, streamed.content
    models = {orjson.loads(e)["model"] for e in sse_events(streamed.content) if e != b"[DONE]"}
    assert models == {"deepseek/x"}
    assert sse_text(streamed.content) == ANSWER
    assert [c.body["model"] for c in upstream.record.chats] == ["x", "x"]


async def test_provider_route(relay: Running, upstream: OpenAIEmulator) -> None:
    """/deepseek/v1/chat/completions forces the upstream whatever the model is called."""
    reply = await post(relay.base_url, "/deepseek/v1/chat/completions", chat("gpt-4o"))
    assert reply.status == 200, reply.content
    assert orjson.loads(reply.content)["choices"][0]["message"]["content"] == ANSWER
    assert upstream.record.chats[0].body["model"] == "gpt-4o"


async def test_an_upstream_can_be_the_default_provider(
    relay_factory: RelayFactory, upstream: OpenAIEmulator
) -> None:
    """RELAY_DEFAULT_PROVIDER may name a configured upstream: a model nobody owns goes
    there (as it is); a name that is no provider is a ConfigError at start."""
    relay = await relay_factory(openai_upstreams=upstreams(upstream),
                                default_provider="deepseek")
    reply = await post(relay.base_url, "/v1/chat/completions", chat("gpt-4o"))
    assert reply.status == 200, reply.content
    assert upstream.record.chats[0].body["model"] == "gpt-4o"
    with pytest.raises(config.ConfigError, match="default_provider: must be one of step, glm, "
                       "deepseek"):
        config.load({"openai_upstreams": upstreams(upstream), "default_provider": "mistral"},
                    environ={})


async def test_models_lists_the_configured_models(relay: Running) -> None:
    """/v1/models lists the upstream's models, owned by it, beside the web chats'."""
    def run() -> dict[str, str]:
        with sdk(relay) as client:
            return {m.id: m.owned_by for m in client.models.list()}

    models = await in_thread(run)
    assert models["deepseek-chat"] == models["deepseek-reasoner"] == "deepseek"
    assert models["step"] == "step"


# --- the fast path ----------------------------------------------------------------------


async def test_fast_path_forwards_the_upstream_bytes(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """OpenAI chat completions in and out: the client gets the upstream's own events, byte
    for byte but for the model name (the upstream's ids and fields, no role chunk of the
    relay's); what the relay does not model (temperature, seed) reaches the upstream."""
    body = chat("deepseek/x", stream=True, temperature=0.3, seed=7)
    reply = await post(relay.base_url, "/v1/chat/completions", body)
    assert reply.status == 200, reply.content
    assert reply.content.endswith(b"data: [DONE]\n\n")
    chunks = [orjson.loads(e) for e in sse_events(reply.content) if e != b"[DONE]"]
    assert {c["id"] for c in chunks} == {"chatcmpl-emu1"}
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)
    assert sum(c["choices"][0]["delta"] == {"role": "assistant", "content": ""}
               for c in chunks) == 1
    sent = upstream.record.chats[0].body
    assert (sent["model"], sent["temperature"], sent["seed"]) == ("x", 0.3, 7)
    assert {c["model"] for c in chunks} == {"deepseek/x"}


async def test_fast_path_whole_answer_is_the_upstream_body(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """Not streamed, the upstream's chat.completion comes back as it is (the model renamed)."""
    reply = await post(relay.base_url, "/v1/chat/completions", chat("deepseek/x"))
    answer = orjson.loads(reply.content)
    assert (answer["id"], answer["model"]) == ("chatcmpl-emu1", "deepseek/x")
    assert answer["choices"][0]["logprobs"] is None


async def test_fast_path_error_body_as_is(relay: Running, upstream: OpenAIEmulator) -> None:
    """An upstream 400 reaches the client with the upstream's bytes, nothing re-rendered."""
    upstream.behavior.http_error = (400, "invalid_request_error", "bad temperature")
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 400
    assert reply.content == (b'{"error":{"message":"bad temperature",'
                             b'"type":"invalid_request_error","param":null,"code":null}}')


async def test_fast_path_upstream_breaks_mid_stream(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """The upstream drops the connection after two deltas: the client has them, then an
    in-band error naming the request, then [DONE]."""
    upstream.behavior.drop_after = 2
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 200
    events = sse_events(reply.content)
    assert events[-1] == b"[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["type"] == "upstream_error"
    assert "request id" in error["message"]
    assert sse_text(b"\n".join(b"data: " + e for e in events[:-2])) == ANSWER[:10]


async def test_fast_path_keeps_a_silent_stream_alive(
    relay_factory: RelayFactory, upstream: OpenAIEmulator
) -> None:
    """A slow first token: the stream is committed after commit_timeout and kept alive
    with SSE comments, then the upstream's events follow."""
    relay = await relay_factory(openai_upstreams=upstreams(upstream), commit_timeout=0.05,
                                sse_keepalive=0.05)
    upstream.behavior.first_delay_s = 0.3
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 200
    assert reply.content.startswith(b": keep-alive\n\n")
    assert sse_text(reply.content) == ANSWER


# --- the other dialects ------------------------------------------------------------------


async def test_responses_api(relay: Running, upstream: OpenAIEmulator) -> None:
    """client.responses.create, whole and streamed, over the upstream."""
    def run() -> tuple[str, str, list[str]]:
        with sdk(relay) as client:
            whole = client.responses.create(model="deepseek-chat", input="hi")
            events = list(client.responses.create(model="deepseek-chat", input="hi",
                                                  stream=True))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        return whole.output_text, text, [e.type for e in events]

    whole, streamed, types = await in_thread(run)
    assert whole == streamed == ANSWER
    assert types[-1] == "response.completed"


async def test_responses_api_tool_call(relay: Running, upstream: OpenAIEmulator) -> None:
    """A Responses function tool becomes the upstream's native tool; its call comes back
    as a function_call item."""
    upstream.behavior.answer = None
    tools: Any = [{"type": "function", "name": "get_weather",
                   "parameters": WEATHER[0]["function"]["parameters"]}]

    def run() -> Any:
        with sdk(relay) as client:
            return client.responses.create(model="deepseek-chat", input=CALL, tools=tools)

    result = await in_thread(run)
    [item] = [i for i in result.output if i.type == "function_call"]
    assert (item.name, orjson.loads(item.arguments)) == ("get_weather", {"city": "Paris"})


def claude(relay: Running) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=relay.base_url, api_key="sk-any", max_retries=0,
                               timeout=10)


async def test_anthropic_messages(relay: Running, upstream: OpenAIEmulator) -> None:
    """messages.create and messages.stream: the upstream's text, end_turn."""
    hi: Any = [{"role": "user", "content": "hi"}]

    def run() -> tuple[Any, str, Any]:
        with claude(relay) as client:
            message = client.messages.create(model="deepseek-chat", max_tokens=100, messages=hi)
            with client.messages.stream(model="deepseek-chat", max_tokens=100,
                                        messages=hi) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
        return message, text, final

    message, text, final = await in_thread(run)
    assert message.content[0].text == text == ANSWER
    assert message.stop_reason == final.stop_reason == "end_turn"
    assert upstream.record.chats[0].body["max_tokens"] == 100


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_tool_use(relay: Running, upstream: OpenAIEmulator, stream: bool) -> None:
    """Anthropic's tool loop over the upstream's native calls: tool_use, then the
    tool_result answered from."""
    upstream.behavior.answer = None
    tools: Any = [{"name": "get_weather", "description": "weather",
                   "input_schema": WEATHER[0]["function"]["parameters"]}]

    def run() -> tuple[Any, Any]:
        first: Any
        with claude(relay) as client:
            ask: Any = [{"role": "user", "content": CALL}]
            if stream:
                with client.messages.stream(model="deepseek-chat", max_tokens=100,
                                            messages=ask, tools=tools) as s:
                    first = s.get_final_message()
            else:
                first = client.messages.create(model="deepseek-chat", max_tokens=100,
                                               messages=ask, tools=tools)
            [use] = [b for b in first.content if b.type == "tool_use"]
            follow: Any = [*ask, {"role": "assistant", "content": first.content},
                           {"role": "user", "content": [
                               {"type": "tool_result", "tool_use_id": use.id,
                                "content": "sunny"}]}]
            second = client.messages.create(model="deepseek-chat", max_tokens=100,
                                            messages=follow, tools=tools)
            return first, second

    first, second = await in_thread(run)
    [use] = [b for b in first.content if b.type == "tool_use"]
    assert (use.name, use.input, first.stop_reason) == ("get_weather", {"city": "Paris"},
                                                        "tool_use")
    assert second.content[0].text == "The tool get_weather returned: sunny"


# --- keys, failover and errors -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", ["401", "429"])
async def test_key_failover(relay_factory: RelayFactory, nursery: trio.Nursery,
                            fault: str, stream: bool) -> None:
    """The first key refused (401) or rate-limited (429): the request succeeds on the
    second key, nothing of the failure reaches the client."""
    if fault == "401":
        emulator = OpenAIEmulator(keys=KEYS[1:], behavior=OpenAIBehavior(answer=ANSWER))
    else:
        emulator = OpenAIEmulator(keys=KEYS, behavior=OpenAIBehavior(
            answer=ANSWER, busy_keys={KEYS[0]}))
    await nursery.start(emulator.serve)
    relay = await relay_factory(openai_upstreams=upstreams(emulator))
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=stream))
    assert reply.status == 200, reply.content
    text = sse_text(reply.content) if stream else orjson.loads(
        reply.content)["choices"][0]["message"]["content"]
    assert text == ANSWER
    assert emulator.record.keys == [KEYS[0], KEYS[1]]  # a refused key is not asked twice
    assert emulator.record.completions + emulator.record.streams_finished == 1


async def test_a_rate_limited_key_rests(relay_factory: RelayFactory,
                                        nursery: trio.Nursery) -> None:
    """A key the upstream rate-limits (429) rests for the account cool-down: the next
    requests go to the other key without asking it first."""
    emulator = OpenAIEmulator(keys=KEYS, behavior=OpenAIBehavior(
        answer=ANSWER, busy_keys={KEYS[0]}))
    await nursery.start(emulator.serve)
    relay = await relay_factory(openai_upstreams=upstreams(emulator))
    for _ in range(3):
        reply = await post(relay.base_url, "/v1/chat/completions", chat())
        assert reply.status == 200, reply.content
    assert emulator.record.keys == [KEYS[0], KEYS[1], KEYS[1], KEYS[1]]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [400, 500])
async def test_errors_keep_status_and_body_without_failover(
    relay: Running, upstream: OpenAIEmulator, status: int, stream: bool
) -> None:
    """A 400 or 500 is not the key's fault: no other key is tried, and the client gets the
    upstream's status and error object."""
    kind = "invalid_request_error" if status == 400 else "server_error"
    upstream.behavior.http_error = (status, kind, "the upstream says no")
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=stream))
    assert reply.status == status
    error = orjson.loads(reply.content)["error"]
    assert (error["message"], error["type"]) == ("the upstream says no", kind)
    assert upstream.record.keys == [KEYS[0]]


async def test_every_key_refused(relay_factory: RelayFactory, nursery: trio.Nursery) -> None:
    """No key works: the client gets the upstream's 401 and its error."""
    emulator = OpenAIEmulator(keys=["other"])
    await nursery.start(emulator.serve)
    relay = await relay_factory(openai_upstreams=upstreams(emulator))
    reply = await post(relay.base_url, "/v1/chat/completions", chat())
    assert reply.status == 401
    assert orjson.loads(reply.content)["error"]["code"] == "invalid_api_key"
    assert sorted(emulator.record.keys) == sorted(KEYS)  # each key asked once, then rested


@pytest.mark.parametrize("bearer", [b"Bearer sk-client-own", b"Bearer sk-up-1,sk-up-2", None])
async def test_a_client_never_brings_its_own_upstream_key(
    relay: Running, upstream: OpenAIEmulator, bearer: bytes | None
) -> None:
    """Open mode: whatever the client presents, the upstream sees only the configured keys."""
    headers = [] if bearer is None else [(b"authorization", bearer)]
    reply = await post(relay.base_url, "/v1/chat/completions", chat(), headers)
    assert reply.status == 200, reply.content
    assert upstream.record.keys == [KEYS[0]]


async def test_with_relay_keys_a_relay_key_is_required(
    relay_factory: RelayFactory, upstream: OpenAIEmulator
) -> None:
    """With RELAY_API_KEYS set, a relay key is required; the upstream key is not one."""
    relay = await relay_factory(openai_upstreams=upstreams(upstream), api_keys="sk-relay")
    good = await post(relay.base_url, "/v1/chat/completions", chat(),
                      [(b"authorization", b"Bearer sk-relay")])
    bad = await post(relay.base_url, "/v1/chat/completions", chat(),
                     [(b"authorization", b"Bearer " + KEYS[0].encode())])
    assert good.status == 200, good.content
    assert bad.status == 401
    assert upstream.record.keys == [KEYS[0]]


async def test_token_check_asks_the_upstream(relay: Running) -> None:
    """/token/check with the upstream named: a key it takes is live, another is not."""
    def check(token: str) -> Any:
        return orjson.dumps({"token": token, "provider": "deepseek"})

    live = await post(relay.base_url, "/token/check", check(KEYS[1]))
    dead = await post(relay.base_url, "/token/check", check("sk-nope"))
    assert orjson.loads(live.content) == {"live": True}
    assert orjson.loads(dead.content) == {"live": False}


def test_the_start_warning_counts_upstream_keys() -> None:
    """Keys of an upstream are server-side accounts: without RELAY_API_KEYS, relay serve
    warns that anyone who reaches it spends them (the check behind that warning)."""
    upstream = {"name": "up", "base_url": "http://127.0.0.1:1/v1", "api_keys": ["k"],
                "models": ["m"]}
    settings = config.load({"openai_upstreams": [upstream]}, environ={})
    assert registry.has_server_credentials(settings, registry.ENTRIES)
    assert not registry.has_server_credentials(config.load(environ={}), registry.ENTRIES)


# --- configuration ---------------------------------------------------------------------------

TOML = """
[[openai_upstreams]]
name = "deepseek"
base_url = "https://api.deepseek.com/v1"
api_keys = ["sk-1", "sk-2"]
models = ["deepseek-chat", "deepseek-reasoner"]

[[openai_upstreams]]
name = "local"
base_url = "http://127.0.0.1:11434/v1/"
api_keys = ["ollama"]
prefix = "local/"
"""


def test_config_from_toml_and_environment(tmp_path: Any) -> None:
    """[[openai_upstreams]] tables and RELAY_OPENAI_UPSTREAMS JSON give the same settings;
    a loopback base URL is allowed; the environment wins over the file."""
    path = tmp_path / "relay.toml"
    path.write_text(TOML)
    from_file = config.load(config_file=str(path), environ={})
    assert from_file.openai_upstreams == (
        config.OpenAIUpstream("deepseek", "https://api.deepseek.com/v1", ("sk-1", "sk-2"),
                              ("deepseek-chat", "deepseek-reasoner")),
        config.OpenAIUpstream("local", "http://127.0.0.1:11434/v1", ("ollama",), (), "local/"),
    )
    env = {"RELAY_OPENAI_UPSTREAMS": orjson.dumps([
        {"name": "local", "base_url": "http://127.0.0.1:11434/v1", "api_keys": ["ollama"],
         "prefix": "local/"}]).decode()}
    assert config.load(config_file=str(path), environ=env).openai_upstreams == (
        from_file.openai_upstreams[1],)
    assert "sk-1" not in repr(from_file)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "step"}, "built-in provider"),
        ({"name": "a b"}, "name must be"),
        ({"base_url": "ftp://x"}, "base_url must be an http"),
        ({"base_url": "https://user:sk-secret@x/v1"}, "must not hold credentials"),
        ({"api_keys": []}, "at least one key"),
        ({"api_keys": "sk-1"}, "api_keys must be a list"),
        ({"api_keys": ["sk 1"]}, "printable ASCII"),
        ({"models": [], "prefix": ""}, "give models"),
        ({"models": "m"}, "models must be a list"),
        ({"key": "x"}, "unknown field 'key'"),
    ],
)
def test_config_errors(entry: dict[str, Any], message: str) -> None:
    """Each mistake is a ConfigError naming the entry and the field, never a key."""
    value = {"name": "up", "base_url": "https://x/v1", "api_keys": ["sk-secret"],
             "models": ["m"], **entry}
    with pytest.raises(config.ConfigError) as info:
        config.load(environ={"RELAY_OPENAI_UPSTREAMS": orjson.dumps([value]).decode()})
    assert message in str(info.value)
    assert "entry 1" in str(info.value)
    assert "sk-secret" not in str(info.value)


def test_config_names_are_unique() -> None:
    """Two upstreams of one name (in any case), or JSON that is not a list, are refused."""
    one = {"name": "up", "base_url": "https://x/v1", "api_keys": ["k"], "models": ["m"]}
    with pytest.raises(config.ConfigError, match="two upstreams are named 'up'"):
        config.load({"openai_upstreams": [one, {**one, "name": "UP"}]}, environ={})
    with pytest.raises(config.ConfigError, match="JSON list"):
        config.load(environ={"RELAY_OPENAI_UPSTREAMS": "{not json"})
    with pytest.raises(config.ConfigError, match="list of upstreams"):
        config.load(environ={"RELAY_OPENAI_UPSTREAMS": "{}"})


