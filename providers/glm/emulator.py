"""A faithful fake chatglm.cn: a real HTTP/1.1 server on trio + h11.

Tests, ``bench/`` (as a separate process, see :func:`main`) and
``relay serve --demo`` (in process) talk to this server instead of the real
site. It speaks what PROTOCOLS.md section 3 says chatglm.cn speaks, records
what it was asked in :class:`GlmRecord`, and misbehaves on request through
the knobs of :class:`GlmBehavior`, which tests may change between requests
(each stream copies it when it starts).

Theory of operation.

*Connections.* :mod:`providers.emulator_http` runs the HTTP/1.1 plumbing:
one task per TCP (or TLS) connection serves requests one after the other
(HTTP/1.1 keep-alive), each answered by ``GlmEmulator._respond``, until the
client closes, a request says ``Connection: close``, or something breaks.
Every connection ends on its own: client errors close it quietly (bad HTTP
is answered 400, a body over :data:`MAX_BODY_BYTES` 413), and an unexpected
exception (a bug) is logged and kept in ``record.handler_errors`` instead of
taking the whole server down; tests assert that list is empty.

*Unary calls* (3.6) answer HTTP 200 with a JSON envelope, as the site does,
even for errors: success ``{"status": 0, "message": "success", "result":
...}``, errors ``{"code": N, "message": ...}``. ``behavior.error_field``
swaps the two field names (the live site's choice per endpoint is not
established, so clients must accept both). The expired-refresh answer is
``{"status": 1, "message": "40102 ..."}``, or ``{"code": 40102, ...}`` when
swapped. Checks run in the site's order: signature (3.4), then bearer
token, then the body.

*Accounts.* A refresh token is an account. The refresh call hands out an
access token tied to it, valid for ``behavior.access_ttl_s`` seconds of
trio's clock (so autojump clocks can expire it); the refresh token comes
back unchanged (whether the site rotates it is not established). Per
account the emulator counts open streams: with
``one_stream_per_account`` a second stream is refused with a non-SSE JSON
envelope (the site's README: one output stream per account at a time).
The record keys accounts by :func:`account_key`, never by the token.

*Streams.* ``/assistant/stream`` answers ``text/event-stream``, chunked,
with the snapshot events of :mod:`providers.glm.emulator_script`.
``frame_delay_s`` is slept where the script says ``PAUSE``: before each
event that starts or grows a part, never before a part's finish event or
the final one, so the answer ends right after its last frame. While
the answer is written the helper's watcher reads the socket: EOF from the client
cancels the stream at once (even while stalled or sleeping between frames),
and the stream counts as aborted. The account is released just before the
final event goes out, so a client that reacts to ``finish`` by starting the
next stream on the same account is not refused. Misbehaviour knobs act on
the wire bytes after h11's chunked framing: ``write_size`` cuts them into
TCP writes of that many bytes (inside SSE lines and UTF-8 characters),
``pack_all`` sends the whole answer in one write. The answer text is
``behavior.answer`` when a test set one; otherwise an agent prompt (tools,
tool results, a JSON instruction) gets
:func:`providers.emulator_agent.agent_answer`'s scripted answer (without
citation markers, which would break its blocks), and any other prompt the
demo answer; the snapshots grow by ``chunk_chars``, so a ``<tool_call>``
block arrives split across events.

*Record.* :class:`GlmRecord` keeps a list entry per request. A long
benchmark run starts the emulator with ``--no-record``
(``keep_record=False``): the counters are kept, the per-request lists are
not, so its memory does not grow with the number of requests.

*Files.* Uploads are parsed as ``multipart/form-data`` (RFC 7578) and kept in
memory; ``GET /files/<id>/<name>`` serves them back, ``GET
/images/<name>.png`` serves a tiny valid PNG (image answers and video
covers point there), ``GET /videos/<name>.mp4`` a few placeholder bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import mimetypes
import re
import secrets
import struct
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol

import h11
import orjson
import trio

from protocol.errors import PayloadTooLarge, RequestError
from providers.emulator_agent import agent_answer
from providers.emulator_http import (
    ClientConnection,
    Reply,
    Request,
    serve_connection,
    serve_http,
)
from providers.emulator_main import run_emulator
from providers.emulator_script import (
    add_answer_flags,
    add_pacing_flags,
    add_record_flag,
    behavior_options,
)
from providers.glm.emulator_script import (
    Pace,
    ScriptSpec,
    SnapshotScript,
    cite,
    default_think,
    demo_answer,
    drawing_answer,
    prompt_last_line,
    prompt_text,
)
from providers.glm.signing import DEFAULT_SECRET, verify

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)

# PROTOCOLS.md 3.2: paths of the site.
REFRESH_PATH = "/chatglm/user-api/user/refresh"
STREAM_PATH = "/chatglm/backend-api/assistant/stream"
DELETE_PATH = "/chatglm/backend-api/assistant/conversation/delete"
UPLOAD_PATH = "/chatglm/backend-api/assistant/file_upload"
VIDEO_CHAT_PATH = "/chatglm/video-api/v1/chat"
VIDEO_STATUS_PREFIX = "/chatglm/video-api/v1/chat/status/"
VIDEO_COMPOSITE_PATH = "/chatglm/video-api/v1/static/composite_video"
VIDEO_UPLOAD_PATH = "/chatglm/video-api/v1/static/upload"
# Ours, not the site's: where answers' media point.
FILES_PREFIX = "/files/"
IMAGES_PREFIX = "/images/"
VIDEOS_PREFIX = "/videos/"

#: PROTOCOLS.md 3.2: the drawing assistant; it draws a default image.
DRAWING_ASSISTANT_ID = "65a232c082ff90a2ad2f15e2"

# Error codes. The site's own codes are not established (3.6); 401 and 40102
# are what the reference tests for, the 1000x ones are ours.
ERR_AUTH = 401
ERR_REFRESH_EXPIRED = 40102
ERR_SIGN = 10001
ERR_BUSY = 10002
ERR_PARAM = 10003
ERR_NOT_FOUND = 10004
#: "A conversation is in progress": the busy account's message.
BUSY_MESSAGE = "当前有对话正在进行中"

#: PROTOCOLS.md 3.8/4: the site takes files up to 100 MiB; leave room for the form.
MAX_BODY_BYTES = 101 * 1024 * 1024
#: Upload dimensions reported for images we cannot measure (3.8's example).
DEFAULT_IMAGE_SIZE = (800, 600)
#: A stream event that is not JSON (the ``malformed_after`` knob).
MALFORMED_DATA = b'{"conversation_id":"'

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FAKE_MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"


def _png(width: int, height: int) -> bytes:
    """A valid RGBA PNG of one colour (PNG spec: IHDR, zlib'd scanlines, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    rows = (b"\x00" + b"\x3c\x8c\xf0\xff" * width) * height  # filter byte 0 per row
    return (
        _PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


#: What ``GET /images/<name>.png`` serves.
TINY_PNG = _png(1, 1)


@dataclass
class GlmBehavior:
    """How the emulator answers; mutable, tests change it between requests.

    ``images`` entries are absolute URLs, or names served by the emulator
    itself (``"cat"`` becomes ``{base_url}/images/cat.png``).
    """

    answer: str | None = None
    chunk_chars: int = 4
    think: str | None = None
    search_results: list[tuple[str, str]] = field(default_factory=list)
    citations: bool = True
    code: str | None = None
    execution_output: str = ""
    images: list[str] = field(default_factory=list)
    intervene_text: str | None = None
    layout: Literal["active", "cumulative"] = "active"
    line_end: Literal["\n", "\r\n"] = "\n"
    write_size: int | None = None
    pack_all: bool = False
    first_delay_s: float = 0.0
    #: with first_delay_s (or first_gate): send the response head at once, hold only
    #: the first event
    head_first: bool = False
    #: when set, the first event (and, without head_first, the response head) waits
    #: until this event is set: a stall before the first event that a test ends
    first_gate: trio.Event | None = None
    frame_delay_s: float = 0.0
    stamp: bool = False
    stamp_frames: int = 100
    stall_after: int | None = None
    drop_after: int | None = None
    malformed_after: int | None = None
    stream_error: tuple[int, dict[str, Any]] | None = None
    error_field: Literal["code", "status"] = "code"
    refresh_expired: bool = False
    access_ttl_s: float = 3600.0
    one_stream_per_account: bool = True
    video_polls: int = 2
    video_fail: bool = False
    #: seconds the video chat call takes before it starts the job and answers
    video_start_delay_s: float = 0.0
    check_signature: bool = True


@dataclass(frozen=True, slots=True)
class Upload:
    """One uploaded file, as received."""

    file_id: str
    filename: str
    content_type: str
    data: bytes
    kind: Literal["chat", "video"]


@dataclass
class GlmRecord:
    """What the emulator was asked, for tests to assert on.

    ``streams`` holds the JSON body of every stream request that passed the
    checks; ``streams_finished``, ``streams_aborted`` (the client left) and
    ``streams_dropped`` (``drop_after``) count how they ended.
    """

    refreshes: int = 0
    streams: list[dict[str, Any]] = field(default_factory=list)
    conversations_created: list[str] = field(default_factory=list)
    conversations_deleted: list[str] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    video_chats: list[dict[str, Any]] = field(default_factory=list)
    video_polls: int = 0
    composites: list[dict[str, Any]] = field(default_factory=list)
    videos_deleted: list[str] = field(default_factory=list)
    bad_signatures: int = 0
    auth_failures: int = 0
    concurrent_rejections: int = 0
    active_streams: int = 0
    max_active_per_account: dict[str, int] = field(default_factory=dict)
    streams_finished: int = 0
    streams_aborted: int = 0
    streams_dropped: int = 0
    paths: list[str] = field(default_factory=list)
    handler_errors: list[str] = field(default_factory=list)


def account_key(refresh_token: str) -> str:
    """The short stable hash that names an account in the record (never the token)."""
    return hashlib.sha256(refresh_token.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- multipart


@dataclass(frozen=True, slots=True)
class FormPart:
    """One part of a ``multipart/form-data`` body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")


def parse_multipart(body: bytes, content_type: str) -> list[FormPart]:
    """Split a ``multipart/form-data`` body (RFC 7578 over RFC 2046) into its parts.

    Args:
        body: the whole request body.
        content_type: the request's Content-Type, which names the boundary.

    Returns:
        The parts in order.

    Raises:
        ValueError: not multipart/form-data, no boundary, or a malformed body.
    """
    mime = content_type.partition(";")[0].strip().lower()
    match = _BOUNDARY.search(content_type)
    if mime != "multipart/form-data" or match is None:
        raise ValueError("not multipart/form-data with a boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # RFC 2046: a preamble before the first delimiter is ignored
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise ValueError("no multipart delimiter")
        pos = found + 2 + len(delimiter)
    parts: list[FormPart] = []
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):  # only transport padding may follow
            raise ValueError("malformed multipart delimiter line")
        start = eol + 2
        if body.startswith(b"\r\n", start):
            head, data_start = b"", start + 2
        else:
            head_end = body.find(b"\r\n\r\n", start)
            if head_end < 0:
                raise ValueError("multipart part headers never end")
            head, data_start = body[start:head_end], head_end + 4
        end = body.find(b"\r\n" + delimiter, data_start)
        if end < 0:
            raise ValueError("multipart part never ends")
        parts.append(_form_part(head, body[data_start:end]))
        pos = end + 2 + len(delimiter)
    return parts


def _form_part(head: bytes, data: bytes) -> FormPart:
    """One part from its header block; browsers send raw UTF-8 file names."""
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", errors="replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("malformed multipart header line")
        headers[name.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise ValueError("multipart part without form-data disposition")
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(disposition):
        value = raw.strip()
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        params[key.lower()] = value
    filename = params.get("filename")
    if "filename*" in params:  # RFC 5987: charset'language'percent-encoded
        charset, _, rest = params["filename*"].partition("'")
        filename = urllib.parse.unquote(rest.partition("'")[2], encoding=charset or "utf-8")
    if "name" not in params:
        raise ValueError("multipart part without a name")
    return FormPart(params["name"], filename, headers.get("content-type"), data)


def _image_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG header, else the default size."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return DEFAULT_IMAGE_SIZE


# ---------------------------------------------------------------- plumbing


class _Refused(RequestError):
    """A request the site refuses: answered with ``envelope`` as JSON."""

    def __init__(self, envelope: dict[str, Any], http_status: int = 200) -> None:
        super().__init__(str(envelope.get("message", "")))
        self.envelope = envelope
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class _Request:
    """A request as the routes read it: method upper-cased, the path without
    its query, header names lower-cased (the last of a repeated one wins)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @classmethod
    def parse(cls, request: Request) -> _Request:
        target = request.target.decode("ascii", errors="replace")
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in request.headers
        }
        return cls(
            request.method.decode("ascii", errors="replace").upper(),
            urllib.parse.urlsplit(target).path,
            headers,
            request.body,
        )


@dataclass(frozen=True, slots=True)
class _Access:
    """An issued access token: whose, and until when (trio clock)."""

    account: str
    expires_at: float


@dataclass(slots=True)
class _VideoJob:
    account: str
    conversation_id: str
    polls: int = 0


class _Release(Protocol):
    """Frees a stream's account; ``finished`` also counts the stream as finished."""

    def __call__(self, *, finished: bool = False) -> None: ...


class _End(Enum):
    """How a stream response ended."""

    FINISHED = "finished"
    ABORTED = "aborted"  # the client left
    DROPPED = "dropped"  # we cut it (drop_after)


def _json(obj: dict[str, Any], status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(obj))


def _bearer(request: _Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# ---------------------------------------------------------------- the server


class GlmEmulator:
    """A fake chatglm.cn. Start it with ``await nursery.start(emulator.serve)``.

    Attributes:
        behavior: how it answers (mutable).
        record: what it was asked.
        port: the bound port, once :meth:`serve` has started.
    """

    def __init__(
        self,
        *,
        tokens: Iterable[str] | None = None,
        behavior: GlmBehavior | None = None,
        secret: str = DEFAULT_SECRET,
        keep_record: bool = True,
    ) -> None:
        """
        Args:
            tokens: the accepted refresh tokens; None accepts any non-empty one.
            behavior: the initial behaviour (default: a well-behaved site).
            secret: the signing secret (3.4).
            keep_record: keep the per-request lists of :attr:`record`; False
                keeps only its counters (long benchmark runs).
        """
        self.behavior = behavior if behavior is not None else GlmBehavior()
        self.record = GlmRecord()
        self._keep = keep_record
        self.port = 0
        self._tokens = frozenset(tokens) if tokens is not None else None
        self._secret = secret
        self._host = "127.0.0.1"
        self._scheme = "http"
        self._expired_refresh: set[str] = set()
        self._access: dict[str, _Access] = {}
        self._conversations: dict[str, str] = {}  # id -> account key
        self._active: dict[str, int] = {}  # account key -> open streams
        self._videos: dict[str, _VideoJob] = {}
        self._files: dict[str, Upload] = {}
        self._changed = trio.Event()

    @property
    def base_url(self) -> str:
        """``http(s)://host:port`` of the running server, without a trailing slash."""
        host = self._host
        if host in ("", "0.0.0.0"):  # noqa: S104 - naming the wildcard, not binding it
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"{self._scheme}://{host}:{self.port}"

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until cancelled; ``task_status.started()`` once bound.

        Args:
            host: the address to bind.
            port: the port; 0 picks a free one (see :attr:`port`).
            ssl_context: serve HTTPS with this server context.
            task_status: for ``nursery.start``.
        """
        serve = partial(serve_http, self._handle, host=host, port=port, ssl_context=ssl_context)
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve)
            self._host = host
            if ssl_context is not None:
                self._scheme = "https"
            task_status.started()

    def expire_access_tokens(self) -> None:
        """Every access token issued so far is now expired (calls get ``code`` 401)."""
        self._access.clear()

    def expire_refresh_token(self, token: str) -> None:
        """Refreshing with ``token`` now answers the 40102 envelope."""
        self._expired_refresh.add(token)

    async def wait_until(
        self,
        predicate: Callable[[GlmRecord], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - part of the interface tests share
    ) -> None:
        """Wait until ``predicate(record)`` holds.

        The record changes only while requests are served, and the server
        wakes waiters after each request and at each stream's start and end.

        Raises:
            trio.TooSlowError: it did not hold within ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            while not predicate(self.record):
                await self._changed.wait()

    def _notify(self) -> None:
        """Wake :meth:`wait_until`: the record may have changed."""
        self._changed.set()
        self._changed = trio.Event()

    # -- connection loop (providers.emulator_http)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        await serve_connection(stream, self._respond, self._refusal, max_body_bytes=MAX_BODY_BYTES)

    def _refusal(self, exc: Exception) -> Reply | None:
        """The answer to a request that broke (``providers.emulator_http.Refuse``)."""
        if isinstance(exc, h11.RemoteProtocolError):
            return _json({"message": str(exc)}, 400)
        if isinstance(exc, PayloadTooLarge):
            return _json({"message": exc.message}, 413)
        self.record.handler_errors.append(repr(exc))  # a bug: let tests see it
        self._notify()
        return None

    async def _respond(self, raw: Request, conn: ClientConnection) -> bool:
        """Serve one request; True if the connection can take another."""
        request = _Request.parse(raw)
        if self._keep:
            self.record.paths.append(request.path)
        try:
            if request.path == STREAM_PATH and request.method == "POST":
                return await self._stream(conn, request)
            if request.path == VIDEO_CHAT_PATH and self.behavior.video_start_delay_s > 0:
                with trio.CancelScope(shield=True):  # the site finishes what it began
                    await trio.sleep(self.behavior.video_start_delay_s)
            reply = self._route(request)
            await conn.reply(reply, head_only=request.method == "HEAD")
        except _Refused as refusal:
            reply = _json(refusal.envelope, refusal.http_status)
            await conn.reply(reply, head_only=request.method == "HEAD")
        finally:
            self._notify()
        return True

    # -- envelopes and checks (3.4, 3.6)

    def _ok(self, result: dict[str, Any]) -> Reply:
        ok_field = "status" if self.behavior.error_field == "code" else "code"
        return _json({ok_field: 0, "message": "success", "result": result})

    def _error(self, code: int, message: str) -> _Refused:
        return _Refused({self.behavior.error_field: code, "message": message})

    def _json_body(self, request: _Request) -> dict[str, Any]:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise self._error(ERR_PARAM, "body must be a JSON object")
        return body

    def _check_signature(self, request: _Request, *, required: bool) -> None:
        if not self.behavior.check_signature:
            return
        timestamp = request.headers.get("x-timestamp")
        nonce = request.headers.get("x-nonce")
        signature = request.headers.get("x-sign")
        if not required and timestamp is None and nonce is None and signature is None:
            return
        now_ms = int(time.time() * 1000)
        if (
            timestamp is None
            or nonce is None
            or signature is None
            or not verify(timestamp, nonce, signature, now_ms=now_ms, secret=self._secret)
        ):
            self.record.bad_signatures += 1
            raise self._error(ERR_SIGN, "sign invalid")

    def _authenticate(self, request: _Request) -> str:
        """The account (refresh token) behind the request's access token."""
        access = self._access.get(_bearer(request))
        if access is None or access.expires_at <= trio.current_time():
            self.record.auth_failures += 1
            raise self._error(ERR_AUTH, "access token invalid or expired")
        return access.account

    # -- unary routes

    def _route(self, request: _Request) -> Reply:
        method, path = request.method, request.path
        fixed = {
            REFRESH_PATH: self._refresh,
            DELETE_PATH: self._delete,
            UPLOAD_PATH: self._upload_chat,
            VIDEO_UPLOAD_PATH: self._upload_video,
            VIDEO_CHAT_PATH: self._video_chat,
            VIDEO_COMPOSITE_PATH: self._video_composite,
        }
        if path in fixed or path == STREAM_PATH:
            if method != "POST":
                raise _Refused({"code": 405, "message": "method not allowed"}, 405)
            return fixed[path](request)
        if path.startswith(VIDEO_STATUS_PREFIX) and method == "GET":
            return self._video_status(request, path.removeprefix(VIDEO_STATUS_PREFIX))
        if path.startswith(VIDEO_CHAT_PATH + "/") and method == "DELETE":
            return self._video_delete(request, path.removeprefix(VIDEO_CHAT_PATH + "/"))
        if method in ("GET", "HEAD"):
            reply = self._static(path)
            if reply is not None:
                return reply
        raise _Refused({"code": 404, "message": f"no route for {method} {path}"}, 404)

    def _refresh(self, request: _Request) -> Reply:
        self._check_signature(request, required=True)
        token = _bearer(request)
        if not token or (self._tokens is not None and token not in self._tokens):
            self.record.auth_failures += 1
            raise self._error(ERR_AUTH, "refresh token invalid")
        if self.behavior.refresh_expired or token in self._expired_refresh:
            self.record.auth_failures += 1
            message = f"{ERR_REFRESH_EXPIRED} refresh token expired"
            if self.behavior.error_field == "code":  # 3.6's example shape
                raise _Refused({"status": 1, "message": message})
            raise _Refused({"code": ERR_REFRESH_EXPIRED, "message": message})
        access = f"glm-emulator-access-{secrets.token_hex(16)}"
        expires_at = trio.current_time() + self.behavior.access_ttl_s
        self._access[access] = _Access(token, expires_at)
        self.record.refreshes += 1
        return self._ok({"access_token": access, "refresh_token": token})

    def _delete(self, request: _Request) -> Reply:
        self._check_signature(request, required=True)
        account = self._authenticate(request)
        conversation_id = self._json_body(request).get("conversation_id")
        if not isinstance(conversation_id, str) or self._conversations.get(
            conversation_id
        ) != account_key(account):
            raise self._error(ERR_NOT_FOUND, "conversation not found")
        del self._conversations[conversation_id]
        if self._keep:
            self.record.conversations_deleted.append(conversation_id)
        return self._ok({})

    def _upload_chat(self, request: _Request) -> Reply:
        upload = self._receive_upload(request, "chat")
        url = self._file_url(upload)
        result: dict[str, Any] = {
            "file_id": upload.file_id,
            "file_name": upload.filename,
            "file_url": url,
        }
        if upload.content_type.startswith("image/"):  # 3.8: width/height mark images
            result["width"], result["height"] = _image_size(upload.data)
        return self._ok(result)

    def _upload_video(self, request: _Request) -> Reply:
        upload = self._receive_upload(request, "video")
        return self._ok({"source_id": upload.file_id, "source_url": self._file_url(upload)})

    def _receive_upload(self, request: _Request, kind: Literal["chat", "video"]) -> Upload:
        """Check and store the multipart ``file`` part of an upload (3.8)."""
        self._check_signature(request, required=False)  # the reference never signs uploads
        self._authenticate(request)
        try:
            parts = parse_multipart(request.body, request.headers.get("content-type", ""))
        except ValueError as exc:
            raise self._error(ERR_PARAM, f"bad upload: {exc}") from exc
        part = next((p for p in parts if p.name == "file" and p.filename is not None), None)
        if part is None:
            raise self._error(ERR_PARAM, "bad upload: no file part")
        filename = part.filename or "file"
        content_type = part.content_type or "application/octet-stream"
        if content_type == "application/octet-stream":
            content_type = mimetypes.guess_type(filename)[0] or content_type
        upload = Upload(secrets.token_hex(12), filename, content_type, part.data, kind)
        self._files[upload.file_id] = upload
        if self._keep:
            self.record.uploads.append(upload)
        return upload

    def _file_url(self, upload: Upload) -> str:
        name = urllib.parse.quote(upload.filename, safe="")
        return f"{self.base_url}{FILES_PREFIX}{upload.file_id}/{name}"

    def _video_chat(self, request: _Request) -> Reply:
        self._check_signature(request, required=True)
        account = self._authenticate(request)
        body = self._json_body(request)
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise self._error(ERR_PARAM, "prompt is required")
        conversation_id = body.get("conversation_id")
        if not isinstance(conversation_id, str) or not conversation_id:
            conversation_id = secrets.token_hex(12)
        chat_id = secrets.token_hex(12)
        self._videos[chat_id] = _VideoJob(account_key(account), conversation_id)
        if self._keep:
            self.record.video_chats.append(body)
        return self._ok({"chat_id": chat_id, "conversation_id": conversation_id})

    def _video_job(self, request: _Request, chat_id: str, *, signed: bool) -> _VideoJob:
        self._check_signature(request, required=signed)
        account = self._authenticate(request)
        job = self._videos.get(chat_id)
        if job is None or job.account != account_key(account):
            raise self._error(ERR_NOT_FOUND, "video chat not found")
        return job

    def _video_status(self, request: _Request, chat_id: str) -> Reply:
        job = self._video_job(request, chat_id, signed=True)
        job.polls += 1
        self.record.video_polls += 1
        behavior = self.behavior
        result: dict[str, Any] = {
            "chat_id": chat_id,
            "conversation_id": job.conversation_id,
            "status": "processing",
            "msg": "",
            "plan": "",
            "cover_url": "",
            "video_url": "",
            "video_duration": "",
            "resolution": "",
        }
        if job.polls <= behavior.video_polls:
            result["status"] = "init" if job.polls == 1 else "processing"
            result["plan"] = f"{job.polls}/{behavior.video_polls + 1}"
        elif behavior.video_fail:
            result["status"] = "failed"
            result["msg"] = "视频生成失败"  # "video generation failed"
        else:
            result["status"] = "finished"
            result["cover_url"] = f"{self.base_url}{IMAGES_PREFIX}{chat_id}_cover.png"
            result["video_url"] = f"{self.base_url}{VIDEOS_PREFIX}{chat_id}.mp4"
            result["video_duration"] = "6s"
            result["resolution"] = "1440 × 960"
        return self._ok(result)

    def _video_composite(self, request: _Request) -> Reply:
        self._check_signature(request, required=True)
        account = self._authenticate(request)
        body = self._json_body(request)
        chat_id = body.get("chat_id")
        job = self._videos.get(chat_id) if isinstance(chat_id, str) else None
        if job is None or job.account != account_key(account):
            raise self._error(ERR_NOT_FOUND, "video chat not found")
        if self._keep:
            self.record.composites.append(body)
        audio = urllib.parse.quote(str(body.get("audio_id", "")), safe="")
        return self._ok({"url": f"{self.base_url}{VIDEOS_PREFIX}{chat_id}_{audio}.mp4"})

    def _video_delete(self, request: _Request, chat_id: str) -> Reply:
        self._video_job(request, chat_id, signed=False)  # the reference never signs it
        del self._videos[chat_id]
        if self._keep:
            self.record.videos_deleted.append(chat_id)
        return self._ok({})

    def _static(self, path: str) -> Reply | None:
        """Uploaded files, the tiny PNG and the fake video; None if not one of ours."""
        if path.startswith(FILES_PREFIX):
            upload = self._files.get(path.removeprefix(FILES_PREFIX).partition("/")[0])
            return None if upload is None else Reply(200, upload.data, upload.content_type)
        if path.startswith(IMAGES_PREFIX) and path.endswith(".png"):
            return Reply(200, TINY_PNG, "image/png")
        if path.startswith(VIDEOS_PREFIX) and path.endswith(".mp4"):
            return Reply(200, _FAKE_MP4, "video/mp4")
        return None

    # -- the stream (3.7, 3.9)

    async def _stream(self, conn: ClientConnection, request: _Request) -> bool:
        """Answer one stream request; True if the connection can be reused."""
        self._check_signature(request, required=True)
        account = self._authenticate(request)
        body = self._json_body(request)
        conversation_id = body.get("conversation_id")
        messages = body.get("messages")
        if (
            not isinstance(body.get("assistant_id"), str)
            or not isinstance(conversation_id, str)
            or not isinstance(messages, list)
            or not messages
            or not isinstance(body.get("meta_data", {}), dict)
        ):
            raise self._error(ERR_PARAM, "assistant_id, conversation_id and messages required")
        key = account_key(account)
        if conversation_id and self._conversations.get(conversation_id) != key:
            raise self._error(ERR_NOT_FOUND, "conversation not found")
        behavior = dataclasses.replace(self.behavior)  # fixed for this stream
        if behavior.one_stream_per_account and self._active.get(key, 0) > 0:
            self.record.concurrent_rejections += 1
            raise self._error(ERR_BUSY, BUSY_MESSAGE)
        if self._keep:
            self.record.streams.append(body)
        if behavior.stream_error is not None:
            status, payload = behavior.stream_error
            await conn.reply(_json(payload, status))
            return True
        if not conversation_id:
            conversation_id = secrets.token_hex(12)  # 24 hex characters, as the site's
            self._conversations[conversation_id] = key
            if self._keep:
                self.record.conversations_created.append(conversation_id)
        script = SnapshotScript(self._spec(behavior, body, conversation_id))

        self._active[key] = active = self._active.get(key, 0) + 1
        self.record.active_streams += 1
        most = self.record.max_active_per_account
        most[key] = max(most.get(key, 0), active)
        self._notify()
        released = False
        counted_finished = False

        def release(*, finished: bool = False) -> None:
            # Called right before the final write (finished=True), so that the
            # record and the account are up to date when the client sees the
            # end; called again, harmlessly, on every way out.
            nonlocal released, counted_finished
            if released:
                return
            released = True
            self.record.active_streams -= 1
            if self._active[key] == 1:
                del self._active[key]
            else:
                self._active[key] -= 1
            if finished:
                counted_finished = True
                self.record.streams_finished += 1
            self._notify()

        end: _End | None = None
        try:
            end = await conn.watched(partial(self._write_stream, conn, behavior, script, release))
        finally:
            release()
        if end is _End.FINISHED:
            return True  # unless the client has gone (the loop checks)
        if counted_finished:  # the final write failed after all
            self.record.streams_finished -= 1
        if end is _End.DROPPED:
            self.record.streams_dropped += 1
        else:
            self.record.streams_aborted += 1
        return False

    def _spec(
        self, behavior: GlmBehavior, body: dict[str, Any], conversation_id: str
    ) -> ScriptSpec:
        """What to answer this request: the behaviour, or demo defaults (3.10)."""
        line = prompt_last_line(body)
        meta = body.get("meta_data")
        chat_mode = meta.get("chat_mode") if isinstance(meta, dict) else None
        think = behavior.think
        if think is None and chat_mode in ("zero", "deep_research"):
            think = default_think(line)
        # demo mode: agent prompts get what a cooperative model says
        agent = agent_answer(prompt_text(body)) if behavior.answer is None else None
        scripted = agent is not None
        answer = behavior.answer if behavior.answer is not None else agent or demo_answer(line)
        images = [self._image_url(image) for image in behavior.images]
        if body.get("assistant_id") == DRAWING_ASSISTANT_ID and not images:
            images = [self._image_url(f"{conversation_id}_0")]
            if behavior.answer is None:
                answer = drawing_answer(line)
                scripted = False
        if behavior.search_results and behavior.citations and not scripted:
            # markers would break a <tool_call> block or a JSON document
            answer = cite(answer, len(behavior.search_results))
        return ScriptSpec(
            conversation_id=conversation_id,
            answer=answer,
            chunk_chars=behavior.chunk_chars,
            think=think,
            search_results=tuple(behavior.search_results),
            code=behavior.code,
            execution_output=behavior.execution_output,
            images=tuple(images),
            intervene_text=behavior.intervene_text,
            layout=behavior.layout,
            stamp_frames=behavior.stamp_frames if behavior.stamp else None,
        )

    def _image_url(self, image: str) -> str:
        if image.startswith(("http://", "https://")):
            return image
        name = image if image.endswith(".png") else f"{image}.png"
        return f"{self.base_url}{IMAGES_PREFIX}{urllib.parse.quote(name)}"

    @staticmethod
    async def _write_stream(
        conn: ClientConnection,
        behavior: GlmBehavior,
        script: SnapshotScript,
        release: _Release,
    ) -> _End:
        """Write the SSE response of ``script`` as ``behavior`` says.

        Returns FINISHED or DROPPED; a stall waits until cancelled (by the
        client leaving). ``release(finished=True)`` frees the account and counts
        the stream as finished right before the final event is written.

        Raises:
            trio.BrokenResourceError: the client is gone.
        """
        size = behavior.write_size
        line_end = behavior.line_end.encode()
        pending = bytearray(conn.encode(h11.Response(status_code=200, headers=_SSE_HEADERS)))
        if behavior.first_delay_s > 0 or behavior.first_gate is not None:
            if behavior.head_first:  # the head now, the first event after the delay
                await conn.send(bytes(pending))
                pending.clear()
            await trio.sleep(behavior.first_delay_s)
            if behavior.first_gate is not None:
                await behavior.first_gate.wait()
        # h11 frames an HTTP/1.1 body without Content-Length as chunked and,
        # when chunked, does not count body bytes: formatting each chunk here,
        # size line and SSE event in one operation, saves copies and calls per
        # event. HTTP/1.0 bodies go through h11.
        chunked = conn.chunked
        end = line_end + line_end
        overhead = len(b"data: ") + len(end)

        def frame(data: bytes) -> bytes:
            if chunked:
                return b"%x\r\ndata: %b%b\r\n" % (len(data) + overhead, data, end)
            return conn.encode(h11.Data(data=b"data: " + data + end))

        events = script.paced()
        pace = behavior.frame_delay_s > 0 and not behavior.pack_all
        sent = 0
        while True:
            if behavior.stall_after is not None and sent >= behavior.stall_after:
                await conn.send(bytes(pending), size)
                await trio.sleep_forever()
            if behavior.drop_after is not None and sent >= behavior.drop_after:
                await conn.send(bytes(pending), size)
                return _End.DROPPED
            if sent == behavior.malformed_after:
                pending += frame(MALFORMED_DATA)
            data = next(events, None)
            while isinstance(data, Pace):  # the next event builds only after the pause
                if sent and pace:
                    await trio.sleep(behavior.frame_delay_s)
                data = next(events, None)
            last = data is None
            pending += frame(script.final() if data is None else data)
            sent += 1
            if last:
                pending += conn.encode(h11.EndOfMessage())
                release(finished=True)
                await conn.send(bytes(pending), size)
                return _End.FINISHED
            if not behavior.pack_all:
                await conn.send(bytes(pending), size)
                pending.clear()


# ---------------------------------------------------------------- CLI


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m providers.glm.emulator",
        description="A fake chatglm.cn for tests, benchmarks and demos (loopback only).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", action="append", help="accepted refresh token (repeatable)")
    add_answer_flags(parser, chunk_chars=4)
    parser.add_argument("--layout", choices=("active", "cumulative"), default="active")
    add_pacing_flags(parser, frame="text event")
    parser.add_argument("--no-signature-check", action="store_true")
    parser.add_argument(
        "--no-stream-limit",
        action="store_true",
        help="any number of concurrent streams per account (the site allows one)",
    )
    add_record_flag(parser)
    return parser.parse_args(argv)


def emulator_from_args(argv: list[str] | None = None) -> tuple[GlmEmulator, str, int]:
    """The emulator, host and port the command line asks for."""
    args = _arguments(argv)
    behavior = GlmBehavior(
        **behavior_options(args),
        layout=args.layout,
        check_signature=not args.no_signature_check,
        one_stream_per_account=not args.no_stream_limit,
    )
    emulator = GlmEmulator(tokens=args.token, behavior=behavior, keep_record=not args.no_record)
    return emulator, args.host, args.port


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then exit 0; prints ``listening on <base url>`` once bound.

    See :func:`providers.emulator_main.serve_until_signal` for why the
    signals are caught the way they are, and the ``gc.freeze()``.
    """
    emulator, host, port = emulator_from_args(argv)
    run_emulator(emulator, host, port)


if __name__ == "__main__":
    main()
