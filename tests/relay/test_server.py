"""The HTTP/1.1 server (relay.server) driven by real clients over loopback.

Low-level cases use a raw ``h11.Connection(h11.CLIENT)`` over
``trio.open_tcp_stream``; malformed input is written as raw bytes; simple
cases use httpcore. Every I/O test runs inside ``trio.fail_after(5)`` and uses
short real timeouts from the settings instead of sleeping.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11
import httpcore
import orjson
import pytest
import trio
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.http1 import MAX_EMPTY_LINES
from relay import config
from relay.app import App
from relay.server import Exchange, Server, open_listeners
from tests.relay.conftest import (
    AUTH,
    STEP_CREDENTIAL,
    RelayFactory,
    Running,
    chat_body,
    sse_events,
    sse_text,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

    from providers.step.emulator import StepEmulator

CHAT = "/v1/chat/completions"
JSON_HEADERS = [(b"content-type", b"application/json"), *AUTH]
ERROR_KEYS = {"message", "type", "param", "code"}


# --- client helpers ------------------------------------------------------------------------


@dataclass
class Reply:
    """One response as a client saw it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    informational: list[int]

    def header(self, name: bytes) -> bytes | None:
        """The first header called ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def encode_request(
    conn: h11.Connection,
    method: str,
    target: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
) -> bytes:
    """The bytes of one request, sent through ``conn`` (which records it)."""
    head = [(b"host", b"relay.test"), *headers]
    if body or method == "POST":
        head.append((b"content-length", str(len(body)).encode()))
    out = conn.send(h11.Request(method=method, target=target, headers=head)) or b""
    if body:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out


async def read_reply(stream: trio.abc.Stream, conn: h11.Connection) -> Reply:
    """Read one whole response from ``stream`` through the client ``conn``."""
    informational: list[int] = []
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    body: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.InformationalResponse):
            informational.append(event.status_code)
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = list(event.headers)
        elif isinstance(event, h11.Data):
            body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return Reply(status, headers, b"".join(body), informational)
        else:
            raise AssertionError(f"unexpected event {event!r}")


async def roundtrip(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    method: str,
    target: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
) -> Reply:
    """Send one request on a kept-alive connection and read its response."""
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    await stream.send_all(encode_request(conn, method, target, headers, body))
    return await read_reply(stream, conn)


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    data = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def parse_raw(data: bytes) -> Reply:
    """Parse one Content-Length response from raw bytes."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    reply = Reply(status, headers, b"", [])
    length = reply.header(b"content-length")
    reply.body = rest[: int(length)] if length is not None else rest
    return reply


def assert_openai_error(body: bytes, *, code: str | None = None) -> dict[str, object]:
    """``body`` is ``{"error": {"message", "type", "param", "code"}}``; returns the inner dict."""
    data = orjson.loads(body)
    assert isinstance(data, dict)
    assert set(data) == {"error"}
    error = data["error"]
    assert isinstance(error, dict)
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code
    return error


@asynccontextmanager
async def connect(relay: Running) -> AsyncIterator[tuple[trio.SocketStream, h11.Connection]]:
    """A TCP connection to the relay and a fresh h11 client for it."""
    stream = await trio.open_tcp_stream(relay.host, relay.port)
    async with stream:
        yield stream, h11.Connection(h11.CLIENT)


def chat_request_bytes(*, stream: bool, content: str = "hi") -> bytes:
    """A whole chat request (head and body) as raw bytes."""
    return encode_request(h11.Connection(h11.CLIENT), "POST", CHAT, JSON_HEADERS,
                          chat_body(content, stream=stream))


# --- keep-alive, pipelining, framing ---------------------------------------------------------


async def test_keep_alive_serves_several_requests_in_order(
    relay: Running, step: StepEmulator
) -> None:
    """GET /ping, a non-stream chat and GET /v1/models on one connection are all answered."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            ping = await roundtrip(stream, conn, "GET", "/ping")
            chat = await roundtrip(stream, conn, "POST", CHAT, JSON_HEADERS, chat_body())
            models = await roundtrip(stream, conn, "GET", "/v1/models")
    assert (ping.status, ping.body) == (200, b"pong")
    assert chat.status == 200
    completion = orjson.loads(chat.body)
    assert completion["choices"][0]["message"]["content"] == "Hello world!"
    assert models.status == 200
    assert orjson.loads(models.body)["object"] == "list"
    assert all(r.header(b"connection") is None for r in (ping, chat, models))
    assert relay.app.server.requests == 3


async def test_pipelined_requests_are_answered_in_order(relay: Running) -> None:
    """Two GETs written in one segment get their two responses, in request order."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            first = encode_request(conn, "GET", "/ping")
            second = encode_request(h11.Connection(h11.CLIENT), "GET", "/v1/models")
            await stream.send_all(first + second)
            ping = await read_reply(stream, conn)
            conn.start_next_cycle()
            encode_request(conn, "GET", "/v1/models")  # let the client state machine follow
            models = await read_reply(stream, conn)
    assert ping.body == b"pong"
    assert models.status == 200
    assert orjson.loads(models.body)["object"] == "list"


