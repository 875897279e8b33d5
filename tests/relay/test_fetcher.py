"""Tests of relay/fetcher.py: UrlFetcher, the private-address guard, proxies, budgets.

File servers are :class:`tests.relay.test_upstream.TinyServer` (an h11 server on
127.0.0.1 port 0); proxies are :class:`RecordingProxy`, an h11 HTTP proxy on
loopback that records each request line or CONNECT target and forwards it.
There is no internet here, so tests that need a "public" host inject a
resolver that maps a name to a public-looking address and let the proxy
(which the guard trusts) send it to loopback instead.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import h11
import pytest
import trio
import trustme

from protocol.errors import RequestError
from protocol.urls import is_public_address, origin_of
from providers.contract import FetchedFile
from relay import fetcher as fetcher_module
from relay.config import Settings
from relay.fetcher import (
    FETCH_USER_AGENT,
    MAX_REDIRECTS,
    GuardedBackend,
    UrlFetcher,
)
from tests.relay.test_upstream import (
    HANG,
    IO_LIMIT_S,
    SHORT_S,
    Reply,
    TinyServer,
    refused_port,
    settings_for,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable


@pytest.fixture
async def server(nursery: trio.Nursery) -> TinyServer:
    """A running TinyServer with no routes yet (tests fill in ``routes``)."""
    tiny = TinyServer()
    await nursery.start(tiny.serve)
    return tiny


@asynccontextmanager
async def fetcher(
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None, **changes: object
) -> AsyncIterator[UrlFetcher]:
    """A UrlFetcher (private addresses allowed unless told otherwise), closed afterwards.

    ``resolver``: the fetcher's (default: the system's).
    """
    changes.setdefault("allow_private_urls", True)
    if resolver is None:
        fetch = UrlFetcher(settings_for(**changes))
    else:
        fetch = UrlFetcher(settings_for(**changes), resolver=resolver)
    try:
        yield fetch
    finally:
        await fetch.aclose()


# === UrlFetcher: data URLs and schemes ====================================================


async def test_fetch_base64_data_url() -> None:
    """A base64 data URL becomes a FetchedFile with its MIME type and a name with the
    matching extension."""
    async with fetcher() as fetch:
        got = await fetch.fetch("data:image/png;base64,iVBORw0KGgo=")
    assert got.mime == "image/png"
    assert got.name.endswith(".png")
    assert got.data == b"\x89PNG\r\n\x1a\n"


async def test_fetch_percent_encoded_data_url() -> None:
    """A percent-encoded data URL decodes to its bytes, named after its MIME type."""
    async with fetcher() as fetch:
        got = await fetch.fetch("data:text/plain,hello%20world")
    assert got == FetchedFile(got.name, "text/plain", b"hello world")
    assert got.name.endswith(".txt")


async def test_fetch_data_url_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A data URL over file_max_bytes is RequestError file_too_large, refused from its
    encoded length without decoding it."""
    import binascii

    def must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded a data URL over the limit")

    monkeypatch.setattr(binascii, "a2b_base64", must_not_decode)
    async with fetcher(file_max_bytes=1000) as fetch:
        with pytest.raises(RequestError) as info:
            await fetch.fetch("data:image/png;base64," + "QUFB" * 1000)
    assert info.value.code == "file_too_large"


async def test_fetch_bad_base64() -> None:
    """A data URL that is not base64 is RequestError (invalid_file_url)."""
    async with fetcher() as fetch:
        with pytest.raises(RequestError) as info:
            await fetch.fetch("data:image/png;base64,&&&&")
    assert info.value.code == "invalid_file_url"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "/relative/path.png",
        "",
    ],
)
async def test_fetch_refuses_other_schemes(url: str) -> None:
    """Only http, https and data URLs are fetched; anything else is RequestError
    (invalid_file_url) without any network activity."""
    async with fetcher() as fetch:
        with pytest.raises(RequestError) as info:
            await fetch.fetch(url)
    assert info.value.code == "invalid_file_url"


# === UrlFetcher: http ============================================================


async def test_fetch_http_file(server: TinyServer) -> None:
    """An http URL is fetched with a GET; the name is the last path segment without the
    query, the MIME type comes from Content-Type (parameters dropped)."""
    server.routes["/files/report%20final.pdf"] = Reply(
        200, [(b"Content-Type", b"Application/PDF; charset=binary")], [b"%PDF-1.4", b" body"]
    )
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            got = await fetch.fetch(server.url("/files/report%20final.pdf?sig=abc&x=1"))
    assert got == FetchedFile("report final.pdf", "application/pdf", b"%PDF-1.4 body")
    (seen,) = server.requests
    assert seen.method == b"GET"
    assert seen.target == b"/files/report%20final.pdf?sig=abc&x=1"
    assert seen.headers[b"user-agent"] == FETCH_USER_AGENT


