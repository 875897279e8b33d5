"""Files that clients name by URL: the address guard, the proxy tunnel, a request's budget.

Theory of operation
-------------------
A chat message may name files (``image_url`` and ``file`` parts, PROTOCOLS.md
1.4) by http(s) URL; the relay downloads them and uploads them to the
upstream. Those URLs are hostile until proven otherwise: without a guard, a
client could make the relay read its own loopback services, the cloud
metadata service (169.254.169.254) or anything on the private network
(server-side request forgery). So :class:`UrlFetcher` never lets httpcore
resolve a name. For every hop (the URL, then each redirect, at most
:data:`MAX_REDIRECTS`) it:

1. resolves the host itself, through a :data:`Resolver` (``getaddrinfo`` by
   default; tests inject one);
2. keeps only public addresses (:func:`protocol.urls.is_public_address`), unless
   ``allow_private_urls`` is set or the URL's origin is one the relay trusts
   (the emulators ``relay serve --demo`` started); none left is a 400
   ``forbidden_file_url``;
3. sends the request to the address it checked: the URL handed to httpcore
   carries that IP in place of the name, ``Host`` carries the name, and so
   does TLS (httpcore's ``sni_hostname`` extension: SNI and the certificate
   check use the name).

Step 3 is what makes the check hold with a proxy too (``upstream_proxy``).
The proxy itself is the operator's choice and trusted, wherever it is
(loopback included); only the targets are checked. Through an HTTP proxy,
an http URL goes out in absolute form (``GET http://<checked ip>:<port>/path``,
``Host: <name>``) and an https URL through ``CONNECT <checked ip>:<port>``,
with TLS to the name inside the tunnel. httpcore's own tunnel ignores
``sni_hostname`` (1.0.9), so the tunnel is ours (:class:`TunnelBackend`):
a network backend whose "connection" is a CONNECT through the proxy, on
which httpcore then starts TLS as on any connection. A SOCKS proxy goes
through httpcore's pool: its CONNECT carries the IP and it honours
``sni_hostname``. The backends refuse any host that is not an IP literal,
so nothing the fetcher did not check can be connected to; the check itself
happens once per hop, on the very address used, so DNS rebinding between a
check and a connect is not possible.

No connection is kept alive: one kept for ``a.example`` at some address
would otherwise serve ``b.example`` at the same address, with a certificate
checked for the first name only.

Budgets: one file is at most ``file_max_bytes``; the files of one request
(one :meth:`UrlFetcher.batch`) together at most ``files_max_bytes``, counted
as the bytes arrive (a body that crosses either limit is refused at once,
and a ``Content-Length`` over it before any body byte is read). How many
files a request may name, and how many are fetched at once, are decided
above (``relay/routes.py``, ``providers/files.py``).

Errors: everything a client's URL can cause is a 400 :class:`RequestError`
(``invalid_file_url``, ``forbidden_file_url``, ``file_too_large``,
``files_too_large``); nothing above this module sees an httpcore class.
"""

from __future__ import annotations

import mimetypes
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import certifi
import h11
import httpcore
import trio

from protocol.datauri import is_data_url, parse_data_url
from protocol.errors import RequestError
from protocol.urls import DEFAULT_PORTS, filename_from_url, ip_literal, is_public_address
from providers.contract import FetchedFile

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

    from protocol.urls import Origin
    from relay.config import Settings

MAX_REDIRECTS = 3
FETCH_USER_AGENT = b"Mozilla/5.0 (compatible; trio-llm-relay)"
#: connections the fetcher holds at once (all requests together)
FETCH_MAX_CONNECTIONS = 100
#: read size of a proxy's CONNECT answer
READ_BYTES = 64 * 1024
#: Resolves a host name (and port) to IP address strings.
Resolver = Callable[[str, int], Awaitable[list[str]]]

_REDIRECTS = (301, 302, 303, 307, 308)


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the system resolver's order (the default)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


# --- the network backends: checked IP literals only ---------------------------------------


class ForbiddenAddress(httpcore.ConnectError):
    """A connection to something the fetcher did not check."""


