"""An upstream's error in its stream's first event becomes an HTTP error (issue 16).

Some OpenAI-compatible platforms answer 200, then report a failure in-band:
``data: {"error": {"message", "type", "code"}}``. While the relay has sent
the client nothing, such an error is taken as it would be in the response
head: its own status (a numeric ``status``/``code``, a key-fault code or type,
else 502), another key for 401, 403 and 429, and the error in the dialect's
shape (on the fast path the upstream's message, type and code as they are).
Once something went out, an error stays in-band. The emulator's
``first_error`` knob sends such a stream; fixtures and helpers are
:mod:`tests.relay.test_openai_upstream`'s.
"""

# The imported fixtures are parameters of the tests below, which ruff sees as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

from typing import Any

import anthropic
import httpcore
import openai
import orjson
import pytest
import trio

from protocol.deltas import UpstreamError
from protocol.errors import AuthError, NoAccountFree, RequestError, UpstreamFailed
from protocol.sse import SSEEvent
from providers.openai.emulator import OpenAIEmulator, error_body
from providers.openai.stream import ChunkStream, in_band_status, leading_error
from tests.relay.conftest import RelayFactory, Running, post, sse_events, sse_text
from tests.relay.test_openai_upstream import (  # noqa: F401  (relay, upstream: fixtures)
    ANSWER,
    KEYS,
    chat,
    claude,
    in_thread,
    relay,
    sdk,
    upstream,
    upstreams,
)

OVERLOADED: dict[str, Any] = {"message": "The model is overloaded", "type": "server_error",
                              "code": "overloaded"}
HI: Any = [{"role": "user", "content": "hi"}]

# --- the status an in-band error stands for (sans-IO) ------------------------------------------

STATUSES: list[tuple[object, int]] = [
    ({"status": 429, "message": "slow down"}, 429),
    ({"code": 401}, 401),
    ({"code": "403"}, 403),
    ({"status": 503, "code": "rate_limit_exceeded"}, 503),  # its own status wins
    ({"code": "rate_limit_exceeded", "type": "requests"}, 429),
    ({"code": "insufficient_quota"}, 429),
    ({"code": "invalid_api_key", "type": "invalid_request_error"}, 401),
    ({"type": "authentication_error"}, 401),
    ({"type": "permission_error"}, 403),
    ({"type": "rate_limit_error"}, 429),
    ({"code": "1301", "message": "sensitive content"}, 502),  # a platform's own number
    ({"code": 200}, 502),
    ({"code": True}, 502),
    ({"type": "server_error"}, 502),
    ("the upstream fell over", 502),
]


@pytest.mark.parametrize(("error", "status"), STATUSES)
def test_both_paths_read_the_same_status(error: object, status: int) -> None:
    """The fast path's exception and the neutral path's UpstreamError carry one status."""
    data = orjson.dumps({"error": error})
    assert in_band_status(error) == status
    exc = leading_error(b"data: " + data + b"\n\n", "up")
    assert exc is not None
    assert exc.status == status
    [delta] = ChunkStream().feed(SSEEvent(data.decode()))
    assert isinstance(delta, UpstreamError)
    assert delta.status == status


def test_leading_error_keeps_the_fields_and_picks_the_class() -> None:
    """The upstream's message, type, param and code are kept; 401/403 are AuthError, 429
    NoAccountFree (the relay fails over on them), another 4xx RequestError, else
    UpstreamFailed."""
    def error(fields: dict[str, Any]) -> Any:
        return leading_error(b"data: " + orjson.dumps({"error": fields}) + b"\n\n", "up")

    overloaded = error(OVERLOADED)
    assert isinstance(overloaded, UpstreamFailed)
    assert (overloaded.status, overloaded.message, overloaded.kind, overloaded.code) == (
        502, "The model is overloaded", "server_error", "overloaded")
    assert isinstance(error({"code": "invalid_api_key", "message": "no"}), AuthError)
    assert isinstance(error({"status": 403, "message": "no"}), AuthError)
    assert isinstance(error({"type": "rate_limit_error", "message": "wait"}), NoAccountFree)
    bad = error({"status": 400, "message": "bad", "param": "temperature"})
    assert isinstance(bad, RequestError)
    assert (bad.status, bad.param) == (400, "temperature")
    assert error({"code": 500}).message == "up reported an error in its stream"


