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

Limits and timeouts, each with a clear answer (every response carries its
standard reason phrase, ``HTTP/1.1 200 OK``):

- a request head bigger than ``max_header_bytes`` -> 431, then close;
- malformed HTTP -> 400 with an OpenAI error body, then close;
- both ``Content-Length`` and ``Transfer-Encoding`` -> 400, then close (RFC
  9112 6.1: a server that serves such a request must close the connection
  after it; refusing it outright leaves no framing for a proxy in front of
  us to disagree with, which is what request smuggling needs);
- an HTTP version other than 1.0 or 1.1 -> 505, then close (h11 parses any
  ``HTTP/x.y``; a request line with no version at all, HTTP/0.9 style, is
  malformed: 400);
- empty lines before a request line are skipped, up to
  :data:`protocol.http1.MAX_EMPTY_LINES` of them (RFC 9112 2.2: "a server
  ... SHOULD ignore at least one empty line (CRLF) received prior to the
  request-line"), on every request of a connection, a bare LF counted as a
  line end;
- a head that takes longer than ``header_timeout`` to arrive -> closed;
- no new request within ``keepalive_timeout`` of the last -> closed;
- a body over ``max_body_bytes`` -> 413 (decided from Content-Length before
  reading when possible; ``Expect: 100-continue`` is then never answered);
- a body not complete ``body_timeout`` after the end of its head -> 408, then
  close (a body dribbled a byte at a time does not restart the clock);
- a write to the client that makes no progress for ``send_timeout`` -> the
  response ends there and the connection is closed (:mod:`relay.netio`
  keeps that clock, so TLS connections have it too; the access log says
  ``send-timeout``);
- ``Expect: 100-continue`` is answered when the application reads the body.

Disconnect detection: once the body is read, the application may run its
upstream work inside :meth:`Exchange.watch_disconnect`. A task then keeps
reading the client's socket; EOF or a reset cancels the work at once, which
cancels the upstream read (the provider's cleanup still runs, shielded).
Bytes a client pipelines meanwhile are handed to h11, which keeps them for
the next cycle; past :data:`PIPELINE_LIMIT_BYTES` the watcher stops reading
(back-pressure) rather than buffer without bound.

Shutdown (:class:`Server.shutdown`): stop accepting, close idle keep-alive
connections, let requests in flight finish within ``grace_period``. Then
each exchange still running is *stopped* (:meth:`Exchange.stop`): its
watched work is cancelled with the reason ``shutdown`` recorded, and on the
way out of :meth:`Exchange.watch_disconnect` a response not started yet
becomes a 503 ``server_shutting_down``, and a started stream is ended with
its last words (the SSE writer's queued bytes, an in-band error event and
``[DONE]``), written within :data:`LAST_WORDS_S`. After
:data:`STOP_BOUND_S` whatever is left is cancelled.
"""

from __future__ import annotations

import errno
import logging
import math
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

from protocol.errors import (
    PayloadTooLarge,
    RelayError,
    RequestError,
    RequestTimeout,
    ServerShuttingDown,
)
from protocol.http1 import REASONS, EmptyLines, has_both_lengths, head_size, sane_request_id
from relay.dialects.openai_chat import OPENAI_CHAT
from relay.netio import SocketListener, SocketStream

if TYPE_CHECKING:
    from types import TracebackType

    from relay.config import Settings
    from relay.dialects import ErrorRenderer

log = logging.getLogger("relay.server")

READ_BYTES = 64 * 1024
PIPELINE_LIMIT_BYTES = 256 * 1024
SERVER_HEADER = b"trio-llm-relay"
JSON = b"application/json"
#: HTTP versions served; others get 505 (RFC 9110 15.6.6)
HTTP_VERSIONS = (b"1.1", b"1.0")
#: once the grace period is over, how long stopped exchanges get to end their responses
STOP_BOUND_S = 2.0
#: the bound on writing a stopped stream's last words (within STOP_BOUND_S)
LAST_WORDS_S = 1.0
#: connections the kernel queues for accept() per listener
LISTEN_BACKLOG = 1024
#: accept() failures (out of file descriptors) pause the accept loop this long
ACCEPT_PAUSE_S = 0.1


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
    #: the client's sane ``X-Request-Id``, else one of ours; on every response
    request_id: str = ""

    def header(self, name: bytes) -> bytes | None:
        """The first header called ``name`` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class ClientGone(Exception):
    """The client closed the connection or a write to it failed."""


class ClientConnection:
    """One client byte stream and its h11 state machine.

    Bytes reach h11 through :meth:`feed` only, which skips the empty lines
    before each request line (:class:`EmptyLines`).
    """

    def __init__(self, stream: trio.abc.Stream, settings: Settings, client: str) -> None:
        self.stream = stream
        self.settings = settings
        self.client = client
        self.h11 = self._new_h11()
        self.gone = False
        #: why the response was cut short, for the access log ("send-timeout", "shutdown")
        self.cut: str | None = None
        #: no byte of the next request line has been given to h11 yet
        self.awaiting_head = True
        self._empty_lines = EmptyLines()

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)

    def feed(self, data: bytes) -> None:
        """Hand bytes read from the client to h11 (``b""``: EOF)."""
        if self.awaiting_head and data:
            data = self._empty_lines.skip(data)
            if not data:
                return
            self.awaiting_head = False
        self.h11.receive_data(data)

    def next_cycle(self) -> None:
        """Get ready for the next request on this connection (after a complete exchange).

        Bytes of the next request may already be in h11's buffer (pipelined,
        or read while the response was written); if they start with an empty
        line, h11 is started afresh with them fed through :meth:`feed` (it
        has no way to drop buffered bytes, and a new ``Connection`` is what
        ``start_next_cycle`` leaves anyway: both sides IDLE, keep-alive on).
        """
        self.h11.start_next_cycle()
        self._empty_lines = EmptyLines()
        rest, closed = self.h11.trailing_data
        if not rest:
            self.awaiting_head = True
        elif rest.startswith((b"\r", b"\n")):
            self.h11 = self._new_h11()
            self.awaiting_head = True
            self.feed(rest)
            if closed:
                self.h11.receive_data(b"")
        else:
            self.awaiting_head = False

    async def send(self, event: h11.Event) -> None:
        """Write one event (raises ClientGone if the client is gone)."""
        await self.send_many((event,))

    async def send_many(self, events: Sequence[h11.Event]) -> None:
        """Write several events with one ``send_all``: one segment, one syscall.

        A cancellation that has already arrived is raised before h11 is told
        anything, so the connection stays usable for a last write (a stopped
        stream's final event); once h11 has produced the bytes, any failure
        puts it in its ERROR state.

        Raises:
            ClientGone: the write failed, or made no progress for
                ``send_timeout`` seconds (:attr:`cut` is then
                ``"send-timeout"``); the connection is not reusable.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
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
        except trio.TooSlowError as exc:  # relay.netio: no progress for send_timeout
            self.h11.send_failed()
            self.gone = True
            self.cut = "send-timeout"
            log.info("client %s read nothing for %.0f s: response cut", self.client,
                     self.settings.send_timeout)
            raise ClientGone("the client stopped reading") from exc
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
        self.feed(bytes(data))
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


def new_request_id() -> str:
    """A request id of ours: 32 random hex digits."""
    return os.urandom(16).hex()


def _first(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _cors_headers() -> list[tuple[bytes, bytes]]:
    return [
        (b"access-control-allow-origin", b"*"),
        (b"access-control-expose-headers", b"*"),
    ]


@dataclass(eq=False)
class Exchange:
    """One request and its response, as the application sees it (hashable by identity)."""

    conn: ClientConnection
    request: Request
    settings: Settings
    started: bool = False
    status: int = 0
    body_read: bool = False
    sent_bytes: int = 0
    #: what the handler wants in the access log line (relay.chat.Outcome)
    note: Any = None
    #: when the whole body must have arrived (``body_timeout`` after the head's end)
    body_deadline: float = math.inf
    #: a started response's final bytes if it is stopped (set by relay.chat's SSE writer)
    last_words: Callable[[], bytes] | None = field(default=None, repr=False)
    #: how :meth:`respond_error` renders an error (the route's dialect, once routed)
    errors: ErrorRenderer = field(default=OPENAI_CHAT.error, repr=False)
    _close_after: bool = False
    _watch_scope: trio.CancelScope | None = field(default=None, repr=False)

    @property
    def cut(self) -> str | None:
        """Why the response was cut short (``"shutdown"``, ``"send-timeout"``), or None."""
        return self.conn.cut

    # --- request body -----------------------------------------------------------

    async def read_body(self) -> bytes:
        """Read the whole request body, enforcing ``max_body_bytes`` and ``body_timeout``.

        The body is due ``body_timeout`` seconds after the end of its head
        (:attr:`body_deadline`), however it trickles in.

        Raises:
            PayloadTooLarge: over the limit (the connection is then closed).
            RequestTimeout: (408) not all there in time (the connection is then closed).
            RequestError: the client broke HTTP or left mid-body.
        """
        limit = self.settings.max_body_bytes
        length = self.request.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._close_after = True
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
        conn = self.conn
        if conn.h11.they_are_waiting_for_100_continue:
            await conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                      reason=b"Continue"))
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                # a body that came with the head is parsed without setting up a timer
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    with trio.move_on_at(self.body_deadline) as scope:
                        event = await conn.next_event()
                    if scope.cancelled_caught:
                        self._close_after = True
                        raise RequestTimeout(
                            f"the request body did not arrive within "
                            f"{self.settings.body_timeout:g} s", code="request_timeout"
                        )
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
        headers = [(b"server", SERVER_HEADER), (b"x-request-id", self.request.request_id.encode())]
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
        events: list[h11.Event] = [
            h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b""))
        ]
        if body and self.request.method != "HEAD":
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self.conn.send_many(events)
        self.sent_bytes += len(body)

    async def respond_error(
        self, exc: RelayError, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Send ``exc`` as :attr:`errors` renders it (OpenAI's error object unless
        routed elsewhere), with ``headers`` added."""
        reply = self.errors(exc)
        await self.respond(reply.status, reply.body, reply.content_type,
                           [*reply.headers, *headers])

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
        events: list[h11.Event] = [
            h11.Response(status_code=status, headers=head, reason=REASONS.get(status, b""))
        ]
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

        The scope is also cancelled by :meth:`stop` (server shutdown). Then,
        on the way out, a response not started yet is raised as a 503
        (:class:`ServerShuttingDown`), and a started one is ended with
        :attr:`last_words` if the handler left some.

        Raises:
            ServerShuttingDown: stopped before the response started.
        """
        conn = self.conn
        with trio.CancelScope() as scope, _single_exception():
            self._watch_scope = scope
            if conn.cut == "shutdown":  # stopped before the work began
                scope.cancel()
            async with trio.open_nursery() as nursery:
                if self.body_read and not conn.gone:
                    nursery.start_soon(self._watch, scope)
                try:
                    yield scope
                finally:
                    nursery.cancel_scope.cancel()
        self._watch_scope = None
        if conn.cut == "shutdown" and scope.cancelled_caught and not self.finished:
            await self._end_stopped()

    def stop(self, reason: str = "shutdown") -> None:
        """Cut the response short: cancel the watched work, remembering ``reason``.

        The handler's way out of :meth:`watch_disconnect` then ends the
        response as well as it can (see there). A cut already recorded (the
        client stopped reading) is kept.
        """
        if self.conn.cut is None:
            self.conn.cut = reason
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def _end_stopped(self) -> None:
        """Answer a stopped request: 503 if nothing was sent, else the last words."""
        if not self.started:
            self._close_after = True
            raise ServerShuttingDown("the server is shutting down; retry the request",
                                     code="server_shutting_down")
        last_words = self.last_words
        if last_words is None or self.conn.gone or self.conn.h11.our_state is not h11.SEND_BODY:
            return  # a write was cut midway (or nothing to say): the close ends it
        with trio.move_on_after(LAST_WORDS_S, shield=True), suppress(ClientGone):
            await self.end_stream(last_words())

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
                conn.feed(b"")
                if not self.finished:  # after the whole response, the rest may finish
                    log.debug("client %s went away mid-request", conn.client)
                    scope.cancel()
                return
            buffered += len(data)
            conn.feed(bytes(data))


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
    #: how refusals before a route is known are rendered (malformed HTTP, 431, 505),
    #: and every exchange's errors until its route says otherwise
    errors: ErrorRenderer = OPENAI_CHAT.error
    connections: int = 0
    requests: int = 0
    _idle: set[trio.CancelScope] = field(default_factory=set)
    _exchanges: set[Exchange] = field(default_factory=set)
    _answered: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    _stopping: bool = False
    _stop_accepting: trio.CancelScope = field(default_factory=trio.CancelScope)
    _connections: trio.Nursery | None = None
    _drained: trio.Event = field(default_factory=trio.Event)

    def statistics(self) -> dict[str, int]:
        """Open connections, requests being answered now, and requests served so far."""
        return {"connections": self.connections, "in_flight": len(self._exchanges),
                "requests": self.requests}

    async def wait_no_requests(self) -> None:
        """Return once no request is being answered (at once if none is)."""
        while self._exchanges:
            await self._answered.park()

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
            if self._exchanges:
                # grace is over: stopped exchanges end their responses (503, or a
                # stream's error event and [DONE]), then what is left is cancelled
                log.warning("grace period over: stopping %d requests in flight",
                            len(self._exchanges))
                for exchange in list(self._exchanges):
                    exchange.stop("shutdown")
                with trio.move_on_after(STOP_BOUND_S):
                    await self._drained.wait()
            connections.cancel_scope.cancel()

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._stopping

    def shutdown(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        self._stopping = True
        self._stop_accepting.cancel()

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        """Accept connections; out of descriptors, pause and retry (one warning per episode)."""
        failures = 0
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    if not failures:
                        log.warning("accept failed (%s); retrying every %g s until it works",
                                    exc, ACCEPT_PAUSE_S)
                    failures += 1
                    await trio.sleep(ACCEPT_PAUSE_S)
                    continue
                raise
            if failures:
                log.warning("accept recovered after %d failures", failures)
                failures = 0
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
        inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        if isinstance(inner, SocketStream):  # netio keeps the clock of every blocked send
            inner.send_timeout = self.settings.send_timeout
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
                exchange = Exchange(conn, request, self.settings,
                                    body_deadline=trio.current_time() + self.settings.body_timeout,
                                    errors=self.errors)
                self._exchanges.add(exchange)
                try:
                    await self._run_exchange(exchange)
                finally:
                    self._exchanges.discard(exchange)
                    if not self._exchanges:
                        self._answered.unpark_all()
                if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                    # the body was never read (error before it) or the response broke
                    break
                if self._stopping:
                    break
                conn.next_cycle()
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
                    if event is h11.NEED_DATA and not conn.awaiting_head:
                        break  # some bytes arrived: the head timeout applies now
            except h11.RemoteProtocolError as exc:
                await self._reject(conn, exc.error_status_hint, _malformed(exc))
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
                    await self._reject(conn, exc.error_status_hint, _malformed(exc))
                    return None
            if head_scope.cancelled_caught:
                log.debug("client %s was too slow sending a request head", conn.client)
                return None
        if isinstance(event, h11.Request):
            # h11 bounds only an *incomplete* head; a whole one that arrived in a
            # single read is checked here
            if head_size(event.method, event.target, event.headers) > s.max_header_bytes:
                await self._reject(conn, 431, "request head is too large")
                return None
            if event.http_version not in HTTP_VERSIONS:
                version = event.http_version.decode("ascii", "replace")
                await self._reject(conn, 505, f"HTTP/{version} is not supported; use HTTP/1.1")
                return None
            if has_both_lengths(event.headers):
                # RFC 9112 6.1 (and 6.3 item 3): a request smuggling pattern; we refuse
                # it rather than pick one framing, and close after the answer
                await self._reject(
                    conn, 400, "a request must not carry both Content-Length and "
                    "Transfer-Encoding"
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
                request_id=sane_request_id(_first(event.headers, b"x-request-id"))
                or new_request_id(),
            )
        return None  # ConnectionClosed, or EOF with nothing

    async def _reject(self, conn: ClientConnection, status: int, message: str) -> None:
        """Answer a request head we refuse with ``status`` (body: :attr:`errors`); close."""
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reply = self.errors(RequestError(message, status=status))
        body = reply.body
        headers = [
            (b"server", SERVER_HEADER),
            (b"x-request-id", new_request_id().encode()),
            (b"content-type", reply.content_type),
            *reply.headers,
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        with suppress(ClientGone, h11.LocalProtocolError):
            await conn.send_many(
                [h11.Response(status_code=reply.status, headers=headers,
                              reason=REASONS.get(reply.status, b"")),
                 h11.Data(data=body), h11.EndOfMessage()]
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


def _malformed(exc: h11.RemoteProtocolError) -> str:
    """The message for what h11 refused (431: the head is over the size limit)."""
    if exc.error_status_hint == 431:
        return "request head is too large"
    return f"malformed HTTP request: {exc}"


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


class CannotListen(OSError):
    """A listener could not be opened; the message names the address and the reason."""


async def open_listeners(
    settings: Settings, *, reuse_port: bool = False
) -> list[trio.abc.Listener[trio.abc.Stream]]:
    """TCP (or Unix-socket) listeners, TLS-wrapped when configured.

    Raises:
        CannotListen: binding failed, e.g. ``cannot listen on 127.0.0.1:8000:
            address already in use`` (``errno`` is the cause's).
    """
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    if settings.uds:
        try:
            listeners.append(SocketListener(await _unix_listener(settings.uds)))
        except OSError as exc:
            raise _cannot_listen(settings.uds, exc) from exc
    else:
        try:
            tcp = await _tcp_listeners(settings.host or None, settings.port, reuse_port)
        except OSError as exc:
            host = settings.host or "*"
            where = f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
            raise _cannot_listen(where, exc) from exc
        listeners.extend(SocketListener(listener) for listener in tcp)
    ctx = ssl_context_from(settings)
    if ctx is not None:
        listeners = [
            trio.SSLListener(listener, ctx, https_compatible=True) for listener in listeners
        ]
    return listeners


async def _tcp_listeners(
    host: str | None, port: int, reuse_port: bool
) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners``, with ``SO_REUSEPORT`` set before bind when asked.

    Workers share a port only if every socket had the option when it was
    bound (Linux socket(7)); set after bind, as trio's function leaves it
    to be, the second worker's bind fails with EADDRINUSE.
    """
    addresses = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, sockaddr in addresses:
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # e.g. no IPv6 here: the other family may do
                raise
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(LISTEN_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, "no address family of this host can be used")
    return listeners


def _cannot_listen(where: str, exc: OSError) -> CannotListen:
    """``cannot listen on <where>: <reason>``, the reason as the C library words it."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    error = CannotListen(f"cannot listen on {where}: {reason[:1].lower()}{reason[1:]}")
    error.errno = exc.errno
    return error


async def _unix_listener(path: str) -> trio.SocketListener:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
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