async def test_request_pipelined_behind_a_chat_waits_for_it(
    relay: Running, step: StepEmulator
) -> None:
    """A GET pipelined behind a running chat is kept, not lost, and answered after the chat."""
    step.behavior.frame_delay_s = 0.01
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            first = encode_request(conn, "POST", CHAT, JSON_HEADERS, chat_body(stream=True))
            second = encode_request(h11.Connection(h11.CLIENT), "GET", "/ping")
            await stream.send_all(first + second)
            chat = await read_reply(stream, conn)
            conn.start_next_cycle()
            encode_request(conn, "GET", "/ping")
            ping = await read_reply(stream, conn)
    assert sse_text(chat.body) == "Hello world!"
    assert sse_events(chat.body)[-1] == b"[DONE]"
    assert ping.body == b"pong"
    await relay.settled()
    assert step.record.chats_deleted == step.record.chats_created


async def test_stream_is_chunked_and_non_stream_has_content_length(relay: Running) -> None:
    """A stream: true chat uses chunked transfer; a non-stream chat carries Content-Length."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            streamed = await roundtrip(stream, conn, "POST", CHAT, JSON_HEADERS,
                                       chat_body(stream=True))
            whole = await roundtrip(stream, conn, "POST", CHAT, JSON_HEADERS, chat_body())
    assert streamed.status == 200
    assert streamed.header(b"transfer-encoding") == b"chunked"
    assert streamed.header(b"content-length") is None
    assert (streamed.header(b"content-type") or b"").startswith(b"text/event-stream")
    assert sse_events(streamed.body)[-1] == b"[DONE]"
    assert whole.header(b"transfer-encoding") is None
    assert whole.header(b"content-length") == str(len(whole.body)).encode()


async def test_connection_close_from_the_client_is_honoured(relay: Running) -> None:
    """``Connection: close`` gets the response, marked close, and then the server closes."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(
                b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 200
    assert reply.body == b"pong"
    assert reply.header(b"connection") == b"close"
    assert data.endswith(b"pong")  # nothing after the response: the server closed


async def test_http10_client_gets_an_answer_and_a_close(relay: Running) -> None:
    """An HTTP/1.0 request is answered (as HTTP/1.1) and the connection is then closed."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(b"GET /ping HTTP/1.0\r\n\r\n")
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert reply.body == b"pong"


async def test_http10_stream_is_delimited_by_close(relay: Running) -> None:
    """HTTP/1.0 has no chunked encoding: a streamed chat ends with [DONE] and a close."""
    body = chat_body(stream=True)
    head = (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + STEP_CREDENTIAL.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(head + body)
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 200
    assert reply.header(b"transfer-encoding") is None
    assert sse_text(reply.body) == "Hello world!"
    assert sse_events(reply.body)[-1] == b"[DONE]"


async def test_expect_100_continue_is_answered_before_the_body(relay: Running) -> None:
    """With ``Expect: 100-continue`` the server sends 100 first; the body then gets a 200."""
    body = chat_body()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Authorization: Bearer " + STEP_CREDENTIAL.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(head)
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += await stream.receive_some(65536)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="POST", target=CHAT, headers=[
                (b"host", b"x"), (b"content-length", str(len(body)).encode())]))
            conn.send(h11.Data(data=body))
            conn.send(h11.EndOfMessage())
            leftover = interim.partition(b"\r\n\r\n")[2]
            if leftover:  # (receive_data(b"") would mean EOF)
                conn.receive_data(leftover)
            reply = await read_reply(stream, conn)
    assert reply.status == 200
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "Hello world!"


# --- limits -----------------------------------------------------------------------------------


async def test_huge_request_head_gets_431(relay_factory: RelayFactory) -> None:
    """A head over max_header_bytes is answered 431 with an OpenAI error, then closed."""
    relay = await relay_factory(max_header_bytes=2048)
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(
                b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
            )
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 431
    assert reply.header(b"connection") == b"close"
    assert "too large" in str(assert_openai_error(reply.body)["message"])


async def test_request_head_growing_over_the_limit_gets_431(
    relay_factory: RelayFactory,
) -> None:
    """An unfinished head that grows past max_header_bytes over several writes is refused
    with 431 without waiting for its end."""
    relay = await relay_factory(max_header_bytes=2048)
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1500)
            await trio.sleep(0.01)
            await stream.send_all(b"a" * 1000)
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 431
    assert_openai_error(reply.body)


async def test_body_over_limit_by_content_length_is_refused_unread(
    relay_factory: RelayFactory,
) -> None:
    """A Content-Length over max_body_bytes gets 413 before any body byte is sent."""
    relay = await relay_factory(max_body_bytes=1024)
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
            )
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 413
    assert reply.header(b"connection") == b"close"
    assert_openai_error(reply.body)


async def test_expect_100_continue_over_limit_gets_413_without_100(
    relay_factory: RelayFactory,
) -> None:
    """An over-limit body announced with Expect: 100-continue is refused; 100 is never sent."""
    relay = await relay_factory(max_body_bytes=1024)
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5000\r\n\r\n"
            )
            data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b" 100 " not in data.split(b"\r\n", 1)[0]


async def test_chunked_body_over_limit_gets_413(relay_factory: RelayFactory) -> None:
    """A chunked body that grows past max_body_bytes is answered 413, then closed."""
    relay = await relay_factory(max_body_bytes=1024)
    chunk = b"x" * 800
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + (b"320\r\n" + chunk + b"\r\n") * 2
            )
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 413
    assert_openai_error(reply.body)


async def test_malformed_request_line_gets_400_then_close(relay: Running) -> None:
    """A garbage request line is answered 400 with an OpenAI error body, then closed."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 400
    assert reply.header(b"connection") == b"close"
    assert_openai_error(reply.body)
    assert data.endswith(reply.body)


