"""ChatGLM request side, sans-IO: from an OpenAI chat request to upstream bytes.

Theory of operation
-------------------
Everything here is pure: functions take strings, parsed messages or upstream
JSON and return strings, bytes or plain objects. ``client.py`` does the I/O
around them (fetching files, signing, sending), so every rule of
PROTOCOLS.md 3.2-3.10 that decides *what* goes on the wire is tested here
without a socket.

The pieces, in the order a chat request uses them:

1. :func:`resolve_model` maps the OpenAI ``model`` string to an assistant
   id, a ``chat_mode`` and two rendering flags (3.10). An agent id is used
   verbatim only when the whole name is 24+ lowercase letters or digits.
2. :func:`valid_conversation_id` decides whether a client-supplied
   ``conversation_id`` continues an upstream conversation. Unlike the
   reference (weakness 36) the test is anchored: the *whole* value must be
   24+ ASCII letters or digits.
3. :func:`attachment_items` sorts file-upload results (3.8) into the
   ``file`` and ``image`` items of the stream body.
4. :func:`build_prompt` flattens the messages into the one text item the
   upstream accepts (3.10), with our corrections: ``<|system|>`` instead of
   the misspelt ``<|sytstem|>`` (weakness 33, the old spelling available
   through ``system_tag``), null contents skipped and the caller's sequence
   never touched (weakness 32), each markdown image removed on its own
   (weakness 35).
5. :func:`stream_body` serialises the assistant/stream request (3.7);
   :func:`delete_body` the conversation delete.
6. :func:`parse_envelope` applies the unary-answer rules of 3.6 to every
   non-stream response (and to a non-SSE answer of the stream endpoint),
   turning failures into our exception tree: auth failures become
   :class:`AuthError` so the account layer evicts the token.

Traps
-----
- JSON ``true`` is a Python ``int``: a numeric ``code``/``status`` test must
  exclude ``bool`` or ``{"code": true}`` would pass as 1.
- Upstream error messages are relayed to clients; they are truncated and any
  JWT-looking substring is redacted, so a token can never be echoed.
- Markdown scrubbing must not join text across lines or across two images:
  the patterns below exclude newlines and brackets instead of relying on
  greedy ``.+``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import orjson

from protocol.errors import AuthError, LocalProtocolError, RemoteProtocolError, UpstreamFailed

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from protocol.openai import Message

# --- wire constants -------------------------------------------------------

#: PROTOCOLS.md 3.2: token refresh (since 2025-04-28).
REFRESH_PATH = "/chatglm/user-api/user/refresh"
#: PROTOCOLS.md 3.2: token refresh before 2025-04-28 (kept for configuration).
LEGACY_REFRESH_PATH = "/chatglm/backend-api/v1/user/refresh"
#: PROTOCOLS.md 3.2, 3.7: the chat (and drawing) SSE stream.
STREAM_PATH = "/chatglm/backend-api/assistant/stream"
#: PROTOCOLS.md 3.2, 3.7: conversation delete.
DELETE_PATH = "/chatglm/backend-api/assistant/conversation/delete"
#: PROTOCOLS.md 3.2, 3.8: chat file upload (multipart).
UPLOAD_PATH = "/chatglm/backend-api/assistant/file_upload"

#: PROTOCOLS.md 3.2: referer page of the default assistant.
REFERER_ALLTOOLS_PATH = "/main/alltoolsdetail"
#: PROTOCOLS.md 3.2: referer page of any other assistant (id appended).
REFERER_GDETAIL_PATH = "/main/gdetail/"
#: PROTOCOLS.md 3.2, 3.8: referer of the chat file upload.
REFERER_UPLOAD_PATH = "/"

#: PROTOCOLS.md 3.2: the default chat assistant (GLM-4).
DEFAULT_ASSISTANT = "65940acff94777010aa6b796"
#: PROTOCOLS.md 3.2, 3.12: the drawing assistant (CogView).
DRAWING_ASSISTANT = "65a232c082ff90a2ad2f15e2"

#: PROTOCOLS.md 3.12 (ids), 3.10 (reasoning and research names): what
#: ``/v1/models`` lists. Any other string is accepted too.
MODELS: tuple[str, ...] = (
    "glm-3-turbo",
    "glm-4",
    "glm-4-plus",
    "glm-4v",
    "glm-v1",
    "glm-v1-vision",
    "glm-4-zero",
    "glm-4-think",
    "glm-4-deepresearch",
)
#: ``owned_by`` of every entry in ``/v1/models``.
MODEL_OWNER = "glm"

#: PROTOCOLS.md 3.5: the browser header set, Origin excluded (it follows the
#: base URL, see :func:`browser_headers`). Accept-Encoding differs on purpose:
#: we only advertise what we decode (2.4, weakness 31). Empty values are kept
#: as the reference sends them.
BROWSER_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Accept", b"application/json, text/plain, */*"),
    (b"Accept-Encoding", b"gzip, deflate"),
    (b"Accept-Language", b"zh-CN,zh;q=0.9,en;q=0.8"),
    (b"Cache-Control", b"no-cache"),
    (b"App-Name", b"chatglm"),
    (b"Pragma", b"no-cache"),
    (b"sec-ch-ua", b'"Chromium";v="134", "Not:A-Brand";v="24", "Google Chrome";v="134"'),
    (b"sec-ch-ua-mobile", b"?0"),
    (b"sec-ch-ua-platform", b'"macOS"'),
    (b"Sec-Fetch-Dest", b"empty"),
    (b"Sec-Fetch-Mode", b"cors"),
    (b"Sec-Fetch-Site", b"same-origin"),
    (
        b"User-Agent",
        b"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
        b"(KHTML, like Gecko) Chrome/134.0.0.0 Safari/537.36",
    ),
    (b"X-App-Platform", b"pc"),
    (b"X-App-Version", b"0.0.1"),
    (b"X-Device-Brand", b""),
    (b"X-Device-Model", b""),
    (
        b"X-Exp-Groups",
        b"na_android_config:exp:NA,na_4o_config:exp:4o_A,na_glm4plus_config:exp:open,"
        b"mainchat_server_app:exp:A,mobile_history_daycheck:exp:a,desktop_toolbar:exp:A,"
        b"chat_drawing_server:exp:A,drawing_server_cogview:exp:cogview4,app_welcome_v2:exp:B,"
        b"chat_drawing_streamv2:exp:A,mainchat_rm_fc:exp:add,mainchat_dr:exp:open,"
        b"chat_auto_entrance:exp:A",
    ),
    (b"X-Lang", b"zh"),
)

#: PROTOCOLS.md 3.10: role tags of the merged prompt. ``system`` is ours
#: (weakness 33); the reference's ``<|sytstem|>`` is a ``system_tag`` away.
SYSTEM_TAG = "<|system|>"
USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"
#: PROTOCOLS.md 3.10 step 1: "focus on the user's latest files and message".
FILE_HINT = "关注用户最新发送文件和消息"

#: PROTOCOLS.md 3.7: ``meta_data`` chat modes the upstream knows.
CHAT_MODES = frozenset({"zero", "deep_research"})

#: PROTOCOLS.md 3.6: the upstream's "refresh token expired" number.
EXPIRED_CODE = 40102
#: What a client sees when its refresh token expired (never the token itself).
EXPIRED_MESSAGE = "ChatGLM refresh token expired; log in again and copy a new chatglm_refresh_token"
#: Longest upstream error message we relay, in characters.
MAX_ERROR_MESSAGE_CHARS = 300

# --- patterns -------------------------------------------------------------

# 3.10: an agent id copied from {base}/main/gdetail/<id>: the whole name.
_AGENT_ID_RE = re.compile(r"[a-z0-9]{24,}")
# weakness 36: anchored by fullmatch; ASCII only (str.isalnum would take CJK digits).
_CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9]{24,}")
# weakness 35: one markdown image, never crossing a line, a closing bracket
# or a closing parenthesis, so two images on a line are two matches and the
# text between them survives. One level of nested brackets in the alt text
# and of parentheses in the target (Wikipedia-style URLs) is allowed; both
# alternations start on distinct characters, so matching stays linear.
MARKDOWN_IMAGE_RE = re.compile(
    r"!\[(?:[^\[\]\n]|\[[^\[\]\n]*\])*\]"  # ![alt]
    r"\((?:[^()\n]|\([^()\n]*\))*\)"  # (target)
)
# 3.10 step 5: a sandbox path and the rest of its line (the newline stays).
_SANDBOX_PATH_RE = re.compile(r"/mnt/data/[^\n]*")
# A JWT (header.payload[.signature]): redacted from relayed error messages.
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?")
# Characters that must not reach a multipart filename or header value.
_UNSAFE_NAME_RE = re.compile(r'[\x00-\x1f\x7f"\\/]')
# RFC 2046 5.1.1: boundary characters (no trailing space allowed here either).
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")


# --- models and ids -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """What an OpenAI ``model`` string selects upstream (PROTOCOLS.md 3.10)."""

    #: the assistant to talk to: an agent id, or the default assistant
    assistant_id: str
    #: ``meta_data.chat_mode``: "zero", "deep_research" or None (omitted)
    chat_mode: str | None
    #: a reasoning model: its ``think`` items are reasoning, not answer text
    think: bool
    #: search hits and reasoning are suppressed from the output
    silent: bool


def is_agent_id(name: str) -> bool:
    """Whether ``name`` is, as a whole, an agent id (24+ of ``[a-z0-9]``)."""
    return _AGENT_ID_RE.fullmatch(name) is not None


def resolve_model(model: str, default_assistant: str = DEFAULT_ASSISTANT) -> ModelChoice:
    """Map an OpenAI model name to the upstream assistant and mode.

    The rules of PROTOCOLS.md 3.10: the name is the assistant id when it is
    wholly 24+ lowercase letters or digits, else ``default_assistant``;
    ``deepresearch`` in the name selects ``deep_research`` (it wins over the
    others), ``think`` or ``zero`` select ``zero``. The name flags are matched
    case-insensitively (the reference is case-sensitive; ``GLM-4-Think`` is
    plainly meant as a think model), the agent-id rule is not.

    Args:
        model: the request's ``model``.
        default_assistant: the assistant for every name that is not an agent id.

    Returns:
        The choice; never raises, any string is a valid model.
    """
    lowered = model.lower()
    think = "think" in lowered or "zero" in lowered
    if "deepresearch" in lowered:
        chat_mode: str | None = "deep_research"
    elif think:
        chat_mode = "zero"
    else:
        chat_mode = None
    return ModelChoice(
        assistant_id=model if is_agent_id(model) else default_assistant,
        chat_mode=chat_mode,
        think=think,
        silent="silent" in lowered,
    )


def valid_conversation_id(value: str | None) -> str | None:
    """A client's ``conversation_id`` if it can name an upstream conversation.

    Anchored (weakness 36): the whole value must be 24 or more ASCII letters
    or digits. Anything else (``"none"``, an id with a suffix, a non-string)
    means "start a new conversation".

    Returns:
        ``value`` unchanged, or None.
    """
    if isinstance(value, str) and _CONVERSATION_ID_RE.fullmatch(value):
        return value
    return None


# --- URLs and headers -----------------------------------------------------


def url_for(base_url: str, path: str) -> str:
    """``base_url`` (a trailing slash ignored) joined with an absolute ``path``."""
    return base_url.rstrip("/") + path


def origin(base_url: str) -> bytes:
    """The ``Origin`` header for ``base_url``: scheme and host[:port] only.

    Raises:
        LocalProtocolError: ``base_url`` is not an absolute http(s) URL (a
            configuration mistake that should have been caught at startup).
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LocalProtocolError(f"base URL {base_url!r} is not an http(s) URL")
    host = parts.hostname
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}".encode("ascii", "strict")