@pytest.mark.parametrize(
    "block",
    [
        b'data: {"error":{"message":"m"}}\n\n',
        b'\xef\xbb\xbf: a comment\r\n\r\ndata: {"error":{"message":"m"}}\r\n\r\n',
        b'data: {"error":\ndata: {"message":"m"}}\n\ndata: [DONE]\n\n',
        b"event: error\ndata: m\n\n",
    ],
)
def test_leading_error_found(block: bytes) -> None:
    """An error as the first event, however the SSE is written (a BOM and a comment first,
    CRLF, the JSON over two data lines, ``event: error`` with text)."""
    exc = leading_error(block, "up")
    assert exc is not None
    assert exc.message == "m"


@pytest.mark.parametrize(
    "block",
    [
        b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        b'data: {"error":{"message":"m"}}\n\n',  # an error second: in-band
        b'data: {"choices":[{"delta":{"content":"an error"}}]}\n\n',
        b'data: {"error":null,"choices":[]}\n\n',
        b"data: error, not JSON\n\n",
        b"data: [DONE]\n\n",
        b": error comment only\n\n",
    ],
)
def test_leading_error_not_found(block: bytes) -> None:
    """No error in the first event: nothing (the block goes to the client as it is)."""
    assert leading_error(block, "up") is None


# --- the fast path ---------------------------------------------------------------------------


async def test_fast_path_first_event_error_through_the_sdk(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """Streamed through the SDK: the create call raises the upstream's error under 502 with
    its message, type and code; it is not the key's fault, so no other key is tried."""
    upstream.behavior.first_error = OVERLOADED

    def run() -> openai.APIStatusError:
        with sdk(relay) as client, pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="deepseek/x", messages=HI, stream=True)
        return info.value

    error = await in_thread(run)
    assert error.status_code == 502
    assert (error.code, error.type) == ("overloaded", "server_error")
    assert "The model is overloaded" in error.message
    assert upstream.record.keys == [KEYS[0]]


