"""Tests of relay/upstream.py: HttpTransport (UrlFetcher's are in test_fetcher.py).

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
from typing import TYPE_CHECKING, Any

import h11
import pytest
import trio

import relay.netio
import relay.timers
from protocol.errors import UpstreamFailed, UpstreamTimeout
from relay import upstream
from relay.config import Settings
from relay.pool import UpstreamPool
from relay.upstream import HttpTransport, make_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpcore

    from providers.contract import StreamedResponse

IO_LIMIT_S = 5.0
SHORT_S = 0.1  # a timeout that must fire
#: the default stall timeout (long enough to be kept by relay.timers)
STALL_DEFAULT_S = Settings().stall_timeout
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


async def test_default_stall_timeout_ends_a_silent_stream(
    server: TinyServer, autojump_clock: trio.testing.MockClock
) -> None:
    """With the default timeouts (120 s: long enough for relay.timers), an upstream
    that goes silent after its first chunk ends the stream the same way as a short
    timeout: the chunk, then UpstreamTimeout (504) no earlier than 120 s after it
    and at most relay.timers' slack later, with no deadline left behind. The
    autojump clock makes the 120 s pass at once; the silent peer is deterministic."""
    server.routes["/stall"] = Reply(200, [], [b"hello", HANG])
    received: list[bytes] = []
    with trio.fail_after(2 * STALL_DEFAULT_S):  # virtual time: a stall never ended fails
        async with (
            transport(first_byte_timeout=STALL_DEFAULT_S, stall_timeout=STALL_DEFAULT_S) as http,
            http.stream(b"POST", server.url("/stall"), []) as resp,
        ):
            chunks = resp.chunks()
            received.append(await chunks.__anext__())
            silent_since = trio.current_time()
            with pytest.raises(UpstreamTimeout) as info:
                await chunks.__anext__()
            waited = trio.current_time() - silent_since
            await chunks.aclose()
    assert received == [b"hello"]
    assert info.value.status == 504
    assert STALL_DEFAULT_S <= waited <= STALL_DEFAULT_S + relay.timers.SLACK_S
    assert len(relay.timers.coarse_timers()) == 0  # the expired deadline is gone


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


# === HttpTransport.stream: the pool's stream context on every way out =====================


class RecordingPool(UpstreamPool):
    """An UpstreamPool that records how each of its stream contexts was left."""

    def __init__(self) -> None:
        super().__init__()
        #: per stream context, in order: the exception its __aexit__ saw, or None
        self.exits: list[BaseException | None] = []

    @asynccontextmanager
    async def stream(
        self,
        method: bytes,
        url: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        content: bytes = b"",
        extensions: dict[str, Any] | None = None,
    ) -> AsyncIterator[httpcore.Response]:
        """The pool's own stream, recording the exception (or None) it ends with."""
        opened = super().stream(
            method, url, headers=headers, content=content, extensions=extensions
        )
        try:
            async with opened as response:
                yield response
        except BaseException as exc:
            self.exits.append(exc)
            raise
        self.exits.append(None)


class Boom(Exception):
    """An error of the code reading a stream."""


async def fail_after_the_first_chunk(http: HttpTransport, url: str) -> None:
    """Open a stream at ``url`` and raise Boom once its first chunk is in."""
    async with http.stream(b"GET", url, []) as resp, aclosing(resp.chunks()) as chunks:
        async for _ in chunks:
            raise Boom


async def test_an_error_inside_a_stream_reaches_the_pools_exit(server: TinyServer) -> None:
    """An exception raised while a stream is read propagates unchanged, the pool's stream
    context sees it on exit, and the unfinished connection is closed, not kept."""
    server.routes["/endless"] = Reply(200, [], [b"tick", HANG])
    settings = settings_for()
    pool = RecordingPool()
    with trio.fail_after(IO_LIMIT_S):
        async with pool:
            http = HttpTransport(pool, settings, "Test")
            with pytest.raises(Boom):
                await fail_after_the_first_chunk(http, server.url("/endless"))
            assert len(pool.exits) == 1
            assert isinstance(pool.exits[0], Boom)
            assert pool.statistics()["upstream_active"] == 0
            assert pool.statistics()["upstream_idle"] == 0


async def test_leaving_a_stream_normally_drains_it_for_reuse(server: TinyServer) -> None:
    """A stream left before its last bytes were read is drained on a normal exit: the
    pool's context ends without an exception and the connection serves the next call."""
    server.routes["/two"] = Reply(200, [], [b"first", 0.01, b"second"])
    server.routes["/ok"] = Reply(200, [], [b"fine"])
    settings = settings_for()
    pool = RecordingPool()
    with trio.fail_after(IO_LIMIT_S):
        async with pool:
            http = HttpTransport(pool, settings, "Test")
            async with (
                http.stream(b"GET", server.url("/two"), []) as resp,
                aclosing(resp.chunks()) as chunks,
            ):
                async for chunk in chunks:
                    assert chunk == b"first"
                    break
            assert pool.exits == [None]
            assert pool.statistics()["upstream_idle"] == 1
            assert (await http.request(b"GET", server.url("/ok"), [])).body == b"fine"
            assert pool.statistics()["upstream_opened"] == 1


async def test_an_unknown_encoding_closes_the_pools_stream(server: TinyServer) -> None:
    """A stream in an encoding we cannot decode is refused: the pool's stream context
    sees the UpstreamFailed on exit and its connection is closed."""
    server.routes["/br"] = Reply(200, [(b"Content-Encoding", b"zstd")], [b"x"])
    settings = settings_for()
    pool = RecordingPool()
    with trio.fail_after(IO_LIMIT_S):
        async with pool:
            http = HttpTransport(pool, settings, "Test")
            with pytest.raises(UpstreamFailed, match="content-encoding"):
                async with http.stream(b"GET", server.url("/br"), []):
                    pytest.fail("opened a stream in an unknown encoding")
            assert len(pool.exits) == 1
            assert isinstance(pool.exits[0], UpstreamFailed)
            assert pool.statistics()["upstream_active"] == 0
