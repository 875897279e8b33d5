"""StepChat requests: from an OpenAI chat request to the upstream's bodies and headers.

Sans-IO: every function here takes parsed values or response bytes and
returns bytes, strings or small tuples. ``client.py`` does the I/O around
them; ``emulator.py`` and the tests use the same constants, so client and
emulator cannot drift apart silently.

Theory of operation (PROTOCOLS.md 2.3-2.9):

- The whole conversation is merged into one prompt string
  (:func:`build_prompt`), because the web chat takes one text per turn and
  we create a fresh upstream chat for every completion. The reference's
  merging is kept where clients may rely on it (``{role}:{text}`` lines and a
  closing ``assistant:``) and corrected where it is wrong (section 5,
  weaknesses 32 and 34): null contents are skipped instead of printing
  ``null``, the "history" hint is only added when there *is* history, and the
  caller's messages are never modified.
- Only the last message's files and images are uploaded (1.4);
  :func:`attachments_of` picks them, :func:`attachment` builds what
  SendMessageStream expects for each uploaded file, with real dimensions or
  empty strings, never the literal ``"undefined"`` (weakness 28).
- Unary calls answer plain JSON; errors are Connect error bodies
  ``{"code": "<string>", "message": ...}``, which :func:`parse_unary_error`
  turns into our exception tree. The ``parse_*`` helpers read the success
  bodies and raise :class:`RemoteProtocolError` when a field we need is
  missing, so a drifted upstream fails loudly instead of sending
  ``undefined`` onwards.
- The streaming call's body is one Connect envelope (2.5):
  :func:`send_message_body`.

Traps:
- The credential is ``deviceId@Oasis-Token``. The reference accepts a value
  without ``@`` and sends ``Oasis-Token=undefined``; we refuse it, and every
  error message about a credential is careful never to echo the token.
- Credential parts and issued tokens go into a ``Cookie`` header, so they
  are restricted to RFC 6265 cookie-octets: nothing a client sends can add a
  header or a cookie.
- ``Accept-Encoding`` names only what we decode (gzip, deflate), not the
  browser's ``br, zstd`` (weakness 31); ``Origin`` follows the configured
  base URL (2.4).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import orjson

from protocol.connect import encode_envelope
from protocol.errors import (
    AuthError,
    LocalProtocolError,
    RelayError,
    RemoteProtocolError,
    UpstreamFailed,
    UpstreamTimeout,
)
from protocol.openai import file_parts

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from protocol.openai import ContentPart, Message

# --- wire constants -------------------------------------------------------

#: PROTOCOLS.md 2.2: the default base URL (configurable: the site moved once).
DEFAULT_BASE_URL = "https://yuewen.cn"

#: PROTOCOLS.md 2.2 / 2.3: token exchange, also the liveness check.
REGISTER_DEVICE_PATH = "/passport/proto.api.passport.v1.PassportService/RegisterDevice"
#: PROTOCOLS.md 2.2 / 2.6
CREATE_CHAT_PATH = "/api/proto.chat.v1.ChatService/CreateChat"
#: PROTOCOLS.md 2.2 / 2.6: the one server-streaming call.
SEND_MESSAGE_PATH = "/api/proto.chat.v1.ChatMessageService/SendMessageStream"
#: PROTOCOLS.md 2.2 / 2.6
DEL_CHAT_PATH = "/api/proto.chat.v1.ChatService/DelChat"
#: PROTOCOLS.md 2.2 / 2.6: ``PUT`` with ``?file_name=<name>``, see :func:`upload_path`.
STORAGE_PATH = "/api/storage"
#: PROTOCOLS.md 2.2 / 2.6
FILE_STATUS_PATH = "/api/proto.file.v1.FileService/GetFileStatus"

#: PROTOCOLS.md 2.2 / 2.6: the name every new chat gets ("new conversation").
CHAT_NAME = "新会话"

#: PROTOCOLS.md 2.9: hint before the last message ("the above is history;
#: focus on the user message below").
HISTORY_HINT = "以上为历史消息，关注以下用户消息"
#: PROTOCOLS.md 2.9: the same when the last message carries files or images
#: ("... focus on the files and message the user sends below").
HISTORY_HINT_WITH_FILES = "以上为历史消息，关注以下用户发送的文件和消息"

#: PROTOCOLS.md 2.6: GetFileStatus ``fileStatus`` values that mean the upload failed.
FILE_FAILED_STATUSES = frozenset({12, 22, 59, 404})

#: PROTOCOLS.md 2.5: request and response type of unary calls.
JSON_CONTENT_TYPE = b"application/json"
#: PROTOCOLS.md 2.5: request and response type of the streaming call.
CONNECT_CONTENT_TYPE = b"application/connect+json"

#: PROTOCOLS.md 2.4 (2024-12-16 set): sent on every upstream call. ``Origin``
#: is missing on purpose: :func:`browser_headers` adds it from the base URL.
#: ``Accept-Encoding`` lists only what we decode (weakness 31).
BROWSER_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Accept", b"*/*"),
    (b"Accept-Encoding", b"gzip, deflate"),
    (b"Accept-Language", b"zh-CN,zh;q=0.9,en-US;q=0.8,en;q=0.7"),
    (b"Connect-Protocol-Version", b"1"),
    (b"Oasis-Appid", b"10200"),
    (b"Oasis-Mode", b"2"),
    (b"Oasis-Platform", b"web"),
    (b"Sec-Ch-Ua", b'"Google Chrome";v="131", "Chromium";v="131", "Not_A Brand";v="24"'),
    (b"Sec-Ch-Ua-Mobile", b"?0"),
    (b"Sec-Ch-Ua-Platform", b'"Windows"'),
    (b"Sec-Fetch-Dest", b"empty"),
    (b"Sec-Fetch-Mode", b"cors"),
    (b"Sec-Fetch-Site", b"same-origin"),
    (
        b"User-Agent",
        b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36"
        b" (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    ),
    (b"X-Waf-Client-Type", b"fetch_sdk"),
)

#: The form a client credential must have (2.3), for error messages.
CREDENTIAL_FORM = "deviceId@Oasis-Token"

#: RFC 6265 cookie-octet: visible ASCII except ``"``, ``,``, ``;`` and ``\\``.
_COOKIE_SAFE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+")

#: Longest upstream error message we pass on to a client, in characters.
_MAX_MESSAGE_CHARS = 500
#: Longest upstream error code we keep.
_MAX_CODE_CHARS = 64

#: Connect codes (2.5) for a non-2xx unary response without a readable
#: error body: the inverse of the code-to-status table of 2.5.
_CODE_OF_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    408: "deadline_exceeded",
    429: "resource_exhausted",
    500: "internal",
    501: "unimplemented",
    503: "unavailable",
    504: "deadline_exceeded",
}


# --- headers --------------------------------------------------------------


def origin_of(base_url: str) -> str:
    """The ``Origin`` a browser on ``base_url`` would send.

    Args:
        base_url: the configured upstream base, e.g. ``https://yuewen.cn``.

    Returns:
        ``scheme://host[:port]``, without path, query or user info.

    Raises:
        LocalProtocolError: ``base_url`` is not an absolute http(s) URL
            (a configuration mistake).
    """
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host:
        raise LocalProtocolError(f"StepChat base URL {base_url!r} is not an http(s) URL")
    if ":" in host:  # IPv6 literal: urlsplit drops the brackets
        host = f"[{host}]"
    port = parts.port
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def browser_headers(base_url: str) -> list[tuple[bytes, bytes]]:
    """The browser header set of 2.4, with ``Origin`` built from ``base_url``.

    Callers add ``Cookie``, ``Oasis-Webid``, ``Referer`` and ``Content-Type``
    per call (see :func:`session_headers`).

    Raises:
        LocalProtocolError: ``base_url`` is not an http(s) URL.
    """
    headers = list(BROWSER_HEADERS)
    headers.append((b"Origin", origin_of(base_url).encode("ascii")))
    return headers


def new_chat_referer(base_url: str) -> str:
    """``Referer`` for calls made before a chat exists (2.2)."""
    return f"{base_url.rstrip('/')}/chats/new"


def chat_referer(base_url: str, chat_id: str) -> str:
    """``Referer`` for calls about chat ``chat_id`` (2.2)."""
    return f"{base_url.rstrip('/')}/chats/{chat_id}"


def upload_path(file_name: str) -> str:
    """Path and query of the storage ``PUT`` for ``file_name`` (2.6).

    The name is percent-encoded; the reference inserts it raw (weakness 28).
    """
    return f"{STORAGE_PATH}?file_name={quote(file_name, safe='')}"


def session_headers(
    base_url: str, cookie: bytes, device_id: str, referer: str, content_type: bytes | None
) -> list[tuple[bytes, bytes]]:
    """All headers of one upstream call (2.3, 2.4).

    Args:
        base_url: the configured upstream base.
        cookie: the ``Cookie`` value (:func:`session_cookie`, or
            :func:`register_cookie` for RegisterDevice).
        device_id: the credential's device id, sent as ``Oasis-Webid``.
        referer: :func:`new_chat_referer` or :func:`chat_referer`.
        content_type: the body's type, or ``None`` for no header.

    Raises:
        LocalProtocolError: ``base_url`` is not an http(s) URL, ``referer``
            is not printable ASCII, or ``device_id`` is not cookie-safe (not
            from :func:`parse_credential`).
    """
    headers = browser_headers(base_url)
    headers += [
        (b"Cookie", cookie),
        (b"Oasis-Webid", _cookie_value(device_id)),
        (b"Referer", _header_value(referer)),
    ]
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    return headers


# --- credentials and cookies ----------------------------------------------


def parse_credential(credential: str) -> tuple[str, str]:
    """Split a client credential ``deviceId@Oasis-Token`` (2.3).

    Surrounding whitespace is ignored. The token may itself contain ``@``:
    only the first one separates.

    Args:
        credential: one entry of the client's comma-separated list.

    Returns:
        ``(device_id, token)``.

    Raises:
        AuthError: no ``@``, an empty side, or characters that cannot go
            into a cookie. The message names the expected form and never
            contains the credential.
    """
    device_id, sep, token = credential.strip().partition("@")
    if not sep or not device_id or not token:
        raise AuthError(
            f"StepChat credential must have the form {CREDENTIAL_FORM!r}", code="invalid_credential"
        )
    if not (_COOKIE_SAFE.fullmatch(device_id) and _COOKIE_SAFE.fullmatch(token)):
        raise AuthError(
            f"StepChat credential {CREDENTIAL_FORM!r} has characters a cookie cannot carry",
            code="invalid_credential",
        )
    return device_id, token


def _cookie_value(value: str) -> bytes:
    """``value`` as cookie bytes, or LocalProtocolError if it is not cookie-safe."""
    if not _COOKIE_SAFE.fullmatch(value):
        raise LocalProtocolError("refusing to put a non-cookie-safe value into a header")
    return value.encode("ascii")


def _header_value(value: str) -> bytes:
    """``value`` as header bytes: visible ASCII and spaces only, else LocalProtocolError."""
    if not (value.isascii() and value.isprintable()):
        raise LocalProtocolError("refusing to put a non-printable or non-ASCII value into a header")
    return value.encode("ascii")


def register_cookie(token: str) -> bytes:
    """``Cookie`` of the RegisterDevice call: only ``Oasis-Token`` (2.3).

    Raises:
        LocalProtocolError: ``token`` is not cookie-safe.
    """
    return b"Oasis-Token=" + _cookie_value(token)


def session_cookie(access: str, refresh: str, device_id: str) -> bytes:
    """``Cookie`` of every call after RegisterDevice (2.3).

    Returns:
        ``Oasis-Token=<access>...<refresh>; Oasis-Webid=<device_id>``.

    Raises:
        LocalProtocolError: a part is not cookie-safe (values from
            :func:`parse_credential` and :func:`parse_register` always are).
    """
    return (
        b"Oasis-Token="
        + _cookie_value(access)
        + b"..."
        + _cookie_value(refresh)
        + b"; Oasis-Webid="
        + _cookie_value(device_id)
    )


# --- prompt ---------------------------------------------------------------


def build_prompt(messages: Sequence[Message]) -> str:
    """Merge an OpenAI conversation into StepChat's one prompt text (2.9).

    One ``{role}:{text}`` line per text part, in order (a string content is
    one text part; image and file parts print nothing; a null content prints
    nothing). When there is more than one message, a ``system:`` line with
    the history hint goes right before the last message, naming files when
    the last message carries file or image parts. The text ends with
    ``assistant:`` and no newline. ``messages`` is not modified.

    Args:
        messages: the parsed request messages.

    Returns:
        The ``messageInfo.text`` of SendMessageStream.
    """
    lines: list[str] = []
    last = len(messages) - 1
    for index, message in enumerate(messages):
        if index == last and last > 0:
            hint = HISTORY_HINT_WITH_FILES if _has_files(message) else HISTORY_HINT
            lines.append(f"system:{hint}\n")
        role = message.role or "user"
        lines.extend(f"{role}:{part.text}\n" for part in message.parts if part.type == "text")
    lines.append("assistant:")
    return "".join(lines)


def _has_files(message: Message) -> bool:
    """True when ``message`` has a file or image part."""
    return any(part.type in ("file", "image_url") for part in message.parts)


def attachments_of(messages: Sequence[Message]) -> list[ContentPart]:
    """The file and image parts of the last message, in order (1.4).

    Returns:
        Parts of type ``file`` or ``image_url``; empty for no messages.
    """
    return file_parts(messages)


def attachment(
    file_id: str, name: str, mime: str, size: int, width: int | None, height: int | None
) -> dict[str, str]:
    """One ``messageInfo.attachments`` entry for an uploaded file (2.6).

    Unknown dimensions are empty strings, never the reference's literal
    ``"undefined"`` (weakness 28).
    """
    return {
        "attachmentType": mime,
        "attachmentId": file_id,
        "name": name,
        "width": "" if width is None else str(width),
        "height": "" if height is None else str(height),
        "size": str(size),
    }


# --- request bodies ---------------------------------------------------------


def register_body() -> bytes:
    """Body of RegisterDevice (2.3): an empty JSON object."""
    return b"{}"


def create_chat_body() -> bytes:
    """Body of CreateChat (2.6)."""
    return orjson.dumps({"chatName": CHAT_NAME})


def send_message_body(
    chat_id: str, text: str, attachments: Sequence[Mapping[str, str]] = ()
) -> bytes:
    """Body of SendMessageStream: exactly one Connect envelope (2.5, 2.6).

    Args:
        chat_id: from :func:`parse_create_chat`.
        text: from :func:`build_prompt`.
        attachments: :func:`attachment` results; the key is omitted when empty.

    Returns:
        The 5-byte envelope header followed by the JSON request.
    """
    info: dict[str, Any] = {"text": text}
    if attachments:
        info["attachments"] = [dict(item) for item in attachments]
    return encode_envelope(orjson.dumps({"chatId": chat_id, "messageInfo": info}))


def delete_chat_body(chat_id: str) -> bytes:
    """Body of DelChat (2.6)."""
    return orjson.dumps({"chatIds": [chat_id]})


def file_status_body(file_id: str) -> bytes:
    """Body of GetFileStatus (2.6)."""
    return orjson.dumps({"id": file_id})


# --- response bodies --------------------------------------------------------


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    """``body`` parsed as a JSON object, or RemoteProtocolError naming ``what``."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RemoteProtocolError(f"StepChat {what} response is not JSON") from exc
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"StepChat {what} response is not a JSON object")
    return value


