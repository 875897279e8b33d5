"""StepChat client: the I/O half of the provider (PROTOCOLS.md section 2).

Per request (2.9): upload the files of the last message, CreateChat,
SendMessageStream, translate the Connect stream into deltas, DelChat. The
wire formats live in ``prompt.py`` (requests) and ``stream.py`` (responses);
this module only moves bytes, through the relay's :class:`Transport`.

Where we differ from the reference, on purpose:

- SendMessageStream's HTTP status and Content-Type are checked before any
  byte is decoded as an envelope; anything else is read as a unary Connect
  error, so a 401 evicts the token instead of hanging the reader (2.8, 5.4);
- the conversation is deleted after *every* request, on success, upstream
  error and client disconnect alike, shielded from cancellation and bounded
  by ``cleanup_timeout`` (5.17);
- upload status is polled with a short back-off, not in a tight loop, and the
  settle delay after it is configurable (5.27); file names are URL-encoded.
"""

from __future__ import annotations

import functools
import json
import logging
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from protocol.connect import EnvelopeDecoder
from protocol.datauri import check_file_name, upload_media_type
from protocol.errors import AuthError, RelayError, UpstreamFailed, UpstreamTimeout
from providers.cancel import create_held
from providers.contract import after_answer
from providers.files import each_file
from providers.step import prompt
from providers.step.stream import CITATION_LINE, StepStream

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Sequence

    from protocol.deltas import Delta
    from protocol.openai import ChatRequest, ContentPart
    from providers.contract import (
        Background,
        FetchedFile,
        Fetcher,
        Headers,
        Response,
        StreamedResponse,
        Transport,
    )

log = logging.getLogger("providers.step")

#: 2.3: access tokens live 900 s
SESSION_TTL_S = 900.0
#: polling GetFileStatus: first delay, growth, cap (5.27: the reference does not wait at all)
POLL_FIRST_S, POLL_GROWTH, POLL_MAX_S = 0.2, 1.5, 2.0
#: 2.6: give up on an upload that is still processing after this long
UPLOAD_PROCESSING_LIMIT_S = 60.0
#: 2.10: the reference lists step-v1 and step-v1-vision; "step" is its default model name
MODELS = ["step", "step-v1", "step-v1-vision"]
#: the model an answer names when the request named none
DEFAULT_MODEL = "step"
#: model names routed here (any case): ours all begin so
MODEL_PREFIX = "step"


@dataclass(frozen=True, slots=True)
class StepSession:
    """A logged-in account: what every call after RegisterDevice needs.

    Attributes:
        device_id: the account's ``Oasis-Webid``.
        cookie: the session cookie (2.3).
        token: the credential's Oasis-Token, to register again with when the
            access token expires during a cleanup. In memory only, never logged.
    """

    device_id: str
    cookie: bytes = field(repr=False)
    token: str = field(default="", repr=False)


class StepAnswer:
    """One SendMessageStream response as lists of deltas (providers.contract.ChatStream)."""

    def __init__(self, response: StreamedResponse, chat_id: str) -> None:
        self._response = response
        self._chat_id = chat_id

    @property
    def conversation_id(self) -> str:
        return self._chat_id

    async def __aiter__(self) -> AsyncGenerator[list[Delta], None]:
        decoder = EnvelopeDecoder()
        translator = StepStream()
        async with aclosing(self._response.chunks()) as chunks:
            async for chunk in chunks:
                deltas: list[Delta] = []
                for envelope in decoder.feed(chunk):
                    deltas += translator.feed(envelope)
                if deltas:
                    yield deltas
                if translator.finished:
                    return
        decoder.close()
        tail = translator.close(ended=decoder.ended)
        if tail:
            yield tail


