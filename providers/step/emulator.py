"""A faithful fake StepChat (yuewen.cn) server for tests, benchmarks and demo mode.

Theory of operation
-------------------
:class:`StepEmulator` is a real HTTP/1.1 server on trio + h11 that speaks the
StepChat Connect API exactly as PROTOCOLS.md section 2 describes it (the
checklist is 2.11), keeps a :class:`StepRecord` of what it was asked, and
misbehaves on request through a mutable :class:`StepBehavior`. Tests start it
with ``await nursery.start(emulator.serve)``; ``bench/`` runs it as a separate
process through :func:`main`; ``relay serve --demo`` runs it in-process.

The HTTP/1.1 plumbing is :mod:`providers.emulator_http`'s: one task per
connection reads a request head and its whole body, ``StepEmulator._respond``
answers it, and the connection is kept alive. Unary calls (2.5) are JSON
in, JSON out with Content-Length; their failures are the Connect error body
``{"code", "message"}`` with a fitting HTTP status. SendMessageStream
answers HTTP 200 ``application/connect+json`` with a chunked body of Connect envelopes (2.5,
2.7); failures found after the request was accepted travel in the
end-of-stream envelope, as Connect does, while authentication failures stay
unary HTTP 401 (2.8 names that case: a naive reader takes the JSON for an
envelope header).

Auth (2.3, 2.11): RegisterDevice exchanges a user token (cookie
``Oasis-Token``) plus the ``Oasis-Webid`` header for fresh JWT-looking access
and refresh strings, remembered with their device and expiry. Every other
call must carry the cookie ``Oasis-Token=<access>...<refresh>`` of one such
grant, unexpired, and the same device id in the ``Oasis-Webid`` header and
cookie; anything else is HTTP 401 ``unauthenticated``.

The answer stream is a lazy *script*: a generator of ready-to-write HTTP
chunks (the chunk size line, the 5-byte envelope header and the JSON payload
are formatted in one go; constant frames are precomputed), interleaved with
the actions "pause", "stall" and "drop". A pause (``frame_delay_s``) comes
before the search event and before each text frame, never after the last
text frame: the end of the answer follows it at once. The script builds a
text frame only after its pause, so stamped frames (``stamp=True``, used by
the latency benchmark) carry the monotonic time at which they were written.
h11 only frames the response head and the final ``0\\r\\n\\r\\n``; with
chunked encoding it does not count body bytes, so bypassing it for the
chunks is safe and saves one copy per frame.

The answer text is ``behavior.answer`` when a test set one; otherwise an
agent prompt (tools, tool results, a JSON instruction) gets
:func:`providers.emulator_agent.agent_answer`'s scripted answer, and any
other prompt :func:`demo_answer`. The text is cut into ``chunk_chars``
frames like any answer, so a ``<tool_call>`` block arrives split.

Memory: the :class:`StepRecord` lists grow with every request. A long
benchmark run starts the emulator with ``--no-record`` (``keep_record=False``):
counters are still kept, the per-request lists (and the set of deleted chat
ids) are not.

While a stream is written, the helper's watcher reads the socket: EOF or a
reset means the client went away, so the write is cancelled at once (even
during a delay or a stall) and the stream is recorded as aborted.

Traps: every connection handler ends cleanly whatever the peer does (bad
HTTP is answered with the Connect error ``invalid_argument``, a body over
:data:`MAX_BODY_BYTES` with ``resource_exhausted``, an unexpected bug is
logged and answered 500 ``internal``), so a test's nursery never sees an
emulator exception. Counters in the record are
only changed together with a wake-up of :meth:`StepEmulator.wait_until`.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import logging
import math
import secrets
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import orjson
import trio

from protocol.connect import FLAG_END_STREAM, EnvelopeDecoder
from protocol.errors import (
    AuthError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RelayError,
    RequestError,
)
from providers.emulator_agent import agent_answer
from providers.emulator_http import (
    ClientConnection,
    Listener,
    Reply,
    Request,
    http_chunk,
    serve_connection,
)
from providers.emulator_main import run_emulator
from providers.emulator_script import (
    Action,
    Outcome,
    StreamTally,
    add_answer_flags,
    add_pacing_flags,
    add_record_flag,
    behavior_options,
    stamp_text,
    text_pieces,
    write_script,
)

logger = logging.getLogger(__name__)

# --- wire constants (PROTOCOLS.md 2.2, 2.6) ---------------------------------
REGISTER_PATH = "/passport/proto.api.passport.v1.PassportService/RegisterDevice"
CREATE_CHAT_PATH = "/api/proto.chat.v1.ChatService/CreateChat"
SEND_MESSAGE_PATH = "/api/proto.chat.v1.ChatMessageService/SendMessageStream"
DELETE_CHAT_PATH = "/api/proto.chat.v1.ChatService/DelChat"
STORAGE_PATH = "/api/storage"
FILE_STATUS_PATH = "/api/proto.file.v1.FileService/GetFileStatus"

#: Content types of unary and streaming Connect calls (2.5).
JSON_TYPE = "application/json"
CONNECT_JSON_TYPE = "application/connect+json"

#: Declared length of the ``oversized_after`` envelope: far over any sane limit.
OVERSIZED_LENGTH_BYTES = 600 * 1024 * 1024
#: Largest request body accepted (uploads are up to 100 MiB, 4).
MAX_BODY_BYTES = 128 * 1024 * 1024

#: First chat id handed out; ids increase by one (2.6 shows such a decimal id).
FIRST_CHAT_ID = 85466015488159744
FIRST_FILE_ID = 160000000000000000

# Envelope header: flags byte, big-endian payload length (2.5). Kept here too
# (protocol.connect does not export its struct) so that a chunk is formatted
# in one operation.
_ENVELOPE_HEADER = struct.Struct(">BI")
_HEADER_SIZE = _ENVELOPE_HEADER.size

_TEXT_PREFIX = b'{"textEvent":{"text":'
_TEXT_SUFFIX = b"}}"
_DONE_PAYLOAD = b'{"doneEvent":{}}'
_END_OK_PAYLOAD = b"{}"
_MALFORMED_PAYLOAD = b'{"textEvent": {"text": "this envelope is cut'
_JWT_HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"


@dataclass
class StepBehavior:
    """What the emulator answers; mutable, tests change it between requests.

    Counts ``*_after`` are numbers of ``textEvent`` frames already written; a
    count at or beyond the number of text frames fires after the last one,
    before ``doneEvent``. At most one of stall, drop, malformed and oversized
    fires, in that order of precedence. Malformed and oversized frames end
    the HTTP body right after them (no ``doneEvent``, no end-of-stream).
    Delays, ``write_size`` and ``pack_all`` apply to the answer stream only.
    """

    answer: str | None = None
    chunk_chars: int = 6
    text_frames: list[str] | None = None
    search_results: list[tuple[str, str]] = field(default_factory=list)
    first_delay_s: float = 0.0
    frame_delay_s: float = 0.0
    write_size: int | None = None
    pack_all: bool = False
    stamp: bool = False
    stamp_frames: int = 100
    stall_after: int | None = None
    drop_after: int | None = None
    end_error: tuple[str, str] | None = None
    omit_done: bool = False
    omit_end: bool = False
    malformed_after: int | None = None
    oversized_after: int | None = None
    stream_http_error: tuple[int, str, str] | None = None
    create_error: tuple[int, str, str] | None = None
    busy: bool = False
    access_ttl_s: float = 900.0
    file_status_polls: int = 2
    file_status_final: int = 1
    #: seconds DelChat takes before it answers (a slow cleanup)
    delete_delay_s: float = 0.0
    #: seconds CreateChat takes before it creates the chat and answers
    create_delay_s: float = 0.0
    #: when set, each answer stream waits for it after its response head (before
    #: ``first_delay_s``): a load test holds every stream open until all have started
    hold: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class Upload:
    """One ``PUT /api/storage`` (2.6): the name is URL-decoded, headers lower-cased."""

    file_id: str
    name: str
    content_type: str
    data: bytes
    headers: dict[str, str]


@dataclass
class StepRecord:
    """What the emulator was asked, in order.

    Stream counters cover answer streams only (not Connect errors sent as a
    stream). ``streams_finished`` counts streams whose script ran to its end,
    a scripted ``drop_after`` included; ``streams_aborted`` those the client
    left before that (or that were cancelled by shutdown).
    """

    registers: int = 0
    chats_created: list[str] = field(default_factory=list)
    chats_deleted: list[str] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    status_polls: int = 0
    streams_started: int = 0
    streams_finished: int = 0
    streams_aborted: int = 0
    active_streams: int = 0
    auth_failures: int = 0
    paths: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Grant:
    """An access/refresh pair issued by RegisterDevice."""

    device: str
    refresh: str
    expires_at: float  # time.monotonic() seconds


Script = Iterator[bytes | Action]


@dataclass(slots=True)
class _Route:
    method: bytes
    handler: Callable[[dict[str, str], str, bytes], dict[str, Any]] | None
    unary_json: bool  # body must be application/json


def _frame(payload: bytes, flags: int, chunked: bool) -> bytes:
    """One envelope (2.5), wrapped in its HTTP/1.1 chunk when ``chunked``."""
    header = _ENVELOPE_HEADER.pack(flags, len(payload))
    if chunked:
        return b"%x\r\n%b%b\r\n" % (len(payload) + _HEADER_SIZE, header, payload)
    return header + payload


def _raw_chunk(data: bytes, chunked: bool) -> bytes:
    return http_chunk(data) if chunked else data


def _connect_error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _error_reply(status: int, code: str, message: str) -> Reply:
    """A unary Connect error (2.5): HTTP ``status``, body ``{"code", "message"}``."""
    return Reply(status, orjson.dumps(_connect_error(code, message)), JSON_TYPE)


def _refusal(exc: Exception) -> Reply:
    """The answer to a request that broke (``providers.emulator_http.Refuse``)."""
    if isinstance(exc, h11.RemoteProtocolError):
        return _error_reply(exc.error_status_hint, "invalid_argument", str(exc))
    if isinstance(exc, PayloadTooLarge):
        return _error_reply(413, "resource_exhausted", "body too large")
    return _error_reply(500, "internal", "emulator error")  # a bug, logged by the helper


def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _parse_cookies(header: str) -> dict[str, str]:
    """Split a Cookie header into name -> value (the first of each name wins)."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out.setdefault(name, value)
    return out