def _shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_unary_error(status: int, body: bytes) -> RelayError | None:
    """Read a unary call's response as a Connect error, if it is one (2.5).

    The body decides, as in the reference: a string ``code`` means an
    error, whatever the status. A non-2xx status without a readable error
    body (empty, not JSON, no string ``code``) is an error too, its code
    taken from the status. Never raises.

    Args:
        status: the HTTP status.
        body: the whole response body.

    Returns:
        ``None`` for a success; otherwise the error to raise, whose
        ``code`` is the Connect code: :class:`AuthError` for
        ``unauthenticated`` and ``permission_denied`` (the caller evicts the
        account's session), :class:`UpstreamFailed` with status 429 for
        ``resource_exhausted``, :class:`UpstreamTimeout` for
        ``deadline_exceeded``, :class:`UpstreamFailed` (502) otherwise.
    """
    code: str | None = None
    message = ""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("code"), str) and value["code"]:
        code = _shorten(value["code"], _MAX_CODE_CHARS)
        if isinstance(value.get("message"), str):
            message = _shorten(value["message"], _MAX_MESSAGE_CHARS)
    ok = 200 <= status < 300
    if code is None:
        if ok:
            return None
        code = _CODE_OF_STATUS.get(status, "unknown")
    detail = f"[{code}] {message}" if message else f"[{code}]"
    if not ok:
        detail = f"HTTP {status} {detail}"
    match code:
        case "unauthenticated":
            return AuthError(f"StepChat rejected the account's credentials: {detail}", code=code)
        case "permission_denied":
            return AuthError(f"StepChat refused the account: {detail}", code=code)
        case "resource_exhausted":
            return UpstreamFailed(
                f"StepChat account is rate-limited: {detail}", code=code, status=429
            )
        case "deadline_exceeded":
            return UpstreamTimeout(f"StepChat timed out: {detail}", code=code)
        case _:
            return UpstreamFailed(f"StepChat request failed: {detail}", code=code)