class StepProvider:
    """StepChat as a provider (providers.contract.Provider)."""

    name = "step"
    session_ttl = SESSION_TTL_S
    citation_line = CITATION_LINE
    default_model = DEFAULT_MODEL
    #: tools, JSON formats, stop and max_tokens are the relay's to emulate
    native_agents = False
    renews_sessions = True
    #: StepChat makes no images or videos
    media = None

    def __init__(
        self,
        transport: Transport,
        fetcher: Fetcher,
        *,
        base_url: str,
        cleanup_timeout: float = 10.0,
        upload_timeout: float = 60.0,
        file_settle: float = 1.0,
        background: Background | None = None,
    ) -> None:
        """
        Args:
            background: where chat deletion runs after an answer; None runs
                it before ``chat`` returns.
        """
        self._transport = transport
        self._fetcher = fetcher
        self._base = base_url.rstrip("/")
        self._cleanup_timeout = cleanup_timeout
        self._upload_timeout = upload_timeout
        self._file_settle = file_settle
        self._background = background

    def models(self) -> list[str]:
        return list(MODELS)

    def owns_model(self, model: str) -> bool:
        return model.lower().startswith(MODEL_PREFIX)

    def looks_like(self, credential: str) -> bool:
        """``deviceId@Oasis-Token`` (2.3): the ``@`` tells it from other providers'."""
        return "@" in credential

    def validate_credential(self, credential: str) -> None:
        prompt.parse_credential(credential)

    def dump_session(self, session: StepSession) -> str:
        """The session as JSON text (providers.contract.SessionCodec).

        The cookie is bytes of a header value: latin-1 keeps every byte as it is.
        """
        return json.dumps({"cookie": session.cookie.decode("latin-1"),
                           "device_id": session.device_id, "token": session.token},
                          sort_keys=True)

    def load_session(self, data: str) -> StepSession:
        """The session :meth:`dump_session` wrote.

        Raises:
            ValueError: ``data`` is not one.
        """
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise ValueError("a StepChat session is a JSON object")
        device_id, cookie, token = (fields.get(name) for name in ("device_id", "cookie", "token"))
        if not (isinstance(device_id, str) and isinstance(cookie, str) and isinstance(token, str)
                and device_id and cookie):
            raise ValueError("a StepChat session needs its device id, cookie and token")
        return StepSession(device_id, cookie.encode("latin-1"), token)

    # --- calls ---------------------------------------------------------------------------

    def _headers(
        self,
        session: StepSession,
        referer: str,
        content_type: bytes | None = prompt.JSON_CONTENT_TYPE,
    ) -> list[tuple[bytes, bytes]]:
        return prompt.session_headers(
            self._base, session.cookie, session.device_id, referer, content_type
        )

    async def _unary(
        self, path: str, headers: Headers, body: bytes, *, method: bytes = b"POST",
        limit_s: float | None = None,
    ) -> Response:
        response = await self._transport.request(
            method, self._base + path, headers, body, limit_s=limit_s
        )
        error = prompt.parse_unary_error(response.status, response.body)
        if error is not None:
            raise error
        return response

    async def login(self, credential: str) -> StepSession:
        device_id, token = prompt.parse_credential(credential)
        return await self._register(device_id, token)

    async def _register(self, device_id: str, token: str) -> StepSession:
        """RegisterDevice (2.3): a fresh access token for the account."""
        headers = prompt.session_headers(
            self._base, prompt.register_cookie(token), device_id,
            prompt.new_chat_referer(self._base), prompt.JSON_CONTENT_TYPE,
        )
        response = await self._unary(
            prompt.REGISTER_DEVICE_PATH, headers, prompt.register_body()
        )
        access, refresh = prompt.parse_register(response.body)
        return StepSession(device_id, prompt.session_cookie(access, refresh, device_id), token)

    async def check(self, credential: str) -> bool:
        """Liveness (2.3): RegisterDevice, uncached.

        Returns:
            True if it worked, False if the site refused the credential.

        Raises:
            RelayError: (UpstreamFailed, UpstreamTimeout, RemoteProtocolError)
                the site could not tell: unreachable, failing, or answering
                something else than a session or a refusal.
        """
        try:
            await self.login(credential)
        except AuthError:
            return False
        return True

    async def _create_chat(self, session: StepSession) -> str:
        response = await self._unary(
            prompt.CREATE_CHAT_PATH,
            self._headers(session, prompt.new_chat_referer(self._base)),
            prompt.create_chat_body(),
        )
        return prompt.parse_create_chat(response.body)

    async def _delete_chat(self, session: StepSession, chat_id: str) -> None:
        await self._unary(
            prompt.DEL_CHAT_PATH,
            self._headers(session, prompt.chat_referer(self._base, chat_id)),
            prompt.delete_chat_body(chat_id),
        )

    async def _cleanup(self, session: StepSession, chat_id: str) -> None:
        """Delete the chat: shielded, bounded, retried once, never raising.

        An access token that expired since the answer (401) is renewed first
        (RegisterDevice with the session's Oasis-Token, as a chat request's
        login does); a refused renewal ends the attempt. The account pool's
        cached session is not replaced: the next request that meets the old
        token logs in again as usual.
        """
        with trio.move_on_after(self._cleanup_timeout, shield=True) as scope:
            for attempt in (1, 2):
                try:
                    await self._delete_chat(session, chat_id)
                    log.debug("deleted chat %s", chat_id)
                    return
                except RelayError as exc:
                    log.warning("deleting chat %s failed (attempt %d): %s", chat_id, attempt, exc)
                    if exc.status != 401 or attempt == 2 or not session.token:
                        continue
                try:
                    session = await self._register(session.device_id, session.token)
                except RelayError as exc:
                    log.warning("deleting chat %s: the login again failed: %s", chat_id, exc)
                    return
        if scope.cancelled_caught:
            log.warning("deleting chat %s timed out", chat_id)

    # --- files ----------------------------------------------------------------------------

    async def _upload(
        self, session: StepSession, part: ContentPart, file: FetchedFile
    ) -> dict[str, str]:
        name = check_file_name(part.name or file.name)  # a redirect names files too
        mime = upload_media_type(file.mime)  # it becomes the upload's Content-Type
        headers = self._headers(session, prompt.new_chat_referer(self._base), mime.encode())
        headers.append((b"Stepchat-Meta-Size", str(len(file.data)).encode()))
        response = await self._unary(
            prompt.upload_path(name),
            headers,
            file.data,
            method=b"PUT",
            limit_s=self._upload_timeout,
        )
        file_id = prompt.parse_upload(response.body)
        await self._wait_processed(session, file_id)
        if self._file_settle:
            await trio.sleep(self._file_settle)
        return prompt.attachment(file_id, name, mime, len(file.data), None, None)

    async def _wait_processed(self, session: StepSession, file_id: str) -> None:
        delay = POLL_FIRST_S
        headers = self._headers(session, prompt.new_chat_referer(self._base))
        body = prompt.file_status_body(file_id)
        with trio.move_on_after(UPLOAD_PROCESSING_LIMIT_S) as scope:
            while True:
                response = await self._unary(prompt.FILE_STATUS_PATH, headers, body)
                status, again = prompt.parse_file_status(response.body)
                if status in prompt.FILE_FAILED_STATUSES:
                    raise UpstreamFailed(f"StepChat could not process a file (status {status})")
                if not again:
                    return
                await trio.sleep(delay)
                delay = min(delay * POLL_GROWTH, POLL_MAX_S)
        if scope.cancelled_caught:
            raise UpstreamTimeout("StepChat took too long to process an uploaded file")

    async def _attachments(self, session: StepSession, parts: Sequence[ContentPart]
                           ) -> list[dict[str, str]]:
        if not parts:
            return []
        return await each_file(
            self._fetcher, [part.url for part in parts],
            lambda index, file: self._upload(session, parts[index], file),
        )

    # --- chat -------------------------------------------------------------------------------

    @asynccontextmanager
    async def chat(self, session: StepSession, request: ChatRequest) -> AsyncIterator[StepAnswer]:
        attachments = await self._attachments(session, prompt.attachments_of(request.messages))
        text = prompt.build_prompt(request.messages)
        # held: a chat created while the client left is deleted all the same
        chat_id = await create_held(
            self._cleanup_timeout,
            functools.partial(self._create_chat, session),
            lambda made: after_answer(
                self._background, functools.partial(self._cleanup, session, made)
            ),
        )
        try:
            headers = self._headers(
                session, prompt.chat_referer(self._base, chat_id), prompt.CONNECT_CONTENT_TYPE
            )
            body = prompt.send_message_body(chat_id, text, attachments)
            async with self._transport.stream(
                b"POST", self._base + prompt.SEND_MESSAGE_PATH, headers, body
            ) as response:
                await self._check_stream_response(response)
                yield StepAnswer(response, chat_id)
        finally:
            await after_answer(self._background, functools.partial(self._cleanup, session, chat_id))

    async def _check_stream_response(self, response: StreamedResponse) -> None:
        content_type = (response.header(b"content-type") or b"").split(b";")[0].strip().lower()
        if response.status == 200 and content_type == prompt.CONNECT_CONTENT_TYPE:
            return
        body = await response.read()
        error = prompt.parse_unary_error(response.status, body)
        if error is None:
            error = UpstreamFailed(
                f"StepChat answered HTTP {response.status} "
                f"({content_type.decode('latin-1') or 'no content type'}) instead of a stream"
            )
        raise error
