"""A tiny fake OpenAI streaming server on loopback, for the ``bench stream`` tests.

The request's ``model`` picks the behaviour:

- ``good``: role chunk, ``Hel``, ``lo ``, ``world``, final chunk, ``[DONE]``;
- ``nodone``: the same without ``[DONE]`` (the body still ends cleanly);
- ``inband``: one chunk, an OpenAI error object, ``[DONE]``;
- ``cutoff``: one chunk, then the connection is closed inside the chunked body;
- ``stall``: one chunk, then silence until the client leaves;
- ``http500``: an HTTP 500 with an OpenAI error body;
- ``notsse``: HTTP 200 with a JSON body.

The HTTP side is the emulators' (``providers.emulator_http``); each
connection serves one request and is closed after its answer.
"""

from __future__ import annotations

from functools import partial

import h11
import orjson
import trio

from providers.emulator_http import ClientConnection, Reply, Request, serve_connection, serve_http

GOOD_TEXT = ("Hel", "lo ", "world")
DONE = b"data: [DONE]\n\n"
MAX_BODY_BYTES = 1024 * 1024


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    body = {
        "id": "fake",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _refusal(exc: Exception) -> Reply | None:
    return None  # bad HTTP or a body over the limit: close without an answer


class FakeOpenAI:
    """Serves ``POST /v1/chat/completions``; counts the requests it saw."""

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0
        self.models: list[str] = []

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (with ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1, any port, until cancelled."""
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(
                partial(serve_http, self._handle, host="127.0.0.1", port=0)
            )
            task_status.started()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        await serve_connection(stream, self._respond, _refusal, max_body_bytes=MAX_BODY_BYTES)

    async def _respond(self, request: Request, conn: ClientConnection) -> bool:
        self.requests += 1
        model = orjson.loads(request.body)["model"]
        self.models.append(model)
        if model == "http500":
            error = orjson.dumps({"error": {"message": "boom", "type": "server_error"}})
            await conn.reply(Reply(500, error))
        elif model == "notsse":
            await conn.reply(Reply(200, b"{}"))
        else:
            await conn.watched(partial(self._stream, conn, model))
        return False

    async def _stream(self, conn: ClientConnection, model: str) -> None:
        async def send(event: h11.Event) -> None:
            await conn.send(conn.encode(event))

        await send(h11.Response(status_code=200, headers=[("content-type", "text/event-stream")]))
        await send(h11.Data(data=_chunk({"role": "assistant", "content": ""})))
        if model in ("good", "nodone"):
            for text in GOOD_TEXT:
                await send(h11.Data(data=_chunk({"content": text})))
                await trio.sleep(0.001)
            await send(h11.Data(data=_chunk({}, "stop")))
            if model == "good":
                await send(h11.Data(data=DONE))
            await send(h11.EndOfMessage())
            return
        await send(h11.Data(data=_chunk({"content": "partial"})))
        if model == "inband":
            error = orjson.dumps(
                {"error": {"message": "upstream failed", "type": "upstream_error"}}
            )
            await send(h11.Data(data=b"data: " + error + b"\n\n" + DONE))
            await send(h11.EndOfMessage())
        elif model == "stall":
            await trio.sleep_forever()  # until the client leaves (the watcher cancels it)
        # "cutoff": return without EndOfMessage; serve_connection closes the socket.