def _json_object(body: bytes) -> dict[str, Any]:
    """Decode a unary request body; empty counts as ``{}``.

    Raises:
        RequestError: not JSON, or not an object (code ``invalid_argument``).
    """
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError("request body is not JSON", code="invalid_argument") from exc
    if not isinstance(value, dict):
        raise RequestError("request body is not a JSON object", code="invalid_argument")
    return value


def _jwt_like(kind: str, device: str, ttl_s: float) -> str:
    """A fresh, unguessable token shaped like the site's JWTs (no ``...`` inside)."""
    expires = int(time.time() + min(ttl_s, 1e9))
    claims = orjson.dumps({"typ": kind, "dev": device[:64], "exp": expires})
    body = base64.urlsafe_b64encode(claims).rstrip(b"=").decode("ascii")
    return f"{_JWT_HEADER}.{body}.{secrets.token_urlsafe(32)}"


def demo_answer(prompt: str) -> str:
    """The friendly answer of demo mode: quotes the prompt's last user line.

    Args:
        prompt: the merged prompt of 2.9 (``role:text`` lines).

    Returns:
        An English answer saying that it comes from the emulator.
    """
    lines = prompt.splitlines()
    quote = ""
    for line in reversed(lines):
        if line.startswith("user:"):
            quote = line.removeprefix("user:").strip()
            break
    else:
        quote = next((line.strip() for line in reversed(lines) if line.strip()), "")
    if len(quote) > 120:
        quote = quote[:119] + "…"
    return (
        f'Hello from the StepChat emulator! You wrote: "{quote}". '
        "This answer is scripted: the relay runs in demo mode, without a StepChat account."
    )