async def test_a_body_that_stops_coming_is_a_408_after_the_body_timeout(
    relay_factory: RelayFactory,
) -> None:
    """A whole head and part of the body, then silence: a 408 (code request_timeout) at
    body_timeout, then the connection closes."""
    relay = await relay_factory(body_timeout=0.3)
    body = chat_body()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            started = trio.current_time()
            await stream.send_all(head + body[:5])
            data = await read_to_eof(stream)
            elapsed = trio.current_time() - started
    reply = parse_raw(data)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert reply.header(b"connection") == b"close"
    error = assert_openai_error(reply.body, code="request_timeout")
    assert error["type"] == "invalid_request_error"
    assert 0.25 <= elapsed < 1.5


async def test_a_body_sent_after_the_head_is_waited_for(relay_factory: RelayFactory) -> None:
    """The head first, the body in later writes: the relay reads on and answers."""
    relay = await relay_factory(keepalive_timeout=2.0)
    body = chat_body()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"authorization: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (AUTH[0][1], len(body))
    )
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(head)
            await trio.sleep(0.05)
            await stream.send_all(body[:7])
            await trio.sleep(0.05)
            await stream.send_all(body[7:])
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 200
    assert orjson.loads(reply.body)["object"] == "chat.completion"


async def test_incomplete_head_is_closed_after_header_timeout(
    relay_factory: RelayFactory,
) -> None:
    """A client that sends half a request head and stops is disconnected at header_timeout."""
    relay = await relay_factory(header_timeout=0.3)
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            started = trio.current_time()
            await stream.send_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
            data = await read_to_eof(stream)
            elapsed = trio.current_time() - started
    assert data == b""
    assert 0.25 <= elapsed < 1.5


async def test_head_deadline_counts_from_the_connection_start(
    relay_factory: RelayFactory,
) -> None:
    """A first byte sent late does not restart the clock: the head is due header_timeout
    after the connection opened, not after its first byte."""
    relay = await relay_factory(header_timeout=0.4)
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            started = trio.current_time()
            await trio.sleep(0.3)
            await stream.send_all(b"G")
            data = await read_to_eof(stream)
            elapsed = trio.current_time() - started
    assert data == b""
    assert 0.35 <= elapsed < 0.6


async def test_trickled_head_does_not_extend_the_deadline(relay_factory: RelayFactory) -> None:
    """A head trickled a byte every 20 ms is still cut off at header_timeout (slowloris)."""
    relay = await relay_factory(header_timeout=0.3)
    closed_at = 0.0
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            started = trio.current_time()
            try:
                for byte in b"GET /ping HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.02)
            except trio.BrokenResourceError:
                pass
            closed_at = trio.current_time() - started
            assert await read_to_eof(stream) == b""
    assert closed_at < 1.0


async def test_idle_keep_alive_connection_is_closed(relay_factory: RelayFactory) -> None:
    """After a response, a connection idle for keepalive_timeout is closed by the server."""
    relay = await relay_factory(keepalive_timeout=0.3)
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            reply = await roundtrip(stream, conn, "GET", "/ping")
            idle_since = trio.current_time()
            tail = await read_to_eof(stream)
            idle = trio.current_time() - idle_since
    assert reply.body == b"pong"
    assert tail == b""
    assert 0.25 <= idle < 1.5


# --- routing ------------------------------------------------------------------------------


