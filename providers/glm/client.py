"""ChatGLM client: the I/O half of the provider (PROTOCOLS.md section 3).

Theory of operation
-------------------
Every decision about *what* goes on the wire lives in the sans-IO modules
(``prompt.py`` for requests and envelopes, ``stream.py`` for the snapshot
stream, ``media.py`` for the image and video flows, ``signing.py`` for the
signature); this module only moves bytes through the relay's
:class:`~providers.contract.Transport` and keeps the flows' order.

Per chat request (3.7-3.10): fetch and upload the last message's files
(concurrently, multipart), POST ``assistant/stream``, decode the SSE body
with :class:`~protocol.sse.SSEDecoder` and translate the snapshots with
:class:`~providers.glm.stream.GlmStream`, one list of deltas per upstream
read, then delete the conversation the answer created.

Every call is signed (3.4) with a fresh nonce and timestamp, the configured
secret, a fresh ``X-Request-Id`` and a *stable* ``X-Device-Id`` per account,
derived from a hash of its refresh token, as a browser keeps one per install
(weakness 30). The reference leaves uploads and the video delete unsigned;
``sign_every_call=False`` reproduces that.

Where we differ from the reference, on purpose:

- the stream endpoint's HTTP status and Content-Type are checked; anything
  else is read as a 3.6 envelope: auth failures raise :class:`AuthError` (the
  relay evicts the session and retries), a busy account ("a conversation is
  in progress") becomes a leading 429 :class:`UpstreamError` so the relay
  moves to another account, the rest :class:`UpstreamFailed`;
- a conversation the relay created is deleted after *every* answer (success,
  upstream error, client disconnect), shielded from cancellation and bounded
  by ``cleanup_timeout`` (weakness 17); a conversation the client asked to
  continue (a valid ``conversation_id``) is left alone (weakness 18);
- the drawing flow only counts markdown *image* targets (weakness 38), a
  content-filter stop is a 400 with the upstream's explanation, and
  ``b64_json`` downloads go through the relay's size-limited, SSRF-guarded
  fetcher (weakness 25);
- a video job is polled within ``video_timeout`` and never re-run as a
  whole (weakness 37); the job is deleted (signed, shielded) on every path.

*The first snapshot.* The site creates the conversation when it takes the
stream request, but names it only in the first snapshot. A client that
leaves in between (the relay is waiting for the response head or the first
event) would otherwise cancel the only read that can learn the id, and the
conversation would stay behind. So, for a conversation the relay will
delete, the request, the response head and the reads up to the first
complete event are held against cancellation (:func:`providers.cancel.hold_on_cancel`):
once the client has gone (or the relay stops), they get ``cleanup_timeout``
more seconds to learn the id, never the upstream's own first-byte timeout;
then the conversation is deleted as usual.

A video's first-frame image is resized to 1440 px wide and centre-cropped to
at most 960 px high before the upload (3.8; :func:`media.first_frame`, with
Pillow, in a worker thread).

Known limits: ``n`` of an images request is not a loop: one drawing flow
runs and every image it drew is returned.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import secrets
import time
import uuid
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from protocol.datauri import check_file_name, upload_media_type
from protocol.deltas import Finish, ImageResult, TextDelta, UpstreamError
from protocol.errors import (
    AuthError,
    NotFound,
    RelayError,
    RemoteProtocolError,
    RequestError,
    UpstreamFailed,
    UpstreamTimeout,
)
from protocol.openai import file_parts
from protocol.sse import SSEDecoder
from providers.cancel import create_held, hold_on_cancel
from providers.contract import FetchedFile, MediaAnswer, after_answer
from providers.files import each_file
from providers.glm import media, prompt
from providers.glm.signing import DEFAULT_SECRET, sign
from providers.glm.stream import CITATION_LINE, GlmModes, GlmStream

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Sequence

    from protocol.deltas import Delta, VideoResult
    from protocol.openai import ChatRequest, ContentPart
    from providers.contract import (
        Background,
        Fetcher,
        Headers,
        Leased,
        StreamedResponse,
        Transport,
    )

    # by name: in GlmProvider's body, ``media`` is its property (providers.contract)
    from providers.glm.media import ImageRequest, VideoRequest, VideoStatus

log = logging.getLogger("providers.glm")

#: PROTOCOLS.md 3.2, 3.3: access tokens live 3600 s.
SESSION_TTL_S = 3600.0
#: PROTOCOLS.md 3.12: the video status is polled every second.
VIDEO_POLL_S = 1.0
#: PROTOCOLS.md 4: each video call is given 30 s.
VIDEO_CALL_TIMEOUT_S = 30.0
#: The model a request without one is answered by (README's default).
DEFAULT_MODEL = "glm-4-plus"
#: Model names routed here (any case), besides agent ids (PROTOCOLS.md 3.10).
MODEL_PREFIXES = ("glm", "chatglm", "cogview", "cogvideo")

#: PROTOCOLS.md 3.7: what the stream call accepts, and the answer's media type.
SSE_ACCEPT = b"text/event-stream"
SSE_CONTENT_TYPE = b"text/event-stream"
JSON_CONTENT_TYPE = b"application/json"
#: The multipart form field of both upload endpoints (3.8).
UPLOAD_FIELD = "file"
#: Busy-account messages (3.13: "a conversation is in progress"; README: one
#: stream per account). Matched as substrings of the envelope's message.
BUSY_MARKERS = ("进行中", "in progress", "busy")
#: How a refresh token becomes a stable device id (no secret, just a label).
_DEVICE_LABEL = b"trio-llm-relay glm device\x00"


def device_id_for(credential: str) -> str:
    """The stable ``X-Device-Id`` of an account: 32 hex digits from its token's hash.

    The same refresh token always gives the same id (a browser keeps one per
    install); the token cannot be recovered from it.
    """
    return hashlib.sha256(_DEVICE_LABEL + credential.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class GlmSession:
    """A logged-in account: the access token and what every call needs besides.

    Attributes:
        access_token: ``Authorization: Bearer`` of every call but the refresh.
        device_id: the account's stable ``X-Device-Id``.
        refresh_token: the refresh token to log in again with: the rotated one
            when the refresh answer carried one (weakness 22), else the
            original. Kept in memory only, never logged.
    """

    access_token: str = field(repr=False)
    device_id: str
    refresh_token: str = field(repr=False)


def _check_header_token(token: str, what: str) -> None:
    """Refuse a token that cannot go into a header (never echoing it)."""
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise RemoteProtocolError(f"ChatGLM sent a malformed {what}")


def _first_byte_timeout(seconds: float) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"ChatGLM sent no answer within {seconds:g} s (RELAY_FIRST_BYTE_TIMEOUT)",
        code="upstream_timeout",
    )


def _busy(body: bytes) -> bool:
    """Whether a non-SSE stream answer says the account is busy."""
    text = body.decode("utf-8", errors="replace").lower()
    return any(marker in text for marker in BUSY_MARKERS)


def _raise_for(error: UpstreamError) -> None:
    """Raise the exception an upstream error delta stands for."""
    message = f"ChatGLM: {error.message}" if error.message else "ChatGLM failed"
    if error.status == 401:
        raise AuthError(message, code=error.code)
    if error.status == 504:
        raise UpstreamTimeout(message, code=error.code)
    raise UpstreamFailed(message, code=error.code, status=error.status)


class GlmAnswer:
    """One ``assistant/stream`` response as lists of deltas (providers.contract.ChatStream)."""

    def __init__(
        self,
        response: StreamedResponse,
        modes: GlmModes,
        conversation_id: str = "",
        *,
        shield_first_event: bool = False,
        grace_s: float = 10.0,
        first_deadline: float = math.inf,
        first_byte_timeout: float = math.inf,
    ) -> None:
        """
        Args:
            response: the open SSE response (status and type already checked).
            modes: how to render the model's answer.
            conversation_id: the continued conversation, "" for a new one.
            shield_first_event: read up to the first complete event shielded
                from cancellation (it names the conversation to delete), for
                at most ``grace_s`` after a cancellation arrives.
            first_deadline: (trio time) the first event must be read by then,
                else UpstreamTimeout (with ``shield_first_event``, only once
                the grace that may learn the conversation is over).
            first_byte_timeout: the setting behind ``first_deadline``, for
                the message.
        """
        self._response = response
        self._translator = GlmStream(modes)
        self._decoder = SSEDecoder()
        self._given = conversation_id
        self._shield = shield_first_event
        self._grace_s = grace_s
        self._first_deadline = first_deadline
        self._first_byte_timeout = first_byte_timeout
        self._events = 0

    @property
    def conversation_id(self) -> str:
        """The conversation: the first one a snapshot named, else the continued one."""
        return self._translator.conversation_id or self._given

    def _feed(self, chunk: bytes) -> list[Delta]:
        deltas: list[Delta] = []
        for event in self._decoder.feed(chunk):
            self._events += 1
            deltas += self._translator.feed(event.data)
        return deltas

    async def learn_conversation(self) -> None:
        """Read until the first event (which names the conversation) or the end.

        For a caller that is being cancelled before iterating: call it
        shielded and bounded. The deltas read are dropped (nobody listens).
        """
        async with aclosing(self._response.chunks()) as chunks:
            while not self._events:
                chunk = await anext(chunks, None)
                if chunk is None:
                    return
                self._feed(chunk)

    async def __aiter__(self) -> AsyncGenerator[list[Delta], None]:
        translator = self._translator
        async with aclosing(self._response.chunks()) as chunks:
            while True:
                if not self._events:
                    # No event yet: this read may be the one naming the conversation,
                    # so a cancellation (the client gone, or the first-byte deadline)
                    # waits (a while) until it is read and fed.
                    chunk, deltas = None, []
                    with trio.move_on_at(self._first_deadline) as first:
                        async with hold_on_cancel(self._grace_s if self._shield else 0):
                            chunk = await anext(chunks, None)
                            if chunk is not None:
                                deltas = self._feed(chunk)
                    if first.cancel_called:  # too late, even if read in the grace
                        raise _first_byte_timeout(self._first_byte_timeout)
                else:
                    chunk = await anext(chunks, None)
                    deltas = self._feed(chunk) if chunk is not None else []
                if chunk is None:
                    break
                if deltas:
                    yield deltas
                if translator.finished:
                    return
        self._decoder.close()
        tail = translator.close()
        if tail:
            yield tail


class GlmRefusal:
    """An answer that is only an error: the account was busy (a ChatStream).

    The relay retries on another account when an answer *begins* with a 429
    error, which is how a busy account is reported (raising at entry would
    end the request instead).
    """

    conversation_id = ""

    def __init__(self, error: UpstreamError) -> None:
        self._error = error

    async def __aiter__(self) -> AsyncGenerator[list[Delta], None]:
        yield [self._error]


class GlmProvider:
    """ChatGLM as a provider (providers.contract.Provider), plus images and videos."""

    name = "glm"
    session_ttl = SESSION_TTL_S
    citation_line = CITATION_LINE
    default_model = DEFAULT_MODEL
    #: tools, JSON formats, stop and max_tokens are the relay's to emulate
    native_agents = False
    renews_sessions = True

    def __init__(
        self,
        transport: Transport,
        fetcher: Fetcher,
        *,
        base_url: str,
        secret: str = DEFAULT_SECRET,
        system_tag: str = prompt.SYSTEM_TAG,
        cleanup_timeout: float = 10.0,
        first_byte_timeout: float = math.inf,
        upload_timeout: float = 60.0,
        video_timeout: float = 600.0,
        video_poll_interval: float = VIDEO_POLL_S,
        sign_every_call: bool = True,
        default_assistant: str = prompt.DEFAULT_ASSISTANT,
        drawing_assistant: str = prompt.DRAWING_ASSISTANT,
        background: Background | None = None,
    ) -> None:
        """
        Args:
            transport: unary and streamed calls to chatglm.cn.
            fetcher: resolves client file URLs (and generated images for b64_json).
            base_url: the site (3.2), e.g. ``https://chatglm.cn``.
            secret: the signing secret (3.4); the site changes it.
            system_tag: role tag of system messages in merged prompts (3.10).
            cleanup_timeout: bound on deleting a conversation or video job,
                and on learning its id once the client has gone or the
                first-byte timeout has passed.
            first_byte_timeout: from sending a stream request to its first
                event. Kept here, not (only) by the transport: when it
                passes, the read goes on for ``cleanup_timeout`` to learn the
                conversation to delete, so the transport's own first-byte
                timeout must be longer by that much (``relay/registry.py``).
            upload_timeout: bound on one file upload call.
            video_timeout: longest wait for a video to be made.
            video_poll_interval: seconds between video status polls.
            sign_every_call: sign uploads and the video delete too (the
                reference does not).
            default_assistant: the chat assistant for non-agent model names.
            drawing_assistant: the assistant that draws.
            background: where conversation deletion runs after an answer;
                None runs it before ``chat`` returns.
        """
        self._transport = transport
        self._fetcher = fetcher
        self._base = base_url.rstrip("/")
        prompt.origin(self._base)  # fail early on a base URL that is not http(s)
        self._secret = secret
        self._system_tag = system_tag
        self._cleanup_timeout = cleanup_timeout
        self._first_byte_timeout = first_byte_timeout
        self._background = background
        self._upload_timeout = upload_timeout
        self._video_timeout = video_timeout
        self._sign_every_call = sign_every_call
        self._default_assistant = default_assistant
        self._drawing_assistant = drawing_assistant
        #: seconds between video status polls (public: tests shorten it)
        self.video_poll_interval = video_poll_interval

    def models(self) -> list[str]:
        return list(prompt.MODELS)

    def owns_model(self, model: str) -> bool:
        """Our model names, and agent ids (3.10: 24+ lowercase letters and digits)."""
        return model.lower().startswith(MODEL_PREFIXES) or prompt.is_agent_id(model)

    def looks_like(self, credential: str) -> bool:
        """A refresh token (3.3) is a JWT: it has no ``@``, which StepChat's have."""
        return "@" not in credential

    @property
    def media(self) -> GlmProvider:
        """ChatGLM draws and makes videos (3.12): :meth:`images`, :meth:`videos`."""
        return self

    # --- sessions and kept conversations (shared account state) ---------------------------

    def dump_session(self, session: GlmSession) -> str:
        """The session as JSON text (providers.contract.SessionCodec)."""
        return json.dumps({"access_token": session.access_token, "device_id": session.device_id,
                           "refresh_token": session.refresh_token}, sort_keys=True)

    def load_session(self, data: str) -> GlmSession:
        """The session :meth:`dump_session` wrote.

        Raises:
            ValueError: ``data`` is not one.
        """
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise ValueError("a ChatGLM session is a JSON object")
        values = [fields.get(name) for name in ("access_token", "device_id", "refresh_token")]
        access, device, refresh = (value if isinstance(value, str) else "" for value in values)
        if not (access and device and refresh):
            raise ValueError("a ChatGLM session needs an access token, device id and refresh token")
        return GlmSession(access, device, refresh)

    def keeps_conversation(self, request: ChatRequest) -> bool:
        """A client that sent ``conversation_id`` (even null or "") keeps its conversations
        (weakness 18; providers.contract.ConversationKeeper)."""
        return request.conversation_id is not None

    def continued_conversation(self, request: ChatRequest) -> str | None:
        """The conversation ``request`` continues: its ``conversation_id``, if valid (3.10)."""
        return prompt.valid_conversation_id(request.conversation_id)

    def validate_credential(self, credential: str) -> None:
        """A refresh token: non-empty ASCII, no whitespace, comma or control character.

        Raises:
            AuthError: it cannot be one (the credential is never echoed).
        """
        if (
            not credential
            or not credential.isascii()
            or "," in credential
            or not credential.isprintable()
            or any(c.isspace() for c in credential)
        ):
            raise AuthError(
                "the ChatGLM credential is not a refresh token (chatglm_refresh_token cookie)",
                code="invalid_credential",
            )

    # --- calls ---------------------------------------------------------------------------

    def _headers(
        self,
        bearer: str,
        device_id: str,
        referer: bytes | None,
        content_type: bytes | None = JSON_CONTENT_TYPE,
        *,
        signed: bool = True,
        accept: bytes | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """The browser set (3.5) plus this call's auth, referer and ids (3.4)."""
        headers = prompt.browser_headers(self._base)
        if accept is not None:
            headers = [(k, accept) if k == b"Accept" else (k, v) for k, v in headers]
        headers.append((b"Authorization", b"Bearer " + bearer.encode()))
        if referer is not None:
            headers.append((b"Referer", referer))
        if content_type is not None:
            headers.append((b"Content-Type", content_type))
        headers.append((b"X-Device-Id", device_id.encode()))
        headers.append((b"X-Request-Id", uuid.uuid4().hex.encode()))
        if signed or self._sign_every_call:
            headers += sign(int(time.time() * 1000), self._secret).headers()
        return headers

    def _session_headers(
        self,
        session: GlmSession,
        referer: bytes | None,
        content_type: bytes | None = JSON_CONTENT_TYPE,
        *,
        signed: bool = True,
        accept: bytes | None = None,
    ) -> list[tuple[bytes, bytes]]:
        return self._headers(
            session.access_token, session.device_id, referer, content_type,
            signed=signed, accept=accept,
        )

    async def _call(
        self,
        method: bytes,
        path: str,
        headers: Headers,
        body: bytes = b"",
        *,
        limit_s: float | None = None,
    ) -> Any:  # noqa: ANN401 - the JSON result, narrowed by the parsers
        """One unary call; the 3.6 envelope's ``result``.

        Raises:
            AuthError: the credential was refused (401, 40102).
            UpstreamFailed, UpstreamTimeout: anything else went wrong.
        """
        response = await self._transport.request(
            method, prompt.url_for(self._base, path), headers, body, limit_s=limit_s
        )
        return prompt.parse_envelope(response.status, response.body)

    async def _refresh(self, credential: str, referer: bytes | None) -> GlmSession:
        self.validate_credential(credential)
        device_id = device_id_for(credential)
        headers = self._headers(credential, device_id, referer)
        result = await self._call(b"POST", prompt.REFRESH_PATH, headers, b"{}")
        access, rotated = prompt.parse_refresh(result)
        _check_header_token(access, "access token")
        if rotated is not None:
            try:
                _check_header_token(rotated, "refresh token")
            except RemoteProtocolError:
                rotated = None
        return GlmSession(access, device_id, rotated or credential)

    async def login(self, credential: str) -> GlmSession:
        """Exchange a refresh token for an access token (3.3).

        Raises:
            AuthError: refused; code ``refresh_token_expired`` for 40102.
            UpstreamFailed, UpstreamTimeout: the call failed.
        """
        return await self._refresh(credential, None)

    async def check(self, credential: str) -> bool:
        """Liveness (3.3): the refresh call with the liveness referer, uncached.

        Returns:
            True if it worked, False if the site refused the credential
            (401, 40102) or it cannot be a refresh token at all.

        Raises:
            RelayError: (UpstreamFailed, UpstreamTimeout, RemoteProtocolError)
                the site could not tell: unreachable, failing, or answering
                something else than a token or a refusal.
        """
        try:
            await self._refresh(
                credential, prompt.url_for(self._base, prompt.REFERER_ALLTOOLS_PATH).encode()
            )
        except AuthError:
            return False
        return True

    async def _delete_conversation(
        self, session: GlmSession, assistant_id: str, conversation_id: str
    ) -> None:
        referer = prompt.url_for(self._base, prompt.REFERER_ALLTOOLS_PATH).encode()
        await self._call(
            b"POST",
            prompt.DELETE_PATH,
            self._session_headers(session, referer),
            prompt.delete_body(assistant_id, conversation_id),
        )

    async def _cleanup(self, session: GlmSession, assistant_id: str, conversation_id: str) -> None:
        """Delete a conversation: shielded, bounded, retried once, never raising.

        An access token that expired since the answer (401) is refreshed
        first, with the session's refresh token, as a chat request would; a
        refused refresh ends the attempt. The account pool's cached session
        is not replaced: the next request that meets the old token logs in
        again as usual.
        """
        with trio.move_on_after(self._cleanup_timeout, shield=True) as scope:
            for attempt in (1, 2):
                try:
                    await self._delete_conversation(session, assistant_id, conversation_id)
                    log.debug("deleted conversation %s", conversation_id)
                    return
                except RelayError as exc:
                    log.warning("deleting conversation %s failed (attempt %d): %s",
                                conversation_id, attempt, exc)
                    if exc.status != 401 or attempt == 2:
                        continue
                try:
                    session = await self._refresh(session.refresh_token, None)
                except RelayError as exc:
                    log.warning("deleting conversation %s: the login again failed: %s",
                                conversation_id, exc)
                    return
        if scope.cancelled_caught:
            log.warning("deleting conversation %s timed out", conversation_id)

    # --- files ----------------------------------------------------------------------------

    async def _upload(self, session: GlmSession, file: FetchedFile, name: str, path: str,
                      referer: bytes, *, video_frame: bool = False) -> dict[str, Any]:
        """Upload a client's (fetched) file as multipart (3.8); the ``result``.

        ``video_frame``: the file is a video's first frame, resized and
        cropped first (off the event loop).
        """
        if video_frame:
            data, mime, extension = await trio.to_thread.run_sync(media.first_frame, file.data)
            stem = (name or file.name).rsplit(".", 1)[0] or "frame"
            file = FetchedFile(f"{stem}.{extension}", mime, data)
        boundary = _boundary(file.data)
        # both go into the part's header: a redirect names files too, a server their type
        body = prompt.multipart_body(UPLOAD_FIELD, check_file_name(name or file.name),
                                     upload_media_type(file.mime), file.data, boundary)
        headers = self._session_headers(
            session, referer, prompt.multipart_content_type(boundary), signed=False
        )
        result = await self._call(b"POST", path, headers, body, limit_s=self._upload_timeout)
        if not isinstance(result, dict):
            raise RemoteProtocolError("ChatGLM upload answer is not an object")
        return result

    async def _chat_upload(
        self, session: GlmSession, part: ContentPart, file: FetchedFile
    ) -> dict[str, Any]:
        result = await self._upload(
            session, file, part.name, prompt.UPLOAD_PATH, prompt.upload_referer(self._base)
        )
        if not isinstance(result.get("file_url"), str):
            raise RemoteProtocolError("ChatGLM upload answer has no file_url")
        return result

    async def _attachments(
        self, session: GlmSession, parts: Sequence[ContentPart]
    ) -> list[dict[str, Any]]:
        if not parts:
            return []
        return await each_file(
            self._fetcher, [part.url for part in parts],
            lambda index, file: self._chat_upload(session, parts[index], file),
        )

    # --- the stream -----------------------------------------------------------------------

    def _stream_headers(self, session: GlmSession, assistant_id: str) -> list[tuple[bytes, bytes]]:
        referer = prompt.referer(self._base, assistant_id,
                                 default_assistant=self._default_assistant)
        return self._session_headers(session, referer, accept=SSE_ACCEPT)

    async def _check_stream_response(
        self, response: StreamedResponse, continued: str | None = None
    ) -> None:
        """Return if the response is an SSE stream; else raise what its body says.

        Args:
            continued: the conversation the request continued, if any.

        Raises:
            NotFound: (404, ``param`` conversation_id) the site does not know
                the ``continued`` conversation (on this account).
            AuthError: 401/403, or an auth envelope (3.6).
            UpstreamFailed: status 429 for a busy account; 502 otherwise.
        """
        content_type = (response.header(b"content-type") or b"").split(b";")[0].strip().lower()
        if response.status == 200 and content_type == SSE_CONTENT_TYPE:
            return
        body = await response.read()
        if continued is not None and prompt.conversation_missing(response.status, body):
            raise NotFound(
                f"ChatGLM has no conversation {continued!r} for this account (it may have "
                "been deleted, or belong to another account); send an empty conversation_id "
                "to start a new one",
                param="conversation_id", code="conversation_not_found",
            )
        try:
            prompt.parse_envelope(response.status, body)  # raises for every error envelope
        except AuthError:
            raise
        except UpstreamFailed as exc:
            if _busy(body):
                raise UpstreamFailed(
                    "the ChatGLM account is busy with another answer", status=429,
                    code="account_busy",
                ) from exc
            raise
        shown = content_type.decode("latin-1") or "no content type"
        raise UpstreamFailed(
            f"ChatGLM answered HTTP {response.status} ({shown}) instead of a stream"
        )

    @asynccontextmanager
    async def chat(
        self, session: GlmSession, request: ChatRequest
    ) -> AsyncIterator[GlmAnswer | GlmRefusal]:
        """Open an answer (3.7-3.10); leaving deletes the conversation we created.

        Raises (on entering):
            AuthError: the access token was refused (the relay evicts it).
            RequestError: a file could not be fetched.
            UpstreamFailed, UpstreamTimeout: upstream trouble. A busy account
                is not raised: the answer then begins with a 429 error.
        """
        choice = prompt.resolve_model(request.model or DEFAULT_MODEL, self._default_assistant)
        reuse = self.continued_conversation(request)
        parts = file_parts(request.messages)
        files, images = prompt.attachment_items(await self._attachments(session, parts))
        body = prompt.stream_body(
            assistant_id=choice.assistant_id,
            conversation_id=reuse or "",
            prompt=prompt.build_prompt(
                request.messages, reuse=reuse is not None, system_tag=self._system_tag
            ),
            files=files,
            images=images,
            chat_mode=choice.chat_mode,
        )
        # A client that sent `conversation_id` (even null or "") manages its
        # conversations: keep them so it can continue (weakness 18). Others
        # leave nothing behind, even when they leave before the id is known.
        keep = self.keeps_conversation(request)
        answer: GlmAnswer | None = None
        try:
            async with AsyncExitStack() as stack:

                async def open_stream() -> StreamedResponse:
                    return await stack.enter_async_context(self._transport.stream(
                        b"POST",
                        prompt.url_for(self._base, prompt.STREAM_PATH),
                        self._stream_headers(session, choice.assistant_id),
                        body,
                    ))

                async def learn_id(opened: StreamedResponse) -> None:
                    # opened, then told to go: read on (bounded) to learn what to delete
                    nonlocal answer
                    if keep:
                        return  # the client keeps its conversations: nothing to delete
                    answer = GlmAnswer(opened, GlmModes())
                    with trio.move_on_after(self._cleanup_timeout, shield=True):
                        await answer.learn_conversation()

                # The first event (which names the conversation) is due by then. Past
                # it, a head or an event still on its way gets the cleanup grace, as
                # for a client that leaves, so the conversation can be deleted; then
                # the answer is a 504 all the same.
                first_deadline = trio.current_time() + self._first_byte_timeout
                opened: StreamedResponse | None = None
                with trio.move_on_at(first_deadline) as first:
                    opened = await create_held(
                        0 if keep else self._cleanup_timeout, open_stream, learn_id
                    )
                if opened is None or first.cancel_called:
                    if opened is not None:  # the head came in the grace: learn_id did not run
                        await learn_id(opened)
                    raise _first_byte_timeout(self._first_byte_timeout)
                response = opened
                try:
                    await self._check_stream_response(response, reuse)
                except UpstreamFailed as exc:
                    if exc.status != 429:
                        raise
                    yield GlmRefusal(UpstreamError(exc.code or "account_busy", exc.message, 429))
                    return
                answer = GlmAnswer(response, GlmModes(think=choice.think, silent=choice.silent),
                                   reuse or "", shield_first_event=not keep,
                                   grace_s=self._cleanup_timeout, first_deadline=first_deadline,
                                   first_byte_timeout=self._first_byte_timeout)
                yield answer
        finally:
            created = answer.conversation_id if answer is not None and not keep else ""
            if created:
                await after_answer(self._background, functools.partial(
                    self._cleanup, session, choice.assistant_id, created))

    # --- images (3.12) -------------------------------------------------------------------

    async def images(self, body: bytes, leased: Leased[GlmSession]) -> MediaAnswer:
        """``/v1/images/generations`` (providers.contract.Media).

        The drawing runs on a leased account (one stream per account, like
        chat); a ``b64_json`` answer downloads the images after the lease.
        """
        request = media.parse_image_request(body)
        urls = await leased(functools.partial(self.draw, request=request))
        return MediaAnswer(await self.images_body(request, urls))

    async def draw(self, session: GlmSession, request: ImageRequest) -> list[str]:
        """Run the drawing flow once; the URLs of the images drawn, first seen first.

        Raises:
            RequestError: (400, code ``content_filter``) the content filter
                stopped it; the message is the upstream's explanation.
            AuthError: the access token was refused.
            UpstreamFailed: 429 for a busy account; 502 when nothing was
                drawn or the stream failed. UpstreamTimeout: it was too slow.
        """
        assistant_id = media.drawing_assistant(request.model, self._drawing_assistant)
        body = prompt.stream_body(
            assistant_id=assistant_id,
            conversation_id="",
            prompt=media.drawing_prompt(request.prompt),
            is_networking=False,
        )
        answer: GlmAnswer | None = None
        urls: dict[str, None] = {}
        texts: list[str] = []
        first_deadline = trio.current_time() + self._first_byte_timeout
        try:
            async with self._transport.stream(
                b"POST",
                prompt.url_for(self._base, prompt.STREAM_PATH),
                self._stream_headers(session, assistant_id),
                body,
            ) as response:
                await self._check_stream_response(response)
                answer = GlmAnswer(response, GlmModes(), shield_first_event=True,
                                   grace_s=self._cleanup_timeout, first_deadline=first_deadline,
                                   first_byte_timeout=self._first_byte_timeout)
                async with aclosing(answer.__aiter__()) as batches:
                    async for batch in batches:
                        for delta in batch:
                            if isinstance(delta, ImageResult):
                                urls[delta.url] = None
                            elif isinstance(delta, TextDelta):
                                texts.append(delta.text)
                            elif isinstance(delta, UpstreamError):
                                _raise_for(delta)
                            elif isinstance(delta, Finish) and delta.reason == "content_filter":
                                raise RequestError(
                                    delta.text or "ChatGLM's content filter refused the prompt",
                                    param="prompt", code="content_filter",
                                )
        finally:
            if answer is not None and answer.conversation_id:
                await self._cleanup(session, assistant_id, answer.conversation_id)
        for url in media.image_urls_from_text("".join(texts)):
            urls[url] = None
        if not urls:
            raise UpstreamFailed("ChatGLM drew no image for this prompt", code="no_images")
        return list(urls)

    async def images_body(self, request: ImageRequest, urls: Sequence[str]) -> bytes:
        """The OpenAI images response for drawn ``urls``; downloads them for ``b64_json``.

        Downloads go through the fetcher (size limit, address guard).

        Raises:
            UpstreamFailed: a generated image could not be downloaded.
        """
        created = int(time.time())
        if request.response_format != "b64_json":
            return media.images_body(urls, created)

        async def keep(index: int, file: FetchedFile) -> bytes:
            return file.data

        try:
            images = await each_file(self._fetcher, urls, keep)
        except RequestError as exc:
            raise UpstreamFailed(
                f"could not download a generated image: {exc.message}", code="image_download"
            ) from exc
        return media.images_b64_body(images, created)

    # --- videos (3.12) -------------------------------------------------------------------

    async def videos(self, body: bytes, leased: Leased[GlmSession]) -> MediaAnswer:
        """``/v1/videos/generations`` (providers.contract.Media): one video, on a leased account."""
        request = media.parse_video_request(body)
        result = await leased(functools.partial(self.make_video, request=request))
        created = int(time.time())
        return MediaAnswer(media.videos_body([result], created), result.conversation_id)

    async def make_video(self, session: GlmSession, request: VideoRequest) -> VideoResult:
        """Make one video: optional first frame, submit, poll, optional sound, delete.

        ``cogvideox-pro`` without an ``image_url`` draws its first frame
        first. The job is deleted on every path (shielded, bounded); it is
        never re-submitted.

        Raises:
            RequestError: the first-frame image could not be fetched, or the
                drawing was refused by the content filter.
            AuthError: the access token was refused.
            UpstreamFailed: the job failed; UpstreamTimeout: not done within
                ``video_timeout``.
        """
        referer = media.video_referer(self._base)
        image_url = request.image_url
        if image_url is None and request.model == "cogvideox-pro":
            image_url = (await self.draw(session, media.ImageRequest(prompt=request.prompt)))[0]
        source_ids: list[str] = []
        if image_url is not None:
            frame = await self._fetcher.fetch(image_url)
            result = await self._upload(session, frame, "", media.VIDEO_UPLOAD_PATH, referer,
                                        video_frame=True)
            source_ids.append(media.parse_upload_source(result))

        async def start() -> tuple[str, str]:
            result = await self._call(
                b"POST",
                media.VIDEO_CHAT_PATH,
                self._session_headers(session, referer),
                media.video_chat_body(request, source_ids),
                limit_s=VIDEO_CALL_TIMEOUT_S,
            )
            return media.parse_video_chat(result)

        # held: a job started while the client left is deleted all the same
        chat_id, conversation_id = await create_held(
            self._cleanup_timeout, start,
            lambda started: self._delete_video(session, started[0], referer),
        )
        try:
            status = await self._wait_video(session, chat_id, referer)
            video_url = None
            if request.audio_id is not None:
                video_url = media.parse_composite(
                    await self._call(
                        b"POST",
                        media.VIDEO_COMPOSITE_PATH,
                        self._session_headers(session, referer),
                        media.composite_body(chat_id, request.audio_id),
                        limit_s=VIDEO_CALL_TIMEOUT_S,
                    )
                )
            return status.to_result(conversation_id, video_url)
        finally:
            await self._delete_video(session, chat_id, referer)

    async def _wait_video(
        self, session: GlmSession, chat_id: str, referer: bytes
    ) -> VideoStatus:
        """Poll until the job is done (bounded by ``video_timeout``)."""
        path = media.video_status_path(chat_id)
        with trio.move_on_after(self._video_timeout):
            while True:
                status = media.parse_video_status(
                    await self._call(
                        b"GET", path, self._session_headers(session, referer, None),
                        limit_s=VIDEO_CALL_TIMEOUT_S,
                    )
                )
                if status.done:
                    return status
                if status.failed:
                    detail = status.msg or f"status {status.status or 'missing'}"
                    raise UpstreamFailed(f"ChatGLM could not make the video: {detail}",
                                         code="video_failed")
                await trio.sleep(self.video_poll_interval)
        raise UpstreamTimeout(
            f"ChatGLM did not finish the video within {self._video_timeout:g} s",
            code="video_timeout",
        )

    async def _delete_video(self, session: GlmSession, chat_id: str, referer: bytes) -> None:
        """DELETE a video job: shielded, bounded, never raising."""
        with trio.move_on_after(self._cleanup_timeout, shield=True) as scope:
            try:
                await self._call(
                    b"DELETE",
                    media.video_delete_path(chat_id),
                    self._session_headers(session, referer, None, signed=False),
                )
                log.debug("deleted video job %s", chat_id)
            except RelayError as exc:
                log.warning("deleting video job %s failed: %s", chat_id, exc)
        if scope.cancelled_caught:
            log.warning("deleting video job %s timed out", chat_id)


def _boundary(data: bytes) -> str:
    """A random multipart boundary that does not occur in ``data``."""
    while True:
        boundary = "----TrioRelayBoundary" + secrets.token_hex(16)
        if b"--" + boundary.encode() not in data:
            return boundary