async def test_fast_path_first_event_error_on_the_wire(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """The raw answer: the error's own status (400 from its code), OpenAI's error object
    with the upstream's message, type and param, JSON, no stream."""
    upstream.behavior.first_error = {"message": "temperature too high", "code": 400,
                                     "type": "invalid_request_error", "param": "temperature"}
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 400
    assert dict(reply.headers)[b"content-type"].startswith(b"application/json")
    assert orjson.loads(reply.content) == {"error": {
        "message": "temperature too high", "type": "invalid_request_error",
        "param": "temperature", "code": "400"}}


async def test_comments_before_the_first_event_leave_its_error_an_http_error(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """A platform that keeps a slow stream open with SSE comments, then fails: the comments
    carry nothing, so they do not commit the 200 and the error keeps its own status; an
    answer after such comments streams as usual (the comments are not in it)."""
    upstream.behavior.lead_comments = 2
    upstream.behavior.first_error = {"message": "slow down", "code": 429}
    upstream.behavior.first_error_keys = set(KEYS)
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 429
    assert orjson.loads(reply.content)["error"]["message"] == "slow down"
    upstream.behavior.first_error = None
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 200
    assert b"PROCESSING" not in reply.content
    assert reply.content.rstrip().endswith(b"data: [DONE]")


KEY_FAULTS: list[dict[str, Any]] = [
    {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"},
    {"message": "slow down", "code": 429},
    {"message": "Incorrect API key", "type": "invalid_request_error", "code": "invalid_api_key"},
    {"message": "not allowed", "status": 403},
]


@pytest.mark.parametrize("fault", KEY_FAULTS)
async def test_fast_path_key_fault_fails_over(
    relay: Running, upstream: OpenAIEmulator, fault: dict[str, Any]
) -> None:
    """The first key's stream opens with a key-fault error: the request succeeds on the
    second key and the client sees nothing of the failure."""
    upstream.behavior.first_error = fault
    upstream.behavior.first_error_keys = {KEYS[0]}
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 200, reply.content
    assert sse_text(reply.content) == ANSWER
    assert b"error" not in reply.content
    assert upstream.record.keys[0] == KEYS[0]
    assert upstream.record.keys[-1] == KEYS[1]


async def test_fast_path_every_key_rate_limited(relay: Running, upstream: OpenAIEmulator) -> None:
    """Every key's stream opens with a rate-limit error: the client gets 429 and the
    upstream's error after both keys were tried."""
    upstream.behavior.first_error = KEY_FAULTS[0]
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 429
    error = orjson.loads(reply.content)["error"]
    assert (error["message"], error["type"], error["code"]) == (
        "Rate limit reached", "requests", "rate_limit_exceeded")
    assert upstream.record.keys == list(KEYS)


async def test_fast_path_error_after_content_stays_in_band(
    relay: Running, upstream: OpenAIEmulator
) -> None:
    """An error after the answer started: 200, the content, then the upstream's error
    event as it sent it, then [DONE]."""
    upstream.behavior.end_error = ("server_error", "went wrong")
    reply = await post(relay.base_url, "/v1/chat/completions", chat(stream=True))
    assert reply.status == 200
    events = sse_events(reply.content)
    assert events[-2:] == [error_body("server_error", "went wrong"), b"[DONE]"]
    assert sse_text(reply.content) == ANSWER


async def test_fast_path_first_event_error_after_a_commit_stays_in_band(
    relay_factory: RelayFactory, upstream: OpenAIEmulator
) -> None:
    """The upstream is silent past the commit timeout, so the relay has sent its 200 head:
    an error as the first event then goes to the client in-band, as the upstream sent it."""
    relay = await relay_factory(openai_upstreams=upstreams(upstream), commit_timeout=0.01)
    hold = upstream.behavior.hold = trio.Event()
    upstream.behavior.first_error = OVERLOADED
    with trio.fail_after(5):
        async with httpcore.AsyncConnectionPool() as pool, pool.stream(
            "POST", relay.base_url + "/v1/chat/completions", content=chat(stream=True),
            headers=[(b"content-type", b"application/json")],
        ) as response:
            assert response.status == 200  # the head came before the upstream's first event
            hold.set()
            body = b"".join([chunk async for chunk in response.aiter_stream()])
    assert sse_events(body) == [orjson.dumps({"error": OVERLOADED}), b"[DONE]"]


# --- the neutral path (Responses, Messages) ------------------------------------------------


async def test_responses_first_event_error(relay: Running, upstream: OpenAIEmulator) -> None:
    """The Responses API, streamed and whole: an HTTP 502 in OpenAI's shape with the
    upstream's message, before any event."""
    upstream.behavior.first_error = OVERLOADED

    def run() -> list[openai.APIStatusError]:
        errors: list[openai.APIStatusError] = []
        with sdk(relay) as client:
            for stream in (True, False):
                with pytest.raises(openai.InternalServerError) as info:
                    client.responses.create(model="deepseek-chat", input="hi", stream=stream)
                errors.append(info.value)
        return errors

    for error in await in_thread(run):
        assert error.status_code == 502
        assert "The model is overloaded" in error.message
    assert len(upstream.record.keys) == 2  # one key each: 502 is not the key's fault


async def test_messages_first_event_error(relay: Running, upstream: OpenAIEmulator) -> None:
    """Anthropic's Messages, streamed: an HTTP error in Anthropic's shape (its status from
    the error's code) before any event."""
    upstream.behavior.first_error = {"message": "context too long", "code": 400,
                                     "type": "invalid_request_error"}

    def run() -> anthropic.APIStatusError:
        with claude(relay) as client, pytest.raises(anthropic.BadRequestError) as info, \
                client.messages.stream(model="deepseek-chat", max_tokens=50,
                                       messages=HI) as stream:
            stream.get_final_message()
        return info.value

    error = await in_thread(run)
    assert error.status_code == 400
    assert error.body is not None
    assert "context too long" in orjson.dumps(error.body).decode()


@pytest.mark.parametrize("fault", [KEY_FAULTS[0], KEY_FAULTS[2]])
async def test_neutral_path_key_fault_fails_over(
    relay: Running, upstream: OpenAIEmulator, fault: dict[str, Any]
) -> None:
    """Through the Responses and Messages dialects too, a key-fault first event moves to
    the second key and the answer comes from it."""
    upstream.behavior.first_error = fault
    upstream.behavior.first_error_keys = {KEYS[0]}

    def run() -> tuple[str, str]:
        with sdk(relay) as client, claude(relay) as claude_client:
            response = client.responses.create(model="deepseek-chat", input="hi")
            with claude_client.messages.stream(model="deepseek-chat", max_tokens=50,
                                               messages=HI) as stream:
                text = "".join(stream.text_stream)
        return response.output_text, text

    assert await in_thread(run) == (ANSWER, ANSWER)
    assert upstream.record.keys[-1] == KEYS[1]
    assert KEYS[0] in upstream.record.keys