def _nonempty_str(value: object) -> str | None:
    """``value`` if it is a non-empty string, else ``None``."""
    return value if isinstance(value, str) and value else None


def parse_register(body: bytes) -> tuple[str, str]:
    """Read RegisterDevice's success body (2.3).

    Returns:
        ``(access, refresh)``: ``accessToken.raw`` and ``refreshToken.raw``.

    Raises:
        RemoteProtocolError: not a JSON object, or a token missing, empty
            or not cookie-safe.
    """
    value = _json_object(body, "RegisterDevice")
    raws: list[str] = []
    for key in ("accessToken", "refreshToken"):
        holder = value.get(key)
        raw = _nonempty_str(holder.get("raw")) if isinstance(holder, dict) else None
        if raw is None or not _COOKIE_SAFE.fullmatch(raw):
            raise RemoteProtocolError(f"StepChat RegisterDevice response has no usable {key}.raw")
        raws.append(raw)
    return raws[0], raws[1]


def parse_create_chat(body: bytes) -> str:
    """Read CreateChat's success body (2.6).

    Returns:
        The ``chatId``, a decimal string.

    Raises:
        RemoteProtocolError: not a JSON object, or no decimal-string ``chatId``.
    """
    chat_id = _json_object(body, "CreateChat").get("chatId")
    if not (isinstance(chat_id, str) and chat_id.isascii() and chat_id.isdigit()):
        raise RemoteProtocolError("StepChat CreateChat response has no decimal chatId")
    return chat_id


