"""The benchmark client's HTTP/1.1: raw h11 over one trio stream per connection.

Theory of operation
-------------------
The client must cost less per chunk than what it measures, so it is the
thinnest loop that still checks the HTTP framing: ``trio.open_tcp_stream``
(TCP_NODELAY is trio's default) or ``trio.open_ssl_over_tcp_stream`` for
``https``, an ``h11.Connection(h11.CLIENT)`` to frame requests and decode
chunked bodies, and one ``receive_some(64 KiB)`` per loop.

:meth:`HttpConnection.stream_body` is the hot path. After each read it
takes ``time.monotonic_ns()``, drains every event h11 can give, joins the
body bytes of that read, and hands them with the receipt time to a
:class:`~bench.readers.StreamReader`. Body bytes that arrived in the same
read as the response head carry that read's time too.

A cut-off body is told apart from a complete one: h11 raises when the peer
closes inside a chunked or Content-Length body, and a reset surfaces as
``trio.BrokenResourceError``; both become :class:`RemoteProtocolError` with
``code="cut_off"``. Failures to connect become :class:`UpstreamFailed` with
``code="connect"``, a malformed response head ``code="bad_http"``. These
codes are the error kinds of :mod:`bench.readers`.

A connection is reused (keep-alive) only through :meth:`next_cycle`, which
says whether h11 allows it; direct StepChat streams use that to run
CreateChat, SendMessageStream and DelChat on one connection.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11
import trio

from protocol.errors import RemoteProtocolError, RequestError, UpstreamFailed

if TYPE_CHECKING:
    from bench.readers import StreamReader

#: Bytes per ``receive_some`` (as hypercorn and httpcore read).
READ_BYTES = 64 * 1024
#: Largest non-streamed response body read (error bodies, unary calls).
UNARY_LIMIT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to connect: scheme, host, port and a path prefix (no trailing slash)."""

    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Split an ``http(s)://host[:port][/prefix]`` base URL.

        Raises:
            RequestError: not an absolute http(s) URL, or a query or fragment.
        """
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise RequestError(f"{url!r} is not an http(s) URL", param="base_url")
        if parts.query or parts.fragment:
            raise RequestError(f"{url!r}: a base URL has no query or fragment", param="base_url")
        try:
            port = parts.port
        except ValueError as exc:
            raise RequestError(f"{url!r}: bad port", param="base_url") from exc
        if port is None:
            port = 443 if scheme == "https" else 80
        return cls(scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> bytes:
        """The ``Host`` header value (port left out when it is the default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        text = host if self.port == default else f"{host}:{self.port}"
        return text.encode("idna" if not text.isascii() else "ascii")

    def target(self, path: str) -> bytes:
        """The request target for ``path`` under the prefix."""
        return (self.prefix + path).encode("ascii")

    @property
    def base_url(self) -> str:
        """The URL this endpoint was parsed from (normalised)."""
        return f"{self.scheme}://{self.host_header.decode()}{self.prefix}"


class HttpConnection:
    """One HTTP/1.1 connection of the benchmark client.

    Not safe for use by two tasks at once. Always close it with :meth:`aclose`.
    """

    __slots__ = ("_conn", "_endpoint", "_read_ns", "_stream")

    def __init__(self, stream: trio.abc.Stream, endpoint: Endpoint) -> None:
        self._stream = stream
        self._endpoint = endpoint
        self._conn = h11.Connection(h11.CLIENT)
        self._read_ns = time.monotonic_ns()

    @classmethod
    async def open(
        cls, endpoint: Endpoint, ssl_context: ssl.SSLContext | None = None
    ) -> HttpConnection:
        """Connect to ``endpoint``.

        Raises:
            UpstreamFailed: code ``connect``: the connection could not be made.
        """
        try:
            if endpoint.scheme == "https":
                context = ssl_context or ssl.create_default_context()
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    endpoint.host, endpoint.port, ssl_context=context, https_compatible=True
                )
            else:
                stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamFailed(
                f"cannot connect to {endpoint.base_url}: {exc}", code="connect"
            ) from exc
        return cls(stream, endpoint)

    @property
    def endpoint(self) -> Endpoint:
        """Where this connection goes."""
        return self._endpoint

    async def send_request(
        self,
        method: bytes,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        """Send one whole request (head, body, end) in one write.

        Args:
            method: ``b"POST"``, ...
            path: the path under the endpoint's prefix (a query may follow).
            headers: extra headers; ``Host`` and ``Content-Length`` are added.
            body: the request body.

        Raises:
            RemoteProtocolError: code ``cut_off``: the peer closed the connection.
        """
        conn = self._conn
        all_headers = [(b"Host", self._endpoint.host_header), *headers]
        all_headers.append((b"Content-Length", b"%d" % len(body)))
        data = conn.send(
            h11.Request(method=method, target=self._endpoint.target(path), headers=all_headers)
        )
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"") if body else (data or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._conn.send_failed()
            raise RemoteProtocolError(
                f"connection closed while sending: {exc}", code="cut_off"
            ) from exc

    async def _receive(self) -> None:
        try:
            data = await self._stream.receive_some(READ_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise RemoteProtocolError(f"connection broken: {exc}", code="cut_off") from exc
        self._read_ns = time.monotonic_ns()
        self._conn.receive_data(bytes(data))

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            if "closed" in str(exc):  # h11: "peer (unexpectedly) closed connection ..."
                raise RemoteProtocolError(f"response cut off: {exc}", code="cut_off") from exc
            raise RemoteProtocolError(f"malformed HTTP response: {exc}", code="bad_http") from exc

    async def read_response(self) -> h11.Response:
        """Read up to and including the response head (1xx answers skipped).

        Raises:
            RemoteProtocolError: code ``cut_off`` (closed before a head) or
                ``bad_http`` (not HTTP/1.x).
        """
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                await self._receive()
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise RemoteProtocolError("connection closed before a response", code="cut_off")
            elif not isinstance(event, h11.InformationalResponse):
                raise RemoteProtocolError(f"unexpected {event!r}", code="bad_http")

    async def read_body(self, limit: int = UNARY_LIMIT_BYTES) -> bytes:
        """Read the rest of a response body into memory.

        Args:
            limit: stop collecting (but keep reading) past this many bytes.

        Raises:
            RemoteProtocolError: code ``cut_off`` if the body was cut short.
        """
        parts: list[bytes] = []
        size = 0
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                await self._receive()
            elif isinstance(event, h11.Data):
                if size < limit:
                    parts.append(bytes(event.data[: limit - size]))
                    size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise RemoteProtocolError("connection closed inside a body", code="cut_off")

    async def stream_body(self, reader: StreamReader) -> None:
        """Feed the body to ``reader``, one call per read, then ``finish`` it.

        ``reader.finish(complete=False)`` is called when the body was cut off;
        no exception escapes for that case. Cancellation propagates (the
        reader is then not finished: the caller decides what it means).
        """
        parts: list[bytes] = []
        while True:
            try:
                event = self._next_event()
                if event is h11.NEED_DATA:
                    if parts:
                        reader.feed(parts[0] if len(parts) == 1 else b"".join(parts), self._read_ns)
                        parts.clear()
                    await self._receive()
                    continue
            except RemoteProtocolError:
                if parts:
                    reader.feed(b"".join(parts), self._read_ns)
                reader.finish(complete=False, now_ns=time.monotonic_ns())
                return
            if type(event) is h11.Data:
                parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                if parts:
                    reader.feed(b"".join(parts), self._read_ns)
                reader.finish(complete=True, now_ns=self._read_ns)
                return
            else:  # ConnectionClosed inside a body cannot come from h11; be safe
                reader.finish(complete=False, now_ns=time.monotonic_ns())
                return

    def next_cycle(self) -> bool:
        """Prepare for another request on this connection, if h11 allows it.

        Returns:
            True when the connection may carry another request.
        """
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False

    async def aclose(self) -> None:
        """Close the connection at once (never raises, never blocks long)."""
        await trio.aclose_forcefully(self._stream)


def header(response: h11.Response, name: bytes) -> bytes:
    """The first value of header ``name`` (lower case) in ``response``, or ``b""``."""
    for key, value in response.headers:
        if key == name:
            return bytes(value)
    return b""
