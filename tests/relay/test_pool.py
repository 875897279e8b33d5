"""The upstream connection pool (relay/pool.py): reuse, limits, failures, TLS."""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from typing import Any

import h11
import httpcore
import orjson
import pytest
import trio
import trustme

import relay.pool
from providers.step.emulator import StepBehavior, StepEmulator
from relay.pool import UpstreamPool
from tests.relay.conftest import RelayFactory, chat_body, post, sse_text

LIMIT_S = 5
PATH = "/v1/chat/completions"


@dataclass
class CountingServer:
    """A keep-alive HTTP/1.1 server on loopback that counts its TCP connections.

    ``/slow`` answers after ``hold_s``; ``/close`` answers and then closes the
    connection without saying so (as a server whose keep-alive timer ran out).
    """

    port: int = 0
    accepted: int = 0
    hold_s: float = 0.05
    open_now: int = 0
    peak: int = 0
    body: bytes = b"ok"
    events: list[str] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.open_now += 1
        self.peak = max(self.peak, self.open_now)
        conn = h11.Connection(h11.SERVER)
        target = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    target = event.target
                elif isinstance(event, h11.Data):
                    pass  # bodies are read and dropped
                elif isinstance(event, h11.EndOfMessage):
                    if target == b"/hangup":
                        return  # no answer at all
                    if target == b"/slow":
                        await trio.sleep(self.hold_s)
                    head = h11.Response(
                        status_code=200, headers=[(b"content-length", b"%d" % len(self.body))]
                    )
                    await stream.send_all(
                        conn.send(head) + conn.send(h11.Data(data=self.body))
                        + conn.send(h11.EndOfMessage())
                    )
                    if target == b"/close":
                        return
                    conn.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            self.open_now -= 1
            await stream.aclose()


@pytest.fixture
async def server(nursery: trio.Nursery) -> CountingServer:
    counting = CountingServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, counting.handle, 0, host="127.0.0.1")
    )
    counting.port = listeners[0].socket.getsockname()[1]
    return counting


async def get(upstream: UpstreamPool, url: str, **timeouts: float) -> bytes:
    extensions = {"timeout": timeouts} if timeouts else None
    async with upstream.stream(b"GET", url, extensions=extensions) as response:
        return b"".join([part async for part in response.stream])  # type: ignore[union-attr]


async def test_sequential_calls_share_one_connection(server: CountingServer) -> None:
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool() as pool:
            for _ in range(5):
                assert await get(pool, server.url()) == b"ok"
            assert len(pool.connections) == 1
    assert server.accepted == 1


async def test_a_burst_is_reused_whole_afterwards(server: CountingServer) -> None:
    """200 concurrent calls, three times: 200 connections in all, every one kept.

    (httpcore's own pool closes every connection that goes idle once it holds
    more than its keep-alive maximum, so each round would connect anew.)
    """
    with trio.fail_after(LIMIT_S * 4):
        async with UpstreamPool() as pool:
            for _ in range(3):
                async with trio.open_nursery() as nursery:
                    for _ in range(200):
                        nursery.start_soon(get, pool, server.url("/slow"))
            assert len(pool.connections) == 200
            assert await get(pool, server.url()) == b"ok"
    assert server.accepted == 200


async def test_max_connections_makes_calls_wait_then_time_out(server: CountingServer) -> None:
    server.hold_s = 0.3
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(max_connections=2) as pool:
            results: list[bytes] = []

            async def call() -> None:
                results.append(await get(pool, server.url("/slow")))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(call)
            assert results == [b"ok"] * 3
            assert server.peak == 2  # the third waited for a connection to come back

            async with trio.open_nursery() as nursery:
                nursery.start_soon(get, pool, server.url("/slow"))
                nursery.start_soon(get, pool, server.url("/slow"))
                await trio.sleep(0.05)
                with pytest.raises(httpcore.PoolTimeout):
                    await get(pool, server.url("/slow"), pool=0.05)


async def test_room_is_made_by_closing_an_idle_connection_of_another_origin(
    server: CountingServer, nursery: trio.Nursery
) -> None:
    other = CountingServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, other.handle, 0, host="127.0.0.1")
    )
    other.port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(max_connections=1) as pool:
            assert await get(pool, server.url()) == b"ok"
            assert await get(pool, other.url()) == b"ok"  # no waiting: the idle one made room
            assert len(pool.connections) == 1


async def test_a_body_closed_unread_closes_its_connection_and_frees_its_room(
    server: CountingServer,
) -> None:
    server.body = b"x" * 200_000
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(max_connections=1) as pool:
            async with pool.stream(b"GET", server.url()) as response:
                async for _ in response.stream:  # type: ignore[union-attr]
                    break  # read a little, then leave
            assert pool.connections == []
            assert len(await get(pool, server.url())) == 200_000
    assert server.accepted == 2


