"""Tests of relay/upstream.py: HttpTransport, UrlFetcher and the address guard.

The upstream is a tiny h11 server written here, on 127.0.0.1 port 0. Each
path of it plays a :class:`Reply`: a status, headers, and a script of body
steps (bytes to send, real pauses of a few hundredths of a second, an event
to wait for, or "hang forever"). Timeouts are real but short, as loopback
I/O and trio's autojump clock do not mix (see STYLE.md section 10).
"""

from __future__ import annotations

import gzip
import socket
import time
import zlib
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11
import pytest
import trio

import relay.netio
import relay.timers
from protocol.errors import RequestError, UpstreamFailed, UpstreamTimeout
from providers.contract import FetchedFile
from relay import upstream
from relay.config import Settings
from relay.upstream import (
    FETCH_USER_AGENT,
    MAX_REDIRECTS,
    GuardedBackend,
    HttpTransport,
    UrlFetcher,
    filename_from_url,
    is_public_address,
    make_pool,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from providers.contract import StreamedResponse

IO_LIMIT_S = 5.0
SHORT_S = 0.1  # a timeout that must fire
HANG = "hang"  # a body step: never send anything more


@dataclass
class Reply:
    """What one path of the test server answers."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: body steps: bytes are sent, a float is a real pause in seconds, an Event is
    #: waited for, HANG stops for good; the response ends after the last step
    body: list[bytes | float | trio.Event | str] = field(default_factory=list)
    #: never send the response head
    silent: bool = False
    #: close the connection without answering
    hang_up: bool = False
    #: raw bytes sent instead of an HTTP response
    garbage: bytes = b""


@dataclass
class Recorded:
    """One request the server received."""

    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes


class TinyServer:
    """An h11 server on loopback that answers each path with its Reply."""

    def __init__(self, routes: dict[str, Reply] | None = None) -> None:
        self.routes = routes or {}
        self.requests: list[Recorded] = []
        self.host = "127.0.0.1"
        self.port = 0

    def url(self, path: str) -> str:
        """An absolute URL of this server."""
        return f"http://{self.host}:{self.port}{path}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 port 0; report readiness through ``task_status``."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            try:
                while await self._one(stream, conn):
                    conn.start_next_cycle()
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                return

    async def _one(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return False
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
        assert request is not None
        self.requests.append(
            Recorded(
                request.method,
                request.target,
                {k.lower(): v for k, v in request.headers},
                bytes(body),
            )
        )
        path = request.target.decode().split("?", 1)[0]
        if path.startswith("http://"):  # absolute form
            path = "/" + path.split("/", 3)[3]
        reply = self.routes.get(path, Reply(404, body=[b"no such path"]))
        if reply.garbage:
            await stream.send_all(reply.garbage)
            return False
        if reply.hang_up:
            return False
        if reply.silent:
            await trio.sleep_forever()
        head = h11.Response(status_code=reply.status, headers=reply.headers)
        await stream.send_all(conn.send(head))
        for step in reply.body:
            if isinstance(step, bytes):
                await stream.send_all(conn.send(h11.Data(data=step)))
            elif isinstance(step, float):
                await trio.sleep(step)
            elif isinstance(step, trio.Event):
                await step.wait()
            else:
                await trio.sleep_forever()
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE


@pytest.fixture
async def server(nursery: trio.Nursery) -> TinyServer:
    """A running TinyServer with no routes yet (tests fill in ``routes``)."""
    tiny = TinyServer()
    await nursery.start(tiny.serve)
    return tiny


def settings_for(**changes: object) -> Settings:
    """Settings with generous timeouts, changed as given."""
    values: dict[str, object] = {
        "connect_timeout": IO_LIMIT_S,
        "request_timeout": IO_LIMIT_S,
        "first_byte_timeout": IO_LIMIT_S,
        "stall_timeout": IO_LIMIT_S,
        "upload_timeout": IO_LIMIT_S,
    }
    values.update(changes)
    return Settings().with_changes(**values)


@asynccontextmanager
async def transport(**changes: object) -> AsyncIterator[HttpTransport]:
    """An HttpTransport over its own pool, closed afterwards."""
    settings = settings_for(**changes)
    async with make_pool(settings) as pool:
        yield HttpTransport(pool, settings, "Test")


@asynccontextmanager
async def fetcher(**changes: object) -> AsyncIterator[UrlFetcher]:
    """A UrlFetcher (private addresses allowed unless told otherwise), closed afterwards."""
    changes.setdefault("allow_private_urls", True)
    fetch = UrlFetcher(settings_for(**changes))
    try:
        yield fetch
    finally:
        await fetch.aclose()


async def drain(resp: StreamedResponse, into: list[bytes]) -> None:
    """Append every chunk of ``resp`` to ``into`` until the body ends (or fails)."""
    async with aclosing(resp.chunks()) as chunks:
        async for chunk in chunks:
            into.append(chunk)  # noqa: PERF401 - keep what came before a failure


def refused_port() -> int:
    """A loopback port with (very probably) nobody listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# === HttpTransport: unary calls ==========================================================


async def test_request_returns_status_headers_and_body(server: TinyServer) -> None:
    """A unary call sends method, headers and body, and returns the upstream's status,
    headers and whole body."""
    server.routes["/api/x"] = Reply(
        201, [(b"X-Answer", b"42"), (b"Content-Type", b"application/json")], [b'{"a":', b"1}"]
    )
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            response = await http.request(
                b"POST", server.url("/api/x"), [(b"X-Token", b"secret")], b'{"q":1}'
            )
    assert response.status == 201
    assert response.header(b"x-answer") == b"42"
    assert response.body == b'{"a":1}'
    (seen,) = server.requests
    assert seen.method == b"POST"
    assert seen.target == b"/api/x"
    assert seen.headers[b"x-token"] == b"secret"
    assert seen.body == b'{"q":1}'


async def test_connections_are_reused(server: TinyServer) -> None:
    """Consecutive calls over one transport reuse one keep-alive connection."""
    server.routes["/a"] = Reply(200, [(b"Content-Length", b"2")], [b"ok"])
    with trio.fail_after(IO_LIMIT_S):
        settings = settings_for()
        async with make_pool(settings) as pool:
            http = HttpTransport(pool, settings, "Test")
            for _ in range(3):
                assert (await http.request(b"GET", server.url("/a"), [])).body == b"ok"
            assert len(pool.connections) == 1
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        (b"gzip", gzip.compress),
        (b"GZIP", gzip.compress),
        (b"deflate", zlib.compress),
        (b"identity", lambda data: data),
    ],
)
async def test_request_decodes_compressed_bodies(
    server: TinyServer, encoding: bytes, compress: object
) -> None:
    """gzip and deflate bodies (any case) are decoded according to Content-Encoding."""
    assert callable(compress)
    plain = b"hello compressed world " * 50
    packed: bytes = compress(plain)
    server.routes["/z"] = Reply(
        200, [(b"Content-Encoding", encoding)], [packed[:10], packed[10:]]
    )
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            response = await http.request(b"GET", server.url("/z"), [])
    assert response.body == plain


