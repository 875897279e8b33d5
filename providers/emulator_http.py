"""The HTTP/1.1 server under both emulators: listen, read requests, answer, keep-alive.

Theory of operation
-------------------
:func:`serve_http` binds ``host``/``port`` (port 0 picks a free one; the bound
port is what ``task_status.started`` reports), wraps the listeners in TLS when
given a context, and runs the emulator's connection handler once per accepted
connection, one task each (``trio.serve_listeners``). That handler is usually
:func:`serve_connection` with the emulator's ``respond`` and ``refuse`` bound
in: it keeps a :class:`ClientConnection` (the stream and its
``h11.Connection``) and loops: read a request head and its whole body
(Content-Length or chunked, ``100 Continue`` sent when asked), hand the
:class:`Request` to ``respond``, ``start_next_cycle()``, again (keep-alive),
until the client closes, either side says ``Connection: close``, ``respond``
returns False, or something breaks. The stream is closed on every way out.

``respond`` answers in one of two ways:

- whole: ``await conn.reply(Reply(status, body, content_type))``, with
  Content-Length (or ``head_only`` for HEAD);
- streamed: ``conn.encode(h11.Response(...))``, then body bytes, then
  ``conn.encode(h11.EndOfMessage())``, all written with :meth:`ClientConnection.send`
  as the emulator paces, packs or splits them (its misbehaviour knobs), inside
  :meth:`ClientConnection.watched`. With chunked framing (an HTTP/1.1 client
  and no Content-Length) h11 frames only the head and the final
  ``0\\r\\n\\r\\n`` and does not count body bytes, so an emulator may format
  its own chunks (:func:`http_chunk`, or in one go with its payload) and save
  a copy and a call per frame. ``conn.chunked`` says whether to; without
  it the body bytes go out as they are (HTTP/1.0: the close ends the body).

While a stream is written a watcher task reads the socket: EOF or a reset
means the client went away, so the write is cancelled at once (even in a
delay or a stall) and :attr:`ClientConnection.peer_gone` is set. Bytes the
watcher reads (a pipelined next request) go to h11 for the next cycle, up
to :data:`MAX_PIPELINED_BYTES`; past that it stops reading (and watching).

Traps: a connection ends quietly whatever the peer does; nothing but a bug
reaches ``refuse`` as an unexpected exception, and even that is logged and
answered (when ``refuse`` gives a reply and h11 still allows one), never
raised into the server's nursery, so a test's nursery never sees it.
"""

from __future__ import annotations

import contextlib
import http
import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import h11
import trio

from protocol.errors import PayloadTooLarge

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Sequence

logger = logging.getLogger(__name__)

#: Bytes per ``receive_some``.
READ_BYTES = 64 * 1024
#: A pipelined client may send at most this much while a stream is written.
MAX_PIPELINED_BYTES = 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Request:
    """One whole request as h11 parsed it (header names lower-cased)."""

    method: bytes
    target: bytes
    headers: Sequence[tuple[bytes, bytes]]
    http_version: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer, sent with Content-Length."""

    status: int
    body: bytes
    content_type: str = "application/json"


class Respond(Protocol):
    """The emulator's side: answer ``request`` on ``conn``; True if it may be reused."""

    async def __call__(self, request: Request, conn: ClientConnection, /) -> bool: ...


class Refuse(Protocol):
    """The emulator's answer to a request that broke; ``None`` closes without one.

    ``exc`` is h11's ``RemoteProtocolError`` (bad HTTP; see its
    ``error_status_hint``), :class:`PayloadTooLarge` (a body over the limit)
    or any other exception (a bug in ``respond``, already logged).
    """

    def __call__(self, exc: Exception, /) -> Reply | None: ...


