"""The upstream pool's sockets (relay/netio.py): trio stream semantics, httpcore's errors."""

from __future__ import annotations

import contextlib
import functools
import gc
import socket
import ssl
import sys
from typing import TYPE_CHECKING, Any

import httpcore
import pytest
import trio
import trio.testing
import trustme

import relay.netio
import relay.server
import relay.timers
from relay import config
from relay.netio import SocketStream, TrioNetworkBackend, TrioNetworkStream
from relay.server import bound_addresses, open_listeners

if TYPE_CHECKING:
    from collections.abc import Iterator

LIMIT_S = 5


Pair = tuple[SocketStream, socket.socket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """Our stream on one end of a connected TCP pair, a plain socket on the other.

    Both are closed when the test ends, however it ends (a failed assertion
    must not leave sockets for the garbage collector to warn about later).
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    theirs.setblocking(False)
    with ours, theirs:
        yield SocketStream(ours), theirs


async def _read_all(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        await trio.lowlevel.wait_readable(sock)
        data += sock.recv(1 << 20)
    return bytes(data)


async def test_send_all_delivers_more_than_the_socket_buffer_holds(pair: Pair) -> None:
    stream, peer = pair
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 20_000  # 5 MB: many partial sends and waits
    received = b""

    async def reader() -> None:
        nonlocal received
        received = await _read_all(peer, len(payload))

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await stream.send_all(payload)
    assert received == payload
    await stream.aclose()
    peer.close()


async def test_receive_waits_for_data_and_reads_the_end_as_empty(pair: Pair) -> None:
    stream, peer = pair
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.sleep(0.05)
                peer.send(b"hello")
                peer.close()

            nursery.start_soon(later)
            assert await stream.receive_some(100) == b"hello"
            assert await stream.receive_some() == b""
    await stream.aclose()


async def test_a_waiting_read_keeps_no_exception_alive(pair: Pair) -> None:
    """The wait is outside the ``except BlockingIOError`` clause.

    Inside it, the exception and its traceback stay alive for as long as the
    stream is idle (an idle stream has two waiting reads).
    """
    stream, peer = pair

    def held() -> list[BaseException]:
        return [
            obj for obj in gc.get_objects()
            if isinstance(obj, BlockingIOError)
            and obj.__traceback__ is not None
            and obj.__traceback__.tb_frame.f_code is SocketStream.receive_some.__code__
        ]

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.receive_some, 10)
            await trio.sleep(0.05)  # the read is waiting
            assert held() == []
            peer.send(b"x")


async def test_a_cancelled_task_is_stopped_at_entry_even_when_data_is_there(pair: Pair) -> None:
    stream, peer = pair
    peer.send(b"ready")
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive_some(10)
    assert scope.cancelled_caught
    assert await stream.receive_some(10) == b"ready"  # nothing was consumed
    await stream.aclose()
    peer.close()


async def test_closing_wakes_a_waiting_reader_and_later_calls_fail(pair: Pair) -> None:
    stream, peer = pair
    failure: BaseException | None = None

    async def reader() -> None:
        nonlocal failure
        try:
            await stream.receive_some(10)
        except trio.ClosedResourceError as exc:
            failure = exc

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
    assert isinstance(failure, trio.ClosedResourceError)
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some(1)
    await stream.aclose()  # twice is fine
    peer.close()


async def test_a_reset_connection_is_a_broken_resource(pair: Pair) -> None:
    stream, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()  # RST
    await trio.sleep(0.05)
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some(10)
    await stream.aclose()


async def test_half_close_and_is_readable(pair: Pair) -> None:
    stream, peer = pair
    assert not stream.is_readable()
    peer.send(b"x")
    await trio.sleep(0.02)
    assert stream.is_readable()
    await stream.send_eof()
    await trio.sleep(0.02)
    assert peer.recv(10) == b""  # the peer sees our end of data
    await stream.aclose()
    peer.close()


async def test_read_and_write_timeouts_and_errors_are_httpcore_s(pair: Pair) -> None:
    stream, peer = pair
    network = TrioNetworkStream(stream)
    with trio.fail_after(LIMIT_S):
        with pytest.raises(httpcore.ReadTimeout):
            await network.read(10, timeout=0.05)
        peer.send(b"abc")
        assert await network.read(10, timeout=1.0) == b"abc"
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with pytest.raises(httpcore.WriteTimeout):
            await network.write(b"x" * 50_000_000, timeout=0.1)  # nobody reads
    assert network.get_extra_info("socket") is stream.socket
    assert network.get_extra_info("server_addr") == peer.getsockname()
    await network.aclose()
    with pytest.raises(httpcore.ReadError):
        await network.read(10)
    with pytest.raises(httpcore.WriteError):
        await network.write(b"x")
    peer.close()


async def test_a_timeout_costs_a_timer_only_when_the_call_has_to_wait(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, peer = pair
    network = TrioNetworkStream(stream)
    scopes = 0
    real_scope = trio.CancelScope

    def counted(*args: Any, **kwargs: Any) -> trio.CancelScope:
        nonlocal scopes
        scopes += 1
        return real_scope(*args, **kwargs)

    peer.send(b"ready")
    await trio.sleep(0.02)
    with trio.fail_after(LIMIT_S):
        monkeypatch.setattr(trio, "CancelScope", counted)
        assert await network.read(10, timeout=1.0) == b"ready"  # there already
        await network.write(b"taken at once", timeout=1.0)
        assert scopes == 0
        with pytest.raises(httpcore.ReadTimeout):  # has to wait: a timer, and it fires
            await network.read(10, timeout=0.05)
        assert scopes == 1
    assert peer.recv(100) == b"taken at once"


@pytest.fixture
def short_timers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Coarse timers' thresholds made short enough for real loopback waits.

    Returns where the cancel scopes relay/netio.py creates from then on are
    counted (trio's own, such as the timer task's sleeps, are not).
    """
    monkeypatch.setattr(relay.netio, "COARSE_MIN_S", 0.1)
    monkeypatch.setattr(relay.timers, "SLACK_S", 0.02)
    scopes = [0]
    real_scope = trio.CancelScope

    def counted(*args: Any, **kwargs: Any) -> trio.CancelScope:
        if sys._getframe(1).f_code.co_filename == relay.netio.__file__:
            scopes[0] += 1
        return real_scope(*args, **kwargs)

    monkeypatch.setattr(trio, "CancelScope", counted)
    return scopes


async def test_a_long_timeout_is_kept_by_coarse_timers_not_a_cancel_scope(
    pair: Pair, short_timers: list[int]
) -> None:
    """A wait past a long timeout closes the stream and raises httpcore's timeout."""
    stream, peer = pair
    network = TrioNetworkStream(stream)
    with trio.fail_after(LIMIT_S):
        peer.send(b"abc")
        assert await network.read(10, timeout=0.2) == b"abc"  # there already
        await trio.sleep(0.2)  # past that read's deadline: it is forgotten, the stream open
        assert not stream.expired
        peer.send(b"def")
        assert await network.read(10, timeout=0.2) == b"def"
        await network.write(b"taken at once", timeout=0.2)
        assert len(relay.timers.coarse_timers()) == 0
        assert peer.recv(100) == b"taken at once"
        with pytest.raises(httpcore.ReadTimeout):  # the peer is silent
            await network.read(10, timeout=0.2)
    assert stream.expired
    assert stream.socket.fileno() == -1  # closed, as httpcore would close it
    assert short_timers == [0]


async def test_a_write_that_waits_past_a_long_timeout_times_out(
    pair: Pair, short_timers: list[int]
) -> None:
    stream, _ = pair
    network = TrioNetworkStream(stream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with trio.fail_after(LIMIT_S), pytest.raises(httpcore.WriteTimeout):
        await network.write(b"x" * 50_000_000, timeout=0.2)  # nobody reads
    assert stream.socket.fileno() == -1
    assert short_timers == [0]


async def test_a_tls_read_past_a_long_timeout_times_out(
    nursery: trio.Nursery, short_timers: list[int]
) -> None:
    """Over TLS a read always had a scope of its own; a long timeout now has none."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)

    async def greet_then_mute(plain: trio.SocketStream) -> None:
        tls = trio.SSLStream(plain, server_context, server_side=True)
        await tls.send_all(b"hello")
        await trio.sleep_forever()

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, greet_then_mute, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    with trio.fail_after(LIMIT_S):
        plain = await TrioNetworkBackend().connect_tcp("127.0.0.1", port, timeout=LIMIT_S)
        tls = await plain.start_tls(trusted, server_hostname="localhost", timeout=LIMIT_S)
        scopes = short_timers[0]
        assert await tls.read(10, timeout=0.2) == b"hello"
        with pytest.raises(httpcore.ReadTimeout):
            await tls.read(10, timeout=0.2)
    assert short_timers[0] == scopes
    assert tls.get_extra_info("socket").fileno() == -1
    with trio.fail_after(LIMIT_S):
        await tls.aclose()  # what httpcore does next: no error from the closed socket


async def test_connect_refused_is_a_connect_error() -> None:
    spare = socket.create_server(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()
    with pytest.raises(httpcore.ConnectError):
        await TrioNetworkBackend().connect_tcp("127.0.0.1", port, timeout=LIMIT_S)


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

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    backend = TrioNetworkBackend()

    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    with trio.fail_after(LIMIT_S):
        plain = await backend.connect_tcp("127.0.0.1", port, timeout=LIMIT_S)
        tls = await plain.start_tls(trusted, server_hostname="localhost", timeout=LIMIT_S)
        big = b"tls " * 100_000  # more than the socket buffers: written while read back
        echoed = b""

        async def read_back() -> None:
            nonlocal echoed
            while len(echoed) < len(big):
                echoed += await tls.read(65536)

        async with trio.open_nursery() as both:
            both.start_soon(read_back)
            await tls.write(big)
        assert echoed == big.upper()
        assert isinstance(tls.get_extra_info("server_addr"), tuple)
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

    listeners = await nursery.start(functools.partial(trio.serve_tcp, mute, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    backend = TrioNetworkBackend()
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


async def test_a_socket_that_never_runs_dry_still_lets_other_tasks_run(pair: Pair) -> None:
    stream, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    peer.sendall(b"z" * 200_000)  # queued before the reader starts: no read ever waits
    await trio.sleep(0.05)
    reads = 1_000
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()  # the other task is running
            before = turns
            for _ in range(reads):
                assert await stream.receive_some(100) == b"z" * 100
            nursery.cancel_scope.cancel()
    # the other task got a turn about every YIELD_EVERY reads (without the
    # yields it gets none: its first turn comes after the last read); trio's
    # scheduler may order a batch either way, hence one turn of slack
    assert turns - before >= reads // relay.netio.YIELD_EVERY - 1
    await stream.aclose()
    peer.close()


async def test_the_relay_s_listeners_hand_out_our_streams_with_nodelay() -> None:
    settings = config.load({"host": "127.0.0.1", "port": "0"}, environ={})
    listeners = await open_listeners(settings)
    try:
        (address,) = bound_addresses(listeners)
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as client:
            with trio.fail_after(LIMIT_S):
                accepted = await listeners[0].accept()
            assert isinstance(accepted, SocketStream)
            try:
                assert accepted.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                here, here_port = client.getsockname()
                assert relay.server._peer(accepted) == f"{here}:{here_port}"
                client.sendall(b"ping")
                with trio.fail_after(LIMIT_S):
                    assert await accepted.receive_some(10) == b"ping"
            finally:
                await accepted.aclose()
    finally:
        for listener in listeners:
            await listener.aclose()


# --- the send clock (send_timeout) ---------------------------------------------------------------


async def test_a_send_that_makes_no_progress_for_send_timeout_raises_too_slow(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that never reads: once the buffers are full, a send waits send_timeout seconds
    (a cancel scope for a short one) and raises trio.TooSlowError."""
    stream, _ = pair
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream.send_timeout = 3.0
    with trio.fail_after(100), pytest.raises(trio.TooSlowError):
        await stream.send_all(b"x" * 50_000_000)
    assert not stream.expired


async def test_a_long_send_timeout_is_a_coarse_timer_and_closes_the_stream(
    pair: Pair, short_timers: list[int]
) -> None:
    """A send_timeout of COARSE_MIN_S or more is kept by relay.timers, not a cancel scope:
    the stream is closed when it fires and the send raises trio.TooSlowError."""
    stream, _ = pair
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream.send_timeout = 0.2
    with trio.fail_after(LIMIT_S), pytest.raises(trio.TooSlowError):
        await stream.send_all(b"x" * 50_000_000)
    assert stream.expired
    assert stream.socket.fileno() == -1
    assert short_timers == [0]
    assert len(relay.timers.coarse_timers()) == 0


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
    stream = SocketStream(ours)
    stream.send_timeout = 10.0
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


async def test_tls_over_our_stream_has_the_send_clock(nursery: trio.Nursery) -> None:
    """trio.SSLStream over a SocketStream with send_timeout: a TLS peer that never reads
    makes send_all raise trio.TooSlowError (the clock is the transport's own)."""
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
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours = SocketStream(sock)
    ours.send_timeout = 0.2
    tls = trio.SSLStream(ours, trusted, server_hostname="localhost")
    with trio.fail_after(LIMIT_S):
        await tls.do_handshake()
        with pytest.raises(trio.TooSlowError):
            await tls.send_all(b"x" * 50_000_000)
    ours.close()
