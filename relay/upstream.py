"""Upstream HTTP over httpcore: the shared pool, streamed calls, file fetching.

Two pools, two trust levels:

- :class:`HttpTransport` talks to the configured upstream services (base URLs
  from the settings, which may be loopback in demo mode and tests). One
  pool (:class:`relay.pool.UpstreamPool`: httpcore's HTTP/1.1 connections,
  kept per origin) is shared by every request, so TLS handshakes and TCP
  connections are reused across requests.
- :class:`UrlFetcher` downloads files that *clients* name in chat messages.
  Those URLs are hostile until proven otherwise, so its pool runs on
  :class:`GuardedBackend`, which resolves each host itself and refuses to
  connect to loopback, private, link-local and other non-global addresses
  unless ``allow_private_urls`` is set. The check happens at connect time on
  the very address connected to, so DNS rebinding cannot slip past it.
  Redirects are followed by hand (at most :data:`MAX_REDIRECTS`), each hop
  going through the same guard, and bodies are read against a size limit.

httpcore's exceptions are translated once, here, into :mod:`protocol.errors`
(STYLE.md section 5): timeouts become :class:`UpstreamTimeout`, everything
else :class:`UpstreamFailed`. Nothing above this module sees an httpcore class.

Timeouts on streams: the first body bytes may take ``first_byte_timeout``
since the request was sent (search and thinking are slow), and after that a
silence longer than ``stall_timeout`` is a stall. httpcore's read timeout
applies to every socket read, so it is set to ``stall_timeout`` and only the
wait for the first chunk gets a trio deadline of its own; that keeps a cancel
scope off the per-chunk hot path. Only when ``stall_timeout`` is the longer
of the two (the read timeout must then let the first read wait longer) does
:class:`_Streamed` fall back to a deadline around every read.

Compression: we advertise only ``gzip, deflate`` (PROTOCOLS.md 2.4: never
claim what we cannot decode) and decode those incrementally with zlib.
"""

from __future__ import annotations

import ipaddress
import logging
import mimetypes
import urllib.parse
import zlib
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, cast

import httpcore
import trio

from protocol.datauri import is_data_url, parse_data_url
from protocol.errors import RequestError, UpstreamFailed, UpstreamTimeout
from providers.contract import FetchedFile, Headers, Response
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
MAX_REDIRECTS = 3
FETCH_USER_AGENT = b"Mozilla/5.0 (compatible; trio-llm-relay)"
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
        stall_timeout: float,
        *,
        per_read_deadline: bool,
    ) -> None:
        self._response = response
        self._what = what
        self._first_deadline = first_deadline
        self._stall = stall_timeout
        self._per_read_deadline = per_read_deadline
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
                per_read = self._per_read_deadline
                while True:
                    if decompress is not None:
                        try:
                            chunk = decompress.decompress(chunk)
                        except zlib.error as exc:
                            raise UpstreamFailed(f"{self._what}: bad compressed body") from exc
                    if chunk:
                        yield chunk
                    if per_read:
                        with trio.fail_after(self._stall):
                            chunk = await body.__anext__()
                    else:  # httpcore's read timeout is the stall timeout
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
        # the first read may wait first_byte_timeout; see the module comment
        read_timeout = max(s.first_byte_timeout, s.stall_timeout)
        per_read_deadline = s.stall_timeout < read_timeout
        with map_errors(what):
            with trio.fail_at(first_deadline + s.connect_timeout):
                cm = self._pool.stream(
                    method,
                    url,
                    headers=list(headers),
                    content=body,
                    extensions={"timeout": self._timeouts(read_timeout)},
                )
                response = await cm.__aenter__()
            try:
                streamed = _Streamed(
                    response, what, first_deadline, s.stall_timeout,
                    per_read_deadline=per_read_deadline,
                )
            except BaseException as exc:  # an encoding we cannot decode: close it
                await cm.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            try:
                yield streamed
            except BaseException as exc:
                await streamed.close()
                if not await cm.__aexit__(type(exc), exc, exc.__traceback__):
                    raise
            else:
                await streamed.finish()
                await cm.__aexit__(None, None, None)


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
            network_backend=network_backend,
            socket_options=[TCP_NODELAY],
        )
    return UpstreamPool(
        ssl_context=ssl_context,
        max_connections=max_connections,
        keepalive_expiry=30.0,
        network_backend=network_backend,
    )


