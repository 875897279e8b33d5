"""Run one checked, timed stream against an OpenAI-compatible endpoint.

:func:`run_openai_stream` is what both ``bench stream`` and the relay half
of ``bench overhead`` do per stream: connect, POST ``/chat/completions``
with ``"stream": true``, check the status and content type, and feed the
body to an :class:`~bench.readers.OpenAIStreamReader`. Every failure ends
up in the :class:`~bench.readers.StreamRecord` as an error kind, never as an
exception, so one bad stream never takes down a benchmark run; only
cancellation from outside propagates (the idle scenario closes its streams
that way).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
import trio

from bench.readers import OpenAIStreamReader, StreamRecord
from bench.wire import Endpoint, HttpConnection, header
from protocol.errors import RelayError

if TYPE_CHECKING:
    import ssl

#: Path of the chat endpoint under an OpenAI base URL such as ``.../v1``.
CHAT_PATH = "/chat/completions"
_SSE_TYPE = b"text/event-stream"


def chat_body(model: str, prompt: str, extra: dict[str, Any] | None = None) -> bytes:
    """The JSON body of one streamed chat completion request.

    Args:
        model: the ``model`` field.
        prompt: the one user message.
        extra: more top-level fields (``max_tokens``, ...), merged last.
    """
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }
    if extra:
        body.update(extra)
    return orjson.dumps(body)


def request_headers(api_key: str | None) -> list[tuple[bytes, bytes]]:
    """Headers of a chat request; ``Authorization`` only with a key."""
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Accept", b"text/event-stream"),
        (b"User-Agent", b"trio-llm-relay-bench"),
    ]
    if api_key:
        headers.append((b"Authorization", b"Bearer " + api_key.encode("latin-1")))
    return headers


async def run_openai_stream(
    endpoint: Endpoint,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    record: StreamRecord,
    *,
    timeout_s: float,
    stamps: bool = False,
    path: str = CHAT_PATH,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Run one stream and fill ``record``; never raises except on outside cancellation.

    Args:
        endpoint: the OpenAI base (``http://host:port/v1``).
        body: from :func:`chat_body`.
        headers: from :func:`request_headers`.
        record: filled in; ``start_ns`` is set here, before connecting.
        timeout_s: bound on the whole stream; past it the error is ``timeout``.
        stamps: extract emulator stamps from the text.
        path: the chat path under the base.
        ssl_context: for ``https`` endpoints (default: system trust).
    """
    record.start_ns = time.monotonic_ns()
    connection: HttpConnection | None = None
    with trio.move_on_after(timeout_s) as scope:
        try:
            connection = await HttpConnection.open(endpoint, ssl_context)
            await connection.send_request(b"POST", path, headers, body)
            response = await connection.read_response()
            if response.status_code != 200:
                detail = await connection.read_body(4096)
                record.fail(
                    f"http_{response.status_code}",
                    detail.decode("utf-8", "replace"),
                    time.monotonic_ns(),
                )
                return
            if not header(response, b"content-type").lower().startswith(_SSE_TYPE):
                kind = header(response, b"content-type").decode("latin-1")
                record.fail("not_sse", f"content-type {kind!r}", time.monotonic_ns())
                return
            await connection.stream_body(OpenAIStreamReader(record, stamps=stamps))
        except RelayError as exc:
            record.fail(exc.code or "cut_off", exc.message, time.monotonic_ns())
        finally:
            if connection is not None:
                await connection.aclose()
    if scope.cancelled_caught:
        record.timed_out(timeout_s)
