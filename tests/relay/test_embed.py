"""The relay embedded in a trio program (relay/__init__.py, relay/embed.py; issue 15).

Settings built in code read no ``RELAY_*`` variable unless asked;
``nursery.start(relay.serve, settings)`` serves (the emulators in process
with ``demo=True``) and stops gracefully when cancelled; ``relay.Relay``
answers without HTTP through the same leasing, failover, shaping and
cleanup, which the emulators' records show; and the README's embedding
examples run as they are written.
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpcore
import orjson
import pytest
import trio

import relay
from protocol.deltas import Finish, TextDelta, UpstreamError
from protocol.errors import AuthError, RequestError, UpstreamFailed
from tests.relay.conftest import GLM_TOKEN, GLM_TOKENS, STEP_CREDENTIAL, sse_events, sse_text

if TYPE_CHECKING:
    from providers.glm.emulator import GlmEmulator
    from providers.step.emulator import StepEmulator

README = Path(__file__).resolve().parents[2] / "README.md"
README_SECTION = "### Embedding it in a trio program"

HELLO = {"model": "step", "messages": [{"role": "user", "content": "hi"}]}
GLM_HELLO = {"model": "glm-4", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def hostile_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """RELAY_* variables that would break every test below if they leaked in."""
    monkeypatch.setenv("RELAY_PORT", "1")  # not ours to bind
    monkeypatch.setenv("RELAY_API_KEYS", "leaked-key")  # would refuse keyless requests
    monkeypatch.setenv("RELAY_STEP_BASE_URL", "http://127.0.0.1:9/")  # nothing listens
    monkeypatch.setenv("RELAY_GLM_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("RELAY_CONFIG", str(tmp_path / "missing.toml"))  # a ConfigError if read


def step_settings(step: StepEmulator, **values: Any) -> relay.Settings:
    defaults = {"host": "127.0.0.1", "port": 0, "step_base_url": step.base_url,
                "step_tokens": [STEP_CREDENTIAL], "step_file_settle": 0.0, "grace_period": 2.0}
    return relay.settings(defaults, **values)


def glm_settings(glm: GlmEmulator, **values: Any) -> relay.Settings:
    return relay.settings(glm_base_url=glm.base_url, glm_tokens=[GLM_TOKEN], **values)


async def chat_over_http(address: str, body: dict[str, Any]) -> httpcore.Response:
    """A POST with no key: the relay's own accounts answer (open mode, or demo)."""
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request(
            "POST", f"http://{address}/v1/chat/completions",
            headers=[(b"content-type", b"application/json")], content=orjson.dumps(body),
        )


