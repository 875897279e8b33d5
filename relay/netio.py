"""The relay's sockets: trio's streams, with the two additions the relay needs.

Both sides run on trio's own streams (:class:`trio.SocketStream`, and
:class:`trio.SSLStream` over it for TLS) and on httpcore's trio backend for
the upstream pool; timeouts are trio cancel scopes (httpcore's backend puts
one around every read and write that has a timeout). Two things are added:

- :class:`ClientStream`: a client connection whose send makes no progress
  for ``send_timeout`` seconds raises :exc:`trio.TooSlowError` (a client that
  stops reading must not hold a stream, its conversation and its account for
  as long as its socket stays open). The clock is the transport's, under TLS,
  so that ``trio.SSLStream``'s sends have it too, and it restarts whenever the
  kernel takes bytes: a slow reader that keeps reading is never cut.
- :class:`HookedBackend`: httpcore's trio backend whose streams await the
  current task's :data:`before_read` hook before each read. A streamed answer
  is decoded one HTTP chunk at a time (one h11 event, one httpcore step each),
  and only here is it known that the bytes of the last read are used up:
  relay.chat's SSE writer sets the hook to write the events decoded from that
  read, so that they leave in one write, before the next read (DESIGN.md,
  "The streaming data path").
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import httpcore
import trio

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Iterable

    from httpcore import AsyncNetworkStream

#: What the current task does before httpcore reads an upstream socket (None:
#: nothing). Set with a token and reset by whoever sets it; tasks started
#: meanwhile inherit it, so a hook checks the task it runs in.
before_read: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar(
    "relay.netio.before_read", default=None
)


class ClientStream(trio.abc.HalfCloseableStream):
    """A client's :class:`trio.SocketStream` with a send clock (module docstring)."""

    def __init__(self, stream: trio.SocketStream, send_timeout: float) -> None:
        self.transport = stream
        self.socket = stream.socket
        #: seconds a send may go without the kernel taking a byte
        self.send_timeout = send_timeout

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send it all; :exc:`trio.TooSlowError` after ``send_timeout`` without progress."""
        sock = self.socket
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                with trio.move_on_after(self.send_timeout) as scope:
                    try:
                        sent += await sock.send(view[sent:])
                    except OSError as exc:
                        if sock.fileno() == -1:
                            raise trio.ClosedResourceError("the stream is closed") from exc
                        raise trio.BrokenResourceError(str(exc)) from exc
                if scope.cancelled_caught:
                    raise trio.TooSlowError

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.transport.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.transport.aclose()


class ClientListener(trio.abc.Listener[ClientStream]):
    """trio's TCP (or Unix) listener handing out :class:`ClientStream` s."""

    def __init__(self, listener: trio.SocketListener, send_timeout: float) -> None:
        self.listener = listener
        self.socket = listener.socket
        self.send_timeout = send_timeout

    async def accept(self) -> ClientStream:
        return ClientStream(await self.listener.accept(), self.send_timeout)

    async def aclose(self) -> None:
        await self.listener.aclose()


class HookedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend whose streams run :data:`before_read` (module docstring)."""

    def __init__(self) -> None:
        self._backend = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        stream = await self._backend.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options,
        )
        return HookedStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("upstreams are reached over TCP")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class HookedStream(httpcore.AsyncNetworkStream):
    """An httpcore stream that awaits :data:`before_read` before each read."""

    def __init__(self, stream: AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        hook = before_read.get()
        if hook is not None:
            await hook()
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncNetworkStream:
        # httpcore closes the socket when the handshake fails but not when the
        # caller cancels it (it would leak): every way out but success closes it
        try:
            tls = await self._stream.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            self.get_extra_info("socket").close()
            raise
        return HookedStream(tls)

    def get_extra_info(self, info: str) -> Any:  # noqa: ANN401 (httpcore's signature)
        return self._stream.get_extra_info(info)