@pytest.mark.parametrize(
    ("path", "content_type", "expected"),
    [
        ("/photo.jpg", None, "image/jpeg"),
        ("/photo.jpg", b"application/octet-stream", "image/jpeg"),
        ("/doc.pdf", b"", "application/pdf"),
        ("/blob.unknownext", None, "application/octet-stream"),
        ("/photo.jpg", b"image/webp", "image/webp"),
    ],
)
async def test_fetch_guesses_mime_from_the_name(
    server: TinyServer, path: str, content_type: bytes | None, expected: str
) -> None:
    """Without a useful Content-Type (absent, empty, octet-stream) the MIME type is
    guessed from the file name; a real Content-Type wins over the name."""
    headers = [] if content_type is None else [(b"Content-Type", content_type)]
    server.routes[path] = Reply(200, headers, [b"bytes"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            got = await fetch.fetch(server.url(path))
    assert got.mime == expected


async def test_fetch_http_error_status(server: TinyServer) -> None:
    """A file URL answering 404 is RequestError (400, invalid_file_url) naming the status."""
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError, match="404") as info:
                await fetch.fetch(server.url("/missing.png"))
    assert info.value.code == "invalid_file_url"
    assert info.value.status == 400


async def test_fetch_content_length_over_the_limit_is_refused_before_reading(
    server: TinyServer,
) -> None:
    """A Content-Length over file_max_bytes is refused at once: the server never sends
    the body, so reading it would hang."""
    server.routes["/huge.bin"] = Reply(200, [(b"Content-Length", b"1000")], [HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(file_max_bytes=100) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/huge.bin"))
    assert info.value.code == "file_too_large"


async def test_fetch_body_over_the_limit_is_refused_while_reading(server: TinyServer) -> None:
    """A body without Content-Length that grows past file_max_bytes is refused as soon as
    it does, without waiting for the rest."""
    server.routes["/grow.bin"] = Reply(200, [], [b"x" * 60, b"x" * 60, HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(file_max_bytes=100) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/grow.bin"))
    assert info.value.code == "file_too_large"


async def test_fetch_body_at_the_limit_is_accepted(server: TinyServer) -> None:
    """A body of exactly file_max_bytes is fetched."""
    server.routes["/exact.bin"] = Reply(200, [], [b"y" * 50, b"y" * 50])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(file_max_bytes=100) as fetch:
            got = await fetch.fetch(server.url("/exact.bin"))
    assert got.data == b"y" * 100


async def test_fetch_unreachable_is_request_error() -> None:
    """A file URL nobody answers on is RequestError (invalid_file_url), not a 502."""
    async with fetcher() as fetch:
        with pytest.raises(RequestError) as info:
            await fetch.fetch(f"http://127.0.0.1:{refused_port()}/a.png")
    assert info.value.code == "invalid_file_url"


async def test_fetch_times_out(server: TinyServer) -> None:
    """A file server that never answers is RequestError after upload_timeout."""
    server.routes["/slow.png"] = Reply(silent=True)
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(upload_timeout=SHORT_S) as fetch:
            with pytest.raises(RequestError, match=r"timed out|ReadTimeout") as info:
                await fetch.fetch(server.url("/slow.png"))
    assert info.value.code == "invalid_file_url"


# === UrlFetcher: redirects ======================================================


def redirect(location: bytes, status: int = 302) -> Reply:
    """A reply redirecting to ``location``."""
    return Reply(status, [(b"Location", location)])


async def test_fetch_follows_redirects_up_to_the_limit(server: TinyServer) -> None:
    """MAX_REDIRECTS (3) redirects of any kind, absolute or relative, are followed; the
    name comes from the final URL."""
    assert MAX_REDIRECTS == 3
    server.routes["/r1"] = redirect(server.url("/r2").encode(), 301)
    server.routes["/r2"] = redirect(b"/dir/r3", 307)
    server.routes["/dir/r3"] = redirect(b"../final.png", 308)
    server.routes["/final.png"] = Reply(200, [(b"Content-Type", b"image/png")], [b"PNG"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            got = await fetch.fetch(server.url("/r1"))
    assert got == FetchedFile("final.png", "image/png", b"PNG")
    assert [r.target for r in server.requests] == [b"/r1", b"/r2", b"/dir/r3", b"/final.png"]


async def test_fetch_refuses_too_many_redirects(server: TinyServer) -> None:
    """A fourth redirect is RequestError (invalid_file_url); the fifth URL is never asked."""
    for number in range(1, 5):
        server.routes[f"/r{number}"] = redirect(f"/r{number + 1}".encode(), 303)
    server.routes["/r5"] = Reply(200, [], [b"unreachable"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError, match="redirects") as info:
                await fetch.fetch(server.url("/r1"))
    assert info.value.code == "invalid_file_url"
    assert [r.target for r in server.requests] == [b"/r1", b"/r2", b"/r3", b"/r4"]


async def test_fetch_redirect_loop_ends(server: TinyServer) -> None:
    """A redirect to itself ends with RequestError, not a loop."""
    server.routes["/loop"] = redirect(b"/loop")
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError):
                await fetch.fetch(server.url("/loop"))
    assert len(server.requests) == MAX_REDIRECTS + 1


async def test_fetch_redirect_without_location(server: TinyServer) -> None:
    """A redirect status without Location is RequestError."""
    server.routes["/nowhere"] = Reply(302)
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError, match="redirects nowhere"):
                await fetch.fetch(server.url("/nowhere"))


async def test_fetch_redirect_to_another_scheme_is_refused(server: TinyServer) -> None:
    """A redirect to file:// is not followed into the file system: RequestError."""
    server.routes["/sneaky"] = redirect(b"file:///etc/passwd")
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher() as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/sneaky"))
    assert info.value.code == "invalid_file_url"


# === UrlFetcher: the private-address guard ===============================================


async def test_loopback_url_is_refused_by_default(server: TinyServer) -> None:
    """With allow_private_urls off (the default), an http URL on 127.0.0.1 is
    RequestError forbidden_file_url, and nothing reaches the server."""
    server.routes["/secret"] = Reply(200, [], [b"internal"])
    assert Settings().allow_private_urls is False
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/secret"))
    assert info.value.code == "forbidden_file_url"
    assert "RELAY_ALLOW_PRIVATE_URLS" in info.value.message
    assert server.requests == []


async def test_loopback_url_is_fetched_when_allowed(server: TinyServer) -> None:
    """With allow_private_urls on, the same loopback URL is fetched."""
    server.routes["/secret"] = Reply(200, [], [b"internal"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=True) as fetch:
            got = await fetch.fetch(server.url("/secret"))
    assert got.data == b"internal"


@pytest.mark.parametrize(
    "host",
    ["localhost", "[::1]", "127.1", "0.0.0.0", "[::ffff:127.0.0.1]", "10.0.0.1"],  # noqa: S104
)
async def test_private_hosts_are_refused(server: TinyServer, host: str) -> None:
    """Host names and literals that resolve to loopback, unspecified or private
    addresses are refused with forbidden_file_url, before any connection."""
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(f"http://{host}:{server.port}/secret")
    assert info.value.code == "forbidden_file_url"
    assert server.requests == []


async def test_redirect_to_a_private_address_is_refused(
    server: TinyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard applies to every hop: with 127.0.0.1 treated as public (so the first hop
    is allowed), a redirect to 127.0.0.2 is refused with forbidden_file_url rather than
    connected to (which would give connection refused, invalid_file_url)."""
    monkeypatch.setattr(fetcher_module, "is_public_address", lambda address: address == "127.0.0.1")
    server.routes["/hop"] = redirect(f"http://127.0.0.2:{refused_port()}/admin".encode())
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(server.url("/hop"))
    assert info.value.code == "forbidden_file_url"
    assert [r.target for r in server.requests] == [b"/hop"]


async def test_guarded_backend_refuses_unix_sockets() -> None:
    """The guarded backend never connects to a Unix socket."""
    backend = GuardedBackend()
    with pytest.raises(fetcher_module.ForbiddenAddress):
        await backend.connect_unix_socket("/var/run/docker.sock")


# === Through a proxy =======================================================================

PUBLIC_IP = "93.184.216.34"  # what the tests' resolver says files.example is


@dataclass
class ProxyRecord:
    """One request the proxy received: its line and its Host header."""

    method: bytes
    target: bytes
    host: bytes | None


class RecordingProxy:
    """An HTTP proxy on loopback that records each request line or CONNECT target.

    Absolute-form requests are forwarded in origin form; a CONNECT is answered
    200 and its bytes tunnelled. Both go to ``route(host, port)`` of the target
    (by default the target itself), so a test can send "public" addresses to a
    loopback server.
    """

    def __init__(self, route: Callable[[str, int], tuple[str, int]] | None = None) -> None:
        self.route = route or (lambda host, port: (host, port))
        self.seen: list[ProxyRecord] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 port 0; report readiness through ``task_status``."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     h11.ProtocolError, OSError):
                while True:
                    request, body = await self._read_request(stream, conn)
                    if request is None:
                        return
                    host = {k.lower(): v for k, v in request.headers}.get(b"host")
                    self.seen.append(ProxyRecord(request.method, request.target, host))
                    if request.method == b"CONNECT":
                        await self._tunnel(stream, conn, request.target.decode())
                        return
                    await self._forward(stream, conn, request, body)
                    if conn.our_state is not h11.DONE:
                        return
                    conn.start_next_cycle()

    @staticmethod
    async def _read_request(
        stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes]:
        request, body = None, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:
                return None, b""

    async def _forward(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, body: bytes
    ) -> None:
        url = urllib.parse.urlsplit(request.target.decode())
        assert url.hostname is not None, "not an absolute-form request"
        address = self.route(url.hostname, url.port or 80)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [(k, v) for k, v in request.headers if k.lower() != b"connection"]
        client = h11.Connection(h11.CLIENT)
        async with await trio.open_tcp_stream(*address) as upstream:
            await upstream.send_all(
                client.send(h11.Request(method=request.method, target=path,
                                        headers=[*headers, (b"Connection", b"close")]))
                + (client.send(h11.Data(data=body)) if body else b"")
                + (client.send(h11.EndOfMessage()) or b"")
            )
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(bytes(await upstream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    kept = [(k, v) for k, v in event.headers if k.lower() != b"connection"]
                    await stream.send_all(conn.send(
                        h11.Response(status_code=event.status_code, headers=kept)))
                elif isinstance(event, h11.Data):
                    await stream.send_all(conn.send(h11.Data(data=event.data)))
                elif isinstance(event, h11.EndOfMessage):
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    return

    async def _tunnel(self, stream: trio.SocketStream, conn: h11.Connection, target: str) -> None:
        host, _, port = target.rpartition(":")
        upstream = await trio.open_tcp_stream(*self.route(host.strip("[]"), int(port)))
        async with upstream:
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))

            async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await source.receive_some(65536):
                        await sink.send_all(data)
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, stream, upstream)
                nursery.start_soon(pipe, upstream, stream)


def resolver(names: dict[str, str]) -> Callable[[str, int], Awaitable[list[str]]]:
    """A resolver that knows ``names`` (name -> address) and nothing else."""

    async def resolve(host: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        if host not in names:
            raise OSError(f"unknown host {host}")
        return [names[host]]

    return resolve


def to_server(server: TinyServer) -> Callable[[str, int], tuple[str, int]]:
    """A proxy route sending every target to ``server``."""
    return lambda host, port: ("127.0.0.1", server.port)


@pytest.mark.parametrize(
    ("url", "proxy_public"),
    [
        ("http://127.0.0.2:{port}/secret", True),
        ("http://169.254.169.254/latest/meta-data/", True),
        ("http://[::1]:{port}/secret", True),
        ("http://[64:ff9b::7f00:1]:{port}/secret", True),
        ("http://127.0.0.1:{port}/secret", False),
        ("http://localhost:{port}/secret", False),
        ("https://127.0.0.1:{port}/secret", False),
    ],
)
async def test_proxy_does_not_carry_private_targets(
    server: TinyServer,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    proxy_public: bool,
) -> None:
    """With a proxy, the guard judges the file URL's address, not the proxy's: loopback,
    link-local (metadata) and NAT64-of-loopback URLs are refused with forbidden_file_url
    and the proxy is never asked, also when the proxy's own address (127.0.0.1) is
    counted as public (as a proxy on a public address would be)."""
    if proxy_public:
        real = is_public_address
        monkeypatch.setattr(fetcher_module, "is_public_address",
                            lambda address: address == "127.0.0.1" or real(address))
    proxy = RecordingProxy(to_server(server))
    await nursery.start(proxy.serve)
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False, upstream_proxy=proxy.url) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch(url.format(port=server.port))
    assert info.value.code == "forbidden_file_url"
    assert proxy.seen == []
    assert server.requests == []


async def test_loopback_proxy_carries_public_names_to_the_checked_address(
    server: TinyServer, nursery: trio.Nursery
) -> None:
    """A proxy on loopback does not make public URLs forbidden: files.example (public)
    is fetched through it, the request line names the address the fetcher checked,
    and Host names files.example."""
    server.routes["/a.png"] = Reply(200, [(b"Content-Type", b"image/png")], [b"PNG"])
    proxy = RecordingProxy(to_server(server))
    await nursery.start(proxy.serve)
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False, upstream_proxy=proxy.url,
                           resolver=resolver({"files.example": PUBLIC_IP})) as fetch:
            got = await fetch.fetch("http://files.example/a.png?v=1")
    assert got == FetchedFile("a.png", "image/png", b"PNG")
    assert proxy.seen == [
        ProxyRecord(b"GET", f"http://{PUBLIC_IP}:80/a.png?v=1".encode(), b"files.example")
    ]
    assert server.requests[0].headers[b"host"] == b"files.example"


async def test_proxy_request_line_carries_the_checked_private_address(
    server: TinyServer, nursery: trio.Nursery
) -> None:
    """With allow_private_urls and a proxy, a name is still resolved by the fetcher: the
    request line carries the address (127.0.0.1) and Host the name with its port."""
    server.routes["/doc.txt"] = Reply(200, [], [b"text"])
    proxy = RecordingProxy()
    await nursery.start(proxy.serve)
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=True, upstream_proxy=proxy.url,
                           resolver=resolver({"intranet.example": "127.0.0.1"})) as fetch:
            got = await fetch.fetch(f"http://intranet.example:{server.port}/doc.txt")
    assert got.data == b"text"
    host = f"intranet.example:{server.port}".encode()
    assert proxy.seen == [
        ProxyRecord(b"GET", f"http://127.0.0.1:{server.port}/doc.txt".encode(), host)
    ]


async def test_proxy_redirect_to_a_private_address_is_refused(
    server: TinyServer, nursery: trio.Nursery
) -> None:
    """Every redirect hop is checked through a proxy too: files.example (public) redirecting
    to 127.0.0.1 is forbidden_file_url, and the proxy sees only the first hop."""
    server.routes["/hop"] = redirect(f"http://127.0.0.1:{server.port}/admin".encode())
    server.routes["/admin"] = Reply(200, [], [b"internal"])
    proxy = RecordingProxy(to_server(server))
    await nursery.start(proxy.serve)
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=False, upstream_proxy=proxy.url,
                           resolver=resolver({"files.example": PUBLIC_IP})) as fetch:
            with pytest.raises(RequestError) as info:
                await fetch.fetch("http://files.example/hop")
    assert info.value.code == "forbidden_file_url"
    assert [seen.target for seen in proxy.seen] == [f"http://{PUBLIC_IP}:80/hop".encode()]


class TlsServer(TinyServer):
    """A TinyServer behind TLS, with a certificate for files.example."""

    def __init__(self, ca: trustme.CA) -> None:
        super().__init__()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("files.example").configure_cert(self.context)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        tls = [trio.SSLListener(listener, self.context) for listener in listeners]
        task_status.started()
        handle = cast("Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]",
                      self._handle)
        await trio.serve_listeners(handle, tls)


async def test_https_through_a_proxy_connects_to_the_checked_address(
    nursery: trio.Nursery,
) -> None:
    """An https URL goes through CONNECT <checked address>:443; inside the tunnel TLS is
    made to the name (SNI and the certificate check: the certificate is for
    files.example only) and Host is the name."""
    ca = trustme.CA()
    tls_server = TlsServer(ca)
    tls_server.routes["/report.pdf"] = Reply(200, [(b"Content-Type", b"application/pdf")],
                                             [b"%PDF"])
    await nursery.start(tls_server.serve)
    proxy = RecordingProxy(lambda host, port: ("127.0.0.1", tls_server.port))
    await nursery.start(proxy.serve)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    settings = settings_for(allow_private_urls=False, upstream_proxy=proxy.url)
    fetch = UrlFetcher(settings, resolver=resolver({"files.example": PUBLIC_IP}),
                       ssl_context=client_context)
    try:
        with trio.fail_after(IO_LIMIT_S):
            got = await fetch.fetch("https://files.example/report.pdf")
    finally:
        await fetch.aclose()
    assert got == FetchedFile("report.pdf", "application/pdf", b"%PDF")
    assert proxy.seen == [ProxyRecord(b"CONNECT", f"{PUBLIC_IP}:443".encode(),
                                      f"{PUBLIC_IP}:443".encode())]
    assert tls_server.requests[0].headers[b"host"] == b"files.example"


async def test_direct_fetch_connects_to_the_checked_address(server: TinyServer) -> None:
    """Without a proxy the name is resolved once, by the fetcher, and the connection goes
    to that address with Host naming the name (the name is never resolved again)."""
    server.routes["/x.txt"] = Reply(200, [], [b"x"])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(allow_private_urls=True,
                           resolver=resolver({"files.example": "127.0.0.1"})) as fetch:
            got = await fetch.fetch(f"http://files.example:{server.port}/x.txt")
    assert got.data == b"x"
    assert server.requests[0].headers[b"host"] == f"files.example:{server.port}".encode()
    assert server.requests[0].target == b"/x.txt"


async def test_the_backend_connects_to_ip_literals_only() -> None:
    """The fetcher's network backend refuses a host name: whatever reaches a socket is
    an address the fetcher checked."""
    with pytest.raises(fetcher_module.ForbiddenAddress):
        await GuardedBackend().connect_tcp("localhost", 80)


# === Trusted origins ======================================================================


async def test_trusted_origin_is_fetched_and_nothing_else(server: TinyServer) -> None:
    """An origin the relay trusts (scheme, host, port) is fetched on loopback without
    allow_private_urls; another port on the same host, or another host name for the
    same address, is still refused."""
    server.routes["/img.png"] = Reply(200, [], [b"PNG"])
    trusted = [origin_of(server.url("/"))]
    settings = settings_for(allow_private_urls=False)
    fetch = UrlFetcher(settings, trusted_origins=trusted)
    try:
        with trio.fail_after(IO_LIMIT_S):
            assert (await fetch.fetch(server.url("/img.png"))).data == b"PNG"
            for url in (f"http://127.0.0.1:{refused_port()}/img.png",
                        f"http://localhost:{server.port}/img.png"):
                with pytest.raises(RequestError) as info:
                    await fetch.fetch(url)
                assert info.value.code == "forbidden_file_url"
    finally:
        await fetch.aclose()


# === One request's byte budget ==============================================================


async def test_batch_refuses_the_file_that_crosses_the_budget_while_it_streams(
    server: TinyServer,
) -> None:
    """The files of one batch share files_max_bytes: after a 60-byte file, a second one
    is refused (files_too_large) as soon as its bytes cross 100, not when it ends
    (it never does)."""
    server.routes["/first.bin"] = Reply(200, [], [b"1" * 60])
    server.routes["/second.bin"] = Reply(200, [], [b"2" * 30, b"2" * 20, HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(files_max_bytes=100, file_max_bytes=1000) as fetch:
            batch = fetch.batch()
            assert len((await batch.fetch(server.url("/first.bin"))).data) == 60
            with pytest.raises(RequestError) as info:
                await batch.fetch(server.url("/second.bin"))
    assert (info.value.code, info.value.status) == ("files_too_large", 400)


async def test_batch_refuses_a_content_length_over_what_is_left(server: TinyServer) -> None:
    """A Content-Length over what is left of the budget is refused before the body."""
    server.routes["/first.bin"] = Reply(200, [], [b"1" * 60])
    server.routes["/announced.bin"] = Reply(200, [(b"Content-Length", b"50")], [HANG])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(files_max_bytes=100, file_max_bytes=1000) as fetch:
            batch = fetch.batch()
            await batch.fetch(server.url("/first.bin"))
            with pytest.raises(RequestError) as info:
                await batch.fetch(server.url("/announced.bin"))
    assert info.value.code == "files_too_large"


async def test_batch_counts_data_urls() -> None:
    """Decoded data URLs draw on the batch's budget too."""
    data_url = "data:application/octet-stream;base64," + "QUFB" * 20  # 60 bytes
    async with fetcher(files_max_bytes=100) as fetch:
        batch = fetch.batch()
        await batch.fetch(data_url)
        with pytest.raises(RequestError) as info:
            await batch.fetch(data_url)
    assert info.value.code == "files_too_large"


async def test_batches_have_budgets_of_their_own(server: TinyServer) -> None:
    """Another request (another batch, or a lone fetch) starts with the whole budget."""
    server.routes["/sixty.bin"] = Reply(200, [], [b"6" * 60])
    with trio.fail_after(IO_LIMIT_S):
        async with fetcher(files_max_bytes=100) as fetch:
            for _ in range(2):
                await fetch.batch().fetch(server.url("/sixty.bin"))
                await fetch.fetch(server.url("/sixty.bin"))
    assert len(server.requests) == 4
