"""The upstream pool's sockets (relay/netio.py): trio stream semantics, httpcore's errors."""

from __future__ import annotations

import contextlib
import functools
import gc
import socket
import ssl
from typing import TYPE_CHECKING

import httpcore
import pytest
import trio
import trio.testing
import trustme

import relay.netio
import relay.server
from relay import config
from relay.netio import SocketStream, TrioNetworkBackend, TrioNetworkStream
from relay.server import bound_addresses, open_listeners
from relay.timers import SLACK_S

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


async def test_read_and_write_errors_are_httpcore_s(pair: Pair) -> None:
    """A closed stream: a read raises httpcore's ReadError and a write its WriteError;
    before that, get_extra_info names the socket and the peer's address."""
    stream, peer = pair
    network = TrioNetworkStream(stream)
    assert network.get_extra_info("socket") is stream.socket
    assert network.get_extra_info("server_addr") == peer.getsockname()
    await network.aclose()
    with pytest.raises(httpcore.ReadError):
        await network.read(10)
    with pytest.raises(httpcore.WriteError):
        await network.write(b"x")


# --- timeouts, on trio's autojump clock --------------------------------------------------------
#
# A Unix socket pair whose peer never sends (or never reads) is a deterministic silence:
# its I/O is done by the time the sending call returns, so the autojump clock never
# jumps while bytes are in flight (MockClock's warning about real sockets).

#: Mock-clock bound for tests that wait out a 120 s timeout: a hang fails at once
MOCK_LIMIT_S = 10_000
#: A short timeout (below COARSE_MIN_S), a unary call's and a stream's (both above it)
SHORT_S, UNARY_S, STALL_S = 1.0, 15.0, 120.0


@pytest.fixture
def unix_pair() -> Iterator[Pair]:
    """Our stream on one end of a Unix socket pair, a plain non-blocking socket on the other."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    with ours, theirs:
        yield SocketStream(ours), theirs


def test_the_timeouts_here_are_on_the_sides_of_coarse_min_s_they_claim() -> None:
    """SHORT_S is below the documented COARSE_MIN_S; a unary call's and a stream's are not."""
    assert SHORT_S < relay.netio.COARSE_MIN_S <= UNARY_S < STALL_S


async def test_a_read_past_a_short_timeout_raises_read_timeout_and_the_stream_stays_usable(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """A silent peer and a short read timeout: httpcore's ReadTimeout at the deadline;
    data the peer sends afterwards is read from the same stream."""
    stream, peer = unix_pair
    network = TrioNetworkStream(stream)
    with trio.fail_after(MOCK_LIMIT_S):
        started = trio.current_time()
        with pytest.raises(httpcore.ReadTimeout):
            await network.read(10, timeout=SHORT_S)
        assert started + SHORT_S <= trio.current_time() <= started + SHORT_S + SLACK_S
        peer.send(b"abc")
        assert await network.read(10, timeout=SHORT_S) == b"abc"


@pytest.mark.parametrize("seconds", [UNARY_S, STALL_S])
async def test_a_read_past_a_long_timeout_raises_read_timeout_and_closes_the_stream(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock, seconds: float
) -> None:
    """A silent peer and a unary call's or a stream's read timeout: httpcore's
    ReadTimeout, never early and at most SLACK_S late, and the socket is closed
    (as httpcore would close it)."""
    stream, _ = unix_pair
    network = TrioNetworkStream(stream)
    with trio.fail_after(MOCK_LIMIT_S):
        started = trio.current_time()
        with pytest.raises(httpcore.ReadTimeout):
            await network.read(10, timeout=seconds)
        assert started + seconds <= trio.current_time() <= started + seconds + SLACK_S
    assert stream.expired
    assert stream.socket.fileno() == -1


@pytest.mark.parametrize("seconds", [SHORT_S, STALL_S])
async def test_a_write_past_its_timeout_raises_write_timeout(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock, seconds: float
) -> None:
    """A peer that never reads, a write larger than the socket buffers: httpcore's
    WriteTimeout, never early and at most SLACK_S late."""
    stream, _ = unix_pair
    network = TrioNetworkStream(stream)
    with trio.fail_after(MOCK_LIMIT_S):
        started = trio.current_time()
        with pytest.raises(httpcore.WriteTimeout):
            await network.write(b"x" * 10_000_000, timeout=seconds)
        assert started + seconds <= trio.current_time() <= started + seconds + SLACK_S


async def test_a_write_past_a_long_timeout_closes_the_stream(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that never reads and a stream's write timeout: WriteTimeout, and the
    socket is closed (as httpcore would close it)."""
    stream, _ = unix_pair
    network = TrioNetworkStream(stream)
    with trio.fail_after(MOCK_LIMIT_S), pytest.raises(httpcore.WriteTimeout):
        await network.write(b"x" * 10_000_000, timeout=STALL_S)
    assert stream.expired
    assert stream.socket.fileno() == -1


