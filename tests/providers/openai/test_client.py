"""Tests of the OpenAI-compatible provider's I/O half over an in-memory transport.

The wire formats have their own tests (test_prompt, test_stream); these check
what :meth:`OpenAIProvider.chat` does with the response it gets: an event
stream, a whole ``chat.completion`` from an upstream that ignored ``stream``,
or something else.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from protocol.deltas import Delta, Finish, ReasoningDelta, TextDelta, Usage
from protocol.errors import UpstreamFailed
from protocol.openai import parse_chat_request
from providers.openai.client import OpenAIProvider
from providers.openai.prompt import ModelNames

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator

    from providers.contract import Headers, Response

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
         "completion_tokens_details": {"reasoning_tokens": 2}}


class _Response:
    """One upstream response, all of its body in memory (providers.contract.StreamedResponse)."""

    def __init__(self, content_type: bytes, body: bytes, status: int = 200) -> None:
        self.status = status
        self.headers = [(b"content-type", content_type)]
        self._body = body

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        for start in range(0, len(self._body), 7):  # small reads: events cut anywhere
            yield self._body[start : start + 7]

    async def read(self, limit: int = 1 << 20) -> bytes:
        return self._body[:limit]


class _Transport:
    """Answers every streamed call with one response; keeps the bodies sent."""

    def __init__(self, response: _Response) -> None:
        self.response = response
        self.sent: list[Any] = []

    async def request(self, method: bytes, url: str, headers: Headers, body: bytes = b"",
                      *, limit_s: float | None = None) -> Response:
        raise AssertionError("no unary call expected")

    @asynccontextmanager
    async def stream(self, method: bytes, url: str, headers: Headers, body: bytes = b""
                     ) -> AsyncIterator[_Response]:
        self.sent.append(orjson.loads(body))
        yield self.response


async def answer(response: _Response) -> tuple[list[Delta], Any]:
    """The deltas the provider makes of ``response``, and the body it sent."""
    transport = _Transport(response)
    provider = OpenAIProvider(transport, name="up", base_url="http://127.0.0.1:1/v1",
                              names=ModelNames(("m",)))
    request = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", '
                                 b'"content": "hi"}]}')
    deltas: list[Delta] = []
    async with provider.chat("sk-1", request) as stream:
        async for batch in stream:
            deltas += batch
    return deltas, transport.sent[0]


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


async def test_streamed_answer_ends_with_the_upstream_usage() -> None:
    """The request asks for usage; the usage chunk after the finish reason is the Finish's."""
    body = sse({"choices": [{"index": 0, "delta": {"reasoning_content": "r"}}]},
               {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
               {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {"choices": [], "usage": USAGE})
    deltas, sent = await answer(_Response(b"text/event-stream", body))
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert deltas == [ReasoningDelta("r"), TextDelta("Hi"), Finish("stop", usage=Usage(11, 7, 2))]


async def test_whole_completion_is_read_too() -> None:
    """An upstream that ignores stream answers one chat.completion: the same deltas, its
    usage on the Finish."""
    body = orjson.dumps({"id": "c", "object": "chat.completion", "model": "m",
                         "choices": [{"index": 0, "finish_reason": "length",
                                      "message": {"role": "assistant", "content": "Hi"}}],
                         "usage": USAGE})
    deltas, _ = await answer(_Response(b"application/json; charset=utf-8", body))
    assert deltas == [TextDelta("Hi"), Finish("length", usage=Usage(11, 7, 2))]


async def test_anything_else_is_not_a_stream() -> None:
    """An HTML page (a proxy's, say) is an UpstreamFailed, not an answer."""
    with pytest.raises(UpstreamFailed) as info:
        await answer(_Response(b"text/html", b"<html></html>"))
    assert info.value.code == "not_a_stream"


def test_sessions_go_to_redis_and_back() -> None:
    """The session (the key) as JSON text and back, for shared state; anything else is a
    ValueError (the pool then logs in again)."""
    provider = OpenAIProvider(_Transport(_Response(b"text/event-stream", b"")), name="up",
                              base_url="http://127.0.0.1:1/v1", names=ModelNames(("m",)))
    text = provider.dump_session("sk-1")
    assert orjson.loads(text) == {"key": "sk-1"}
    assert provider.load_session(text) == "sk-1"
    for bad in ('{"key": ""}', '{"key": 1}', '["sk-1"]'):
        with pytest.raises(ValueError, match="session is"):
            provider.load_session(bad)
    with pytest.raises(ValueError, match="unexpected character"):  # not JSON (orjson's error)
        provider.load_session("sk-1")