def browser_headers(base_url: str) -> list[tuple[bytes, bytes]]:
    """The header set of PROTOCOLS.md 3.5 with ``Origin`` following ``base_url``.

    A fresh list, so callers may append their per-call headers to it.
    """
    headers = list(BROWSER_HEADERS)
    headers.insert(5, (b"Origin", origin(base_url)))  # the table's position, after App-Name
    return headers


def referer(
    base_url: str, assistant_id: str, *, default_assistant: str = DEFAULT_ASSISTANT
) -> bytes:
    """The ``Referer`` of stream and delete calls (PROTOCOLS.md 3.7).

    ``{base}/main/alltoolsdetail`` for the default assistant, else
    ``{base}/main/gdetail/{assistant_id}``.
    """
    if assistant_id == default_assistant:
        return url_for(base_url, REFERER_ALLTOOLS_PATH).encode()
    return url_for(base_url, REFERER_GDETAIL_PATH + assistant_id).encode()


def upload_referer(base_url: str) -> bytes:
    """The ``Referer`` of a chat file upload: ``{base}/`` (PROTOCOLS.md 3.8)."""
    return url_for(base_url, REFERER_UPLOAD_PATH).encode()


# --- prompt ---------------------------------------------------------------


def strip_markdown_images(text: str) -> str:
    """Remove every markdown image ``![alt](target)``, each on its own (weakness 35)."""
    return MARKDOWN_IMAGE_RE.sub("", text) if "![" in text else text


