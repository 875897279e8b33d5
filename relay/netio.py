"""The relay's sockets, both sides: trio streams with less work per call.

httpcore's own ``TrioBackend`` wraps every read and write in
``trio.fail_after`` and a generator-based exception map (two context
managers and a cancel scope per call), over :class:`trio.SocketStream`, whose
``send_all`` and ``receive_some`` each add a conflict detector, an async
context manager, and a reschedule of the task after a call that did not
block. On a small machine those add up to a good part of what an upstream
call costs: measured here, 0.8-0.95 ms of CPU per keep-alive call through
the pool, against 0.4-0.47 ms for h11 driven by hand over a trio socket.

So the pool's connections run on :class:`TrioNetworkBackend`, and the
clients' connections come from :class:`SocketListener`:

- :class:`SocketStream` is a :class:`trio.abc.HalfCloseableStream` over a
  non-blocking socket. A send or receive is tried at once and waits for the
  socket (``trio.lowlevel.wait_writable``/``wait_readable``) only when the
  kernel says it would block. Cancellation is still honoured on entry
  (``checkpoint_if_cancelled``), but a call that did not block reschedules
  the task only every :data:`YIELD_EVERY` calls: a stream read faster than
  the upstream sends waits on every read anyway, and one whose upstream
  keeps the socket full (a burst, or a server flooding us) still lets every
  other task, deadline and connection of the relay run.
- TLS is trio's :class:`trio.SSLStream` over that stream, on both sides.
- :class:`SocketListener` wraps trio's listener: trio accepts (with
  ``TCP_NODELAY``), and each connection is handed over as a
  :class:`SocketStream`; a paced stream's frame then costs the relay one
  scheduler step (the upstream socket's wake-up) instead of two.
- :class:`TrioNetworkStream` gives it to httpcore. Over plain TCP a read or
  write with a timeout sets up a cancel scope only if it has to wait (data
  already there, or a send the kernel takes at once, needs no timer); over
  TLS a call with a timeout has one bare :class:`trio.CancelScope`. trio's
  errors become httpcore's in one ``except``.
- Long timeouts (:data:`COARSE_MIN_S` and more: a stream's 120 s stall
  timeout, a unary call's 15 s) need no cancel scope at all: the call
  enters its deadline in :mod:`relay.timers` (a dict store), whose one task
  per run closes the stream of a call past its deadline; the call wakes up
  on the closed socket and raises httpcore's timeout. Such a timeout fires
  up to 0.25 s late, and the timed-out connection is closed, as httpcore
  would close it anyway. A paced stream waits once per frame, and over TLS
  every read had a scope of its own.
- A send that makes no progress for :attr:`SocketStream.send_timeout`
  seconds raises :exc:`trio.TooSlowError` (the server sets it on every
  client connection: a client that stops reading must not hold a stream,
  its conversation and its account for as long as its socket stays open).
  The clock is the stream's own, not the caller's, so TLS over the stream
  (``trio.SSLStream`` calls our ``send_all``) has it too, and it is kept
  only while a send waits for room: each wait starts right after the
  kernel took bytes (or at the start of the send), so "no progress for
  ``send_timeout``" is one deadline per wait, and a send the kernel takes
  at once sets up nothing. Long ones are :mod:`relay.timers` entries, as
  above (the stream is closed when one fires, and the send raises
  ``TooSlowError``); short ones (tests) a cancel scope.
- Before httpcore reads an upstream socket, :class:`TrioNetworkStream`
  awaits the task's :data:`before_read` hook if it has one. A streamed
  answer is decoded one HTTP chunk at a time (one h11 event, one httpcore
  step each), and only here is it known that the bytes of the last read are
  used up: relay.chat's SSE writer sets the hook to write the events decoded
  from that read, so that they leave in one write, before the next read
  (DESIGN.md, "The streaming data path").
"""

from __future__ import annotations

import math
import select
import socket
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import httpcore
import trio

from relay.timers import coarse_timers

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Iterable

    from httpcore import AsyncNetworkStream

#: Bytes asked of the kernel per receive when the caller names no size
DEFAULT_RECEIVE_SIZE = 65536
#: Calls in a row that did not block before one reschedules the task anyway
YIELD_EVERY = 16
#: Timeouts this long or longer are kept by relay.timers, not a cancel scope
COARSE_MIN_S = 5.0

#: What the current task does before httpcore reads an upstream socket (None:
#: nothing). Set with a token and reset by whoever sets it; tasks started
#: meanwhile inherit it, so a hook checks the task it runs in.
before_read: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar(
    "relay.netio.before_read", default=None
)


class SocketStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream, without a reschedule per call.

    One task sends and one receives at a time (httpcore's connection makes
    sure of it), so there is no conflict detector.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._closed = False
        self._unblocked = 0  # calls since this stream last let other tasks run
        #: closed by relay.timers: a call waited past its deadline
        self.expired = False
        #: seconds a send may wait for room without the kernel taking a byte (module docstring)
        self.send_timeout = math.inf

    async def _ran(self) -> None:
        """A call done without waiting: every YIELD_EVERY-th one gives the others a turn."""
        self._unblocked += 1
        if self._unblocked >= YIELD_EVERY:
            self._unblocked = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.socket.setsockopt(level, option, value)

    def is_readable(self) -> bool:
        """Whether a read would not block (data, or the peer closed): a poll, no wait."""
        poller = select.poll()
        poller.register(self.socket, select.POLLIN)
        return bool(poller.poll(0))

    async def send_all(
        self, data: bytes | bytearray | memoryview, deadline: float = math.inf
    ) -> None:
        """Send it all, waiting for room until ``deadline`` (:exc:`trio.TooSlowError`).

        A send the kernel takes at once needs no timer: a cancel scope is set
        up only when the socket is full (``deadline`` as in :meth:`receive_some`).
        Each wait for room is also bounded by :attr:`send_timeout` (no progress
        for that long: :exc:`trio.TooSlowError`).
        """
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self.socket
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += sock.send(view[sent:])
                    continue
                except BlockingIOError:
                    pass  # waited for below, outside the handler (see receive_some)
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                if deadline == math.inf and self.send_timeout == math.inf:
                    await trio.lowlevel.wait_writable(sock)
                else:
                    await self._wait_for_room(deadline)
                self._unblocked = 0
        await self._ran()

    async def _wait_for_room(self, deadline: float) -> None:
        """Wait until the socket takes bytes, by ``deadline`` and within :attr:`send_timeout`."""
        stall = self.send_timeout
        if stall >= COARSE_MIN_S and deadline == math.inf:
            timers = coarse_timers()
            timers.set(self, trio.current_time() + stall)
            try:
                await trio.lowlevel.wait_writable(self.socket)
            except trio.ClosedResourceError:
                if self.expired:  # relay.timers closed us: the send timed out
                    raise trio.TooSlowError from None
                raise
            finally:
                timers.cancel(self)
        else:
            deadline = min(deadline, trio.current_time() + stall)
            await _wait_until(trio.lowlevel.wait_writable, self.socket, deadline)

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def receive_some(self, max_bytes: int | None = None, deadline: float = math.inf) -> bytes:
        """Read what is there, waiting for data until ``deadline`` (:exc:`trio.TooSlowError`).

        Data already there is read without a timer: a cancel scope is set up
        only when the read has to wait (``deadline`` is an addition of ours
        to trio's signature; without it the wait has no end). A wait without
        a deadline is written out here rather than in a helper: an idle
        stream keeps two such reads waiting (the client's side, and the
        upstream's, whose long timeout :mod:`relay.timers` keeps), and each
        layer would be one more frame per read. The wait is also outside the
        ``except BlockingIOError`` clause: a wait inside it would keep the
        exception and its traceback alive for as long as the stream is idle
        (about 1 KiB per waiting read).
        """
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self.socket
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        while True:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            else:
                await self._ran()
                return data
            if deadline == math.inf:
                await trio.lowlevel.wait_readable(sock)
            else:
                await _wait_until(trio.lowlevel.wait_readable, sock, deadline)
            self._unblocked = 0

    def close(self) -> None:
        """Close at once (no checkpoint): for cleanup where awaiting is not possible."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)  # a waiting task: ClosedResourceError
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def expire(self) -> None:
        """Close because a call waited past its deadline (relay.timers calls it)."""
        self.expired = True
        self.close()


async def _wait_until(
    wait: Callable[[socket.socket], Awaitable[None]], sock: socket.socket, deadline: float
) -> None:
    """``wait(sock)``, or :exc:`trio.TooSlowError` once ``deadline`` has passed."""
    with trio.CancelScope(deadline=deadline) as scope:
        await wait(sock)
    if scope.cancelled_caught:
        raise trio.TooSlowError


def _from_trio(trio_socket: trio.socket.SocketType) -> SocketStream:
    """Take a connected trio socket over (it is closed, the descriptor is ours)."""
    sock = socket.socket(
        trio_socket.family, trio_socket.type, trio_socket.proto, fileno=trio_socket.detach()
    )
    return SocketStream(sock)


class SocketListener(trio.abc.Listener[SocketStream]):
    """A trio TCP (or Unix) listener whose connections are :class:`SocketStream` s.

    The relay's client side: each SSE event written to a client is one
    ``send`` without a reschedule after it (see the module docstring).
    Accepting is trio's (``TCP_NODELAY`` on, errors as trio raises them).
    """

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self.socket = listener.socket

    async def accept(self) -> SocketStream:
        return _from_trio((await self.listener.accept()).socket)

    async def aclose(self) -> None:
        await self.listener.aclose()


class TrioNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on trio, built on :class:`SocketStream` (module docstring)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        with _deadline_scope(timeout) as scope:
            try:
                # trio connects (happy eyeballs, resolution in a thread); the socket is then ours
                connected = await trio.open_tcp_stream(host, port, local_address=local_address)
            except OSError as exc:
                raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        if scope.cancelled_caught:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out")
        stream = _from_trio(connected.socket)
        try:
            for option in socket_options or ():
                stream.socket.setsockopt(*option)
        except OSError as exc:
            stream.close()
            raise httpcore.ConnectError(f"socket option refused: {exc}") from exc
        return TrioNetworkStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("upstreams are reached over TCP")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


def _deadline_scope(timeout: float | None) -> trio.CancelScope:
    """A scope that ends an operation after ``timeout`` seconds (None: never)."""
    if timeout is None:
        return trio.CancelScope()
    return trio.CancelScope(deadline=trio.current_time() + timeout)


class TrioNetworkStream(httpcore.AsyncNetworkStream):
    """A :class:`SocketStream`, or TLS over one, for httpcore (module docstring)."""

    def __init__(self, stream: SocketStream | trio.SSLStream[SocketStream]) -> None:
        self._stream = stream
        self._socket = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        #: the stream itself when it is plain TCP: its reads and writes take deadlines
        self._plain = stream if isinstance(stream, SocketStream) else None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        hook = before_read.get()
        if hook is not None:
            await hook()
        try:
            if timeout is not None and timeout >= COARSE_MIN_S:
                timers = coarse_timers()
                timers.set(self._socket, trio.current_time() + timeout)
                try:
                    return bytes(await self._stream.receive_some(max_bytes))
                finally:
                    timers.cancel(self._socket)
            if self._plain is not None:
                deadline = math.inf if timeout is None else trio.current_time() + timeout
                return await self._plain.receive_some(max_bytes, deadline)
            if timeout is None:
                return bytes(await self._stream.receive_some(max_bytes))
            with trio.CancelScope(deadline=trio.current_time() + timeout):
                return bytes(await self._stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self._socket.expired:
                raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc
        except trio.TooSlowError:
            pass
        raise httpcore.ReadTimeout("upstream read timed out")  # the deadline came

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        try:
            if timeout is not None and timeout >= COARSE_MIN_S:
                timers = coarse_timers()
                timers.set(self._socket, trio.current_time() + timeout)
                try:
                    await self._stream.send_all(buffer)
                finally:
                    timers.cancel(self._socket)
                return
            if self._plain is not None:
                deadline = math.inf if timeout is None else trio.current_time() + timeout
                await self._plain.send_all(buffer, deadline)
                return
            if timeout is None:
                await self._stream.send_all(buffer)
                return
            with trio.CancelScope(deadline=trio.current_time() + timeout):
                await self._stream.send_all(buffer)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self._socket.expired:
                raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc
        except trio.TooSlowError:
            pass
        raise httpcore.WriteTimeout("upstream write timed out")

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncNetworkStream:
        if isinstance(self._stream, trio.SSLStream):
            raise RuntimeError("TLS is already on")  # pragma: no cover
        tls = trio.SSLStream(
            self._stream, ssl_context, server_hostname=server_hostname, https_compatible=True
        )
        # httpcore drops a stream whose handshake fails without closing it, so
        # every way out but success closes the socket here, cancellation included
        try:
            with _deadline_scope(timeout) as scope:
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise httpcore.ConnectError(str(exc.__cause__ or exc)) from exc
            if scope.cancelled_caught:
                raise httpcore.ConnectTimeout("TLS handshake timed out")
        except BaseException:
            self._socket.close()
            raise
        return TrioNetworkStream(tls)

    def get_extra_info(self, info: str) -> Any:  # noqa: ANN401 (httpcore's signature)
        sock = self._socket.socket
        if info == "socket":
            return sock
        if info == "is_readable":
            return self._socket.is_readable()
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        return None