def _checked(host: str) -> str:
    if ip_literal(host) is None:
        raise ForbiddenAddress(f"{host} is not a checked address")
    return host


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A trio network backend that connects only to IP literals (the fetcher's checked ones).

    It never resolves a name, so no address reaches a socket without
    :class:`UrlFetcher`'s check; Unix sockets are refused.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_tcp(
            _checked(host), port, timeout, local_address, socket_options
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


class TunnelBackend(GuardedBackend):
    """Connects to checked IP literals through an HTTP proxy's ``CONNECT``.

    The stream returned is the tunnel: httpcore starts TLS on it as on a
    direct connection, with the ``sni_hostname`` the request names.
    """

    def __init__(
        self, proxy: httpcore.Proxy, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        super().__init__(inner)
        url = proxy.url
        if url.scheme not in (b"http", b"https"):
            raise ValueError("a CONNECT tunnel needs an http(s) proxy")
        self._proxy_host = url.host.decode("ascii")
        self._proxy_port = url.port or DEFAULT_PORTS[url.scheme.decode("ascii")]
        self._proxy_tls = url.scheme == b"https"
        self._proxy_ssl = proxy.ssl_context
        self._proxy_headers = list(proxy.headers)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = _checked(host)
        authority = (f"[{address}]:{port}" if ":" in address else f"{address}:{port}").encode()
        stream = await self._inner.connect_tcp(
            self._proxy_host, self._proxy_port, timeout, local_address, socket_options
        )
        try:
            if self._proxy_tls:
                context = self._proxy_ssl or ssl.create_default_context(cafile=certifi.where())
                stream = await stream.start_tls(context, self._proxy_host, timeout)
            await _open_tunnel(stream, authority, self._proxy_headers, timeout)
        except BaseException:
            await stream.aclose()
            raise
        return stream


async def _open_tunnel(
    stream: httpcore.AsyncNetworkStream,
    authority: bytes,
    proxy_headers: list[tuple[bytes, bytes]],
    timeout: float | None,  # noqa: ASYNC109 - httpcore's per-operation timeout
) -> None:
    """Send ``CONNECT authority`` on ``stream``; return once the proxy says 2xx.

    Raises:
        httpcore.ProxyError: the proxy refused, or answered something else.
    """
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method=b"CONNECT", target=authority, headers=[(b"Host", authority), *proxy_headers]
    )
    try:
        await stream.write(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""), timeout)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.read(READ_BYTES, timeout))
            elif isinstance(event, h11.Response):
                break
            elif not isinstance(event, h11.InformationalResponse):
                raise httpcore.ProxyError(f"the proxy answered CONNECT with {event!r}")
    except h11.ProtocolError as exc:
        raise httpcore.ProxyError(f"the proxy broke HTTP answering CONNECT: {exc}") from exc
    if not 200 <= event.status_code < 300:
        raise httpcore.ProxyError(f"the proxy answered CONNECT with {event.status_code}")
    if conn.trailing_data[0]:  # the server speaks first only after our TLS hello
        raise httpcore.ProxyError("the proxy sent bytes after its CONNECT answer")


def _pool(
    backend: httpcore.AsyncNetworkBackend,
    ssl_context: ssl.SSLContext | None,
    proxy: httpcore.Proxy | None = None,
) -> httpcore.AsyncConnectionPool:
    # no keep-alive: see the module comment
    return httpcore.AsyncConnectionPool(
        ssl_context=ssl_context, proxy=proxy, network_backend=backend,
        max_connections=FETCH_MAX_CONNECTIONS, max_keepalive_connections=0,
    )


def fetch_pools(
    settings: Settings,
    backend: httpcore.AsyncNetworkBackend | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, httpcore.AsyncConnectionPool]:
    """The pool for each URL scheme: direct, through a proxy, or through its tunnel.

    ``backend`` (tests) is what connects to the checked addresses or the
    proxy; ``ssl_context`` (tests) checks the file servers' certificates.
    """
    if not settings.upstream_proxy:
        direct = _pool(GuardedBackend(backend), ssl_context)
        return {"http": direct, "https": direct}
    proxy = httpcore.Proxy(settings.upstream_proxy)
    # the proxy is trusted: its own host is resolved and connected to as it is
    proxied = _pool(backend or httpcore.TrioBackend(), ssl_context, proxy)
    if proxy.url.scheme not in (b"http", b"https"):  # SOCKS: httpcore honours sni_hostname
        return {"http": proxied, "https": proxied}
    return {"http": proxied, "https": _pool(TunnelBackend(proxy, backend), ssl_context)}