def http_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (RFC 9112 7.1): hex size, CRLF, data, CRLF."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class ClientConnection:
    """One client connection of an emulator: its stream and its ``h11.Connection``.

    Attributes:
        stream: the connection's byte stream.
        h11: its state machine; ``respond`` may read it (``their_http_version``).
        peer_gone: the watcher saw the client close or reset the connection.
    """

    __slots__ = ("h11", "peer_gone", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)
        self.peer_gone = False

    @property
    def chunked(self) -> bool:
        """Whether a response without Content-Length is chunked (an HTTP/1.1 client)."""
        return self.h11.their_http_version == b"1.1"

    def encode(self, *events: h11.Event) -> bytes:
        """The wire bytes of ``events``, in order (h11 checks they are legal now).

        Raises:
            h11.LocalProtocolError: an event the state machine does not allow.
        """
        return b"".join(self.h11.send(event) or b"" for event in events)

    async def send(self, data: bytes, size: int | None = None) -> None:
        """Write ``data``: in one ``send_all``, or in writes of ``size`` bytes if given.

        Raises:
            trio.BrokenResourceError, trio.ClosedResourceError: the client is
                gone; the connection is then unusable (h11 state ERROR).
        """
        try:
            if size is None or size <= 0 or size >= len(data):
                await self.stream.send_all(data)
            else:
                view = memoryview(data)
                for start in range(0, len(data), size):
                    await self.stream.send_all(view[start : start + size])
        except BaseException:
            self.h11.send_failed()
            raise

    async def reply(self, reply: Reply, *, head_only: bool = False) -> None:
        """Send a whole response in one write; ``head_only`` leaves the body out (HEAD)."""
        headers = [
            (b"content-type", reply.content_type.encode()),
            (b"content-length", b"%d" % len(reply.body)),
        ]
        head = h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
        body = [] if head_only else [h11.Data(data=reply.body)]
        await self.send(self.encode(head, *body, h11.EndOfMessage()))

    async def watched(self, write: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``write`` (a streamed answer) while a watcher task reads the socket.

        Returns:
            What ``write`` returned, or ``None`` if the client left first: its
            EOF or reset cancels ``write`` at once (even in a sleep), and a
            write that finds the connection broken or closed ends the same way.
        """
        result: T | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, nursery.cancel_scope)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                result = await write()
            nursery.cancel_scope.cancel()
        return result

    async def _watch(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the client closes or resets the connection."""
        pipelined = 0
        try:
            while True:
                data = await self.stream.receive_some(READ_BYTES)
                if not data:
                    self.h11.receive_data(b"")
                    break
                self.h11.receive_data(bytes(data))
                pipelined += len(data)
                if pipelined > MAX_PIPELINED_BYTES:
                    return  # a flood: stop watching, keep streaming
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.peer_gone = True
        scope.cancel()

    async def read_request(self, max_body_bytes: int) -> Request | None:
        """The next whole request, or ``None`` when the client closed between requests.

        Raises:
            h11.RemoteProtocolError: bytes that are not HTTP/1.1 (or a cut request).
            PayloadTooLarge: the body is over ``max_body_bytes``.
            trio.BrokenResourceError: the connection broke.
        """
        head = await self._next_event()
        if not isinstance(head, h11.Request):
            return None  # ConnectionClosed (or PAUSED)
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body_bytes:
                    raise PayloadTooLarge("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                version = head.http_version
                return Request(head.method, head.target, head.headers, version, bytes(body))
            else:
                raise h11.RemoteProtocolError("connection closed inside a request", 400)

    async def _next_event(self) -> h11.Event | None:
        """The next event; ``None`` for PAUSED (never: the next cycle is always started)."""
        while True:
            event = self.h11.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                return None
            if self.h11.they_are_waiting_for_100_continue:
                await self.send(self.encode(h11.InformationalResponse(status_code=100, headers=[])))
            self.h11.receive_data(bytes(await self.stream.receive_some(READ_BYTES)))

    async def refuse(self, reply: Reply | None) -> None:
        """Best-effort ``reply`` on a connection about to close, if h11 still allows one."""
        if reply is None or self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError
        ):
            await self.reply(reply)


async def serve_connection(
    stream: trio.abc.Stream, respond: Respond, refuse: Refuse, *, max_body_bytes: int
) -> None:
    """Serve HTTP/1.1 on one connection until either side ends it, then close it.

    Args:
        stream: the connection (TCP, TLS, or one end of a memory stream pair);
            it is closed when this returns.
        respond: answers each request; returns whether the connection may be reused.
        refuse: the answer to a request that broke (see :data:`Refuse`).
        max_body_bytes: longest request body read; longer ones are refused.

    Never raises: peer errors end the connection quietly, and an unexpected
    error is logged and answered as ``refuse`` says.
    """
    conn = ClientConnection(stream)
    try:
        while True:
            try:
                request = await conn.read_request(max_body_bytes)
            except (h11.RemoteProtocolError, PayloadTooLarge) as exc:
                await conn.refuse(refuse(exc))
                return
            if request is None:
                return
            keep = await respond(request, conn)
            if not keep or conn.peer_gone:
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception as exc:  # a bug: keep serving the others
        logger.exception("emulator: unexpected error in a connection")
        await conn.refuse(refuse(exc))
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http(
    handle: Callable[[trio.abc.Stream], Awaitable[None]],
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host``/``port`` and run ``handle`` per connection until cancelled.

    Args:
        handle: serves one connection (a task each); usually
            :func:`serve_connection` with the emulator's hooks bound in.
        host: the address to bind (``"::1"`` for IPv6 loopback).
        port: the port; 0 picks a free one.
        ssl_context: serve HTTPS with this server context.
        task_status: reports the bound port once listening (``nursery.start``).

    Raises:
        OSError: the address cannot be bound.
    """
    tcp = await trio.open_tcp_listeners(port, host=host)
    listeners: list[trio.abc.Listener[Any]] = list(tcp)
    if ssl_context is not None:
        listeners = [trio.SSLListener(t, ssl_context, https_compatible=True) for t in tcp]
    task_status.started(tcp[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


class Listener:
    """What an emulator needs to listen: :meth:`serve` on a port, :attr:`base_url` once bound.

    A subclass provides :meth:`handle_connection` (one accepted connection)
    and may set :attr:`url_path`, appended to the origin in :attr:`base_url`.
    """

    #: appended to ``scheme://host:port`` in :attr:`base_url` (an SDK's base URL ends in /v1)
    url_path = ""

    def __init__(self) -> None:
        self.port = 0
        self._scheme = "http"
        self._host = "127.0.0.1"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` and :attr:`url_path` (``https`` when serving TLS)."""
        host = self._host if self._host not in ("", "0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"{self._scheme}://{host}:{self.port}{self.url_path}"

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection (the subclass's)."""
        raise NotImplementedError

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until cancelled.

        Args:
            host: address to bind.
            port: port to bind; 0 picks a free one (see :attr:`port`).
            ssl_context: serve HTTPS with this server context.
            task_status: reports readiness once listening (``nursery.start``).
        """
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(
                partial(serve_http, self.handle_connection, host=host, port=port,
                        ssl_context=ssl_context)
            )
            self._host = host
            if ssl_context is not None:
                self._scheme = "https"
            task_status.started()