async def test_request_refuses_an_unknown_encoding(server: TinyServer) -> None:
    """A body in an encoding we did not offer (br) is UpstreamFailed, not passed on raw."""
    server.routes["/br"] = Reply(200, [(b"Content-Encoding", b"br")], [b"\x1b\x00\x00"])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            with pytest.raises(UpstreamFailed, match="content-encoding") as info:
                await http.request(b"GET", server.url("/br"), [])
    assert info.value.status == 502


async def test_request_refuses_a_corrupt_gzip_body(server: TinyServer) -> None:
    """A body that claims gzip but is not is UpstreamFailed."""
    server.routes["/bad"] = Reply(200, [(b"Content-Encoding", b"gzip")], [b"not gzip at all"])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            with pytest.raises(UpstreamFailed, match="compressed"):
                await http.request(b"GET", server.url("/bad"), [])


async def test_request_body_over_the_limit_fails(
    server: TinyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unary body over UNARY_BODY_LIMIT_BYTES is UpstreamFailed, not buffered without end."""
    monkeypatch.setattr(upstream, "UNARY_BODY_LIMIT_BYTES", 1000)
    server.routes["/big"] = Reply(200, [], [b"x" * 600, b"x" * 600, HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            with pytest.raises(UpstreamFailed, match="over the limit"):
                await http.request(b"GET", server.url("/big"), [])


async def test_connection_refused_is_upstream_failed() -> None:
    """Nobody listening is UpstreamFailed (502), not a timeout or an httpcore error."""
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            with pytest.raises(UpstreamFailed) as info:
                await http.request(b"GET", f"http://127.0.0.1:{refused_port()}/x", [])
    assert not isinstance(info.value, UpstreamTimeout)
    assert info.value.status == 502


async def test_silent_server_is_upstream_timeout(server: TinyServer) -> None:
    """A server that never answers makes the call fail with UpstreamTimeout (504) after
    request_timeout."""
    server.routes["/slow"] = Reply(silent=True)
    with trio.fail_after(IO_LIMIT_S):
        async with transport(request_timeout=SHORT_S) as http:
            start = time.monotonic()
            with pytest.raises(UpstreamTimeout) as info:
                await http.request(b"GET", server.url("/slow"), [])
            assert time.monotonic() - start < IO_LIMIT_S / 2
    assert info.value.status == 504


async def test_limit_s_overrides_the_request_timeout(server: TinyServer) -> None:
    """A per-call limit_s replaces request_timeout for that call."""
    server.routes["/slow"] = Reply(silent=True)
    with trio.fail_after(IO_LIMIT_S):
        async with transport(request_timeout=60.0) as http:
            with pytest.raises(UpstreamTimeout):
                await http.request(b"GET", server.url("/slow"), [], limit_s=SHORT_S)


async def test_server_hanging_up_is_upstream_failed(server: TinyServer) -> None:
    """A server that closes the connection without answering is UpstreamFailed."""
    server.routes["/bye"] = Reply(hang_up=True)
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            with pytest.raises(UpstreamFailed):
                await http.request(b"GET", server.url("/bye"), [])


async def test_garbage_response_is_upstream_failed(server: TinyServer) -> None:
    """Bytes that are not HTTP are UpstreamFailed, not an httpcore exception."""
    server.routes["/junk"] = Reply(garbage=b"SSH-2.0-OpenSSH\r\n\r\n")
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            with pytest.raises(UpstreamFailed):
                await http.request(b"GET", server.url("/junk"), [])


# === HttpTransport: streamed calls ========================================================


async def test_stream_delivers_chunks_as_they_are_sent(server: TinyServer) -> None:
    """Each body chunk the upstream writes comes out of chunks() on its own, before the
    next one is written (the server waits for the test between chunks)."""
    gates = [trio.Event() for _ in range(3)]
    server.routes["/s"] = Reply(
        200,
        [(b"Content-Type", b"text/event-stream"), (b"X-Kind", b"sse")],
        [b"one", gates[0], b"two", gates[1], b"three", gates[2]],
    )
    received: list[bytes] = []
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http, http.stream(b"POST", server.url("/s"), [], b"{}") as resp:
            assert resp.status == 200
            assert resp.header(b"x-kind") == b"sse"
            assert resp.header(b"X-KIND") == b"sse"
            async with aclosing(resp.chunks()) as chunks:
                async for chunk in chunks:
                    received.append(chunk)
                    if len(received) <= len(gates):
                        gates[len(received) - 1].set()
    assert received == [b"one", b"two", b"three"]
    assert server.requests[0].body == b"{}"


async def test_stream_reports_error_statuses(server: TinyServer) -> None:
    """A streamed call answered 401 still opens; status and body are there to inspect."""
    server.routes["/deny"] = Reply(401, [(b"Content-Type", b"application/json")], [b'{"e":1}'])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http, http.stream(b"POST", server.url("/deny"), []) as resp:
            assert resp.status == 401
            assert await resp.read() == b'{"e":1}'


async def test_stream_decodes_gzip_incrementally(server: TinyServer) -> None:
    """A gzip stream cut into small writes decodes to the original bytes."""
    plain = b"".join(b"data: %d\n\n" % i for i in range(200))
    packed = gzip.compress(plain)
    steps: list[bytes | float | trio.Event | str] = [
        packed[i : i + 7] for i in range(0, len(packed), 7)
    ]
    server.routes["/gz"] = Reply(200, [(b"Content-Encoding", b"gzip")], steps)
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http, http.stream(b"GET", server.url("/gz"), []) as resp:
            body = b"".join([chunk async for chunk in resp.chunks()])
    assert body == plain


async def test_stream_refuses_an_unknown_encoding(server: TinyServer) -> None:
    """Opening a stream whose Content-Encoding we cannot decode is UpstreamFailed."""
    server.routes["/br"] = Reply(200, [(b"Content-Encoding", b"zstd")], [b"x"])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            with pytest.raises(UpstreamFailed, match="content-encoding"):
                async with http.stream(b"GET", server.url("/br"), []):
                    pytest.fail("opened a stream in an unknown encoding")


async def test_stream_connection_refused_is_upstream_failed() -> None:
    """Opening a stream to nobody is UpstreamFailed."""
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            with pytest.raises(UpstreamFailed):
                async with http.stream(b"GET", f"http://127.0.0.1:{refused_port()}/", []):
                    pytest.fail("opened a stream to a closed port")


async def test_stream_without_a_head_times_out(server: TinyServer) -> None:
    """A server that never sends the response head makes opening the stream fail with
    UpstreamTimeout once first_byte_timeout has passed."""
    server.routes["/quiet"] = Reply(silent=True)
    with trio.fail_after(IO_LIMIT_S):
        async with transport(first_byte_timeout=SHORT_S, stall_timeout=SHORT_S) as http:
            with pytest.raises(UpstreamTimeout):
                async with http.stream(b"POST", server.url("/quiet"), []):
                    pytest.fail("opened a stream that never answered")


async def test_first_byte_timeout(server: TinyServer) -> None:
    """Head sent but no body within first_byte_timeout: chunks() raises UpstreamTimeout,
    long before the (large) stall timeout."""
    server.routes["/think"] = Reply(200, [], [HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with transport(first_byte_timeout=SHORT_S, stall_timeout=60.0) as http:
            start = time.monotonic()
            received: list[bytes] = []
            async with http.stream(b"POST", server.url("/think"), []) as resp:
                with pytest.raises(UpstreamTimeout):
                    await drain(resp, received)
            assert time.monotonic() - start < IO_LIMIT_S / 2
    assert received == []


async def test_first_read_may_take_longer_than_the_stall_timeout(server: TinyServer) -> None:
    """The first chunk is allowed first_byte_timeout even when that is longer than the
    stall timeout; after it, silence longer than stall_timeout is UpstreamTimeout."""
    server.routes["/slow-start"] = Reply(200, [], [SHORT_S * 2, b"first", HANG])
    received: list[bytes] = []
    with trio.fail_after(IO_LIMIT_S):
        async with (
            transport(first_byte_timeout=IO_LIMIT_S, stall_timeout=SHORT_S / 2) as http,
            http.stream(b"POST", server.url("/slow-start"), []) as resp,
        ):
            with pytest.raises(UpstreamTimeout):
                await drain(resp, received)
    assert received == [b"first"]


async def test_stall_timeout_after_one_chunk(server: TinyServer) -> None:
    """One chunk, then silence: chunks() yields the chunk, then raises UpstreamTimeout."""
    server.routes["/stall"] = Reply(200, [], [b"hello", HANG])
    received: list[bytes] = []
    with trio.fail_after(IO_LIMIT_S):
        async with (
            transport(first_byte_timeout=60.0, stall_timeout=SHORT_S) as http,
            http.stream(b"POST", server.url("/stall"), []) as resp,
        ):
            with pytest.raises(UpstreamTimeout) as info:
                await drain(resp, received)
    assert received == [b"hello"]
    assert info.value.status == 504


async def test_stall_timeout_kept_by_coarse_timers(
    server: TinyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stall timeout long enough for relay.timers (120 s by default; made short
    here) ends the stream the same way: the chunk, then UpstreamTimeout (504)."""
    monkeypatch.setattr(relay.netio, "COARSE_MIN_S", SHORT_S / 2)
    monkeypatch.setattr(relay.timers, "SLACK_S", SHORT_S / 5)
    expired: list[relay.netio.SocketStream] = []
    real_expire = relay.netio.SocketStream.expire

    def expire(stream: relay.netio.SocketStream) -> None:
        expired.append(stream)
        real_expire(stream)

    monkeypatch.setattr(relay.netio.SocketStream, "expire", expire)
    server.routes["/stall"] = Reply(200, [], [b"hello", HANG])
    received: list[bytes] = []
    with trio.fail_after(IO_LIMIT_S):
        async with (
            transport(first_byte_timeout=SHORT_S, stall_timeout=SHORT_S) as http,
            http.stream(b"POST", server.url("/stall"), []) as resp,
        ):
            with pytest.raises(UpstreamTimeout) as info:
                await drain(resp, received)
            assert len(relay.timers.coarse_timers()) == 0  # expired, nothing left behind
    assert received == [b"hello"]
    assert info.value.status == 504
    assert len(expired) == 1  # the timers ended it, not a cancel scope


async def test_stall_timer_restarts_with_every_chunk(server: TinyServer) -> None:
    """Chunks that each come within stall_timeout of the previous one never time out,
    even when the whole body takes longer than the stall timeout."""
    gap = 0.05
    steps: list[bytes | float | trio.Event | str] = []
    for number in range(6):
        steps += [gap, b"%d" % number]
    server.routes["/drip"] = Reply(200, [], steps)
    with trio.fail_after(IO_LIMIT_S):
        async with (
            transport(first_byte_timeout=60.0, stall_timeout=gap * 4) as http,
            http.stream(b"POST", server.url("/drip"), []) as resp,
        ):
            start = time.monotonic()
            body = b"".join([chunk async for chunk in resp.chunks()])
            elapsed = time.monotonic() - start
    assert body == b"012345"
    assert elapsed > gap * 4  # longer than one stall timeout in total


async def test_broken_stream_is_upstream_failed(server: TinyServer) -> None:
    """A connection that closes inside a body of announced length is UpstreamFailed."""
    server.routes["/cut"] = Reply(200, [(b"Content-Length", b"100")], [b"0123456789"])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http, http.stream(b"GET", server.url("/cut"), []) as resp:
            received: list[bytes] = []
            with pytest.raises(UpstreamFailed):
                await drain(resp, received)
    assert b"".join(received) == b"0123456789"


async def test_read_caps_the_body(server: TinyServer) -> None:
    """read(limit) returns at most ``limit`` bytes, the start of the body, and stops
    reading (the rest of the body is never awaited)."""
    server.routes["/error"] = Reply(500, [], [b"a" * 100, b"b" * 100, b"c" * 100, HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http, http.stream(b"GET", server.url("/error"), []) as resp:
            body = await resp.read(250)
    assert body == b"a" * 100 + b"b" * 100 + b"c" * 50


async def test_read_without_limit_reads_a_short_body(server: TinyServer) -> None:
    """read() returns a short error body whole."""
    server.routes["/e"] = Reply(502, [], [b"bad ", b"gateway"])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http, http.stream(b"GET", server.url("/e"), []) as resp:
            assert await resp.read() == b"bad gateway"


async def test_stream_closed_early_leaves_the_pool_usable(server: TinyServer) -> None:
    """Leaving a stream before its end closes it; later calls on the pool still work."""
    server.routes["/endless"] = Reply(200, [], [b"tick", HANG])
    server.routes["/ok"] = Reply(200, [], [b"fine"])
    with trio.fail_after(IO_LIMIT_S):
        async with transport() as http:
            async with (
                http.stream(b"GET", server.url("/endless"), []) as resp,
                aclosing(resp.chunks()) as chunks,
            ):
                async for chunk in chunks:
                    assert chunk == b"tick"
                    break
            assert (await http.request(b"GET", server.url("/ok"), [])).body == b"fine"


# === UrlFetcher: data URLs and schemes ====================================================


async def test_fetch_base64_data_url() -> None:
    """A base64 data URL becomes a FetchedFile with its MIME type and a name with the
    matching extension."""
    async with fetcher() as fetch:
        got = await fetch.fetch("data:image/png;base64,iVBORw0KGgo=")
    assert got.mime == "image/png"
    assert got.name.endswith(".png")
    assert got.data == b"\x89PNG\r\n\x1a\n"


async def test_fetch_percent_encoded_data_url() -> None:
    """A percent-encoded data URL decodes to its bytes, named after its MIME type."""
    async with fetcher() as fetch:
        got = await fetch.fetch("data:text/plain,hello%20world")
    assert got == FetchedFile(got.name, "text/plain", b"hello world")
    assert got.name.endswith(".txt")


async def test_fetch_data_url_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A data URL over file_max_bytes is RequestError file_too_large, refused from its
    encoded length without decoding it."""
    import binascii

    def must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded a data URL over the limit")

    monkeypatch.setattr(binascii, "a2b_base64", must_not_decode)
    async with fetcher(file_max_bytes=1000) as fetch:
        with pytest.raises(RequestError) as info:
            await fetch.fetch("data:image/png;base64," + "QUFB" * 1000)
    assert info.value.code == "file_too_large"


async def test_fetch_bad_base64() -> None:
    """A data URL that is not base64 is RequestError (invalid_file_url)."""
    async with fetcher() as fetch:
        with pytest.raises(RequestError) as info:
            await fetch.fetch("data:image/png;base64,&&&&")
    assert info.value.code == "invalid_file_url"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "/relative/path.png",
        "",
    ],
)
async def test_fetch_refuses_other_schemes(url: str) -> None:
    """Only http, https and data URLs are fetched; anything else is RequestError
    (invalid_file_url) without any network activity."""
    async with fetcher() as fetch:
        with pytest.raises(RequestError) as info:
            await fetch.fetch(url)
    assert info.value.code == "invalid_file_url"


# === UrlFetcher: http ============================================================


async def test_fetch_http_file(server: TinyServer) -> None:
    """An http URL is fetched with a GET; the name is the last path segment without the
    query, the MIME type comes from Content-Type (parameters dropped)."""
    server.routes["/files/report%20final.pdf"] = Reply(
        200, [(b"Content-Type", b"Application/PDF; charset=binary")], [b"%PDF-1.4", b" body"]
    )
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            got = await fetch.fetch(server.url("/files/report%20final.pdf?sig=abc&x=1"))
    assert got == FetchedFile("report final.pdf", "application/pdf", b"%PDF-1.4 body")
    (seen,) = server.requests
    assert seen.method == b"GET"
    assert seen.target == b"/files/report%20final.pdf?sig=abc&x=1"
    assert seen.headers[b"user-agent"] == FETCH_USER_AGENT


@pytest.mark.parametrize(
    ("path", "content_type", "expected"),
    [
        ("/photo.jpg", None, "image/jpeg"),
        ("/photo.jpg", b"application/octet-stream", "image/jpeg"),
        ("/doc.pdf", b"", "application/pdf"),
        ("/blob.unknownext", None, "application/octet-stream"),
        ("/photo.jpg", b"image/webp", "image/webp"),
    ],
)
async def test_fetch_guesses_mime_from_the_name(
    server: TinyServer, path: str, content_type: bytes | None, expected: str
) -> None:
    """Without a useful Content-Type (absent, empty, octet-stream) the MIME type is
    guessed from the file name; a real Content-Type wins over the name."""
    headers = [] if content_type is None else [(b"Content-Type", content_type)]
    server.routes[path] = Reply(200, headers, [b"bytes"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            got = await fetch.fetch(server.url(path))
    assert got.mime == expected


async def test_fetch_http_error_status(server: TinyServer) -> None:
    """A file URL answering 404 is RequestError (400, invalid_file_url) naming the status."""
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError, match="404") as info:
                await fetch.fetch(server.url("/missing.png"))
    assert info.value.code == "invalid_file_url"
    assert info.value.status == 400


async def test_fetch_content_length_over_the_limit_is_refused_before_reading(
    server: TinyServer,
) -> None:
    """A Content-Length over file_max_bytes is refused at once: the server never sends
    the body, so reading it would hang."""
    server.routes["/huge.bin"] = Reply(200, [(b"Content-Length", b"1000")], [HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(file_max_bytes=100) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/huge.bin"))
    assert info.value.code == "file_too_large"


async def test_fetch_body_over_the_limit_is_refused_while_reading(server: TinyServer) -> None:
    """A body without Content-Length that grows past file_max_bytes is refused as soon as
    it does, without waiting for the rest."""
    server.routes["/grow.bin"] = Reply(200, [], [b"x" * 60, b"x" * 60, HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(file_max_bytes=100) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/grow.bin"))
    assert info.value.code == "file_too_large"


async def test_fetch_body_at_the_limit_is_accepted(server: TinyServer) -> None:
    """A body of exactly file_max_bytes is fetched."""
    server.routes["/exact.bin"] = Reply(200, [], [b"y" * 50, b"y" * 50])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(file_max_bytes=100) as fetch:
            got = await fetch.fetch(server.url("/exact.bin"))
    assert got.data == b"y" * 100


async def test_fetch_unreachable_is_request_error() -> None:
    """A file URL nobody answers on is RequestError (invalid_file_url), not a 502."""
    async with fetcher() as fetch:
        with pytest.raises(RequestError) as info:
            await fetch.fetch(f"http://127.0.0.1:{refused_port()}/a.png")
    assert info.value.code == "invalid_file_url"


async def test_fetch_times_out(server: TinyServer) -> None:
    """A file server that never answers is RequestError after upload_timeout."""
    server.routes["/slow.png"] = Reply(silent=True)
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(upload_timeout=SHORT_S) as fetch:
            with pytest.raises(RequestError, match=r"timed out|ReadTimeout") as info:
                await fetch.fetch(server.url("/slow.png"))
    assert info.value.code == "invalid_file_url"


# === UrlFetcher: redirects ======================================================


def redirect(location: bytes, status: int = 302) -> Reply:
    """A reply redirecting to ``location``."""
    return Reply(status, [(b"Location", location)])


async def test_fetch_follows_redirects_up_to_the_limit(server: TinyServer) -> None:
    """MAX_REDIRECTS (3) redirects of any kind, absolute or relative, are followed; the
    name comes from the final URL."""
    assert MAX_REDIRECTS == 3
    server.routes["/r1"] = redirect(server.url("/r2").encode(), 301)
    server.routes["/r2"] = redirect(b"/dir/r3", 307)
    server.routes["/dir/r3"] = redirect(b"../final.png", 308)
    server.routes["/final.png"] = Reply(200, [(b"Content-Type", b"image/png")], [b"PNG"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            got = await fetch.fetch(server.url("/r1"))
    assert got == FetchedFile("final.png", "image/png", b"PNG")
    assert [r.target for r in server.requests] == [b"/r1", b"/r2", b"/dir/r3", b"/final.png"]


async def test_fetch_refuses_too_many_redirects(server: TinyServer) -> None:
    """A fourth redirect is RequestError (invalid_file_url); the fifth URL is never asked."""
    for number in range(1, 5):
        server.routes[f"/r{number}"] = redirect(f"/r{number + 1}".encode(), 303)
    server.routes["/r5"] = Reply(200, [], [b"unreachable"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError, match="redirects") as info:
                await fetch.fetch(server.url("/r1"))
    assert info.value.code == "invalid_file_url"
    assert [r.target for r in server.requests] == [b"/r1", b"/r2", b"/r3", b"/r4"]


async def test_fetch_redirect_loop_ends(server: TinyServer) -> None:
    """A redirect to itself ends with RequestError, not a loop."""
    server.routes["/loop"] = redirect(b"/loop")
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError):
                await fetch.fetch(server.url("/loop"))
    assert len(server.requests) == MAX_REDIRECTS + 1


async def test_fetch_redirect_without_location(server: TinyServer) -> None:
    """A redirect status without Location is RequestError."""
    server.routes["/nowhere"] = Reply(302)
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError, match="redirects nowhere"):
                await fetch.fetch(server.url("/nowhere"))


async def test_fetch_redirect_to_another_scheme_is_refused(server: TinyServer) -> None:
    """A redirect to file:// is not followed into the file system: RequestError."""
    server.routes["/sneaky"] = redirect(b"file:///etc/passwd")
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/sneaky"))
    assert info.value.code == "invalid_file_url"


# === UrlFetcher: the private-address guard ===============================================


async def test_loopback_url_is_refused_by_default(server: TinyServer) -> None:
    """With allow_private_urls off (the default), an http URL on 127.0.0.1 is
    RequestError forbidden_file_url, and nothing reaches the server."""
    server.routes["/secret"] = Reply(200, [], [b"internal"])
    assert Settings().allow_private_urls is False
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/secret"))
    assert info.value.code == "forbidden_file_url"
    assert "RELAY_ALLOW_PRIVATE_URLS" in info.value.message
    assert server.requests == []


async def test_loopback_url_is_fetched_when_allowed(server: TinyServer) -> None:
    """With allow_private_urls on, the same loopback URL is fetched."""
    server.routes["/secret"] = Reply(200, [], [b"internal"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=True) as fetch:
            got = await fetch.fetch(server.url("/secret"))
    assert got.data == b"internal"


@pytest.mark.parametrize(
    "host",
    ["localhost", "[::1]", "127.1", "0.0.0.0", "[::ffff:127.0.0.1]", "10.0.0.1"],  # noqa: S104
)
async def test_private_hosts_are_refused(server: TinyServer, host: str) -> None:
    """Host names and literals that resolve to loopback, unspecified or private
    addresses are refused with forbidden_file_url, before any connection."""
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(f"http://{host}:{server.port}/secret")
    assert info.value.code == "forbidden_file_url"
    assert server.requests == []


async def test_redirect_to_a_private_address_is_refused(
    server: TinyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard applies to every hop: with 127.0.0.1 treated as public (so the first hop
    is allowed), a redirect to 127.0.0.2 is refused with forbidden_file_url rather than
    connected to (which would give connection refused, invalid_file_url)."""
    monkeypatch.setattr(upstream, "is_public_address", lambda address: address == "127.0.0.1")
    server.routes["/hop"] = redirect(f"http://127.0.0.2:{refused_port()}/admin".encode())
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/hop"))
    assert info.value.code == "forbidden_file_url"
    assert [r.target for r in server.requests] == [b"/hop"]


async def test_guarded_backend_refuses_unix_sockets() -> None:
    """The guarded backend never connects to a Unix socket."""
    backend = GuardedBackend(allow_private=True)
    with pytest.raises(upstream.ForbiddenAddress):
        await backend.connect_unix_socket("/var/run/docker.sock")


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("127.255.0.9", False),
        ("::1", False),
        ("0.0.0.0", False),  # noqa: S104 - an address to refuse, not to bind
        ("::", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # link-local: cloud metadata
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("224.0.0.1", False),  # multicast
        ("239.255.255.250", False),
        ("ff02::1", False),
        ("ff0e::1", False),
        ("255.255.255.255", False),
        ("192.0.2.1", False),  # documentation
        ("2001:db8::1", False),
        ("240.0.0.1", False),  # reserved
        ("not an address", False),
        ("", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    """Only globally routable unicast addresses count as public; loopback, private,
    link-local, multicast, reserved, IPv4-mapped forms of them and junk do not."""
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://example.com/a/b/photo.png?x=1#frag", "photo.png"),
        ("https://example.com/a%20b.txt", "a b.txt"),
        ("https://example.com/", "file"),
        ("https://example.com", "file"),
        ("https://example.com/dir/?name=x.png", "file"),
    ],
)
def test_filename_from_url(url: str, name: str) -> None:
    """The file name is the URL-decoded last path segment, never the query; "file"
    when the path has none."""
    assert filename_from_url(url) == name