# --- one request's files ------------------------------------------------------------------


class FileBudget:
    """The bytes all files of one request may take together (``files_max_bytes``)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def room(self) -> int:
        """Bytes still free."""
        return self.limit - self.used

    def take(self, size: int) -> None:
        """Count ``size`` more bytes.

        Raises:
            RequestError: (``files_too_large``) the request's files are now over the limit.
        """
        self.used += size
        if self.used > self.limit:
            raise self.exceeded()

    def exceeded(self) -> RequestError:
        return RequestError(
            f"the files of this request are over the {self.limit}-byte limit "
            "(RELAY_FILES_MAX_BYTES)",
            param="messages",
            code="files_too_large",
        )


@dataclass(frozen=True, slots=True)
class Target:
    """One hop's URL after the check: where the request goes and what it says."""

    scheme: str
    url: str  # the URL with the checked IP in place of the host name
    host: bytes  # the Host header: the name as the URL gave it
    sni: str | None  # the TLS server name (https with a host name only)


class FileBatch:
    """The files of one request: every fetch through it draws on one :class:`FileBudget`."""

    def __init__(self, fetcher: UrlFetcher, budget: FileBudget) -> None:
        self._fetcher = fetcher
        self.budget = budget

    async def fetch(self, url: str) -> FetchedFile:
        """As :meth:`UrlFetcher.fetch`, counting the bytes against the request's budget."""
        return await self._fetcher.fetch_within(url, self.budget)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _invalid(message: str) -> RequestError:
    return RequestError(message, code="invalid_file_url")


