"""Keep-alive connections to the upstreams: httpcore's HTTP/1.1, a pool of our own.

Why not ``httpcore.AsyncConnectionPool``: every time a request is added to or
removed from it (twice per upstream call, six times per chat completion) it
walks all of its connections, polls the socket of every idle one, and for
each idle one builds a list of *all* of them, so the bookkeeping grows with
the square of the pool; and once the pool holds more than
``max_keepalive_connections`` it closes every connection that goes idle, so
above that concurrency nothing is reused at all (a new TCP and TLS handshake
per call). Measured here: with 100 idle connections left by a burst, each
later request paid 3.7 ms of pool bookkeeping (1.3 ms with 50).

This pool does only what the relay needs, in constant time per call, and
leaves HTTP itself to httpcore: each connection is an
:class:`httpcore.AsyncHTTP11Connection` (h11 underneath) over a stream from
httpcore's network backend. Idle connections wait in a per-origin stack and
are taken last-in first-out (the warmest socket first). The one taken is
checked (keep-alive expiry, and a poll that tells whether the server closed
it) unless it went idle less than :data:`FRESH_IDLE_S` ago, where
httpcore's pool polls them all: on this kind of machine a system call costs
tens of microseconds, and back-to-back calls (create the chat, stream the
answer, delete the chat) would pay for one each. A response hands its
connection back when its body is closed: idle again if it was read to the
end, otherwise httpcore has closed it. A kept connection the server closed
anyway (found only when the request fails before any response head came)
costs one retry on a new connection: the server never took that request.

System calls are also why each connection's stream is *corked*
(:class:`_CorkedStream`): httpcore writes a request's head and body
separately, and the two go out in one ``send`` when the response is read.

Limits: at most ``max_connections`` connections live at once (idle ones of
any origin are closed to make room; beyond that a call waits for one, bounded
by the request's ``pool`` timeout, then ``httpcore.PoolTimeout``); at most
``max_idle_per_origin`` are kept idle per origin; an idle connection older
than ``keepalive_expiry`` is closed when met. HTTP/1.1 only (the upstreams
speak it, and a proxy goes through httpcore's own pool, see
:func:`relay.upstream.make_pool`). Apart from the stale-connection case
above, a failed call is not retried: the caller's request may not be
idempotent.
"""

from __future__ import annotations

import math
import ssl
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, cast

import certifi
import httpcore
import trio

from relay.netio import TrioNetworkBackend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable
    from types import TracebackType

    from httpcore import AsyncNetworkBackend, AsyncNetworkStream

#: IPPROTO_TCP, TCP_NODELAY, on: every event is written as soon as it is ready
TCP_NODELAY = (6, 1, 1)
#: Request bytes held for one write with the rest of the request (see _CorkedStream)
CORK_LIMIT = 64 * 1024
#: Parsed URLs kept (the upstreams' call URLs; file fetches go through another pool)
URL_CACHE_SIZE = 256
#: An idle connection back this recently is used without polling its socket first
FRESH_IDLE_S = 1.0

_Key = tuple[bytes, bytes, int]


_DEFAULT_PORTS = {b"http": 80, b"https": 443}
#: How a kept connection the server has closed fails before any response head.
_STALE = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)


def _with_framing(
    headers: list[tuple[bytes, bytes]], url: httpcore.URL, content: bytes
) -> list[tuple[bytes, bytes]]:
    """Add ``Host`` and ``Content-Length`` unless given (as httpcore's own ``stream``)."""
    names = {name.lower() for name, _ in headers}
    if b"host" not in names:
        port = url.port
        host = url.host if port is None or port == _DEFAULT_PORTS.get(url.scheme) else (
            b"%b:%d" % (url.host, port)
        )
        headers.insert(0, (b"Host", host))
    if b"content-length" not in names and b"transfer-encoding" not in names:
        headers.append((b"Content-Length", b"%d" % len(content)))
    return headers


