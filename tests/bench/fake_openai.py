"""A tiny fake OpenAI streaming server on loopback, for the ``bench stream`` tests.

The request's ``model`` picks the behaviour:

- ``good``: role chunk, ``Hel``, ``lo ``, ``world``, final chunk, ``[DONE]``;
- ``nodone``: the same without ``[DONE]`` (the body still ends cleanly);
- ``inband``: one chunk, an OpenAI error object, ``[DONE]``;
- ``cutoff``: one chunk, then the connection is closed inside the chunked body;
- ``stall``: one chunk, then silence until the client leaves;
- ``http500``: an HTTP 500 with an OpenAI error body;
- ``notsse``: HTTP 200 with a JSON body.
"""

from __future__ import annotations

import h11
import orjson
import trio

GOOD_TEXT = ("Hel", "lo ", "world")


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    body = {
        "id": "fake",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"


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
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            self.requests += 1
            model = orjson.loads(body)["model"]
            self.models.append(model)
            await self._answer(conn, stream, model)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream, model: str) -> None:
        async def send(event: h11.Event) -> None:
            data = conn.send(event)
            if data:
                await stream.send_all(data)

        if model == "http500":
            error = orjson.dumps({"error": {"message": "boom", "type": "server_error"}})
            await send(
                h11.Response(
                    status_code=500,
                    headers=[
                        ("content-type", "application/json"),
                        ("content-length", str(len(error))),
                    ],
                )
            )
            await send(h11.Data(data=error))
            await send(h11.EndOfMessage())
            return
        if model == "notsse":
            await send(
                h11.Response(status_code=200, headers=[("content-type", "application/json")])
            )
            await send(h11.Data(data=b"{}"))
            await send(h11.EndOfMessage())
            return
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
            await trio.sleep_forever()
        # "cutoff": return without EndOfMessage; the caller closes the socket.