@pytest.mark.parametrize("seconds", [SHORT_S, UNARY_S, STALL_S])
async def test_calls_that_need_not_wait_return_at_once_and_leave_no_deadline_behind(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock, seconds: float
) -> None:
    """Data already there is read, and a write the socket takes is sent, with no time
    passing; a read that waits and gets data before its deadline returns it. Long past
    all those deadlines the stream is still open and works both ways."""
    stream, peer = unix_pair
    network = TrioNetworkStream(stream)
    with trio.fail_after(MOCK_LIMIT_S):
        peer.send(b"ready")
        started = trio.current_time()
        assert await network.read(10, timeout=seconds) == b"ready"
        await network.write(b"taken at once", timeout=seconds)
        assert trio.current_time() == started
        assert peer.recv(100) == b"taken at once"

        async def send_later() -> None:
            await trio.sleep(seconds / 2)
            peer.send(b"in time")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_later)
            assert await network.read(10, timeout=seconds) == b"in time"
        await trio.sleep(3 * seconds + 10 * SLACK_S)  # every deadline above has passed
        assert not stream.expired
        assert stream.socket.fileno() != -1
        peer.send(b"still")
        assert await network.read(10, timeout=seconds) == b"still"
        await network.write(b"open", timeout=seconds)
        assert peer.recv(100) == b"open"


@pytest.fixture
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a trustme certificate for localhost, a client one trusting it."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


def _tls_server(sock: socket.socket, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """trio's own TLS server stream over one end of a socket pair."""
    return trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(sock)), context, server_side=True
    )


async def _handshake_then_mute(sock: socket.socket, context: ssl.SSLContext) -> None:
    """A TLS peer that completes the handshake, then never sends or reads again."""
    await _tls_server(sock, context).do_handshake()
    await trio.sleep_forever()


@pytest.mark.parametrize("seconds", [SHORT_S, STALL_S])
async def test_a_tls_read_past_its_timeout_raises_read_timeout(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    seconds: float,
) -> None:
    """A TLS peer that greets, then stays silent: the greeting is read, the next read
    raises httpcore's ReadTimeout, never early and at most SLACK_S late."""
    server_context, client_context = tls_contexts
    ours, theirs = socket.socketpair()

    async def greet_then_mute() -> None:
        tls = _tls_server(theirs, server_context)
        await tls.send_all(b"hello")
        await trio.sleep_forever()

    nursery.start_soon(greet_then_mute)
    with ours, theirs, trio.fail_after(MOCK_LIMIT_S):
        plain = TrioNetworkStream(SocketStream(ours))
        tls = await plain.start_tls(client_context, server_hostname="localhost", timeout=seconds)
        assert await tls.read(10, timeout=seconds) == b"hello"
        started = trio.current_time()
        with pytest.raises(httpcore.ReadTimeout):
            await tls.read(10, timeout=seconds)
        assert started + seconds <= trio.current_time() <= started + seconds + SLACK_S
        await tls.aclose()  # what httpcore does next: no error, whatever the socket's state
    nursery.cancel_scope.cancel()


