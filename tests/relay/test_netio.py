"""relay/netio.py: the client side's send clock, the upstream side's before_read hook.

Everything else is trio's and httpcore's; what is tested here is what the
relay adds, by what a peer sees and what a caller gets.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from typing import TYPE_CHECKING

import httpcore
import pytest
import trio
import trio.testing
import trustme

import relay.server
from relay import config
from relay.netio import ClientStream, HookedBackend, before_read
from relay.server import bound_addresses, open_listeners

if TYPE_CHECKING:
    from collections.abc import Iterator

LIMIT_S = 5


@pytest.fixture
def pair() -> Iterator[tuple[trio.SocketStream, socket.socket]]:
    """trio's stream on one end of a connected TCP pair, a plain socket on the other."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    theirs.setblocking(False)
    with ours, theirs:
        yield trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


# --- the send clock (send_timeout) ---------------------------------------------------------------


async def test_a_send_that_makes_no_progress_for_send_timeout_raises_too_slow(
    pair: tuple[trio.SocketStream, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that never reads: once the buffers are full, a send waits send_timeout seconds
    and raises trio.TooSlowError."""
    plain, _ = pair
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = ClientStream(plain, send_timeout=3.0)
    started = trio.current_time()
    with trio.fail_after(100), pytest.raises(trio.TooSlowError):
        await stream.send_all(b"x" * 50_000_000)
    assert trio.current_time() - started == pytest.approx(3.0)


async def test_send_progress_restarts_the_send_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that reads what is there every 6 s never leaves a send 10 s without progress,
    so a send that takes far longer than send_timeout in all still completes.

    Over a Unix socket pair: a read there makes room for the writer at once, where
    loopback TCP may wait for a delayed ACK in real time, which the autojump clock
    would not wait for.
    """
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    stream = ClientStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), 10.0)
    payload = b"x" * 2_000_000
    received = 0

    async def slow_reader() -> None:
        nonlocal received
        while received < len(payload):
            await trio.sleep(6)
            with contextlib.suppress(BlockingIOError):
                received += len(peer.recv(1 << 22))

    with ours, peer, trio.fail_after(100_000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            started = trio.current_time()
            await stream.send_all(payload)
            took = trio.current_time() - started
    assert took > 3 * stream.send_timeout
    assert received == len(payload)


async def test_tls_over_a_client_stream_has_the_send_clock(nursery: trio.Nursery) -> None:
    """trio.SSLStream over a ClientStream: a TLS peer that never reads makes send_all
    raise trio.TooSlowError (the clock is the transport's own)."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)

    async def handshake_then_mute(plain: trio.SocketStream) -> None:
        tls = trio.SSLStream(plain, server_context, server_side=True)
        await tls.do_handshake()
        await trio.sleep_forever()

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, handshake_then_mute, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    plain = await trio.open_tcp_stream("127.0.0.1", port)
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    tls = trio.SSLStream(ClientStream(plain, 0.2), trusted, server_hostname="localhost")
    with trio.fail_after(LIMIT_S):
        await tls.do_handshake()
        with pytest.raises(trio.TooSlowError):
            await tls.send_all(b"x" * 50_000_000)
    await plain.aclose()


async def test_a_closed_or_reset_client_stream_fails_as_trio_streams_do(
    pair: tuple[trio.SocketStream, socket.socket],
) -> None:
    plain, peer = pair
    stream = ClientStream(plain, 1.0)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()  # RST
    await trio.sleep(0.05)
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x" * 1_000_000)
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_the_relay_s_listeners_hand_out_client_streams_with_nodelay() -> None:
    settings = config.load({"host": "127.0.0.1", "port": "0", "send_timeout": "7"}, environ={})
    listeners = await open_listeners(settings)
    try:
        (address,) = bound_addresses(listeners)
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as client:
            with trio.fail_after(LIMIT_S):
                accepted = await listeners[0].accept()
            assert isinstance(accepted, ClientStream)
            try:
                assert accepted.send_timeout == 7.0
                assert accepted.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                here, here_port = client.getsockname()
                assert relay.server._peer(accepted) == f"{here}:{here_port}"
                client.sendall(b"ping")
                with trio.fail_after(LIMIT_S):
                    assert await accepted.receive_some(10) == b"ping"
                    await accepted.send_all(b"pong")
                assert client.recv(10) == b"pong"
            finally:
                await accepted.aclose()
    finally:
        for listener in listeners:
            await listener.aclose()


# --- the upstream side: httpcore's trio backend with the before_read hook -------------------------


async def _server(nursery: trio.Nursery, handler: object) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_before_read_runs_before_every_read_in_the_task_that_set_it(
    nursery: trio.Nursery,
) -> None:
    async def two_replies(plain: trio.SocketStream) -> None:
        await plain.send_all(b"one")
        await trio.sleep(0.05)
        await plain.send_all(b"two")
        await trio.sleep_forever()

    port = await _server(nursery, two_replies)
    calls: list[str] = []

    async def hook() -> None:
        calls.append("hook")
        await trio.lowlevel.checkpoint()

    with trio.fail_after(LIMIT_S):
        stream = await HookedBackend().connect_tcp("127.0.0.1", port, timeout=LIMIT_S)
        assert await stream.read(10) == b"one"  # no hook set
        token = before_read.set(hook)
        try:
            calls.append(bytes(await stream.read(10)).decode())
        finally:
            before_read.reset(token)
        await stream.aclose()
    assert calls == ["hook", "two"]


async def test_read_and_write_timeouts_and_errors_are_httpcore_s(nursery: trio.Nursery) -> None:
    async def mute(plain: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await _server(nursery, mute)
    with trio.fail_after(LIMIT_S):
        stream = await HookedBackend().connect_tcp("127.0.0.1", port, timeout=LIMIT_S)
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(10, timeout=0.05)
        stream.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with pytest.raises(httpcore.WriteTimeout):
            await stream.write(b"x" * 50_000_000, timeout=0.1)  # nobody reads
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        await stream.aclose()

    spare = socket.create_server(("127.0.0.1", 0))
    closed_port = spare.getsockname()[1]
    spare.close()
    with pytest.raises(httpcore.ConnectError):
        await HookedBackend().connect_tcp("127.0.0.1", closed_port, timeout=LIMIT_S)


async def test_tls_both_ways_and_an_untrusted_certificate(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)

    async def echo(plain: trio.SocketStream) -> None:
        tls = trio.SSLStream(plain, server_context, server_side=True)
        try:
            while data := await tls.receive_some(65536):
                await tls.send_all(data.upper())
        except trio.BrokenResourceError:
            pass
        finally:
            await tls.aclose()

    port = await _server(nursery, echo)
    backend = HookedBackend()
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    hooked = 0

    async def hook() -> None:
        nonlocal hooked
        hooked += 1

    with trio.fail_after(LIMIT_S):
        plain = await backend.connect_tcp("127.0.0.1", port, timeout=LIMIT_S)
        tls = await plain.start_tls(trusted, server_hostname="localhost", timeout=LIMIT_S)
        await tls.write(b"hello")
        token = before_read.set(hook)
        try:
            assert await tls.read(65536) == b"HELLO"
        finally:
            before_read.reset(token)
        assert hooked == 1  # the TLS stream has the hook too
        await tls.aclose()

        plain = await backend.connect_tcp("127.0.0.1", port, timeout=LIMIT_S)
        with pytest.raises(httpcore.ConnectError):
            await plain.start_tls(
                ssl.create_default_context(), server_hostname="localhost", timeout=LIMIT_S
            )


async def test_a_handshake_that_fails_in_any_way_closes_the_socket(
    nursery: trio.Nursery,
) -> None:
    async def mute(plain: trio.SocketStream) -> None:
        await trio.sleep_forever()  # accepts, never answers the TLS hello

    port = await _server(nursery, mute)
    backend = HookedBackend()
    context = ssl.create_default_context()

    timed_out = await backend.connect_tcp("127.0.0.1", port, timeout=LIMIT_S)
    with pytest.raises(httpcore.ConnectTimeout):
        await timed_out.start_tls(context, server_hostname="localhost", timeout=0.05)
    assert timed_out.get_extra_info("socket").fileno() == -1

    cancelled = await backend.connect_tcp("127.0.0.1", port, timeout=LIMIT_S)
    with trio.move_on_after(0.05) as scope:  # the caller gives up: httpcore would leak it
        await cancelled.start_tls(context, server_hostname="localhost", timeout=None)
    assert scope.cancelled_caught
    assert cancelled.get_extra_info("socket").fileno() == -1
