"""Fixtures for end-to-end tests: StepChat and ChatGLM emulators and a relay, on loopback.

``relay_factory(**settings)`` starts an :class:`relay.app.App` on
127.0.0.1 port 0 in the test's nursery and returns a :class:`Running` with
its base URL. Each test talks to it over real sockets (h11, httpcore or the
``openai`` SDK), and asserts on what the emulator recorded.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpcore
import orjson
import pytest
import trio

from providers.glm.emulator import GlmBehavior, GlmEmulator
from providers.step.emulator import StepBehavior, StepEmulator
from relay import config
from relay.app import App

STEP_TOKEN = "good-token"
STEP_CREDENTIAL = f"device1@{STEP_TOKEN}"
AUTH = [(b"authorization", f"Bearer {STEP_CREDENTIAL}".encode())]
#: ChatGLM refresh tokens the `glm` emulator accepts.
GLM_TOKEN = "glm-refresh-alice"
GLM_TOKENS = (GLM_TOKEN, "glm-refresh-bob", "glm-refresh-carol")
GLM_AUTH = [(b"authorization", f"Bearer {GLM_TOKEN}".encode())]


@dataclass
class Running:
    """A relay serving on loopback."""

    app: App
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def settled(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until no request is being answered and the cleanups after answers are done.

        A client may read the whole answer before its request has left the
        relay (the delete is queued on the way out), so the janitor alone
        could still be idle.
        """
        with trio.fail_after(timeout):
            await self.app.server.wait_no_requests()
            await self.app.janitor.wait_idle()


RelayFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def step(nursery: trio.Nursery) -> StepEmulator:
    """A StepChat emulator that accepts STEP_TOKEN (and tokens t1..t4)."""
    emulator = StepEmulator(
        tokens=[STEP_TOKEN, "t1", "t2", "t3", "t4"], behavior=StepBehavior(answer="Hello world!")
    )
    await nursery.start(emulator.serve)
    return emulator


@pytest.fixture
async def glm(nursery: trio.Nursery) -> GlmEmulator:
    """A ChatGLM emulator that accepts GLM_TOKENS (signatures checked)."""
    emulator = GlmEmulator(tokens=GLM_TOKENS, behavior=GlmBehavior(answer="你好，世界！"))
    await nursery.start(emulator.serve)
    return emulator


@pytest.fixture
async def relay_factory(
    nursery: trio.Nursery, step: StepEmulator, glm: GlmEmulator
) -> AsyncIterator[RelayFactory]:
    """Start relays with given settings (pointed at the `step` and `glm` emulators)."""
    apps: list[App] = []

    async def start(**overrides: Any) -> Running:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "step_base_url": step.base_url,
            "glm_base_url": glm.base_url,
            "step_file_settle": 0.0,
            "commit_timeout": 2.0,
            "grace_period": 1.0,
        }
        values.update(overrides)
        ssl_context = values.pop("upstream_ssl_context", None)
        settings = config.load(values, environ={})
        app = App(settings, upstream_ssl_context=ssl_context)
        apps.append(app)
        addresses = await nursery.start(functools.partial(app.serve))
        host, _, port = addresses[0].rpartition(":")
        return Running(app, host, int(port))

    yield start
    for app in apps:
        app.shutdown()
        with trio.move_on_after(5):
            await app.stopped.wait()
        await app.aclose()


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> Running:
    """A relay with default settings (open mode: credentials in Authorization)."""
    return await relay_factory()


async def send_raw_post(
    relay: Running, body: bytes, credential: str, path: str = "/v1/chat/completions"
) -> trio.SocketStream:
    """Open a bare TCP connection to ``relay`` and send one JSON POST on it.

    For tests that hang up at a chosen moment (a client leaving mid-request).
    """
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    await stream.send_all(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + credential.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    return stream


def chat_body(content: str = "hi", *, stream: bool = False, **extra: Any) -> bytes:
    """A minimal chat completion request body."""
    body: dict[str, Any] = {
        "model": "step",
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    }
    body.update(extra)
    return orjson.dumps(body)


async def post(
    base_url: str,
    path: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> httpcore.Response:
    """One POST over a fresh httpcore pool; the whole response is read."""
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request(
            "POST",
            base_url + path,
            headers=[
                (b"content-type", b"application/json"),
                *(AUTH if headers is None else headers),
            ],
            content=body,
        )


def sse_events(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order (comments skipped)."""
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def sse_text(body: bytes) -> str:
    """The concatenated content deltas of an OpenAI SSE body."""
    text = []
    for payload in sse_events(body):
        if payload != b"[DONE]":
            chunk = orjson.loads(payload)
            text += [c.get("delta", {}).get("content") or "" for c in chunk.get("choices", [])]
    return "".join(text)