def _texts(behavior: StepBehavior, prompt: str) -> Iterator[Callable[[], str]]:
    """The texts of the ``textEvent`` frames, each as a function called at write time.

    Pulling the next item does not make its text, so the script can tell
    that another frame follows (and pause before it) before a stamp is read.
    """
    if behavior.stamp:
        return itertools.repeat(stamp_text, max(0, behavior.stamp_frames))
    if behavior.text_frames is not None:
        texts: Iterable[str] = behavior.text_frames
    else:
        answer = behavior.answer
        if answer is None:  # demo mode: agent prompts get what a cooperative model says
            answer = agent_answer(prompt)
        if answer is None:
            answer = demo_answer(prompt)
        texts = text_pieces(answer, behavior.chunk_chars)
    return (partial(str, text) for text in texts)


def _interruption(behavior: StepBehavior, sent: float, chunked: bool) -> list[bytes | Action]:
    """The steps that replace the rest of the script once ``sent`` text frames are out."""

    def due(count: int | None) -> bool:
        return count is not None and count <= sent

    if due(behavior.stall_after):
        return [Action.STALL]
    if due(behavior.drop_after):
        return [Action.DROP]
    if due(behavior.malformed_after):
        return [_frame(_MALFORMED_PAYLOAD, 0, chunked)]
    if due(behavior.oversized_after):
        # A header promising 600 MB, followed by a few bytes of it: the body then ends.
        header = _ENVELOPE_HEADER.pack(0, OVERSIZED_LENGTH_BYTES)
        return [_raw_chunk(header + _TEXT_PREFIX, chunked)]
    return []