def parse_upload(body: bytes) -> str:
    """Read the storage ``PUT``'s success body (2.6).

    Returns:
        The uploaded file's ``id``.

    Raises:
        RemoteProtocolError: not a JSON object, or no non-empty string ``id``.
    """
    file_id = _nonempty_str(_json_object(body, "storage upload").get("id"))
    if file_id is None:
        raise RemoteProtocolError("StepChat storage upload response has no file id")
    return file_id


def parse_file_status(body: bytes) -> tuple[int, bool]:
    """Read GetFileStatus's success body (2.6).

    Protobuf JSON leaves out fields that hold their default value, so a
    missing ``fileStatus`` is 0 and a missing ``needFurtherCall`` is false.

    Returns:
        ``(fileStatus, needFurtherCall)``; the upload failed when the status
        is in :data:`FILE_FAILED_STATUSES`.

    Raises:
        RemoteProtocolError: not a JSON object, or a field of the wrong type.
    """
    value = _json_object(body, "GetFileStatus")
    file_status = value.get("fileStatus", 0)
    further = value.get("needFurtherCall", False)
    if isinstance(file_status, bool) or not isinstance(file_status, int):
        raise RemoteProtocolError("StepChat GetFileStatus response has a non-integer fileStatus")
    if not isinstance(further, bool):
        raise RemoteProtocolError(
            "StepChat GetFileStatus response has a non-boolean needFurtherCall"
        )
    return file_status, further