async def test_unknown_path_is_404_in_openai_shape(relay: Running) -> None:
    """An unknown path gets 404 and {"error": {"message", "type", "param", "code"}}."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            reply = await roundtrip(stream, conn, "GET", "/v1/nowhere")
            after = await roundtrip(stream, conn, "GET", "/ping")
    assert reply.status == 404
    assert reply.header(b"content-type") == b"application/json"
    error = assert_openai_error(reply.body)
    assert error["type"] == "invalid_request_error"
    assert after.body == b"pong"  # an error response keeps the connection usable


async def test_wrong_method_is_405_with_allow(relay: Running) -> None:
    """GET on the chat endpoint is 405 with ``Allow: POST``."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            reply = await roundtrip(stream, conn, "GET", CHAT)
    assert reply.status == 405
    assert reply.header(b"allow") == b"POST"
    assert_openai_error(reply.body)


async def test_options_preflight_gets_204_with_cors(relay: Running) -> None:
    """A CORS pre-flight OPTIONS gets 204, the CORS headers, and no body framing header."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            reply = await roundtrip(stream, conn, "OPTIONS", CHAT, [
                (b"origin", b"http://app.example"),
                (b"access-control-request-method", b"POST"),
            ])
            after = await roundtrip(stream, conn, "GET", "/ping")
    assert reply.status == 204
    assert reply.body == b""
    assert reply.header(b"access-control-allow-origin") == b"*"
    assert b"POST" in (reply.header(b"access-control-allow-methods") or b"")
    assert reply.header(b"access-control-allow-headers") is not None
    # RFC 9110 8.6: a server must not send Content-Length in a 204 response
    assert reply.header(b"content-length") is None
    assert after.body == b"pong"


async def test_index_ping_and_metrics(relay: Running) -> None:
    """GET / is HTML, /ping is pong, /metrics is Prometheus text counting requests."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            index = await roundtrip(stream, conn, "GET", "/")
            ping = await roundtrip(stream, conn, "GET", "/ping")
            metrics = await roundtrip(stream, conn, "GET", "/metrics")
    assert index.status == 200
    assert (index.header(b"content-type") or b"").startswith(b"text/html")
    assert b"<html" in index.body
    assert (ping.status, ping.body) == (200, b"pong")
    assert metrics.status == 200
    assert (metrics.header(b"content-type") or b"").startswith(b"text/plain")
    assert (b'relay_requests_total{model="",provider="",route="/ping",status="200"} 1.0'
            in metrics.body)
    assert b"_created" not in metrics.body
    assert b"relay_open_connections" in metrics.body
    assert b"relay_upstream_connections_idle 0.0" in metrics.body
    assert b"relay_cleanup_pending 0.0" in metrics.body
    assert b"relay_requests_in_flight 1.0" in metrics.body  # the /metrics request itself


async def test_head_ping_has_headers_and_no_body(relay: Running) -> None:
    """HEAD /ping gets 200 with GET's Content-Length but no body; the connection stays usable."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            head = await roundtrip(stream, conn, "HEAD", "/ping")
            get = await roundtrip(stream, conn, "GET", "/ping")
    assert head.status == 200
    assert head.body == b""
    assert head.header(b"content-length") == b"4"
    assert get.body == b"pong"


# --- disconnects ------------------------------------------------------------------------------


async def test_client_leaving_mid_stream_aborts_and_deletes_the_chat(
    relay: Running, step: StepEmulator
) -> None:
    """A client that closes after the first chunk aborts the upstream stream, the chat is
    deleted, and the relay goes on serving."""
    step.behavior.answer = "y" * 200
    step.behavior.chunk_chars = 2
    step.behavior.frame_delay_s = 0.05
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(chat_request_bytes(stream=True))
            received = b""
            while b"data: " not in received:
                received += await stream.receive_some(65536)
        await step.wait_until(lambda r: r.streams_aborted == 1 and len(r.chats_deleted) == 1)
        async with connect(relay) as (stream, conn):
            ping = await roundtrip(stream, conn, "GET", "/ping")
    assert received.startswith(b"HTTP/1.1 200 ")
    assert step.record.streams_finished == 0
    await relay.settled()
    assert step.record.chats_deleted == step.record.chats_created
    assert ping.body == b"pong"


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority for the whole session."""
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """A server certificate for 127.0.0.1 and its key, written as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(certfile), str(keyfile)


async def test_tls_serves_ping_and_a_stream(
    relay_factory: RelayFactory, ca: trustme.CA, tls_files: tuple[str, str]
) -> None:
    """Over HTTPS with the CA trusted, /ping and a streamed chat work, certificate verified."""
    certfile, keyfile = tls_files
    relay = await relay_factory(certfile=certfile, keyfile=keyfile)
    base = f"https://127.0.0.1:{relay.port}"
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(5):
        async with httpcore.AsyncConnectionPool(ssl_context=client_ctx) as pool:
            ping = await pool.request("GET", base + "/ping")
            async with pool.stream("POST", base + CHAT, headers=JSON_HEADERS,
                                   content=chat_body(stream=True)) as response:
                streamed = b"".join([part async for part in response.aiter_stream()])
                status = response.status
    assert (ping.status, ping.content) == (200, b"pong")
    assert status == 200
    assert sse_text(streamed) == "Hello world!"
    assert sse_events(streamed)[-1] == b"[DONE]"


async def test_plain_http_on_the_tls_port_does_not_crash(
    relay_factory: RelayFactory,
    ca: trustme.CA,
    tls_files: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Plain HTTP sent to the TLS port gets no HTTP answer; HTTPS still works afterwards."""
    certfile, keyfile = tls_files
    relay = await relay_factory(certfile=certfile, keyfile=keyfile)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await read_to_eof(stream)
        async with httpcore.AsyncConnectionPool(ssl_context=client_ctx) as pool:
            ping = await pool.request("GET", f"https://127.0.0.1:{relay.port}/ping")
    assert not data.startswith(b"HTTP/")
    assert ping.content == b"pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- Unix socket -----------------------------------------------------------------------------


