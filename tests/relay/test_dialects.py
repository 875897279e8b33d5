"""The dialect seam (relay/dialects): a dialect defined only here is served by one routing line.

``Toy`` speaks a wire of its own: a JSON request ``{"say": text, "live": bool}``,
a stream of plain-text lines (``> start``, ``+ <text>``, ``= <reason>``,
``! <code>``), a whole answer ``{"said": text, "id": conversation}`` and errors
``{"oops": {"why", "status"}}``. The test adds it to the running app's route
table and drives it over loopback against the StepChat emulator: its answers
and every error of its route come back in its shape, none in OpenAI's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpcore
import orjson
import trio
import trio.testing

from protocol.deltas import Finish, TextDelta, UpstreamError
from protocol.errors import RelayError, RequestError
from protocol.openai import ChatRequest, ContentPart, Message
from relay import config
from relay.dialects import JSON, ErrorReply
from relay.routes import chat_route
from relay.server import Server
from tests.relay.conftest import (
    AUTH,
    STEP_CREDENTIAL,
    RelayFactory,
    Running,
    post,
    send_raw_post,
)
from tests.relay.test_server import OneStreamListener

if TYPE_CHECKING:
    from collections.abc import Sequence

    from protocol.chunks import ReasoningMode
    from protocol.deltas import Delta
    from providers.step.emulator import StepEmulator
    from relay.dialects import Dialect
    from relay.server import Exchange

PATH = "/v1/toy"
LINES = b"text/plain; charset=utf-8"
ANSWER = "The toy answers, line by line."


class ToyStream:
    """Plain-text lines: one per event."""

    content_type = LINES

    def __init__(self, conversation_id: str) -> None:
        self.completion_id = conversation_id
        self.finished = False

    def start(self) -> bytes:
        return b"> start\n"

    def encode(self, deltas: Sequence[Delta]) -> bytes:
        out = []
        for delta in deltas:
            if self.finished:
                break
            if isinstance(delta, TextDelta):
                out.append(b"+ " + delta.text.encode() + b"\n")
            elif isinstance(delta, Finish):
                out.append(b"= " + delta.reason.encode() + b"\n")
                self.finished = True
            elif isinstance(delta, UpstreamError):
                out.append(b"! " + delta.code.encode() + b"\n")
                self.finished = True
        return b"".join(out)

    def keepalive(self) -> bytes:
        return b"" if self.finished else b"~\n"

    def last_words(self, error: RelayError) -> bytes:
        return b"! " + (error.code or error.kind).encode() + b"\n"


class ToyAnswer:
    """The whole answer: the text, and the conversation it came from."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finished = False
        self.error: UpstreamError | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, deltas: Sequence[Delta]) -> None:
        for delta in deltas:
            if self.finished or self.error is not None:
                return
            if isinstance(delta, TextDelta):
                self.parts.append(delta.text)
            elif isinstance(delta, Finish):
                self.finished = True
            elif isinstance(delta, UpstreamError):
                self.error = delta

    def answer(self, conversation_id: str) -> bytes:
        return orjson.dumps({"said": self.text, "id": conversation_id})