def strip_sandbox_paths(text: str) -> str:
    """Remove every ``/mnt/data/`` with the rest of its line (PROTOCOLS.md 3.10 step 5)."""
    return _SANDBOX_PATH_RE.sub("", text) if "/mnt/data/" in text else text


def _texts(message: Message) -> list[str]:
    return [part.text for part in message.parts if part.type == "text"]


def _has_attachment(message: Message) -> bool:
    return any(part.type in ("file", "image_url") for part in message.parts)


def _role_tag(role: str, system_tag: str) -> str:
    if role in ("system", "developer"):  # OpenAI's newer name for the system role
        return system_tag
    if role == "user":
        return USER_TAG
    if role == "assistant":
        return ASSISTANT_TAG
    return role  # tool and others stay bare, as in the reference


def build_prompt(messages: Sequence[Message], *, reuse: bool, system_tag: str = SYSTEM_TAG) -> str:
    """Flatten the messages into the single text item the upstream takes.

    PROTOCOLS.md 3.10, with our corrections:

    - Pass-through (``reuse``, or fewer than two messages): each text part's
      text plus a newline; no tags, no hint, no scrubbing.
    - Merged: a file hint (``FILE_HINT`` as a system message) before the last
      message when that message has file or image parts; every text part as
      ``tag\\ntext\\n``; a trailing ``<|assistant|>\\n``; then markdown images
      removed one by one, then every ``/mnt/data/`` path with the rest of its
      line.

    Messages with null content (no parts) contribute nothing; the hint is
    added to the output, never inserted into ``messages``.

    Args:
        messages: the request's messages, oldest first.
        reuse: a valid ``conversation_id`` continues an upstream conversation,
            which already holds the history.
        system_tag: the tag for system messages; ``"<|sytstem|>"`` reproduces
            the reference byte for byte.

    Returns:
        The prompt text.
    """
    if reuse or len(messages) < 2:
        return "".join(text + "\n" for message in messages for text in _texts(message))
    pieces: list[str] = []
    last = len(messages) - 1
    for index, message in enumerate(messages):
        if index == last and _has_attachment(message):
            pieces += (system_tag, "\n", FILE_HINT, "\n")
        tag = _role_tag(message.role, system_tag)
        for text in _texts(message):
            pieces += (tag, "\n", text, "\n")
    pieces += (ASSISTANT_TAG, "\n")
    return strip_sandbox_paths(strip_markdown_images("".join(pieces)))