@asynccontextmanager
async def uds_relay(
    nursery: trio.Nursery, step: StepEmulator, path: str
) -> AsyncIterator[tuple[App, list[str]]]:
    """A relay listening on the Unix socket ``path`` (relay_factory speaks host:port only)."""
    settings = config.load(
        {"uds": path, "step_base_url": step.base_url, "step_file_settle": 0.0,
         "grace_period": 1.0},
        environ={},
    )
    app = App(settings)
    addresses = await nursery.start(app.serve)
    try:
        yield app, addresses
    finally:
        app.shutdown()
        with trio.move_on_after(5):
            await app.stopped.wait()
        await app.aclose()


async def test_unix_socket_serves_ping_and_chat(
    nursery: trio.Nursery, step: StepEmulator, tmp_path: Path
) -> None:
    """A relay on a Unix socket answers /ping and a streamed chat through it."""
    path = str(tmp_path / "relay.sock")
    with trio.fail_after(5):
        async with uds_relay(nursery, step, path) as (_, addresses), \
                httpcore.AsyncConnectionPool(uds=path) as pool:
            ping = await pool.request("GET", "http://localhost/ping")
            chat = await pool.request("POST", "http://localhost" + CHAT, headers=JSON_HEADERS,
                                      content=chat_body(stream=True))
    assert addresses == [path]
    assert ping.content == b"pong"
    assert sse_text(chat.content) == "Hello world!"