class Toy:
    """A dialect of this test's own."""

    name = "toy"

    def parse(self, body: bytes) -> ChatRequest:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RequestError("the toy wants JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("say"), str):
            raise RequestError("the toy wants something to say", param="say")
        text = ContentPart("text", text=data["say"])
        return ChatRequest(model="step", messages=(Message("user", (text,), False),),
                           stream=data.get("live") is True, include_usage=False,
                           conversation_id=None, use_search=None)

    def stream(self, request: ChatRequest, *, model: str, conversation_id: str,
               reasoning: ReasoningMode, citation_line: str) -> ToyStream:
        return ToyStream(conversation_id)

    def whole(self, request: ChatRequest, *, model: str, reasoning: ReasoningMode) -> ToyAnswer:
        return ToyAnswer()

    def error(self, exc: RelayError) -> ErrorReply:
        return ErrorReply(exc.status, orjson.dumps({"oops": {"why": exc.message,
                                                             "status": exc.status}}), JSON)


TOY: Dialect = Toy()


async def _toy_relay(relay_factory: RelayFactory, **settings: Any) -> Running:
    relay = await relay_factory(**settings)
    relay.app.routes[PATH] = chat_route(TOY)  # the one routing line
    return relay


def _oops(response: httpcore.Response, status: int) -> dict[str, Any]:
    """The toy error of ``response``, checked to be one (and not OpenAI's)."""
    assert response.status == status, response.content
    body = orjson.loads(response.content)
    assert set(body) == {"oops"}, body
    oops: dict[str, Any] = body["oops"]
    assert oops["status"] == status
    return oops


async def test_a_toy_dialect_streams_in_its_own_lines(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """A streamed answer on the toy route is the toy's lines, with the toy's content type:
    the start line, the emulator's exact text in ``+`` lines, and the finish line."""
    relay = await _toy_relay(relay_factory)
    step.behavior.answer = ANSWER
    step.behavior.chunk_chars = 4
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, orjson.dumps({"say": "hi", "live": True}))
    assert response.status == 200
    assert (b"content-type", LINES) in response.headers
    lines = response.content.decode().splitlines()
    assert lines[0] == "> start"
    assert lines[-1] == "= stop"
    assert all(line.startswith("+ ") for line in lines[1:-1])
    assert "".join(line[2:] for line in lines[1:-1]) == ANSWER
    await relay.settled()
    assert step.record.chats_deleted == step.record.chats_created


async def test_a_toy_dialect_answers_whole_in_its_own_json(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """Not streamed, the toy's answer is its own JSON object, named after the conversation."""
    relay = await _toy_relay(relay_factory)
    step.behavior.answer = ANSWER
    with trio.fail_after(5):
        response = await post(relay.base_url, PATH, orjson.dumps({"say": "hi"}))
    assert response.status == 200
    answer = orjson.loads(response.content)
    assert answer["said"] == ANSWER
    assert answer["id"]


async def test_the_toy_routes_errors_are_in_the_toys_shape(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """Every error of the toy's route is rendered by the toy: a bad body (400, from its
    parser), no credentials (401, without OpenAI's Bearer challenge), the wrong method
    (405, with Allow), a body over the limit (413, from the server's body reader) and an
    upstream that fails before any text (502); one that fails after some is the toy's
    in-band error line. Other routes keep OpenAI's shape."""
    relay = await _toy_relay(relay_factory, max_body_bytes=1024)
    url = relay.base_url + PATH
    live = orjson.dumps({"say": "hi", "live": True})
    with trio.fail_after(5):
        bad = await post(relay.base_url, PATH, b"{not json")
        nobody = await post(relay.base_url, PATH, orjson.dumps({"say": "hi"}), headers=[])
        large = await post(relay.base_url, PATH, orjson.dumps({"say": "x" * 2048}))
        step.behavior.end_error = ("internal", "boom")
        in_band = await post(relay.base_url, PATH, live)
        step.behavior.create_error = (500, "internal", "boom")
        failed = await post(relay.base_url, PATH, live)
        async with httpcore.AsyncConnectionPool() as pool:
            wrong = await pool.request("GET", url, headers=AUTH)
        openai = await post(relay.base_url, "/v1/chat/completions", b"{not json")
    assert _oops(bad, 400)["why"] == "the toy wants JSON"
    _oops(nobody, 401)
    assert all(name != b"www-authenticate" for name, _ in nobody.headers)
    _oops(large, 413)
    assert "boom" in _oops(failed, 502)["why"]
    assert in_band.status == 200
    assert in_band.content.endswith(b"\n! internal\n")
    _oops(wrong, 405)
    assert (b"allow", b"POST") in wrong.headers
    assert openai.status == 400
    assert set(orjson.loads(openai.content)) == {"error"}


async def test_a_stopped_toy_stream_ends_with_the_toys_last_words(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """A toy stream still running when the grace period ends gets the toy's own last words
    (``! server_shutting_down``), not OpenAI's error event and [DONE]."""
    relay = await _toy_relay(relay_factory, grace_period=0.2)
    step.behavior.answer = "abcdefghij"
    step.behavior.chunk_chars = 1
    step.behavior.stall_after = 3  # then silence: the stream is in flight when grace ends
    body = orjson.dumps({"say": "hi", "live": True})
    with trio.fail_after(5):
        stream = await send_raw_post(relay, body, STEP_CREDENTIAL, PATH)
        async with stream:
            received = b""
            while b"+ a" not in received:
                received += await stream.receive_some(65536)
            relay.app.shutdown()
            while part := await stream.receive_some(65536):
                received += part
        await relay.app.stopped.wait()
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"> start\n" in received
    assert b"! server_shutting_down\n" in received
    assert b"[DONE]" not in received
    assert step.record.chats_deleted == step.record.chats_created


async def _refuse(ex: Exchange) -> None:
    await ex.read_body()
    raise RequestError("refused by the handler")


async def test_a_server_given_a_renderer_refuses_in_its_shape(nursery: trio.Nursery) -> None:
    """The server's own refusals (malformed HTTP, 505) and an unrouted handler's errors use
    the renderer it was given: one place to replace OpenAI's default shape."""
    settings = config.load({}, environ={})
    sides = [trio.testing.memory_stream_pair() for _ in range(3)]
    server = Server(settings, _refuse, errors=TOY.error)
    await nursery.start(server.run, [OneStreamListener(*(side for _, side in sides))])
    requests = [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ]
    replies = []
    with trio.fail_after(5):
        for (client, _), request in zip(sides, requests, strict=True):
            await client.send_all(request)
            data = bytearray()
            while chunk := await client.receive_some(65536):
                data += chunk
            replies.append(bytes(data))
    server.shutdown()
    for reply, status in zip(replies, (400, 505, 400), strict=True):
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), head
        assert set(orjson.loads(body)) == {"oops"}, body
