"""The HTTP/1.1 server: listeners, one task per connection, the h11 loop.

Theory of operation
-------------------
:func:`serve` opens the listeners (TCP, optionally TLS, or a Unix socket) and
runs one task per client connection in a handler nursery kept apart from the
listeners, as hypercorn does, so that shutdown can first stop accepting and
then give connections in flight a grace period.

Each connection is a :class:`ClientConnection`: the byte stream and its
``h11.Connection``, with one rule: every write goes through :meth:`send` or
:meth:`send_many`, and a failed write puts h11 into its ERROR state
(``send_failed``) so the connection is never reused. The request loop reads a
request head, hands an :class:`Exchange` to the application, then either
starts the next cycle (keep-alive) or closes.

Limits and timeouts, each with a clear answer:

- a request head bigger than ``max_header_bytes`` -> 431, then close;
- malformed HTTP -> 400 with an OpenAI error body, then close;
- a head that takes longer than ``header_timeout`` to arrive -> closed;
- no new request within ``keepalive_timeout`` of the last -> closed;
- a body over ``max_body_bytes`` -> 413 (decided from Content-Length before
  reading when possible; ``Expect: 100-continue`` is then never answered);
- ``Expect: 100-continue`` is answered when the application reads the body.

Disconnect detection: once the body is read, the application may run its
upstream work inside :meth:`Exchange.watch_disconnect`. A task then keeps
reading the client's socket; EOF or a reset cancels the work at once, which
cancels the upstream read (the provider's cleanup still runs, shielded).
Bytes a client pipelines meanwhile are handed to h11, which keeps them for
the next cycle; past :data:`PIPELINE_LIMIT_BYTES` the watcher stops reading
(back-pressure) rather than buffer without bound.

Shutdown (:class:`Server.shutdown`): stop accepting, close idle keep-alive
connections, let requests in flight finish within ``grace_period``, then
cancel what is left.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h11
import trio

from protocol.errors import PayloadTooLarge, RelayError, RequestError
from protocol.openai import error_body, error_from_exception
from relay.netio import SocketListener, SocketStream

if TYPE_CHECKING:
    from types import TracebackType

    from relay.config import Settings

log = logging.getLogger("relay.server")

READ_BYTES = 64 * 1024
PIPELINE_LIMIT_BYTES = 256 * 1024
SERVER_HEADER = b"trio-llm-relay"
JSON = b"application/json"


@dataclass(slots=True)
class Request:
    """The head of one client request."""

    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]
    http_version: bytes
    client: str

    def header(self, name: bytes) -> bytes | None:
        """The first header called ``name`` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class ClientGone(Exception):
    """The client closed the connection or a write to it failed."""