# --- files named by clients --------------------------------------------------------


def is_public_address(address: str) -> bool:
    """True when ``address`` is a globally routable unicast IP."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class ForbiddenAddress(httpcore.ConnectError):
    """The host resolved only to addresses we may not connect to."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A trio network backend that connects only to public addresses."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = httpcore.TrioBackend()
        self._allow_private = allow_private

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._allow_private:
            return await self._inner.connect_tcp(
                host, port, timeout, local_address, socket_options
            )
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = [str(info[4][0]) for info in infos]
        allowed = [a for a in addresses if is_public_address(a)]
        if not allowed:
            raise ForbiddenAddress(f"{host} resolves to a private or local address")
        return await self._inner.connect_tcp(
            allowed[0], port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ForbiddenAddress("unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


def filename_from_url(url: str) -> str:
    """The last path segment without the query string, URL-decoded."""
    path = urllib.parse.urlsplit(url).path
    name = urllib.parse.unquote(path.rsplit("/", 1)[-1])
    return name or "file"


class UrlFetcher:
    """Resolves client file references (providers.contract.Fetcher)."""

    def __init__(
        self, settings: Settings, pool: Pool | None = None
    ) -> None:
        self._settings = settings
        self._pool = pool or make_pool(
            settings,
            network_backend=GuardedBackend(settings.allow_private_urls),
            max_connections=100,
        )

    async def aclose(self) -> None:
        """Close the pool's connections."""
        await self._pool.aclose()

    async def fetch(self, url: str) -> FetchedFile:
        limit = self._settings.file_max_bytes
        if is_data_url(url):
            decoded = parse_data_url(url, limit)
            return FetchedFile(decoded.filename(), decoded.mime, decoded.data)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise RequestError(
                "file URLs must be http(s):// or data: URLs", code="invalid_file_url"
            )
        current = url
        try:
            with trio.fail_after(self._settings.upload_timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    result = await self._get(current, limit)
                    if isinstance(result, FetchedFile):
                        return result
                    current = urllib.parse.urljoin(current, result)
        except trio.TooSlowError as exc:
            raise RequestError(f"fetching {url} timed out", code="invalid_file_url") from exc
        raise RequestError(f"too many redirects fetching {url}", code="invalid_file_url")

    async def _get(self, url: str, limit: int) -> FetchedFile | str:
        """GET one URL: the file, or the next URL when redirected."""
        s = self._settings
        timeouts = {"connect": s.connect_timeout, "read": s.upload_timeout,
                    "write": s.upload_timeout, "pool": s.upload_timeout}
        try:
            async with self._pool.stream(
                b"GET", url, headers=[(b"User-Agent", FETCH_USER_AGENT), (b"Accept", b"*/*")],
                extensions={"timeout": timeouts},
            ) as response:
                status = response.status
                if status in (301, 302, 303, 307, 308):
                    location = _header(response.headers, b"location")
                    if not location:
                        raise RequestError(f"{url} redirects nowhere", code="invalid_file_url")
                    return location.decode("latin-1")
                if status >= 400:
                    raise RequestError(
                        f"file URL {url} answered HTTP {status}", code="invalid_file_url"
                    )
                length = _header(response.headers, b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    raise RequestError(
                        f"file at {url} is over the {limit}-byte limit", code="file_too_large"
                    )
                data = bytearray()
                async for chunk in response.aiter_stream():
                    data += chunk
                    if len(data) > limit:
                        raise RequestError(
                            f"file at {url} is over the {limit}-byte limit", code="file_too_large"
                        )
                content_type = _header(response.headers, b"content-type") or b""
        except ForbiddenAddress as exc:
            raise RequestError(
                f"file URL {url} points at a private or local address; "
                "set RELAY_ALLOW_PRIVATE_URLS=true to allow it",
                code="forbidden_file_url",
            ) from exc
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                httpcore.UnsupportedProtocol, httpcore.ProxyError) as exc:
            raise RequestError(
                f"could not fetch file URL {url}: {type(exc).__name__}", code="invalid_file_url"
            ) from exc
        name = filename_from_url(url)
        mime = content_type.split(b";", 1)[0].strip().decode("latin-1").lower()
        if not mime or mime == "application/octet-stream":
            mime = mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"
        return FetchedFile(name, mime, bytes(data))