class UrlFetcher:
    """Resolves client file references (providers.contract.Fetcher)."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: Resolver = resolve_host,
        trusted_origins: Collection[Origin] = (),
        network_backend: httpcore.AsyncNetworkBackend | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """
        Args:
            settings: limits, timeouts, ``allow_private_urls``, ``upstream_proxy``.
            resolver: host name and port to addresses (tests map names to IPs).
            trusted_origins: (scheme, host, port) fetched whatever they resolve
                to: the emulators the demo started, nothing a client chose.
            network_backend: what the pools connect through (tests).
            ssl_context: checks https file servers (default: certifi's roots).
        """
        self._settings = settings
        self._resolve = resolver
        self._trusted = frozenset(trusted_origins)
        self._pools = fetch_pools(settings, network_backend, ssl_context)

    async def aclose(self) -> None:
        """Close the pools' connections."""
        for pool in {id(p): p for p in self._pools.values()}.values():
            await pool.aclose()

    def batch(self) -> FileBatch:
        """A new request's files: fetches through it share one ``files_max_bytes`` budget."""
        return FileBatch(self, FileBudget(self._settings.files_max_bytes))

    async def fetch(self, url: str) -> FetchedFile:
        """Download an http(s) URL or decode a data URL (one file, alone).

        Raises:
            RequestError: (400) malformed, forbidden, unreachable, an error
                status, or over a size limit; see the module comment.
        """
        return await self.batch().fetch(url)

    async def fetch_within(self, url: str, budget: FileBudget) -> FetchedFile:
        """As :meth:`fetch`, counting the bytes against ``budget`` as they arrive."""
        file_limit = self._settings.file_max_bytes
        if is_data_url(url):
            try:
                decoded = parse_data_url(url, min(file_limit, budget.room))
            except RequestError as exc:
                if exc.code == "file_too_large" and budget.room < file_limit:
                    raise budget.exceeded() from exc
                raise
            budget.take(len(decoded.data))
            return FetchedFile(decoded.filename(), decoded.mime, decoded.data)
        if urllib.parse.urlsplit(url).scheme.lower() not in DEFAULT_PORTS:
            raise _invalid("file URLs must be http(s):// or data: URLs")
        current = url
        try:
            with trio.fail_after(self._settings.upload_timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    result = await self._get(current, budget)
                    if isinstance(result, FetchedFile):
                        return result
                    current = urllib.parse.urljoin(current, result)
        except trio.TooSlowError as exc:
            raise _invalid(f"fetching {url} timed out") from exc
        raise _invalid(f"too many redirects fetching {url}")

    async def _target(self, url: str) -> Target:
        """Resolve and check ``url``'s host; the URL to request instead.

        Raises:
            RequestError: ``invalid_file_url`` (not http(s), no host, a bad
                port, a name that does not resolve) or ``forbidden_file_url``.
        """
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise _invalid(f"file URL {url} has an invalid port") from exc
        if scheme not in DEFAULT_PORTS or not host:
            raise _invalid(f"file URL {url} is not an http(s) URL with a host")
        default_port = DEFAULT_PORTS[scheme]
        port = default_port if port is None else port
        literal = ip_literal(host)
        if literal is not None:
            name = str(literal)
            addresses = [name]
        else:
            try:
                name = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise _invalid(f"file URL {url} has an invalid host name") from exc
            try:
                addresses = await self._resolve(name, port)
            except OSError as exc:
                raise _invalid(f"cannot resolve the host of {url}: {exc}") from exc
        if not (self._settings.allow_private_urls or (scheme, host, port) in self._trusted):
            addresses = [a for a in addresses if is_public_address(a)]
            if not addresses:
                raise RequestError(
                    f"file URL {url} points at a private or local address; "
                    "set RELAY_ALLOW_PRIVATE_URLS=true to allow it",
                    code="forbidden_file_url",
                )
        if not addresses:
            raise _invalid(f"the host of {url} resolves to no address")
        address = addresses[0].split("%", 1)[0]
        at = f"[{address}]" if ":" in address else address
        bracketed = f"[{name}]" if ":" in name else name
        return Target(
            scheme=scheme,
            url=urllib.parse.urlunsplit((scheme, f"{at}:{port}", parts.path or "/",
                                         parts.query, "")),
            host=(bracketed if port == default_port else f"{bracketed}:{port}").encode(),
            sni=name if scheme == "https" and literal is None else None,
        )

    async def _get(self, url: str, budget: FileBudget) -> FetchedFile | str:
        """GET one URL: the file, or the next URL when redirected."""
        s = self._settings
        target = await self._target(url)
        extensions: dict[str, object] = {"timeout": {
            "connect": s.connect_timeout, "read": s.upload_timeout,
            "write": s.upload_timeout, "pool": s.upload_timeout,
        }}
        if target.sni is not None:
            extensions["sni_hostname"] = target.sni
        pool = self._pools[target.scheme]
        file_limit = s.file_max_bytes
        try:
            async with pool.stream(
                b"GET", target.url,
                headers=[(b"Host", target.host), (b"User-Agent", FETCH_USER_AGENT),
                         (b"Accept", b"*/*")],
                extensions=extensions,
            ) as response:
                status = response.status
                if status in _REDIRECTS:
                    location = _header(response.headers, b"location")
                    if not location:
                        raise _invalid(f"{url} redirects nowhere")
                    return location.decode("latin-1")
                if status >= 400:
                    raise _invalid(f"file URL {url} answered HTTP {status}")
                too_large = RequestError(
                    f"file at {url} is over the {file_limit}-byte limit", code="file_too_large"
                )
                length = _header(response.headers, b"content-length")
                if length is not None and length.isdigit():
                    if int(length) > file_limit:
                        raise too_large
                    if int(length) > budget.room:
                        raise budget.exceeded()
                data = bytearray()
                async for chunk in response.aiter_stream():
                    data += chunk
                    if len(data) > file_limit:
                        raise too_large
                    budget.take(len(chunk))
                content_type = _header(response.headers, b"content-type") or b""
        except ForbiddenAddress as exc:  # a bug: the fetcher hands the pools checked IPs only
            raise RequestError(f"file URL {url} was not checked",
                               code="forbidden_file_url") from exc
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                httpcore.UnsupportedProtocol, httpcore.ProxyError) as exc:
            raise _invalid(f"could not fetch file URL {url}: {type(exc).__name__}") from exc
        name = filename_from_url(url)
        mime = content_type.split(b";", 1)[0].strip().decode("latin-1").lower()
        if not mime or mime == "application/octet-stream":
            mime = mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"
        return FetchedFile(name, mime, bytes(data))