def text_of(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# --- settings ------------------------------------------------------------------------------


def test_settings_in_code_read_no_environment(hostile_env: None) -> None:
    """relay.settings() takes Python values and reads the environment only when asked."""
    s = relay.settings(port=0, glm_tokens=["a", "b"], demo=True, grace_period=1)
    assert (s.port, s.glm_tokens, s.demo, s.grace_period, s.api_keys) == (
        0, ("a", "b"), True, 1.0, ())
    assert relay.settings().port == 8000
    assert relay.settings({"port": 5}, port=6).port == 6  # keywords win over the mapping
    with pytest.raises(relay.ConfigError, match=r"missing\.toml"):
        relay.settings(from_environ=True)  # RELAY_CONFIG names a missing file


def test_settings_from_environ_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_PORT", "9123")
    monkeypatch.setenv("RELAY_LOG_LEVEL", "debug")
    s = relay.settings(from_environ=True, log_level="warning")
    assert (s.port, s.log_level) == (9123, "warning")  # the values beat the environment


def test_settings_refuse_unknown_names() -> None:
    with pytest.raises(relay.ConfigError, match="unknown setting 'prot'"):
        relay.settings(prot=0)


def test_import_relay_stays_light() -> None:
    """The exports load on first use: `import relay` (and the CLI's start) pulls in no app."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, relay; print('relay.app' in sys.modules, 'trio' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=README.parent, timeout=60,
    )
    assert out.stdout.split() == ["False", "False"]
    assert set(relay.__all__) <= set(dir(relay))
    with pytest.raises(AttributeError):
        relay.no_such_name  # noqa: B018


# --- serving over HTTP -----------------------------------------------------------------------


async def test_serve_with_settings_built_in_code(hostile_env: None, step: StepEmulator) -> None:
    """nursery.start(relay.serve, settings) reports the bound address; the hostile
    environment (port 1, an API key, dead upstreams) did not leak in."""
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(relay.serve, step_settings(step))
        assert len(addresses) == 1
        assert not addresses[0].endswith(":1")
        response = await chat_over_http(addresses[0], HELLO)
        assert response.status == 200, response.content
        assert orjson.loads(response.content)["choices"][0]["message"]["content"] == (
            "Hello world!")
        nursery.cancel_scope.cancel()
    assert step.record.chats_deleted == step.record.chats_created  # done before serve returned


async def test_serve_demo_answers_over_http(hostile_env: None) -> None:
    """demo=True starts both emulators in process, as `relay serve --demo` does."""
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(relay.serve, relay.settings(port=0, demo=True))
        for model in ("step", "glm-4", "emu-chat", "demo/emu-reasoner"):
            response = await chat_over_http(addresses[0], {**HELLO, "model": model})
            assert response.status == 200, response.content
            answer = orjson.loads(response.content)["choices"][0]["message"]["content"]
            assert "hi" in answer  # the demo answer quotes the prompt
        async with httpcore.AsyncConnectionPool() as pool:
            listed = await pool.request("GET", f"http://{addresses[0]}/v1/models")
        owners = {m["id"]: m["owned_by"] for m in orjson.loads(listed.content)["data"]}
        assert owners["emu-chat"] == "demo"  # the emulated OpenAI-compatible upstream
        nursery.cancel_scope.cancel()


async def test_demo_adds_an_openai_compatible_upstream_only_when_none_is_configured(
    hostile_env: None,
) -> None:
    """Demo mode emulates one OpenAI-compatible upstream, ``demo``, with its models listed;
    upstreams the operator configured are kept as they are, with no emulated one beside."""
    async with relay.Relay(relay.settings(demo=True)) as service:
        [upstream] = service.settings.openai_upstreams
        assert (upstream.name, upstream.models, upstream.prefix) == (
            "demo", ("emu-chat", "emu-reasoner"), "demo/")
        assert upstream.base_url.startswith("http://127.0.0.1:")
    mine = [{"name": "mine", "base_url": "http://127.0.0.1:9/v1", "api_keys": ["k"],
             "models": ["m"]}]
    async with relay.Relay(relay.settings(demo=True, openai_upstreams=mine)) as service:
        assert [u.name for u in service.settings.openai_upstreams] == ["mine"]


@dataclass
class Served:
    """relay.serve running in a nursery of its own, which the test cancels."""

    address: str
    scope: trio.CancelScope
    returned: trio.Event


async def serve_apart(nursery: trio.Nursery, settings: relay.Settings) -> Served:
    async def run(task_status: trio.TaskStatus[Served]) -> None:
        returned = trio.Event()
        try:
            async with trio.open_nursery() as own:
                addresses = await own.start(relay.serve, settings)
                task_status.started(Served(addresses[0], own.cancel_scope, returned))
        finally:
            returned.set()

    served: Served = await nursery.start(run)
    return served


async def stream_while_cancelling(served: Served, *, then: Any = None) -> bytes:
    """Stream a chat; cancel the serving nursery at the first bytes; read on to the end."""
    received = b""
    async with httpcore.AsyncConnectionPool() as pool, pool.stream(
        "POST", f"http://{served.address}/v1/chat/completions",
        headers=[(b"content-type", b"application/json")],
        content=orjson.dumps({**HELLO, "stream": True}),
    ) as response:
        assert response.status == 200
        async for chunk in response.aiter_stream():
            if not received:
                served.scope.cancel()  # mid-stream
                if then is not None:
                    await then()
            received += chunk
    return received


async def test_cancelling_serve_is_graceful(nursery: trio.Nursery, step: StepEmulator) -> None:
    """A stream in flight when serve is cancelled ends whole within the grace period; new
    connections are refused at once; serve returns once the conversation is deleted."""
    step.behavior.answer = "one two three four five six seven eight"
    step.behavior.chunk_chars = 4
    step.behavior.frame_delay_s = 0.05
    served = await serve_apart(nursery, step_settings(step, grace_period=5.0))
    host, _, port = served.address.rpartition(":")

    async def refused() -> None:
        await trio.sleep(0.02)
        with pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream(host, int(port))
        assert not served.returned.is_set()  # the stream is still being answered

    received = await stream_while_cancelling(served, then=refused)
    assert sse_events(received)[-1] == b"[DONE]"
    assert sse_text(received) == step.behavior.answer
    with trio.fail_after(5):
        await served.returned.wait()
    assert step.record.streams_finished == 1
    assert step.record.chats_deleted == step.record.chats_created != []


async def test_cancelling_serve_past_the_grace_ends_streams_in_band(
    nursery: trio.Nursery, step: StepEmulator
) -> None:
    """A stream still running when the grace period ends gets server_shutting_down and
    [DONE]; its conversation is deleted all the same."""
    step.behavior.stall_after = 1
    served = await serve_apart(nursery, step_settings(step, grace_period=0.2))
    events = sse_events(await stream_while_cancelling(served))
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "server_shutting_down"
    with trio.fail_after(5):
        await served.returned.wait()
    assert step.record.chats_deleted == step.record.chats_created != []


async def test_serve_reports_a_port_in_use_as_one_error(step: StepEmulator) -> None:
    async with trio.open_nursery() as nursery:
        address = (await nursery.start(relay.serve, step_settings(step)))[0]
        port = int(address.rpartition(":")[2])
        with pytest.raises(OSError, match="in use"):
            await nursery.start(relay.serve, step_settings(step, port=port))
        nursery.cancel_scope.cancel()


# --- the chat service without HTTP ---------------------------------------------------------


async def test_chat_streams_neutral_events_from_stepchat(
    hostile_env: None, step: StepEmulator
) -> None:
    async with relay.Relay(step_settings(step)) as service:
        chat = service.chat(HELLO)
        events = [event async for event in chat]
        assert text_of(events) == "Hello world!"
        assert events[-1] == Finish("stop")
        assert (chat.provider, chat.model, chat.attempts) == ("step", "step", 1)
        assert chat.account
        assert chat.conversation_id in step.record.chats_created
        await step_deleted(step, chat.conversation_id)


async def step_deleted(step: StepEmulator, chat_id: str) -> None:
    await step.wait_until(lambda record: chat_id in record.chats_deleted)


async def test_chat_streams_neutral_events_from_chatglm(glm: GlmEmulator) -> None:
    """A ChatRequest or a dict; reasoning comes as its own events; the conversation goes."""
    glm.behavior.think = "Let me think."
    async with relay.Relay(glm_settings(glm)) as service:
        chat = service.chat(GLM_HELLO)
        events = [event async for event in chat]
        assert text_of(events) == "你好，世界！"
        assert "".join(getattr(e, "text", "") for e in events
                       if type(e).__name__ == "ReasoningDelta") == "Let me think."
        assert isinstance(events[-1], Finish)
        await glm.wait_until(lambda r: chat.conversation_id in r.conversations_deleted)


async def test_early_break_deletes_the_conversation_and_frees_the_account(
    glm: GlmEmulator,
) -> None:
    """ChatGLM takes one stream per account: a second chat right after a `break` gets
    the one account, because the first ended (its stream aborted, its conversation gone)."""
    glm.behavior.answer = "a long answer, " * 40
    glm.behavior.frame_delay_s = 0.02
    async with relay.Relay(glm_settings(glm, account_wait_timeout=5.0)) as service:
        async for event in service.chat(GLM_HELLO):
            assert isinstance(event, TextDelta)
            break
        gc.collect()  # CPython drops the iterator at once; others collect it here
        glm.behavior.answer, glm.behavior.frame_delay_s = "second", 0.0
        events = [event async for event in service.chat(GLM_HELLO)]
        assert text_of(events) == "second"
        first = glm.record.conversations_created[0]
        await glm.wait_until(lambda r: first in r.conversations_deleted)
    assert glm.record.streams_aborted == 1
    assert glm.record.concurrent_rejections == 0
    assert max(glm.record.max_active_per_account.values()) == 1


async def test_a_kept_conversation_continues_on_its_owner(glm: GlmEmulator) -> None:
    """With two accounts, a conversation kept by one chat ("conversation_id": "") is
    continued by the next chats on the account that owns it (another account's would
    be "conversation not found"), as through the server."""
    keep = {**GLM_HELLO, "conversation_id": ""}
    async with relay.Relay(relay.settings(glm_base_url=glm.base_url,
                                          glm_tokens=list(GLM_TOKENS[:2]))) as service:
        first = service.chat(keep)
        assert text_of([event async for event in first]) == "你好，世界！"
        owner = first.account
        for _ in range(3):
            follow_up = service.chat({**GLM_HELLO, "conversation_id": first.conversation_id})
            events = [event async for event in follow_up]
            assert isinstance(events[-1], Finish), events[-1]
            assert follow_up.account == owner
    assert glm.record.conversations_deleted == []  # kept, as asked


async def test_leaving_the_chat_block_releases_the_account_at_once(glm: GlmEmulator) -> None:
    glm.behavior.answer = "a long answer, " * 40
    glm.behavior.frame_delay_s = 0.02
    async with relay.Relay(glm_settings(glm)) as service:
        pool = service.app.providers["glm"].pool
        async with service.chat(GLM_HELLO) as chat:
            async for _ in chat:
                assert pool.statistics().active_streams == 1
                break
        assert pool.statistics().active_streams == 0  # aclose waited for the release
        await glm.wait_until(lambda r: chat.conversation_id in r.conversations_deleted)
        with pytest.raises(StopAsyncIteration):
            await chat.__anext__()  # an ended chat stays ended


async def test_cancelled_wait_ends_the_chat(step: StepEmulator) -> None:
    """The caller's cancel scope fires while the upstream is silent: the chat ends there."""
    step.behavior.stall_after = 1
    async with relay.Relay(step_settings(step)) as service:
        pool = service.app.providers["step"].pool
        chat = service.chat(HELLO)
        assert isinstance(await chat.__anext__(), TextDelta)  # the answer has begun
        with trio.move_on_after(0.3) as scope:
            async for _ in chat:
                pass
        assert scope.cancelled_caught
        await step_deleted(step, chat.conversation_id)
        assert pool.statistics().active_streams == 0
        assert step.record.streams_aborted == 1


async def test_closing_the_relay_ends_open_chats(step: StepEmulator) -> None:
    step.behavior.stall_after = 1
    async with relay.Relay(step_settings(step)) as service:
        chat = service.chat(HELLO)
        await chat.__anext__()
    assert step.record.chats_deleted == step.record.chats_created != []
    with pytest.raises(RuntimeError, match="not open"):
        service.chat(HELLO)


async def test_chat_fails_over_from_a_refused_credential(step: StepEmulator) -> None:
    """Explicit credentials are leased like a client's: the refused one rests, the next answers."""
    async with relay.Relay(step_settings(step)) as service:
        chat = service.chat(HELLO, credentials=["device9@dead-token", STEP_CREDENTIAL])
        assert text_of([event async for event in chat]) == "Hello world!"
        assert chat.attempts == 2


async def test_chat_raises_a_failure_before_the_first_event(step: StepEmulator) -> None:
    step.behavior.create_error = (500, "internal", "the site is down")
    async with relay.Relay(step_settings(step)) as service:
        with pytest.raises(UpstreamFailed):
            async for _ in service.chat(HELLO):
                pass
        with pytest.raises(AuthError):
            service.chat({**HELLO, "model": "glm-4"})  # no ChatGLM accounts here
        with pytest.raises(RequestError, match="messages"):
            service.chat({"model": "step"})


async def test_a_failure_mid_answer_is_the_last_event(step: StepEmulator) -> None:
    step.behavior.answer = "one two three four"
    step.behavior.chunk_chars = 4
    step.behavior.drop_after = 2
    async with relay.Relay(step_settings(step)) as service:
        events = [event async for event in service.chat(HELLO)]
    assert text_of(events) == "one two "
    assert isinstance(events[-1], UpstreamError)


async def test_chat_answers_are_shaped(step: StepEmulator) -> None:
    """stop and max_tokens apply as over HTTP (relay.chat.ShapedAnswer)."""
    async with relay.Relay(step_settings(step)) as service:
        events = [event async for event in service.chat({**HELLO, "stop": ["world"]})]
    assert text_of(events) == "Hello "
    assert events[-1] == Finish("stop", stop_sequence="world")


async def test_chat_in_demo_mode(hostile_env: None) -> None:
    async with relay.Relay(relay.settings(demo=True)) as service:
        assert service.settings.step_base_url.startswith("http://127.0.0.1:")
        for model in ("step", "glm-4"):
            events = [event async for event in service.chat({**HELLO, "model": model})]
            assert "hi" in text_of(events)
            assert isinstance(events[-1], Finish)


async def test_the_block_s_own_exception_comes_out_as_it_is(step: StepEmulator) -> None:
    with pytest.raises(KeyError):
        async with relay.Relay(step_settings(step)):
            raise KeyError("mine")


# --- the README's examples ------------------------------------------------------------------


def readme_examples() -> list[str]:
    """The ```python blocks of the README's embedding section (it must exist)."""
    text = README.read_text(encoding="utf-8")
    start = text.find("\n" + README_SECTION + "\n")
    assert start >= 0, f"README.md has no {README_SECTION!r} section"
    section = text[start + 1:]
    following = re.search(r"^#{1,3} ", section[len(README_SECTION):], re.MULTILINE)
    if following:
        section = section[: len(README_SECTION) + following.start()]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert blocks, f"README.md's {README_SECTION!r} has no python example"
    return blocks


def test_readme_embedding_examples_run(
    hostile_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each example runs as written (demo mode: no account, no internet), in a fresh
    namespace, with a hostile RELAY_* environment that must not matter."""
    for number, code in enumerate(readme_examples(), 1):
        namespace: dict[str, Any] = {"__name__": f"readme_embedding_{number}"}
        exec(compile(code, f"README.md {README_SECTION} example {number}", "exec"),  # noqa: S102
             namespace)
        out = capsys.readouterr().out
        assert out.strip(), f"example {number} printed nothing"
        assert "Traceback" not in out
