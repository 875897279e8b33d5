"""Reading our wire bytes as a client would: the helpers the dialects' tests share.

- :func:`data_events` and :func:`named_events` split an encoder's SSE bytes
  into events, strictly: they also check the exact layout every encoder
  writes (OpenAI's chat stream: ``data:`` lines alone; Anthropic's and the
  Responses API's: an ``event:`` line naming the data's ``type``, then one
  ``data:`` line), so a stray newline in an event fails the test;
- :class:`SdkClient` is the ``openai`` SDK over a transport that answers
  every request with one fixed body, to hold our bytes to the SDK's parsing;
- :func:`nested` is a JSON document nested to a given depth, for the
  parsers' depth limit.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson


def data_events(wire: bytes) -> list[Any]:
    """The events of a ``data:``-only SSE body (OpenAI's chat stream), in order.

    Each event is one line: its ``data:`` JSON parsed, ``"[DONE]"`` for
    ``data: [DONE]``, or a comment as its text (``": keep-alive"``).
    """
    assert wire.endswith(b"\n\n"), wire[-40:]
    events: list[Any] = []
    for raw in wire[:-2].split(b"\n\n"):
        assert b"\n" not in raw, raw  # one line per event
        if raw.startswith(b":"):
            events.append(raw.decode())
        elif raw == b"data: [DONE]":
            events.append("[DONE]")
        else:
            assert raw.startswith(b"data: "), raw
            events.append(orjson.loads(raw[6:]))
    return events


def named_events(wire: bytes) -> list[tuple[str, Any]]:
    """``(name, data)`` of each event of a named-event SSE body, in order.

    Every event is two lines, ``event: <name>`` and ``data: <json>``, and the
    data's ``type`` is the event's name (Anthropic's Messages stream and the
    Responses API's both do this).
    """
    events: list[tuple[str, Any]] = []
    for block in wire.split(b"\n\n"):
        if not block:
            continue
        name, data = block.split(b"\n")
        assert name.startswith(b"event: "), block
        assert data.startswith(b"data: "), block
        payload = orjson.loads(data[6:])
        assert payload["type"] == name[7:].decode(), block
        events.append((payload["type"], payload))
    return events


class SdkClient:
    """An ``openai.OpenAI`` client whose transport answers every request with ``body``.

    Use :attr:`client` directly, or ``with SdkClient(...) as client:`` to have
    it closed after.
    """

    def __init__(self, body: bytes, content_type: str) -> None:
        #: the body of every request the client sent, in order
        self.requests: list[bytes] = []

        def answer(request: httpx2.Request) -> httpx2.Response:
            self.requests.append(request.read())
            return httpx2.Response(200, content=body, headers={"content-type": content_type})

        self.client = openai.OpenAI(
            api_key="sk-test",
            base_url="http://127.0.0.1:9/v1",
            max_retries=0,
            http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
        )

    def __enter__(self) -> openai.OpenAI:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()


def nested(depth: int) -> bytes:
    """JSON text of objects nested ``depth`` levels: ``{"a":{"a":...{}...}}``."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)