async def test_unix_socket_replaces_a_stale_socket(
    nursery: trio.Nursery, step: StepEmulator, tmp_path: Path
) -> None:
    """A socket file left by an earlier run is replaced instead of failing with EADDRINUSE."""
    path = str(tmp_path / "relay.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    assert await trio.Path(path).is_socket()
    with trio.fail_after(5):
        async with uds_relay(nursery, step, path), \
                httpcore.AsyncConnectionPool(uds=path) as pool:
            ping = await pool.request("GET", "http://localhost/ping")
    assert ping.content == b"pong"


async def test_unix_socket_never_deletes_a_regular_file(tmp_path: Path) -> None:
    """A regular file where the socket should go is an error, and the file is left intact."""
    path = tmp_path / "not-a-socket"
    path.write_bytes(b"precious")
    settings = config.load({"uds": str(path)}, environ={})
    fds_before = len(os.listdir("/proc/self/fd"))
    with trio.fail_after(5), pytest.raises(OSError, match="in use"):
        await open_listeners(settings)
    assert path.read_bytes() == b"precious"
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the failed socket was closed


# --- graceful shutdown ---------------------------------------------------------------------------


async def test_shutdown_finishes_streams_refuses_new_and_closes_idle(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """On shutdown a stream in flight completes with [DONE], an idle keep-alive connection is
    closed at once, and new connections are refused."""
    relay = await relay_factory(grace_period=4.0)
    step.behavior.answer = "abcdefghij"
    step.behavior.chunk_chars = 1
    step.behavior.frame_delay_s = 0.03
    with trio.fail_after(5):
        async with connect(relay) as (idle, idle_conn), connect(relay) as (busy, busy_conn):
            assert (await roundtrip(idle, idle_conn, "GET", "/ping")).body == b"pong"
            await busy.send_all(
                encode_request(busy_conn, "POST", CHAT, JSON_HEADERS, chat_body(stream=True))
            )
            first = bytes(await busy.receive_some(65536))
            busy_conn.receive_data(first)
            relay.app.shutdown()
            asked = trio.current_time()
            assert await read_to_eof(idle) == b""
            idle_closed = trio.current_time() - asked
            with pytest.raises(OSError, match="connect"):
                await trio.open_tcp_stream(relay.host, relay.port)
            reply = await read_reply(busy, busy_conn)
            assert await read_to_eof(busy) == b""
        with trio.move_on_after(2):
            await relay.app.stopped.wait()
    assert idle_closed < 0.2
    assert reply.status == 200
    assert sse_text(reply.body) == "abcdefghij"
    assert sse_events(reply.body)[-1] == b"[DONE]"
    await relay.settled()
    assert step.record.chats_deleted == step.record.chats_created
    assert relay.app.stopped.is_set()


# --- hostile input ------------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.binary(max_size=200).map(lambda tail: b"GET / HTTP/1.1\r\n" + tail),
    st.binary(max_size=200).map(
        lambda tail: b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 40\r\n" + tail
    ),
    st.binary(max_size=200).map(
        lambda tail: b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + tail
    ),
)


async def _send_junk(relay: Running, junk: bytes) -> None:
    """Send ``junk`` and EOF; check the answer (if any) and that /ping still works."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            try:
                await stream.send_all(junk)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass
            data = await read_to_eof(stream)
        async with connect(relay) as (stream, conn):
            ping = await roundtrip(stream, conn, "GET", "/ping")
    if data:
        assert data.startswith(b"HTTP/1.1 ")
        assert 200 <= int(data[9:12]) < 500 or int(data[9:12]) == 505, data[:100]
    assert ping.body == b"pong"


async def test_random_bytes_never_crash_the_server(
    relay: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """Any bytes sent as a request get a non-5xx answer (505 for an HTTP version we do not
    speak) or a close, never log an unexpected error, and the server goes on answering /ping
    on new connections."""

    # Hypothesis runs in a worker thread and hands each example back to this trio
    # run, so that all examples share one relay (and fail fast on the first bug).
    @settings(max_examples=40, deadline=None, database=None)
    @given(junk=HOSTILE)
    def check(junk: bytes) -> None:
        trio.from_thread.run(_send_junk, relay, junk)

    await trio.to_thread.run_sync(check)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert relay.app.server.requests >= 40  # every example's /ping, at least


# --- framing and versions (RFC 9112) -----------------------------------------------------------


async def test_content_length_with_transfer_encoding_is_refused_and_closed(
    relay: Running,
) -> None:
    """A request with both Content-Length and Transfer-Encoding: chunked gets a 400 with an
    OpenAI error body and the connection is closed: a request behind it is never answered
    (a proxy that framed it by Content-Length would see a different second request)."""
    smuggled = (
        b"GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(smuggled)
            data = await read_to_eof(stream)
    reply = parse_raw(data)
    assert reply.status == 400
    assert reply.header(b"connection") == b"close"
    assert "Transfer-Encoding" in str(assert_openai_error(reply.body)["message"])
    assert data.endswith(reply.body)  # one response, then the close
    assert relay.app.server.requests == 0


@pytest.mark.parametrize(
    "request_line",
    [b"GET /ping HTTP/9.9", b"GET /ping HTTP/2.0", b"GET /ping HTTP/0.9", b"GET /ping HTTP/1.2",
     b"PRI * HTTP/2.0"],
)
async def test_other_http_versions_get_505_and_a_close(
    relay: Running, request_line: bytes
) -> None:
    """A request line naming a version other than HTTP/1.0 or 1.1 (HTTP/2's prior-knowledge
    preface too) gets 505 HTTP Version Not Supported with an OpenAI error body, then a close."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(request_line + b"\r\nHost: x\r\n\r\n")
            data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    reply = parse_raw(data)
    assert reply.header(b"connection") == b"close"
    assert_openai_error(reply.body)
    assert data.endswith(reply.body)


async def test_a_request_line_without_a_version_gets_400_and_a_close(relay: Running) -> None:
    """An HTTP/0.9-style request line (no version at all) is malformed for h11: 400, close."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(b"GET /ping\r\n\r\n")
            data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert_openai_error(parse_raw(data).body)


async def test_empty_lines_before_request_lines_are_skipped(relay: Running) -> None:
    """Empty lines (CRLF or a bare LF) before a request line are ignored (RFC 9112 2.2): on
    the first request, between kept-alive requests, split across writes, and pipelined
    behind a request; each request is answered and the connection stays open."""
    ping = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            await stream.send_all(b"\r\n" + ping)
            encode_request(conn, "GET", "/ping")
            first = await read_reply(stream, conn)
            conn.start_next_cycle()
            for part in (b"\n", b"\r", b"\n\r", b"\n" + ping):  # a CRLF cut between writes
                await stream.send_all(part)
                await trio.sleep(0.01)
            encode_request(conn, "GET", "/ping")
            second = await read_reply(stream, conn)
            conn.start_next_cycle()
            await stream.send_all(ping + b"\r\n\r\n" + ping)  # pipelined, empty lines between
            encode_request(conn, "GET", "/ping")
            third = await read_reply(stream, conn)
            conn.start_next_cycle()
            encode_request(conn, "GET", "/ping")
            fourth = await read_reply(stream, conn)
            conn.start_next_cycle()
            last = await roundtrip(stream, conn, "GET", "/ping")
    assert [r.body for r in (first, second, third, fourth, last)] == [b"pong"] * 5
    assert all(r.header(b"connection") is None for r in (first, second, third, fourth, last))


async def test_too_many_empty_lines_get_400(relay: Running) -> None:
    """More empty lines than MAX_EMPTY_LINES before a request line are refused with 400."""
    with trio.fail_after(5):
        async with connect(relay) as (stream, _):
            await stream.send_all(b"\r\n" * (MAX_EMPTY_LINES + 1)
                                  + b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await read_to_eof(stream)
    assert parse_raw(data).status == 400


async def test_every_status_line_carries_its_reason_phrase(
    relay_factory: RelayFactory,
) -> None:
    """Responses carry the standard reason phrase: 200 OK, 404, 405, 204, 100 Continue, and
    the server's own refusals (400, 413, 431)."""
    relay = await relay_factory(max_body_bytes=1024, max_header_bytes=2048)

    async def status_line(raw: bytes) -> bytes:
        async with connect(relay) as (stream, _):
            await stream.send_all(raw)
            data = bytearray()
            while b"\r\n" not in data:
                data += await stream.receive_some(65536)
        return bytes(data).split(b"\r\n", 1)[0]

    with trio.fail_after(5):
        lines = [
            await status_line(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"),
            await status_line(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"),
            await status_line(b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"),
            await status_line(b"OPTIONS /ping HTTP/1.1\r\nHost: x\r\n\r\n"),
            await status_line(b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                              b"Expect: 100-continue\r\n\r\n"),
            await status_line(b"NOT HTTP\r\n\r\n"),
            await status_line(b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"),
            await status_line(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000
                              + b"\r\n\r\n"),
        ]
    expected = [200, 404, 405, 204, 100, 400, 413, 431]
    assert lines == [b"HTTP/1.1 %d %s" % (code, HTTPStatus(code).phrase.encode())
                     for code in expected]


# --- body timeout (autojump clock over a memory stream) ----------------------------------------


class OneStreamListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener that hands out the given streams, then waits forever."""

    def __init__(self, *streams: trio.abc.Stream) -> None:
        self._streams = list(streams)

    async def accept(self) -> trio.abc.Stream:
        if not self._streams:
            await trio.sleep_forever()
        return self._streams.pop(0)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _echo_body(ex: Exchange) -> None:
    body = await ex.read_body()
    await ex.respond(200, body, b"text/plain")


async def _reply_over(client: trio.abc.Stream) -> bytes:
    """Everything ``client`` receives until the server closes it."""
    data = bytearray()
    while chunk := await client.receive_some(65536):
        data += chunk
    return bytes(data)


async def test_a_body_dribbled_a_byte_a_second_is_cut_at_body_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A body sent one byte a second (each byte within the idle timeout) is still due
    body_timeout after the end of its head: 408 request_timeout at exactly 30 s, then close."""
    settings = config.load({"body_timeout": 30.0, "keepalive_timeout": 60.0}, environ={})
    client, server_side = trio.testing.memory_stream_pair()
    server = Server(settings, _echo_body)
    await nursery.start(server.run, [OneStreamListener(server_side)])
    body = b"x" * 100
    cut_at = math.inf

    async def dribble() -> None:
        nonlocal cut_at
        try:
            for byte in body:
                await trio.sleep(1)
                await client.send_all(bytes([byte]))
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(200):
        started = trio.current_time()
        await client.send_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        async with trio.open_nursery() as inner:
            inner.start_soon(dribble)
            data = await _reply_over(client)
            cut_at = trio.current_time() - started
            inner.cancel_scope.cancel()
    server.shutdown()
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    reply = parse_raw(data)
    assert reply.header(b"connection") == b"close"
    error = assert_openai_error(reply.body, code="request_timeout")
    assert error["type"] == "invalid_request_error"
    assert cut_at == pytest.approx(30.0)


async def test_a_body_that_arrives_in_time_is_served(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A body dribbled over 20 s, inside a 30 s body_timeout, is read whole and answered."""
    settings = config.load({"body_timeout": 30.0}, environ={})
    client, server_side = trio.testing.memory_stream_pair()
    server = Server(settings, _echo_body)
    await nursery.start(server.run, [OneStreamListener(server_side)])
    with trio.fail_after(100):
        await client.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n"
                              b"Connection: close\r\n\r\n")
        for byte in b"0123456789abcdefghij":
            await trio.sleep(1)
            await client.send_all(bytes([byte]))
        data = await _reply_over(client)
    server.shutdown()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert parse_raw(data).body == b"0123456789abcdefghij"


# --- accept failures ------------------------------------------------------------------------------


class FailingListener(trio.abc.Listener[trio.abc.Stream]):
    """accept() fails with EMFILE ``failures`` times, then hands out ``stream``, then waits."""

    def __init__(self, failures: int, stream: trio.abc.Stream) -> None:
        self.failures = failures
        self._stream: trio.abc.Stream | None = stream

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        if self._stream is None:
            await trio.sleep_forever()
        stream, self._stream = self._stream, None
        assert stream is not None
        return stream

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_running_out_of_descriptors_logs_once_per_episode(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50 accept failures in a row (EMFILE) log one warning, and the accept that works again
    logs "accept recovered after 50 failures"; the connection it brings is served."""
    caplog.set_level(logging.INFO, logger="relay.server")
    settings = config.load({}, environ={})
    client, server_side = trio.testing.memory_stream_pair()
    server = Server(settings, _echo_body)
    await nursery.start(server.run, [FailingListener(50, server_side)])
    with trio.fail_after(100):
        await client.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await _reply_over(client)
    server.shutdown()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    messages = [r.getMessage() for r in caplog.records if r.name == "relay.server"]
    assert len([m for m in messages if m.startswith("accept failed")]) == 1
    assert "accept recovered after 50 failures" in messages


# --- shutdown at the end of the grace period ------------------------------------------------------


async def test_a_stream_cut_by_shutdown_ends_with_an_error_event_and_done(
    relay_factory: RelayFactory, step: StepEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream still running when grace_period ends gets an in-band error event (code
    server_shutting_down) and [DONE]; its chat is deleted and the access log records the cut."""
    caplog.set_level(logging.INFO, logger="relay.access")
    relay = await relay_factory(grace_period=0.2)
    step.behavior.answer = "abcdefghij"
    step.behavior.chunk_chars = 1
    step.behavior.stall_after = 3  # then silence: the stream is in flight when grace ends
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            await stream.send_all(
                encode_request(conn, "POST", CHAT, JSON_HEADERS, chat_body(stream=True))
            )
            received = b""
            while b'"content"' not in received:
                received += await stream.receive_some(65536)
            conn.receive_data(received)
            relay.app.shutdown()
            reply = await read_reply(stream, conn)
        await relay.app.stopped.wait()
    assert reply.status == 200
    events = sse_events(reply.body)
    assert events[-1] == b"[DONE]"
    error = assert_openai_error(events[-2], code="server_shutting_down")
    assert error["type"] == "server_error"
    assert sse_text(b"data: " + b"\n\ndata: ".join(events[:-2])) == "abc"
    assert step.record.chats_created
    assert step.record.chats_deleted == step.record.chats_created
    access = [r.getMessage() for r in caplog.records if r.name == "relay.access"]
    assert any(" 200 " in line and " end=shutdown " in line and " cut=shutdown" in line
               for line in access), access


async def test_a_non_stream_request_cut_by_shutdown_gets_503(
    relay_factory: RelayFactory, step: StepEmulator
) -> None:
    """A non-stream chat still waiting for its answer when grace_period ends is answered 503
    with code server_shutting_down (and a close); its chat is deleted."""
    relay = await relay_factory(grace_period=0.2)
    step.behavior.stall_after = 1
    with trio.fail_after(5):
        async with connect(relay) as (stream, conn):
            await stream.send_all(
                encode_request(conn, "POST", CHAT, JSON_HEADERS, chat_body(stream=False))
            )
            await step.wait_until(lambda r: r.streams_started == 1)
            relay.app.shutdown()
            reply = await read_reply(stream, conn)
        await relay.app.stopped.wait()
    assert reply.status == 503
    assert reply.header(b"connection") == b"close"
    error = assert_openai_error(reply.body, code="server_shutting_down")
    assert error["type"] == "server_error"
    assert step.record.chats_created
    assert step.record.chats_deleted == step.record.chats_created


async def test_a_tls_client_that_stops_reading_is_cut_at_send_timeout(
    relay_factory: RelayFactory, step: StepEmulator, ca: trustme.CA,
    tls_files: tuple[str, str],
) -> None:
    """Over HTTPS too, a client that never reads a long stream is cut once a write makes no
    progress for send_timeout: the upstream stream is aborted and the chat deleted while the
    client's socket is still open."""
    certfile, keyfile = tls_files
    relay = await relay_factory(certfile=certfile, keyfile=keyfile, send_timeout=0.3)
    step.behavior.answer = "x" * 4_000_000  # more than the socket buffers on both sides hold
    step.behavior.chunk_chars = 100_000
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    with trio.fail_after(20):
        await sock.connect((relay.host, relay.port))
        tls = trio.SSLStream(trio.SocketStream(sock), client_ctx, server_hostname="127.0.0.1")
        async with tls:
            await tls.send_all(chat_request_bytes(stream=True))  # and never read
            await step.wait_until(
                lambda r: r.streams_aborted == 1 and len(r.chats_deleted) == 1, timeout=20
            )
    assert step.record.streams_finished == 0
    assert step.record.chats_deleted == step.record.chats_created