async def test_a_tls_read_past_a_long_timeout_closes_the_socket(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A TLS peer that never sends after the handshake and a stream's read timeout:
    ReadTimeout, the socket under TLS is closed, and closing the TLS stream then is no error."""
    server_context, client_context = tls_contexts
    ours, theirs = socket.socketpair()

    nursery.start_soon(_handshake_then_mute, theirs, server_context)
    with ours, theirs, trio.fail_after(MOCK_LIMIT_S):
        plain = TrioNetworkStream(SocketStream(ours))
        tls = await plain.start_tls(client_context, server_hostname="localhost", timeout=UNARY_S)
        with pytest.raises(httpcore.ReadTimeout):
            await tls.read(10, timeout=STALL_S)
        assert tls.get_extra_info("socket").fileno() == -1
        await tls.aclose()
    nursery.cancel_scope.cancel()



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


@pytest.mark.parametrize("send_timeout", [3.0, STALL_S])
async def test_a_send_that_makes_no_progress_for_send_timeout_raises_too_slow(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock, send_timeout: float
) -> None:
    """A peer that never reads: once the buffers are full, the send raises
    trio.TooSlowError send_timeout seconds later (never early, at most SLACK_S late)."""
    stream, _ = unix_pair
    stream.send_timeout = send_timeout
    with trio.fail_after(MOCK_LIMIT_S):
        started = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await stream.send_all(b"x" * 10_000_000)
        assert started + send_timeout <= trio.current_time() <= started + send_timeout + SLACK_S


async def test_a_short_send_timeout_leaves_the_stream_open(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """A send_timeout below COARSE_MIN_S that fires: TooSlowError, the stream not closed."""
    stream, _ = unix_pair
    stream.send_timeout = 3.0
    with trio.fail_after(MOCK_LIMIT_S), pytest.raises(trio.TooSlowError):
        await stream.send_all(b"x" * 10_000_000)
    assert not stream.expired
    assert stream.socket.fileno() != -1


async def test_a_long_send_timeout_closes_the_stream_when_it_fires(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """A send_timeout of COARSE_MIN_S or more that fires (a client that stopped reading):
    TooSlowError, and the stream is closed; later calls fail as on any closed stream."""
    stream, _ = unix_pair
    stream.send_timeout = STALL_S
    with trio.fail_after(MOCK_LIMIT_S), pytest.raises(trio.TooSlowError):
        await stream.send_all(b"x" * 10_000_000)
    assert stream.expired
    assert stream.socket.fileno() == -1
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


@pytest.mark.parametrize(("send_timeout", "period"), [(2.0, 1.5), (10.0, 6.0)])
async def test_send_progress_restarts_the_send_clock(
    unix_pair: Pair, autojump_clock: trio.testing.MockClock, send_timeout: float, period: float
) -> None:
    """A peer that reads what is there every ``period`` seconds never leaves a send
    send_timeout seconds without progress, so a send that takes far longer than
    send_timeout in all still completes (a short send_timeout and a long one).

    Over a Unix socket pair: a read there makes room for the writer at once, where
    loopback TCP may wait for a delayed ACK in real time, which the autojump clock
    would not wait for.
    """
    stream, peer = unix_pair
    stream.send_timeout = send_timeout
    payload = b"x" * 2_000_000
    received = 0

    async def slow_reader() -> None:
        nonlocal received
        while received < len(payload):
            await trio.sleep(period)
            with contextlib.suppress(BlockingIOError):
                received += len(peer.recv(1 << 22))

    with trio.fail_after(100_000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            started = trio.current_time()
            await stream.send_all(payload)
            took = trio.current_time() - started
    assert took > 3 * send_timeout
    assert received == len(payload)
    assert not stream.expired


@pytest.mark.parametrize("send_timeout", [3.0, STALL_S])
async def test_tls_over_our_stream_has_the_send_clock(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    send_timeout: float,
) -> None:
    """trio.SSLStream over a SocketStream with send_timeout: a TLS peer that never reads
    makes send_all raise trio.TooSlowError send_timeout seconds after the buffers fill
    (at most SLACK_S late): the clock is the transport's own."""
    server_context, client_context = tls_contexts
    ours, theirs = socket.socketpair()

    nursery.start_soon(_handshake_then_mute, theirs, server_context)
    stream = SocketStream(ours)
    stream.send_timeout = send_timeout
    tls = trio.SSLStream(stream, client_context, server_hostname="localhost")
    with ours, theirs, trio.fail_after(MOCK_LIMIT_S):
        await tls.do_handshake()
        started = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await tls.send_all(b"x" * 10_000_000)
        assert started + send_timeout <= trio.current_time() <= started + send_timeout + SLACK_S
    nursery.cancel_scope.cancel()
