"""Upstream HTTP over httpcore: the shared pool and streamed calls.

:class:`HttpTransport` talks to the configured upstream services (base URLs
from the settings, which may be loopback in demo mode and tests). One pool
(:class:`relay.pool.UpstreamPool`: httpcore's HTTP/1.1 connections, kept per
origin) is shared by every request, so TLS handshakes and TCP connections are
reused across requests. Files that *clients* name are fetched elsewhere, by
:class:`relay.fetcher.UrlFetcher`, behind the private-address guard.

httpcore's exceptions are translated once, here, into :mod:`protocol.errors`
(STYLE.md section 5): timeouts become :class:`UpstreamTimeout`, everything
else :class:`UpstreamFailed`. Nothing above this module sees an httpcore class.

Timeouts on streams: the first body bytes may take ``first_byte_timeout``
since the request was sent (search and thinking are slow), and after that a
silence longer than ``stall_timeout`` is a stall. httpcore's read timeout
bounds every socket read of the response, the first ones included, so it is
the longer of the two; the wait for the first chunk has a trio deadline of
its own (``first_byte_timeout``). When ``stall_timeout`` is the longer one
(or they are equal, the default) the read timeout *is* the stall timeout and
a chunk costs no deadline of ours. Only when ``stall_timeout`` is the shorter
one does :class:`_Streamed` put ``trio.fail_after(stall_timeout)`` around
every read after the first.

Compression: we advertise only ``gzip, deflate`` (PROTOCOLS.md 2.4: never
claim what we cannot decode) and decode those incrementally with zlib.
"""

from __future__ import annotations

import logging
import zlib
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from typing import TYPE_CHECKING, cast

import httpcore
import trio

from protocol.errors import UpstreamFailed, UpstreamTimeout
from providers.contract import Headers, Response
from relay.netio import TrioNetworkBackend
from relay.pool import TCP_NODELAY, UpstreamPool

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
    from types import TracebackType

    from relay.config import Settings

log = logging.getLogger(__name__)

#: What upstream calls go through: our pool, or httpcore's when a proxy is set.
Pool = UpstreamPool | httpcore.AsyncConnectionPool

UNARY_BODY_LIMIT_BYTES = 16 * 1024 * 1024
ERROR_BODY_LIMIT_BYTES = 64 * 1024
#: after the answer, the rest of a stream is read for this long (and this much) at most
DRAIN_LIMIT_S = 0.25
DRAIN_LIMIT_BYTES = 256 * 1024