# --- request bodies -------------------------------------------------------


def is_image_upload(result: Mapping[str, Any]) -> bool:
    """Whether an upload result is an image: a truthy ``width`` or ``height`` (3.8)."""
    return bool(result.get("width")) or bool(result.get("height"))


def attachment_items(
    results: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sort upload results (3.8) into the stream body's file and image items.

    Each result is copied whole (the upstream wants it verbatim); image ones
    get ``image_url`` = ``file_url`` added. The inputs are not modified.

    Returns:
        ``(files, images)``, each in input order.
    """
    files: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for result in results:
        if is_image_upload(result):
            images.append({**result, "image_url": result.get("file_url")})
        else:
            files.append(dict(result))
    return files, images


def stream_body(
    *,
    assistant_id: str,
    conversation_id: str,
    prompt: str,
    files: Sequence[Mapping[str, Any]] = (),
    images: Sequence[Mapping[str, Any]] = (),
    chat_mode: str | None = None,
    is_networking: bool = True,
) -> bytes:
    """The JSON body of ``assistant/stream`` (PROTOCOLS.md 3.7).

    Args:
        assistant_id: from :func:`resolve_model` (or the drawing assistant).
        conversation_id: ``""`` for a new conversation, else a valid id.
        prompt: from :func:`build_prompt` (or a drawing prompt).
        files: document upload results (see :func:`attachment_items`).
        images: image upload results; ``image_url`` is filled from
            ``file_url`` where missing.
        chat_mode: ``"zero"``, ``"deep_research"`` or None (omitted).
        is_networking: sent as ``true`` when set; the drawing flow clears it
            and the key is then omitted, as the reference does.

    Returns:
        The UTF-8 JSON body.

    Raises:
        LocalProtocolError: ``chat_mode`` is not one the upstream knows.
    """
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if files:
        content.append({"type": "file", "file": [dict(item) for item in files]})
    if images:
        content.append(
            {
                "type": "image",
                "image": [{"image_url": item.get("file_url"), **item} for item in images],
            }
        )
    meta: dict[str, Any] = {"channel": ""}
    if chat_mode is not None:
        if chat_mode not in CHAT_MODES:
            raise LocalProtocolError(f"unknown ChatGLM chat_mode {chat_mode!r}")
        meta["chat_mode"] = chat_mode
    meta |= {"draft_id": "", "if_plus_model": True, "input_question_type": "xxxx"}
    if is_networking:
        meta["is_networking"] = True
    meta |= {"is_test": False, "platform": "pc", "quote_log_id": ""}
    return orjson.dumps(
        {
            "assistant_id": assistant_id,
            "conversation_id": conversation_id,
            "messages": [{"role": "user", "content": content}],
            "meta_data": meta,
        }
    )


def delete_body(assistant_id: str, conversation_id: str) -> bytes:
    """The JSON body of ``assistant/conversation/delete`` (PROTOCOLS.md 3.7)."""
    return orjson.dumps({"assistant_id": assistant_id, "conversation_id": conversation_id})


# --- responses ------------------------------------------------------------


def _number(value: object) -> int | float | None:
    """A JSON number, or None (``true``/``false`` are not numbers here).

    Integral floats become ints, so ``401.0`` compares and prints as 401.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _safe_message(message: str) -> str:
    """An upstream message fit to show a client: no token, bounded length."""
    message = _JWT_RE.sub("[redacted]", message)
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "..."
    return message


def parse_envelope(http_status: int, body: bytes) -> Any:  # noqa: ANN401 (JSON boundary)
    """Apply the unary-answer rules of PROTOCOLS.md 3.6.

    - Not JSON: an error naming the HTTP status.
    - Neither ``code`` nor ``status`` is a number: the whole body is the
      result (the reference's rule), unless the HTTP status is an error.
    - ``code == 0`` or ``status == 0``: success, ``result`` is returned.
    - Otherwise an error: see Raises.

    Args:
        http_status: the response's HTTP status.
        body: the whole response body.

    Returns:
        The ``result`` (any JSON value, None when absent), or the whole body.

    Raises:
        AuthError: HTTP 401 or 403; ``code``/``status`` 401; or 40102 as
            ``code``, ``status`` or within the message (code
            ``refresh_token_expired``; otherwise ``access_token_invalid``).
        UpstreamFailed: any other failure; the message carries the upstream's
            message (redacted and truncated), never a token.
    """
    if http_status in (401, 403):
        detail = ""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and _is_expired(parsed):
            raise AuthError(EXPIRED_MESSAGE, code="refresh_token_expired")
        if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
            detail = ": " + _safe_message(parsed["message"])
        raise AuthError(
            f"ChatGLM refused the credential (HTTP {http_status}){detail}",
            code="access_token_invalid",
        )
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamFailed(
            f"ChatGLM answered HTTP {http_status} with a body that is not JSON"
        ) from None
    if not isinstance(parsed, dict):
        if http_status >= 400:
            raise UpstreamFailed(f"ChatGLM request failed with HTTP {http_status}")
        return parsed
    code = _number(parsed.get("code"))
    status = _number(parsed.get("status"))
    if code is None and status is None:
        if http_status >= 400:
            raise UpstreamFailed(f"ChatGLM request failed with HTTP {http_status}")
        return parsed
    if code == 0 or status == 0:
        return parsed.get("result")
    if _is_expired(parsed):
        raise AuthError(EXPIRED_MESSAGE, code="refresh_token_expired")
    raw_message = parsed.get("message")
    message = _safe_message(raw_message) if isinstance(raw_message, str) and raw_message else ""
    if code == 401 or status == 401:
        raise AuthError(
            f"ChatGLM refused the credential: {message or 'code 401'}",
            code="access_token_invalid",
        )
    number = code if code is not None else status
    shown = message or f"code {number}"
    raise UpstreamFailed(f"ChatGLM request failed: {shown}")


def _is_expired(envelope: Mapping[str, Any]) -> bool:
    """40102 as ``code``, ``status`` or inside the message (3.6)."""
    if EXPIRED_CODE in (_number(envelope.get("code")), _number(envelope.get("status"))):
        return True
    message = envelope.get("message")
    return isinstance(message, str) and str(EXPIRED_CODE) in message


#: How a stream answer says the conversation it was asked to continue does not
#: exist. PROTOCOLS.md does not establish the site's code for it (3.6: codes per
#: endpoint are unknown), so its message decides, in English (the emulator's
#: "conversation not found") or Chinese ("会话不存在"), or an HTTP 404.
_MISSING_RE = re.compile(r"not[ _]?found|not[ _]exist|不存在", re.IGNORECASE)


def conversation_missing(http_status: int, body: bytes) -> bool:
    """Whether a non-SSE answer of the stream endpoint says "no such conversation".

    Only meaningful for a request that continued a conversation (3.10): a
    new conversation cannot be missing. Never raises.
    """
    if http_status == 404:
        return True
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(parsed, dict):
        return False
    numbers = [n for n in (_number(parsed.get("code")), _number(parsed.get("status")))
               if n is not None]
    failed = bool(numbers) and 0 not in numbers  # parse_envelope's rule (3.6)
    message = parsed.get("message")
    return failed and isinstance(message, str) and _MISSING_RE.search(message) is not None


def parse_refresh(result: object) -> tuple[str, str | None]:
    """The tokens of a refresh answer's ``result`` (PROTOCOLS.md 3.3).

    Reads ``access_token`` (or the pre-2025 ``accessToken``, weakness 21) and
    the rotated ``refresh_token`` (weakness 22: the caller may keep it).

    Returns:
        ``(access_token, refresh_token or None)``.

    Raises:
        RemoteProtocolError: no non-empty access token in ``result``.
    """
    if isinstance(result, dict):
        access = result.get("access_token")
        if not (isinstance(access, str) and access):
            access = result.get("accessToken")
        if isinstance(access, str) and access:
            refresh = result.get("refresh_token")
            return access, refresh if isinstance(refresh, str) and refresh else None
    raise RemoteProtocolError("ChatGLM refresh answer carries no access token")


# --- file upload ----------------------------------------------------------


def filename_from_url(url: str) -> str:
    """A file name for an uploaded URL: its last path segment.

    Unlike the reference (weakness 29) the query string and fragment are not
    part of it, so ``cat.png?x=1`` keeps its ``.png`` and its MIME type.
    Percent escapes are decoded; quotes, backslashes, slashes and control
    characters are dropped so the name is safe in a multipart header.

    Returns:
        The name, or ``"file"`` when nothing usable is left.
    """
    path = urlsplit(url).path
    name = _UNSAFE_NAME_RE.sub("", unquote(path.rsplit("/", 1)[-1]))
    return name if name not in ("", ".", "..") else "file"


def multipart_content_type(boundary: str) -> bytes:
    """The ``Content-Type`` header value for :func:`multipart_body`."""
    return f"multipart/form-data; boundary={boundary}".encode("ascii")


def multipart_body(
    field: str, filename: str, content_type: str, data: bytes, boundary: str
) -> bytes:
    """A ``multipart/form-data`` body holding one file part (PROTOCOLS.md 3.8).

    The filename is written as browsers do (WHATWG HTML: UTF-8, with ``"``,
    CR and LF percent-encoded).

    Args:
        field: the form field name (``"file"`` for ChatGLM).
        filename: the file's name.
        content_type: the file's MIME type.
        data: the file.
        boundary: the part boundary; the caller makes it random.

    Returns:
        The body; send it with :func:`multipart_content_type` of ``boundary``.

    Raises:
        LocalProtocolError: the boundary is not a valid RFC 2046 boundary or
            occurs in ``data``, or ``field``/``content_type`` hold characters
            that would break the part header.
    """
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise LocalProtocolError(f"invalid multipart boundary {boundary!r}")
    delimiter = b"--" + boundary.encode("ascii")
    if delimiter in data:
        raise LocalProtocolError("multipart boundary occurs in the file")
    if _UNSAFE_NAME_RE.search(field) or re.search(r"[\x00-\x1f\x7f]", content_type):
        raise LocalProtocolError("multipart field or content type holds control characters")
    quoted = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    head = (
        f'Content-Disposition: form-data; name="{field}"; filename="{quoted}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return b"".join((delimiter, b"\r\n", head, data, b"\r\n", delimiter, b"--\r\n"))