class StepEmulator(Listener):
    """A StepChat server on loopback that records requests and misbehaves on request.

    Attributes:
        behavior: what to answer; replace it or change its fields at any time
            (a request reads it when it starts).
        record: what was asked so far.
        port: the bound port, once :meth:`serve` has started.
    """

    def __init__(
        self,
        *,
        tokens: Iterable[str] | None = None,
        behavior: StepBehavior | None = None,
        keep_record: bool = True,
    ) -> None:
        """Create an emulator; it does not listen until :meth:`serve`.

        Args:
            tokens: accepted user ``Oasis-Token`` values (the part after ``@``
                of a ``deviceId@Oasis-Token`` credential); ``None`` accepts
                any non-empty token.
            behavior: initial behaviour; default :class:`StepBehavior()`.
            keep_record: keep the per-request lists of :attr:`record` (and the
                deleted chat ids); False keeps only its counters, so that a
                long benchmark run does not grow the emulator's memory.
        """
        self._tokens = frozenset(tokens) if tokens is not None else None
        self.behavior = behavior if behavior is not None else StepBehavior()
        self.record = StepRecord()
        self._keep = keep_record
        super().__init__()
        self._grants: dict[str, _Grant] = {}
        self._chats: dict[str, str] = {}  # live chat id -> name
        self._deleted: set[str] = set()
        self._files: dict[str, int] = {}  # file id -> GetFileStatus calls so far
        self._chat_ids = itertools.count(FIRST_CHAT_ID)
        self._file_ids = itertools.count(FIRST_FILE_ID)
        self._message_ids = itertools.count(FIRST_CHAT_ID + 10**9)
        self._lot = trio.lowlevel.ParkingLot()
        self._routes: dict[str, _Route] = {
            REGISTER_PATH: _Route(b"POST", self._register, unary_json=True),
            CREATE_CHAT_PATH: _Route(b"POST", self._create_chat, unary_json=True),
            SEND_MESSAGE_PATH: _Route(b"POST", None, unary_json=False),
            DELETE_CHAT_PATH: _Route(b"POST", self._delete_chat, unary_json=True),
            STORAGE_PATH: _Route(b"PUT", self._store_file, unary_json=False),
            FILE_STATUS_PATH: _Route(b"POST", self._file_status, unary_json=True),
        }

    # --- public API --------------------------------------------------------


    def expire_access_tokens(self) -> None:
        """Make every access token issued so far invalid from now on."""
        for grant in self._grants.values():
            grant.expires_at = -math.inf

    async def wait_until(
        self,
        predicate: Callable[[StepRecord], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 (the interface tests and bench rely on)
    ) -> None:
        """Wait until ``predicate(record)`` holds; checked after every recorded change.

        Raises:
            trio.TooSlowError: it did not hold within ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            while not predicate(self.record):
                await self._lot.park()

    # --- bookkeeping -------------------------------------------------------

    def _changed(self) -> None:
        self._lot.unpark_all()

    def _auth_failure(self, message: str) -> AuthError:
        self.record.auth_failures += 1
        self._changed()
        return AuthError(message, code="unauthenticated")

    def _authenticate(self, headers: dict[str, str]) -> str:
        """Check the session of 2.3 and return the device id.

        Raises:
            AuthError: code ``unauthenticated``; counted in ``auth_failures``.
        """
        webid = headers.get("oasis-webid", "")
        cookies = _parse_cookies(headers.get("cookie", ""))
        if not webid:
            raise self._auth_failure("missing Oasis-Webid header")
        if cookies.get("Oasis-Webid") != webid:
            raise self._auth_failure("Oasis-Webid header and cookie differ")
        access, sep, refresh = cookies.get("Oasis-Token", "").partition("...")
        grant = self._grants.get(access)
        if not sep or grant is None or grant.refresh != refresh:
            raise self._auth_failure("Oasis-Token is not a session issued by RegisterDevice")
        if grant.device != webid:
            raise self._auth_failure("Oasis-Token was issued to another device")
        if grant.expires_at <= time.monotonic():
            raise self._auth_failure("access token expired")
        return webid

    def _authenticate_user(self, headers: dict[str, str]) -> str:
        """Check RegisterDevice's user token and device id (2.3); return the device id.

        Raises:
            AuthError: code ``unauthenticated``; counted in ``auth_failures``.
        """
        token = _parse_cookies(headers.get("cookie", "")).get("Oasis-Token", "")
        if not token or (self._tokens is not None and token not in self._tokens):
            raise self._auth_failure("unknown Oasis-Token")
        device = headers.get("oasis-webid", "")
        if not device:
            raise self._auth_failure("missing Oasis-Webid header")
        return device

    # --- unary handlers (2.3, 2.6) ----------------------------------------

    def _register(self, headers: dict[str, str], query: str, body: bytes) -> dict[str, Any]:
        _json_object(body)
        device = headers["oasis-webid"]  # checked by _authenticate_user
        ttl = self.behavior.access_ttl_s
        access = _jwt_like("access", device, ttl)
        refresh = _jwt_like("refresh", device, ttl * 100)
        self._grants[access] = _Grant(device, refresh, time.monotonic() + ttl)
        self.record.registers += 1
        self._changed()
        return {
            "accessToken": {"raw": access},
            "refreshToken": {"raw": refresh},
            "device": {"deviceID": device},
        }

    def _create_chat(self, headers: dict[str, str], query: str, body: bytes) -> dict[str, Any]:
        request = _json_object(body)
        error = self.behavior.create_error
        if error is not None:
            status, code, message = error
            raise RelayError(message, code=code, status=status)
        name = request.get("chatName", "")
        if not isinstance(name, str):
            raise RequestError("chatName must be a string", code="invalid_argument")
        chat_id = str(next(self._chat_ids))
        self._chats[chat_id] = name
        if self._keep:
            self.record.chats_created.append(chat_id)
        self._changed()
        return {"chatId": chat_id, "chatName": name}

    def _delete_chat(self, headers: dict[str, str], query: str, body: bytes) -> dict[str, Any]:
        ids = _json_object(body).get("chatIds")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise RequestError("chatIds must be a list of strings", code="invalid_argument")
        unknown = [i for i in ids if i not in self._chats and i not in self._deleted]
        if unknown:
            raise NotFound(f"chat {unknown[0]} not found", code="not_found")
        for chat_id in ids:
            if self._chats.pop(chat_id, None) is not None and self._keep:
                self._deleted.add(chat_id)
                self.record.chats_deleted.append(chat_id)
        self._changed()
        return {}

    def _store_file(self, headers: dict[str, str], query: str, body: bytes) -> dict[str, Any]:
        names = [
            v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k == "file_name"
        ]
        if not names or not names[0]:
            raise RequestError("missing file_name", code="invalid_argument")
        file_id = str(next(self._file_ids))
        self._files[file_id] = 0
        upload = Upload(file_id, names[0], headers.get("content-type", ""), body, dict(headers))
        if self._keep:
            self.record.uploads.append(upload)
        self._changed()
        return {"id": file_id, "fileName": upload.name, "size": str(len(body))}

    def _file_status(self, headers: dict[str, str], query: str, body: bytes) -> dict[str, Any]:
        file_id = _json_object(body).get("id")
        if not isinstance(file_id, str) or file_id not in self._files:
            raise NotFound(f"file {file_id!r} not found", code="not_found")
        polls = self._files[file_id]
        self._files[file_id] = polls + 1
        self.record.status_polls += 1
        self._changed()
        if polls < self.behavior.file_status_polls:
            return {"fileStatus": 0, "needFurtherCall": True}
        return {"fileStatus": self.behavior.file_status_final, "needFurtherCall": False}

    # --- SendMessageStream (2.5, 2.6, 2.7) ---------------------------------

    def _decode_request(self, body: bytes) -> dict[str, Any]:
        """The request of SendMessageStream: exactly one flags-0 envelope of a JSON object.

        Raises:
            RequestError: code ``invalid_argument``.
        """
        decoder = EnvelopeDecoder()
        try:
            envelopes = decoder.feed(body)
            decoder.close()
        except RelayError as exc:
            raise RequestError(f"bad request envelope: {exc}", code="invalid_argument") from exc
        if len(envelopes) != 1 or envelopes[0].flags != 0:
            raise RequestError("the body must be exactly one envelope", code="invalid_argument")
        return _json_object(envelopes[0].payload)

    def _check_message(self, message: dict[str, Any]) -> tuple[str, str]:
        """Validate a send request against the chats and uploads; return (chat id, text).

        Raises:
            RelayError: ``invalid_argument`` or ``not_found``.
        """
        chat_id = message.get("chatId")
        info = message.get("messageInfo")
        if not isinstance(chat_id, str) or not isinstance(info, dict):
            raise RequestError("chatId and messageInfo are required", code="invalid_argument")
        text = info.get("text")
        if not isinstance(text, str):
            raise RequestError("messageInfo.text must be a string", code="invalid_argument")
        if chat_id not in self._chats:
            gone = "was deleted" if chat_id in self._deleted else "does not exist"
            raise NotFound(f"chat {chat_id} {gone}", code="not_found")
        attachments = info.get("attachments", [])
        if not isinstance(attachments, list):
            raise RequestError("attachments must be a list", code="invalid_argument")
        for item in attachments:
            file_id = item.get("attachmentId") if isinstance(item, dict) else None
            if not isinstance(file_id, str) or file_id not in self._files:
                raise RequestError(f"unknown attachment {file_id!r}", code="invalid_argument")
        return chat_id, text

    async def _send_message(
        self, conn: ClientConnection, headers: dict[str, str], body: bytes
    ) -> bool:
        """Answer SendMessageStream; returns whether the connection may be reused.

        Raises:
            RelayError: before anything was written (unary error answer).
        """
        behavior = self.behavior
        if _media_type(headers) != CONNECT_JSON_TYPE:
            raise RelayError(
                f"content type must be {CONNECT_JSON_TYPE}", code="invalid_argument", status=415
            )
        try:
            message = self._decode_request(body)
        except RelayError as exc:
            await self._send_stream_error(conn, exc)
            return True
        if self._keep:
            self.record.messages.append(message)
        self._changed()
        if behavior.stream_http_error is not None:
            status, code, text = behavior.stream_http_error
            raise RelayError(text, code=code, status=status)
        try:
            chat_id, prompt = self._check_message(message)
            if behavior.busy:
                raise RelayError("too many requests, try again later", code="resource_exhausted")
        except RelayError as exc:
            await self._send_stream_error(conn, exc)
            return True
        return await self._stream_answer(conn, behavior, chat_id, prompt)

    async def _send_stream_error(self, conn: ClientConnection, exc: RelayError) -> None:
        """HTTP 200 whose only envelope is an error end-of-stream (2.5)."""
        payload = orjson.dumps({"error": _connect_error(exc.code or "unknown", exc.message)})
        head = h11.Response(
            status_code=200, headers=[(b"content-type", CONNECT_JSON_TYPE.encode())], reason=b"OK"
        )
        body = h11.Data(data=_frame(payload, FLAG_END_STREAM, False))
        await conn.send(conn.encode(head, body, h11.EndOfMessage()))

    def _script(self, behavior: StepBehavior, chat_id: str, prompt: str, chunked: bool) -> Script:
        """The answer stream of 2.7, one ready-to-write frame per item."""
        message_id = str(next(self._message_ids))
        start = {"startEvent": {"chatId": chat_id, "messageId": message_id}}
        yield _frame(orjson.dumps(start), 0, chunked)
        if behavior.search_results:
            results = [{"title": title, "url": url} for title, url in behavior.search_results]
            event = {"pipelineEvent": {"eventSearch": {"results": results}}}
            yield Action.PAUSE
            yield _frame(orjson.dumps(event), 0, chunked)
        for sent, make_text in enumerate(_texts(behavior, prompt)):
            cut = _interruption(behavior, sent, chunked)
            if cut:
                yield from cut
                return
            yield Action.PAUSE
            text = make_text()  # after the pause: a stamp is the time of the write
            yield _frame(_TEXT_PREFIX + orjson.dumps(text) + _TEXT_SUFFIX, 0, chunked)
        cut = _interruption(behavior, math.inf, chunked)
        if cut:
            yield from cut
            return
        if behavior.end_error is not None:
            code, text = behavior.end_error
            payload = orjson.dumps({"error": _connect_error(code, text)})
            yield _frame(payload, FLAG_END_STREAM, chunked)
            return
        bookkeeping = {"messageEvent": {"messageId": message_id, "chatId": chat_id, "status": 2}}
        yield _frame(orjson.dumps(bookkeeping), 0, chunked)
        if not behavior.omit_done:
            yield _frame(_DONE_PAYLOAD, 0, chunked)
        if not behavior.omit_end:
            yield _frame(_END_OK_PAYLOAD, FLAG_END_STREAM, chunked)

    async def _stream_answer(
        self, conn: ClientConnection, behavior: StepBehavior, chat_id: str, prompt: str
    ) -> bool:
        """Write the scripted answer; returns whether the connection may be reused.

        The client leaving (EOF, reset, a failed write) ends the write at once
        and counts the stream as aborted.
        """
        tally = StreamTally(self.record, self._changed)
        outcome: Outcome | None = None
        try:
            write = partial(self._write_script, conn, behavior, tally, chat_id, prompt)
            outcome = await conn.watched(write)
        finally:
            tally.settle(outcome or Outcome.ABORTED)
        return outcome is Outcome.COMPLETE

    async def _write_script(
        self,
        conn: ClientConnection,
        behavior: StepBehavior,
        tally: StreamTally,
        chat_id: str,
        prompt: str,
    ) -> Outcome:
        """Write the head and the script (:func:`providers.emulator_script.write_script`)."""
        head = h11.Response(
            status_code=200, headers=[(b"content-type", CONNECT_JSON_TYPE.encode())], reason=b"OK"
        )
        script = self._script(behavior, chat_id, prompt, conn.chunked)
        return await write_script(conn, behavior, tally, head, script)

    # --- HTTP/1.1 connection loop (providers.emulator_http) -----------------

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve HTTP/1.1 on one accepted connection until either side ends it, then close it.

        :meth:`serve` calls this per TCP connection; it also serves any other
        trio stream, such as one end of ``trio.testing.memory_stream_pair()``
        (tests that watch write boundaries, or an in-process demo).

        Args:
            stream: the connection; it is closed when this returns.

        Never raises: peer errors end the connection quietly, and an
        unexpected error is logged and answered with HTTP 500 when possible.
        """
        await serve_connection(stream, self._respond, _refusal, max_body_bytes=MAX_BODY_BYTES)

    async def _respond(self, request: Request, conn: ClientConnection) -> bool:
        """Route one request and answer it; returns whether the connection may be reused."""
        body = request.body
        path, _, query = request.target.decode("latin-1").partition("?")
        if self._keep:
            self.record.paths.append(path)
        self._changed()
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            if key in headers:
                text = headers[key] + ("; " if key == "cookie" else ", ") + text
            headers[key] = text
        try:
            route = self._routes.get(path)
            if route is None:
                raise NotFound(f"no such procedure: {path}", code="not_found")
            if request.method != route.method:
                raise MethodNotAllowed(
                    f"{request.method.decode('latin-1')} is not allowed here", code="unimplemented"
                )
            if path == REGISTER_PATH:
                self._authenticate_user(headers)
            else:
                self._authenticate(headers)
            if route.unary_json and body.strip() and _media_type(headers) != JSON_TYPE:
                raise RelayError(
                    f"content type must be {JSON_TYPE}", code="invalid_argument", status=415
                )
            if route.handler is None:
                return await self._send_message(conn, headers, body)
            if path == DELETE_CHAT_PATH and self.behavior.delete_delay_s > 0:
                await trio.sleep(self.behavior.delete_delay_s)
            if path == CREATE_CHAT_PATH and self.behavior.create_delay_s > 0:
                with trio.CancelScope(shield=True):  # the site finishes what it began
                    await trio.sleep(self.behavior.create_delay_s)
            answer = route.handler(headers, query, body)
        except RelayError as exc:
            await conn.reply(_error_reply(exc.status, exc.code or "unknown", exc.message))
            return True
        await conn.reply(Reply(200, orjson.dumps(answer), JSON_TYPE))
        return True


# --- command line -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CliOptions:
    """What ``python -m providers.step.emulator`` was asked to do."""

    host: str
    port: int
    tokens: tuple[str, ...] | None
    behavior: StepBehavior
    keep_record: bool = True


def parse_args(argv: list[str] | None = None) -> CliOptions:
    """Parse the command line of :func:`main`.

    Raises:
        SystemExit: bad arguments or ``--help`` (argparse's behaviour).
    """
    parser = argparse.ArgumentParser(
        prog="python -m providers.step.emulator",
        description="A fake StepChat (yuewen.cn) server for tests, benchmarks and demos.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8001, help="port to bind (0: any free)")
    add_answer_flags(parser, chunk_help="characters per textEvent")
    add_pacing_flags(parser, frame="text frame")
    parser.add_argument(
        "--token", action="append", dest="tokens", help="accepted user token (repeatable)"
    )
    add_record_flag(parser)
    args = parser.parse_args(argv)
    behavior = StepBehavior(**behavior_options(args))
    tokens = tuple(args.tokens) if args.tokens else None
    return CliOptions(
        host=args.host,
        port=args.port,
        tokens=tokens,
        behavior=behavior,
        keep_record=not args.no_record,
    )


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then exit 0; prints ``listening on <base url>`` once bound.

    See :func:`providers.emulator_main.serve_until_signal` for why the
    signals are caught the way they are, and the ``gc.freeze()``.
    """
    options = parse_args(argv)
    emulator = StepEmulator(
        tokens=options.tokens, behavior=options.behavior, keep_record=options.keep_record
    )
    run_emulator(emulator, options.host, options.port)


if __name__ == "__main__":
    main()