class map_errors:
    """Turn httpcore's exceptions into ours, naming ``what`` failed.

    A class, not a generator: a stream holds two open while it lasts.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            return
        what = self.what
        if isinstance(exc, httpcore.TimeoutException):
            raise UpstreamTimeout(f"{what}: timed out ({type(exc).__name__})") from exc
        if isinstance(exc, trio.TooSlowError):
            raise UpstreamTimeout(f"{what}: timed out") from exc
        if isinstance(exc, (httpcore.NetworkError, httpcore.ProtocolError, httpcore.ProxyError)):
            raise UpstreamFailed(
                f"{what}: {type(exc).__name__}: {exc or 'connection failed'}"
            ) from exc
        if isinstance(exc, httpcore.UnsupportedProtocol):
            raise UpstreamFailed(f"{what}: unsupported URL: {exc}") from exc


def _decoder(headers: Iterable[tuple[bytes, bytes]]) -> zlib._Decompress | None:
    for key, value in headers:
        if key.lower() == b"content-encoding":
            enc = value.strip().lower()
            if enc == b"gzip":
                return zlib.decompressobj(16 + zlib.MAX_WBITS)
            if enc == b"deflate":
                return zlib.decompressobj()
            if enc not in (b"", b"identity"):
                raise UpstreamFailed(f"upstream sent an unrequested content-encoding: {enc!r}")
    return None


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class _Streamed:
    """One streamed upstream response (satisfies providers.contract.StreamedResponse)."""

    def __init__(
        self,
        response: httpcore.Response,
        what: str,
        first_deadline: float,
        stall_timeout: float | None,
    ) -> None:
        self._response = response
        self._what = what
        self._first_deadline = first_deadline
        #: a deadline of ours per read after the first (None: httpcore's read timeout is it)
        self._stall_timeout = stall_timeout
        self.status = response.status
        self.headers: list[tuple[bytes, bytes]] = list(response.headers)
        self._decompress = _decoder(self.headers)
        # httpcore types the stream as a sync-or-async iterable; ours is an async generator
        source = cast("AsyncIterable[bytes]", response.stream)
        self._body = cast("AsyncGenerator[bytes, None]", source.__aiter__())
        self._started = False
        self._ended = False

    def header(self, name: bytes) -> bytes | None:
        return _header(self.headers, name.lower())

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        decompress = self._decompress
        body = self._body
        with map_errors(self._what):
            try:
                if self._started:
                    chunk = await body.__anext__()
                else:
                    self._started = True
                    with trio.fail_at(self._first_deadline):
                        chunk = await body.__anext__()
                stall_timeout = self._stall_timeout
                while True:
                    if decompress is not None:
                        try:
                            chunk = decompress.decompress(chunk)
                        except zlib.error as exc:
                            raise UpstreamFailed(f"{self._what}: bad compressed body") from exc
                    if chunk:
                        yield chunk
                    if stall_timeout is None:  # httpcore's read timeout is the stall timeout
                        chunk = await body.__anext__()
                    else:
                        with trio.fail_after(stall_timeout):
                            chunk = await body.__anext__()
            except StopAsyncIteration:
                self._ended = True

    async def finish(self) -> None:
        """Read what is left of the body (briefly) so that the connection can be reused.

        A provider stops reading once the answer is complete, which is
        usually a few bytes before the body ends (StepChat's end-of-stream
        envelope, the last chunk of a chunked body). A connection whose
        response was not read to its end cannot go back to the pool, so
        every request would pay for a new one; here the rest is read, within
        :data:`DRAIN_LIMIT_S` and :data:`DRAIN_LIMIT_BYTES`, and then the body
        is closed whatever happened.
        """
        size = 0
        with trio.move_on_after(DRAIN_LIMIT_S):
            try:
                while not self._ended and size <= DRAIN_LIMIT_BYTES:
                    try:
                        size += len(await self._body.__anext__())
                    except StopAsyncIteration:
                        self._ended = True
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException):
                pass  # httpcore has closed the connection
        await self.close()

    async def close(self) -> None:
        """Close the body (httpcore closes the connection unless it was read to its end)."""
        with trio.CancelScope(shield=True):
            await self._body.aclose()

    async def read(self, limit: int = ERROR_BODY_LIMIT_BYTES) -> bytes:
        body = bytearray()
        async with aclosing(self.chunks()) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > limit:
                    del body[limit:]
                    break
        return bytes(body)


class HttpTransport:
    """Calls to one upstream service over a shared pool (providers.contract.Transport)."""

    def __init__(self, pool: Pool, settings: Settings, name: str) -> None:
        self._pool = pool
        self._settings = settings
        self._name = name

    def _timeouts(self, read: float) -> dict[str, float]:
        s = self._settings
        return {"connect": s.connect_timeout, "read": read, "write": read, "pool": read}

    async def request(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        body: bytes = b"",
        *,
        limit_s: float | None = None,
    ) -> Response:
        read_timeout = limit_s if limit_s is not None else self._settings.request_timeout
        what = f"{self._name} {url.rsplit('/', 1)[-1]}"
        with map_errors(what), trio.fail_after(read_timeout + self._settings.connect_timeout):
            async with self._pool.stream(
                method,
                url,
                headers=list(headers),
                content=body,
                extensions={"timeout": self._timeouts(read_timeout)},
            ) as response:
                data = bytearray()
                async for chunk in response.aiter_stream():
                    data += chunk
                    if len(data) > UNARY_BODY_LIMIT_BYTES:
                        raise UpstreamFailed(f"{what}: response body over the limit")
        decompress = _decoder(response.headers)
        raw = bytes(data)
        if decompress is not None:
            try:
                raw = decompress.decompress(raw) + decompress.flush()
            except zlib.error as exc:
                raise UpstreamFailed(f"{what}: bad compressed body") from exc
        return Response(response.status, list(response.headers), raw)

    @asynccontextmanager
    async def stream(
        self, method: bytes, url: str, headers: Headers, body: bytes = b""
    ) -> AsyncIterator[_Streamed]:
        s = self._settings
        what = f"{self._name} {url.rsplit('/', 1)[-1]}"
        first_deadline = trio.current_time() + s.first_byte_timeout
        # httpcore's read timeout lets the first read wait first_byte_timeout
        # (module docstring); a shorter stall timeout needs a deadline per read
        read_timeout = max(s.first_byte_timeout, s.stall_timeout)
        stall_timeout = s.stall_timeout if s.stall_timeout < read_timeout else None
        # The exit stack holds the pool's stream open past the deadline, which
        # covers only its opening (connect, send, the response head); on the
        # way out the pool's __aexit__ sees whatever exception ends the block.
        with map_errors(what):
            async with AsyncExitStack() as stack:
                with trio.fail_at(first_deadline + s.connect_timeout):
                    response = await stack.enter_async_context(
                        self._pool.stream(
                            method,
                            url,
                            headers=list(headers),
                            content=body,
                            extensions={"timeout": self._timeouts(read_timeout)},
                        )
                    )
                # an encoding we cannot decode raises here: the stack closes the stream
                streamed = _Streamed(response, what, first_deadline, stall_timeout)
                try:
                    yield streamed
                except BaseException:
                    await streamed.close()
                    raise
                await streamed.finish()


def make_pool(settings: Settings, *, ssl_context: ssl.SSLContext | None = None,
              network_backend: httpcore.AsyncNetworkBackend | None = None,
              max_connections: int = 1000) -> Pool:
    """The pool upstream calls share: ours (relay/pool.py), or httpcore's behind a proxy."""
    if settings.upstream_proxy:
        return httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            proxy=httpcore.Proxy(settings.upstream_proxy),
            max_connections=max_connections,
            max_keepalive_connections=100,
            keepalive_expiry=30.0,
            # the relay's sockets, as in our pool: relay.chat's writer needs
            # their before_read hook (relay.netio)
            network_backend=network_backend if network_backend is not None
            else TrioNetworkBackend(),
            socket_options=[TCP_NODELAY],
        )
    return UpstreamPool(
        ssl_context=ssl_context,
        max_connections=max_connections,
        keepalive_expiry=30.0,
        network_backend=network_backend,
    )