class ClientConnection:
    """One client byte stream and its h11 state machine."""

    def __init__(self, stream: trio.abc.Stream, settings: Settings, client: str) -> None:
        self.stream = stream
        self.settings = settings
        self.client = client
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_header_bytes)
        self.gone = False

    async def send(self, event: h11.Event) -> None:
        """Write one event (raises ClientGone if the client is gone)."""
        await self.send_many((event,))

    async def send_many(self, events: Sequence[h11.Event]) -> None:
        """Write several events with one ``send_all``: one segment, one syscall."""
        try:
            parts = []
            for event in events:
                data = self.h11.send(event)
                if data:
                    parts.append(data)
            if parts:
                await self.stream.send_all(b"".join(parts) if len(parts) > 1 else parts[0])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.h11.send_failed()
            self.gone = True
            raise ClientGone("client connection closed during a write") from exc
        except BaseException:
            self.h11.send_failed()
            raise

    async def receive(self) -> bool:
        """Read once from the client into h11. Returns False at EOF."""
        try:
            data = await self.stream.receive_some(READ_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self.gone = True
        self.h11.receive_data(bytes(data))
        return bool(data)

    async def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """The next h11 event, reading as needed (EOF gives ConnectionClosed)."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.gone:
                    return h11.ConnectionClosed()
                await self.receive()
                continue
            return event

    async def aclose(self) -> None:
        """Close the byte stream (a TLS close_notify is attempted, briefly)."""
        with trio.move_on_after(1, shield=True):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self.stream.aclose()


def _cors_headers() -> list[tuple[bytes, bytes]]:
    return [
        (b"access-control-allow-origin", b"*"),
        (b"access-control-expose-headers", b"*"),
    ]


@dataclass
class Exchange:
    """One request and its response, as the application sees it."""

    conn: ClientConnection
    request: Request
    settings: Settings
    started: bool = False
    status: int = 0
    body_read: bool = False
    sent_bytes: int = 0
    #: what the handler wants in the access log line (relay.chat.Outcome)
    note: Any = None
    _close_after: bool = False
    _watch_scope: trio.CancelScope | None = field(default=None, repr=False)

    # --- request body -----------------------------------------------------------

    async def read_body(self) -> bytes:
        """Read the whole request body, enforcing ``max_body_bytes``.

        Raises:
            PayloadTooLarge: over the limit (the connection is then closed).
            RequestError: the client broke HTTP or left mid-body.
        """
        limit = self.settings.max_body_bytes
        length = self.request.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._close_after = True
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
        conn = self.conn
        if conn.h11.they_are_waiting_for_100_continue:
            await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                # a body that came with the head is parsed without setting up a timer
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    with trio.move_on_after(self.settings.keepalive_timeout) as scope:
                        event = await conn.next_event()
                    if scope.cancelled_caught:
                        self._close_after = True
                        raise RequestError("timed out reading the request body")
            except h11.RemoteProtocolError as exc:
                self._close_after = True
                raise RequestError(f"malformed request body: {exc}") from exc
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    self._close_after = True
                    raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.body_read = True
                return b"".join(chunks)
            else:
                self._close_after = True
                raise RequestError("client closed the connection before the body was complete")

    # --- responses -----------------------------------------------------------------

    def _head(
        self, status: int, content_type: bytes | None, extra: Sequence[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        headers = [(b"server", SERVER_HEADER)]
        if content_type:
            headers.append((b"content-type", content_type))
        headers.extend(_cors_headers())
        headers.extend(extra)
        if self._close_after or not self.body_read:
            headers.append((b"connection", b"close"))
        return headers

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes | None = JSON,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Send a whole response with Content-Length, in one write."""
        head = self._head(status, content_type, headers)
        if status >= 200 and status not in (204, 304):
            # RFC 9110 8.6: no Content-Length in a 1xx or 204 response (304: it would
            # describe the unsent representation)
            head.append((b"content-length", str(len(body)).encode()))
        self.started = True
        self.status = status
        events: list[h11.Event] = [h11.Response(status_code=status, headers=head)]
        if body and self.request.method != "HEAD":
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self.conn.send_many(events)
        self.sent_bytes += len(body)

    async def respond_error(self, exc: RelayError) -> None:
        """Send ``exc`` as an OpenAI error object with its status."""
        extra: list[tuple[bytes, bytes]] = []
        if exc.status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        await self.respond(exc.status, error_from_exception(exc), headers=extra)

    async def start_stream(
        self, status: int, content_type: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
        first: bytes = b"", *, end: bool = False,
    ) -> None:
        """Send the head of a chunked response and ``first`` body bytes in one write.

        With ``end``, the response is complete with them (still one write).
        """
        head = self._head(status, content_type, headers)
        self.started = True
        self.status = status
        events: list[h11.Event] = [h11.Response(status_code=status, headers=head)]
        if first:
            events.append(h11.Data(data=first))
            self.sent_bytes += len(first)
        if end:
            events.append(h11.EndOfMessage())
        await self.conn.send_many(events)

    async def send_data(self, data: bytes) -> None:
        """Send body bytes of a started response."""
        await self.conn.send(h11.Data(data=data))
        self.sent_bytes += len(data)

    async def end_stream(self, last: bytes = b"") -> None:
        """Finish a started response (with ``last`` bytes in the same write)."""
        events: list[h11.Event] = []
        if last:
            events.append(h11.Data(data=last))
            self.sent_bytes += len(last)
        events.append(h11.EndOfMessage())
        await self.conn.send_many(events)

    # --- disconnect detection ----------------------------------------------------

    @asynccontextmanager
    async def watch_disconnect(self) -> AsyncIterator[trio.CancelScope]:
        """Run the body in a scope that is cancelled when the client goes away.

        Only valid once the request body was read (the watcher reads the
        socket). On exit, ``scope.cancelled_caught`` tells whether the client
        left; :attr:`ClientConnection.gone` stays set.
        """
        conn = self.conn
        with trio.CancelScope() as scope, _single_exception():
            self._watch_scope = scope
            async with trio.open_nursery() as nursery:
                if self.body_read and not conn.gone:
                    nursery.start_soon(self._watch, scope)
                try:
                    yield scope
                finally:
                    nursery.cancel_scope.cancel()

    @property
    def finished(self) -> bool:
        """True once the whole response was sent."""
        return self.conn.h11.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    def abandon(self) -> None:
        """The client is gone (a failed write elsewhere): cancel the watched work."""
        self.conn.gone = True
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def _watch(self, scope: trio.CancelScope) -> None:
        conn = self.conn
        buffered = 0
        while buffered < PIPELINE_LIMIT_BYTES:
            try:
                data = await conn.stream.receive_some(READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            except trio.BusyResourceError:  # pragma: no cover - a bug elsewhere
                return
            if not data:
                conn.gone = True
                conn.h11.receive_data(b"")
                if not self.finished:  # after the whole response, the rest may finish
                    log.debug("client %s went away mid-request", conn.client)
                    scope.cancel()
                return
            buffered += len(data)
            conn.h11.receive_data(bytes(data))


class _single_exception:
    """Unwrap a nursery's group of one (the watcher never raises; the body may).

    A class, not a generator: every request holds one open while it runs.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            raise exc.exceptions[0] from None


Handler = Callable[[Exchange], Awaitable[None]]


@dataclass
class Server:
    """Listens, runs connections, shuts down gracefully."""

    settings: Settings
    handler: Handler
    connections: int = 0
    requests: int = 0
    _idle: set[trio.CancelScope] = field(default_factory=set)
    _stopping: bool = False
    _stop_accepting: trio.CancelScope = field(default_factory=trio.CancelScope)
    _connections: trio.Nursery | None = None
    _drained: trio.Event = field(default_factory=trio.Event)

    def statistics(self) -> dict[str, int]:
        """Open connections and requests served so far."""
        return {"connections": self.connections, "requests": self.requests}

    async def run(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``listeners`` until :meth:`shutdown`; then drain and return."""
        async with trio.open_nursery() as connections:
            self._connections = connections
            try:
                with self._stop_accepting:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept_loop, listener, connections)
                        task_status.started()
            finally:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
            for scope in list(self._idle):
                scope.cancel()
            with trio.move_on_after(self.settings.grace_period):
                if self.connections:
                    await self._drained.wait()
            connections.cancel_scope.cancel()

    def shutdown(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        self._stopping = True
        self._stop_accepting.cancel()

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    log.warning("accept failed (%s); pausing briefly", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        try:
            await self._serve_connection(stream)
        except Exception:
            log.exception("unexpected error on a client connection")
        finally:
            self.connections -= 1
            if not self.connections:
                drained, self._drained = self._drained, trio.Event()
                drained.set()

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        client = _peer(stream)
        if isinstance(stream, trio.SSLStream):
            with trio.move_on_after(self.settings.header_timeout) as scope:
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    scope.cancel()
            if scope.cancel_called:
                with trio.move_on_after(0.5, shield=True):
                    await trio.aclose_forcefully(stream)
                return
        conn = ClientConnection(stream, self.settings, client)
        try:
            first = True
            while not self._stopping or first:
                request = await self._read_head(conn, first)
                first = False
                if request is None:
                    break
                self.requests += 1
                exchange = Exchange(conn, request, self.settings)
                await self._run_exchange(exchange)
                if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                    # the body was never read (error before it) or the response broke
                    break
                if self._stopping:
                    break
                conn.h11.start_next_cycle()
        finally:
            await conn.aclose()

    async def _read_head(self, conn: ClientConnection, first: bool) -> Request | None:
        """Wait for the next request head, with the idle and head timeouts."""
        s = self.settings
        idle = s.header_timeout if first else s.keepalive_timeout
        # idle wait: cancelled by shutdown, unless bytes of a request already arrived
        with trio.CancelScope() as idle_scope:
            self._idle.add(idle_scope)
            idle_scope.deadline = trio.current_time() + idle
            try:
                event = conn.h11.next_event()
                while event is h11.NEED_DATA and not conn.gone:
                    await conn.receive()
                    event = conn.h11.next_event()
                    if event is h11.NEED_DATA:
                        break  # some bytes arrived: the head timeout applies now
            except h11.RemoteProtocolError as exc:
                await self._reject(conn, exc)
                return None
            finally:
                self._idle.discard(idle_scope)
        if idle_scope.cancelled_caught:
            return None
        # the first head is due header_timeout after the connection opened (a late
        # first byte must not restart the clock); a later one, after its first byte
        if event is h11.NEED_DATA and not conn.gone:  # part of a head: a timer only then
            head_deadline = (
                idle_scope.deadline if first else trio.current_time() + s.header_timeout
            )
            with trio.move_on_at(head_deadline) as head_scope:
                try:
                    while event is h11.NEED_DATA and not conn.gone:
                        await conn.receive()
                        event = conn.h11.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._reject(conn, exc)
                    return None
            if head_scope.cancelled_caught:
                log.debug("client %s was too slow sending a request head", conn.client)
                return None
        if isinstance(event, h11.Request):
            # h11 bounds only an *incomplete* head; a whole one that arrived in a
            # single read is checked here
            if _head_size(event) > s.max_header_bytes:
                await self._reject(
                    conn, h11.RemoteProtocolError("request head is too large", 431)
                )
                return None
            target = event.target.decode("latin-1")
            path, _, query = target.partition("?")
            return Request(
                method=event.method.decode("ascii", "replace"),
                target=target,
                path=path,
                query=query,
                headers=[(k, v) for k, v in event.headers],
                http_version=event.http_version,
                client=conn.client,
            )
        return None  # ConnectionClosed, or EOF with nothing

    async def _reject(self, conn: ClientConnection, exc: h11.RemoteProtocolError) -> None:
        """Answer malformed HTTP with its status (400 or 431) and an OpenAI error body."""
        status = exc.error_status_hint
        message = "request head is too large" if status == 431 else f"malformed HTTP request: {exc}"
        body = error_body(message, "invalid_request_error")
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            (b"server", SERVER_HEADER),
            (b"content-type", JSON),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        with suppress(ClientGone, h11.LocalProtocolError):
            await conn.send_many(
                [h11.Response(status_code=status, headers=headers), h11.Data(data=body),
                 h11.EndOfMessage()]
            )

    async def _run_exchange(self, exchange: Exchange) -> None:
        try:
            await self.handler(exchange)
        except ClientGone:
            return
        except RelayError as exc:
            if exchange.started:
                log.warning("error after the response started: %s", exc)
                exchange.conn.h11.send_failed()
                return
            await self._respond_error(exchange, exc)
        except h11.LocalProtocolError:
            log.exception("h11 refused our response")
            exchange.conn.h11.send_failed()
        except Exception:
            log.exception("unhandled error handling %s %s", exchange.request.method,
                          exchange.request.path)
            if not exchange.started:
                await self._respond_error(exchange, RelayError("internal error"))
            else:
                exchange.conn.h11.send_failed()

    async def _respond_error(self, exchange: Exchange, exc: RelayError) -> None:
        with suppress(ClientGone, h11.LocalProtocolError):
            await exchange.respond_error(exc)


def _head_size(request: h11.Request) -> int:
    """The size of ``request``'s head as sent, give or take optional whitespace."""
    size = len(request.method) + len(request.target) + 13  # " ", " HTTP/1.1\r\n"
    for name, value in request.headers:
        size += len(name) + len(value) + 4  # ": ", "\r\n"
    return size + 2  # the blank line


def _peer(stream: trio.abc.Stream) -> str:
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, SocketStream | trio.SocketStream):
        try:
            peer = inner.socket.getpeername()
        except OSError:
            return "?"
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return str(peer) or "unix"
    return "?"


# --- listeners ------------------------------------------------------------------------


def ssl_context_from(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context when certfile and keyfile are set."""
    if not settings.certfile or not settings.keyfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.certfile, settings.keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def open_listeners(
    settings: Settings, *, reuse_port: bool = False
) -> list[trio.abc.Listener[trio.abc.Stream]]:
    """TCP (or Unix-socket) listeners, TLS-wrapped when configured."""
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    if settings.uds:
        listeners.append(SocketListener(await _unix_listener(settings.uds)))
    else:
        tcp = await trio.open_tcp_listeners(settings.port, host=settings.host or None,
                                            backlog=1024)
        for listener in tcp:
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listeners.append(SocketListener(listener))
    ctx = ssl_context_from(settings)
    if ctx is not None:
        listeners = [
            trio.SSLListener(listener, ctx, https_compatible=True) for listener in listeners
        ]
    return listeners


async def _unix_listener(path: str) -> trio.SocketListener:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(1024)
    except BaseException:
        sock.close()  # e.g. EADDRINUSE: do not leak the descriptor
        raise
    return trio.SocketListener(sock)


def bound_addresses(listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]) -> list[str]:
    """Human-readable addresses the listeners are bound to."""
    out = []
    for listener in listeners:
        inner = listener.transport_listener if isinstance(listener, trio.SSLListener) else listener
        if isinstance(inner, SocketListener | trio.SocketListener):
            name = inner.socket.getsockname()
            if isinstance(name, tuple):
                host = name[0]
                host = f"[{host}]" if ":" in host else host
                out.append(f"{host}:{name[1]}")
            else:
                out.append(str(name))
    return out