@pytest.mark.parametrize("polled", [True, False])
async def test_a_connection_the_server_closed_while_idle_is_not_used(
    server: CountingServer, polled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polled (idle a while): found closed and dropped. Fresh (not polled): the call
    fails before any response head and goes once more on a new connection."""
    if polled:
        monkeypatch.setattr(relay.pool, "FRESH_IDLE_S", 0.0)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool() as pool:
            assert await get(pool, server.url("/close")) == b"ok"
            await trio.sleep(0.05)  # the server's FIN arrives
            assert await get(pool, server.url()) == b"ok"
    assert server.accepted == 2


async def test_a_new_connection_that_fails_is_not_retried(server: CountingServer) -> None:
    """Only a kept connection earns a retry: a fresh one failing is the server's answer."""
    async with UpstreamPool() as pool:
        with pytest.raises(httpcore.RemoteProtocolError):
            await get(pool, server.url("/hangup"))
    assert server.accepted == 1


class _CountingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, counting the writes on its sockets."""

    def __init__(self) -> None:
        self.writes: list[int] = []
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        writes = self.writes
        original = stream.write

        async def write(buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
            writes.append(len(buffer))
            await original(buffer, timeout)

        stream.write = write  # type: ignore[method-assign]
        return stream


async def test_a_request_goes_out_in_one_write(server: CountingServer) -> None:
    """httpcore writes the head and the body apart; the corked stream sends them together."""
    backend = _CountingBackend()
    async with UpstreamPool(network_backend=backend) as pool:
        async with pool.stream(b"POST", server.url(), content=b"x" * 1000) as response:
            await response.aread()
        assert len(backend.writes) == 1
        assert backend.writes[0] > 1000  # head and body
        big = b"y" * (relay.pool.CORK_LIMIT + 1)
        async with pool.stream(b"POST", server.url(), content=big) as response:
            await response.aread()
    assert backend.writes[1:] == [backend.writes[1], len(big)]  # a big body is not copied


async def test_unsupported_scheme_and_refused_connection() -> None:
    async with UpstreamPool() as pool:
        with pytest.raises(httpcore.UnsupportedProtocol):
            await get(pool, "file:///etc/passwd")
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with pytest.raises(httpcore.ConnectError):
            await get(pool, f"http://127.0.0.1:{port}/")
        assert pool.connections == []


async def test_closed_pool_refuses_calls(server: CountingServer) -> None:
    pool = UpstreamPool()
    assert await get(pool, server.url()) == b"ok"
    await pool.aclose()
    assert pool.connections == []
    with pytest.raises(RuntimeError):
        await get(pool, server.url())


# --- TLS, end to end through the relay -------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def _tls_step(nursery: trio.Nursery, ca: trustme.CA) -> StepEmulator:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    emulator = StepEmulator(behavior=StepBehavior(answer="over TLS"))
    await nursery.start(
        lambda task_status: emulator.serve(ssl_context=server_context, task_status=task_status)
    )
    return emulator


async def test_relay_talks_tls_to_the_upstream_and_reuses_the_connection(
    relay_factory: RelayFactory, nursery: trio.Nursery, ca: trustme.CA
) -> None:
    emulator = await _tls_step(nursery, ca)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    relay = await relay_factory(step_base_url=emulator.base_url,
                                upstream_ssl_context=client_context)
    with trio.fail_after(LIMIT_S):
        for _ in range(2):
            response = await post(relay.base_url, PATH, chat_body(stream=True))
            assert sse_text(response.content) == "over TLS"
    assert emulator.base_url.startswith("https://")
    # the next request and the previous one's background DelChat may overlap: 1 or 2
    upstream = relay.app.providers["step"].provider._transport._pool.connections  # type: ignore[attr-defined]
    assert 1 <= len(upstream) <= 2
    assert all(c.info().startswith("'https://127.0.0.1") for c in upstream)


async def test_an_untrusted_upstream_certificate_is_a_502(
    relay_factory: RelayFactory, nursery: trio.Nursery, ca: trustme.CA
) -> None:
    emulator = await _tls_step(nursery, ca)
    relay = await relay_factory(step_base_url=emulator.base_url,
                                upstream_ssl_context=ssl.create_default_context())
    with trio.fail_after(LIMIT_S):
        response = await post(relay.base_url, PATH, chat_body())
    assert response.status == 502
    assert "ConnectError" in orjson.loads(response.content)["error"]["message"]


async def test_metrics_count_upstream_connections(relay_factory: RelayFactory) -> None:
    """/metrics shows the pool: connections opened, kept idle after an answer."""
    relay = await relay_factory()
    with trio.fail_after(LIMIT_S):
        response = await post(relay.base_url, PATH, chat_body())
        assert response.status == 200
        while not relay.app.janitor.done:  # noqa: ASYNC110 (the chat is deleted after the answer)
            await trio.sleep(0.001)
        stats = relay.app.statistics()
        async with httpcore.AsyncConnectionPool() as client:
            metrics = await client.request("GET", relay.base_url + "/metrics")
    assert stats["upstream_opened"] >= 1
    assert stats["upstream_active"] == 0
    assert stats["upstream_idle"] >= 1
    assert stats["cleanup_pending"] == 0
    assert b"relay_upstream_connections_opened_total" in metrics.content