def default_ssl_context() -> ssl.SSLContext:
    """Certificate checks against certifi's roots (as httpcore's default), HTTP/1.1 by ALPN."""
    context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections per origin (see the module docstring).

    Offers the part of httpcore's request interface the relay uses:
    :meth:`stream`, :meth:`handle_async_request`, :attr:`connections`,
    :meth:`aclose` and ``async with``.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 1000,
        max_idle_per_origin: int = 256,
        keepalive_expiry: float = 30.0,
        network_backend: AsyncNetworkBackend | None = None,
        socket_options: Iterable[tuple[int, int, int]] = (TCP_NODELAY,),
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._ssl_context = ssl_context
        self._max = max_connections
        self._max_idle = max_idle_per_origin
        self._expiry = keepalive_expiry
        self._backend = network_backend if network_backend is not None else TrioNetworkBackend()
        self._socket_options = list(socket_options)
        # per origin, oldest first: (connection, when it went idle)
        self._idle: dict[_Key, list[tuple[httpcore.AsyncHTTP11Connection, float]]] = {}
        self._active: set[httpcore.AsyncHTTP11Connection] = set()
        self._count = 0  # live connections, idle and active (and being opened)
        self._opened = 0
        self._room = trio.lowlevel.ParkingLot()
        self._closed = False
        self._urls: dict[str, httpcore.URL] = {}

    # --- the request interface ------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        """Connections now, for metrics: ``upstream_active``, ``upstream_idle``;
        and since start, ``upstream_opened``."""
        idle = sum(len(stack) for stack in self._idle.values())
        return {
            "upstream_active": len(self._active),
            "upstream_idle": idle,
            "upstream_opened": self._opened,
        }

    @property
    def connections(self) -> list[httpcore.AsyncHTTP11Connection]:
        """Every open connection, active ones first (for tests and statistics)."""
        return [*self._active, *(c for stack in self._idle.values() for c, _ in stack)]

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
        """Send a request; the response's body is read by the caller, closed on exit."""
        target = self._urls.get(url)
        if target is None:  # parsed once: the upstreams' URLs are a handful of constants
            target = httpcore.URL(url)
            if len(self._urls) < URL_CACHE_SIZE:
                self._urls[url] = target
        request = httpcore.Request(
            method,
            target,
            headers=_with_framing(list(headers or ()), target, content),
            content=content,
            extensions=extensions,
        )
        response = await self.handle_async_request(request)
        try:
            yield response
        finally:
            await response.aclose()

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        """Send ``request`` on an idle or a new connection to its origin."""
        if self._closed:
            raise RuntimeError("the upstream pool is closed")
        scheme = request.url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpcore.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        origin = request.url.origin
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        key = (origin.scheme, origin.host, origin.port)
        connection, reused = await self._checkout(key, origin, timeouts, reuse=True)
        self._active.add(connection)
        try:
            try:
                response = await connection.handle_async_request(request)
            except _STALE:
                if not reused:
                    raise
                # The server had closed the kept connection (no response head
                # came): the request was not taken. Once more, on a new one.
                self._active.discard(connection)
                await self._close(connection)
                connection, _ = await self._checkout(key, origin, timeouts, reuse=False)
                self._active.add(connection)
                response = await connection.handle_async_request(request)
        except BaseException:
            self._active.discard(connection)
            await self._close(connection)
            raise
        # the body hands the connection back when closed (set in place: a
        # second Response would check every header again)
        response.stream = _PooledBody(cast("_Body", response.stream), self, connection, key)
        return response

    async def aclose(self) -> None:
        """Close every connection; later calls raise."""
        self._closed = True
        connections = self.connections
        self._idle.clear()
        self._active.clear()
        for connection in connections:
            await self._close(connection)

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- connections ---------------------------------------------------------------------

    async def _checkout(
        self,
        key: _Key,
        origin: httpcore.Origin,
        timeouts: dict[str, float | None],
        *,
        reuse: bool,
    ) -> tuple[httpcore.AsyncHTTP11Connection, bool]:
        """The warmest usable idle connection to ``origin`` (if ``reuse``), else a new one.

        Returns the connection and whether it was an idle one.

        At the limit, an idle connection to another origin is closed to make
        room; with none, the call waits (bounded by the ``pool`` timeout) for
        a connection to come back or to close.
        """
        deadline: float | None = None
        while True:
            stack = self._idle.get(key) if reuse else None
            while stack:
                connection, since = stack.pop()
                # A connection idle for a moment is taken as it is; an older one
                # is checked (keep-alive expiry, and a poll for the server's FIN).
                if connection.is_idle() and (
                    trio.current_time() - since < FRESH_IDLE_S or not connection.has_expired()
                ):
                    return connection, True
                await self._close(connection)  # expired, or closed by the server
            if self._count < self._max:
                break
            oldest = self._oldest_idle()
            if oldest is not None:
                await self._close(oldest)  # its room is ours
                continue
            if deadline is None:  # the clock starts at the first wait (a scope only here)
                limit_s = timeouts.get("pool")
                deadline = trio.current_time() + (limit_s if limit_s is not None else math.inf)
            with trio.move_on_at(deadline) as scope:
                await self._room.park()
            if scope.cancelled_caught:
                raise httpcore.PoolTimeout("no room for another upstream connection")
        self._count += 1
        try:
            stream = await self._connect(origin, timeouts.get("connect"))
        except BaseException:
            self._release()
            raise
        self._opened += 1
        connection = httpcore.AsyncHTTP11Connection(
            origin, _CorkedStream(stream), keepalive_expiry=self._expiry
        )
        return connection, False

    async def _connect(self, origin: httpcore.Origin, limit_s: float | None) -> AsyncNetworkStream:
        host = origin.host.decode("ascii")
        stream = await self._backend.connect_tcp(
            host, origin.port, timeout=limit_s, socket_options=self._socket_options
        )
        if origin.scheme == b"https":
            if self._ssl_context is None:
                self._ssl_context = default_ssl_context()
            try:
                stream = await stream.start_tls(
                    self._ssl_context, server_hostname=host, timeout=limit_s
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        return stream

    def _oldest_idle(self) -> httpcore.AsyncHTTP11Connection | None:
        """Take the least recently used idle connection out of the longest stack."""
        stacks = [stack for stack in self._idle.values() if stack]
        if not stacks:
            return None
        return max(stacks, key=len).pop(0)[0]

    def _release(self) -> None:
        self._count -= 1
        self._room.unpark()

    async def _close(self, connection: httpcore.AsyncHTTP11Connection) -> None:
        """Close ``connection`` (shielded) and give its room back."""
        with trio.CancelScope(shield=True):
            await connection.aclose()
        self._release()

    async def _checkin(self, connection: httpcore.AsyncHTTP11Connection, key: _Key) -> None:
        """A response was closed: keep its connection if it can serve again."""
        self._active.discard(connection)
        if self._closed or not connection.is_idle():
            await self._close(connection)  # httpcore closed it (body not read to its end)
            return
        stack = self._idle.setdefault(key, [])
        if len(stack) >= self._max_idle:
            await self._close(connection)
            return
        stack.append((connection, trio.current_time()))
        self._room.unpark()  # a call waiting for room may take this one
        if len(stack) > 1 and stack[0][1] + self._expiry < trio.current_time():
            await self._close(stack.pop(0)[0])  # one check per return: old ones do not pile up


class _CorkedStream(httpcore.AsyncNetworkStream):
    """A connection's socket stream whose writes wait for the next read.

    httpcore writes a request's head and its body separately; an HTTP/1.1
    client always reads the response next, so holding the writes until then
    sends the whole request in one ``send`` (one system call less per
    upstream call; system calls are the dearest thing the relay does). A
    write that would hold more than :data:`CORK_LIMIT` bytes goes out at
    once, after what was held.
    """

    def __init__(self, stream: AsyncNetworkStream) -> None:
        self._stream = stream
        self._held = b""

    async def _flush(self, timeout: float | None) -> None:  # noqa: ASYNC109 (httpcore's)
        held, self._held = self._held, b""
        await self._stream.write(held, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self._held:
            await self._flush(timeout)
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        if len(self._held) + len(buffer) <= CORK_LIMIT:
            self._held += buffer
            return
        if self._held:
            await self._flush(timeout)
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        self._held = b""
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncNetworkStream:
        raise RuntimeError("TLS is started before a connection is corked")  # pragma: no cover

    def get_extra_info(self, info: str) -> Any:  # noqa: ANN401 (httpcore's signature)
        return self._stream.get_extra_info(info)


class _Body(Protocol):
    """httpcore's HTTP/1.1 response body: async iterable, closable."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class _PooledBody:
    """A response body that hands its connection back to the pool when closed."""

    def __init__(
        self,
        stream: _Body,
        pool: UpstreamPool,
        connection: httpcore.AsyncHTTP11Connection,
        key: _Key,
    ) -> None:
        self._stream = stream
        self._pool = pool
        self._connection = connection
        self._key = key
        self._closed = False
        self._parts: AsyncIterator[bytes] = stream.__aiter__()

    # An iterator object, not an async generator: a body dropped half read
    # (the answer was complete) has nothing left for the garbage collector
    # to finalize; the connection goes back through aclose().
    def __aiter__(self) -> _PooledBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._parts.__anext__()
        except StopAsyncIteration:
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
            await self._pool._checkin(self._connection, self._key)
