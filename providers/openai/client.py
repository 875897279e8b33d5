"""An OpenAI-compatible upstream as a provider: the I/O half (issue 16).

One :class:`OpenAIProvider` per configured upstream (``RELAY_OPENAI_UPSTREAMS``):
DeepSeek, a local vLLM or Ollama, StepFun's or Zhipu's open platforms. The
wire formats live in ``prompt.py`` (requests) and ``stream.py`` (answers);
this module only moves bytes, through the relay's :class:`Transport`.

Accounts are the operator's API keys: a key is its own session
(:meth:`OpenAIProvider.login` returns it, nothing is called), so keys rotate,
rest and fail over like web-chat accounts. Clients never bring keys for
these models (``relay/access.py`` leases only the configured ones).

Two ways to answer:

- :meth:`OpenAIProvider.chat` (every dialect): the neutral request as the
  upstream's chat body, always streamed; the SSE events become neutral
  deltas (a whole ``chat.completion``, from an upstream that ignored
  ``stream``, becomes the same deltas at once), the last a Finish with the
  upstream's token counts. The upstream does tools, JSON formats, ``stop``
  and ``max_tokens`` natively (:attr:`OpenAIProvider.native_agents`).
- :meth:`OpenAIProvider.passthrough` (OpenAI chat completions in and out):
  the client's body goes up with the upstream's model name, and the answer
  comes back as the upstream's bytes, cut at event boundaries, the model name
  rewritten when it differs (:class:`~providers.openai.stream.EventFramer`).

Errors keep the upstream's status and OpenAI error fields
(:func:`~providers.openai.stream.error_from_response`). 401, 403 and 429 are
raised before any byte of the answer, as AuthError or NoAccountFree: the
relay then tries another key. An error the upstream sends in-band as its
stream's first event stands for a status too
(:func:`~providers.openai.stream.in_band_status`), on both paths. There is
no conversation to delete: leaving ``chat`` only closes the response.

Model list: :meth:`OpenAIProvider.models` is the configured names;
:meth:`OpenAIProvider.upstream_models` asks an upstream with a prefix what
is under it (``GET /models``), which the relay caches.
"""

from __future__ import annotations

import logging
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING

import orjson

from protocol.errors import RemoteProtocolError, UpstreamFailed
from protocol.sse import SSEDecoder
from providers.openai import prompt
from providers.openai.stream import (
    ChunkStream,
    EventFramer,
    error_from_response,
    holds_event,
    leading_error,
    model_member,
    rewrite_model,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator

    from protocol.deltas import Delta
    from protocol.errors import RelayError
    from protocol.openai import ChatRequest
    from providers.contract import StreamedResponse, Transport
    from providers.openai.prompt import ModelNames

log = logging.getLogger("providers.openai")

#: A key is its own session: nothing expires, cache it for a day.
SESSION_TTL_S = 24 * 3600.0
#: Statuses that say the key is at fault: raised before the answer, so the relay fails over.
KEY_STATUSES = (401, 403, 429)
#: Longest whole (not streamed) answer read.
WHOLE_BODY_LIMIT_BYTES = 16 * 1024 * 1024
SSE_TYPE = b"text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"


def model_ids(body: bytes) -> list[str]:
    """The ids of an OpenAI model list (``{"data": [{"id": ...}, ...]}``), each once, in order.

    Items without a non-empty string id are left out.

    Raises:
        RemoteProtocolError: the body is not a JSON object with a ``data`` list.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RemoteProtocolError("the upstream's model list is not JSON") from exc
    data = value.get("data") if isinstance(value, dict) else None
    if not isinstance(data, list):
        raise RemoteProtocolError("the upstream's model list has no data list")
    ids = (item.get("id") for item in data if isinstance(item, dict))
    return list(dict.fromkeys(i for i in ids if isinstance(i, str) and i))


def _media_type(response: StreamedResponse) -> bytes:
    return (response.header(b"content-type") or b"").split(b";")[0].strip().lower()


async def _whole_body(response: StreamedResponse) -> bytes:
    """A whole answer's body.

    Raises:
        UpstreamFailed: it is over :data:`WHOLE_BODY_LIMIT_BYTES`.
    """
    data = await response.read(WHOLE_BODY_LIMIT_BYTES + 1)
    if len(data) > WHOLE_BODY_LIMIT_BYTES:
        raise UpstreamFailed("the upstream's answer is over the size limit",
                             code="answer_too_large")
    return data


class OpenAIAnswer:
    """One upstream answer as lists of deltas (providers.contract.ChatStream).

    Streamed (an event stream), or one whole ``chat.completion`` when the
    upstream ignored ``stream: true`` (``whole``): then one batch.
    """

    def __init__(self, response: StreamedResponse, *, whole: bool = False) -> None:
        self._response = response
        self._whole = whole

    @property
    def conversation_id(self) -> str:
        """No conversation upstream: ``""``."""
        return ""

    async def __aiter__(self) -> AsyncGenerator[list[Delta], None]:
        translator = ChunkStream()
        if self._whole:
            yield translator.completion(await _whole_body(self._response))
            return
        decoder = SSEDecoder()
        async with aclosing(self._response.chunks()) as chunks:
            async for chunk in chunks:
                deltas: list[Delta] = []
                for event in decoder.feed(chunk):
                    deltas += translator.feed(event)
                    if translator.finished:
                        break
                if deltas:
                    yield deltas
                if translator.finished:
                    return
        decoder.close()
        tail = translator.close()
        if tail:
            yield tail


class OpenAIRawAnswer:
    """The upstream's answer as bytes for the client (providers.contract.RawAnswer)."""

    def __init__(self, response: StreamedResponse, member: bytes | None,
                 upstream: str = "the upstream") -> None:
        self._response = response
        self._member = member
        self._upstream = upstream
        self.status = response.status
        self.content_type = response.header(b"content-type") or b"application/json"
        self.streamed = response.status == 200 and _media_type(response) == SSE_TYPE
        self._framer = EventFramer(member)
        self._ended = False

    @property
    def done(self) -> bool:
        """The last event went out: ``[DONE]``, or the one added when it was left out."""
        return self._framer.done or self._ended

    def leading_error(self, data: bytes) -> RelayError | None:
        """The in-band error ``data`` opens with (:func:`providers.openai.stream.leading_error`)."""
        return leading_error(data, self._upstream)

    async def events(self) -> AsyncGenerator[bytes, None]:
        framer = self._framer
        started = False  # an event went out: comments before it are dropped
        async with aclosing(self._response.chunks()) as chunks:
            async for chunk in chunks:
                data = framer.feed(chunk)
                if data and not started:
                    # a block of comments only (a platform keeping a slow stream
                    # open) would commit the client's 200 before the first event,
                    # which may be an error with a status of its own; the relay's
                    # writer keeps a silent client alive itself
                    started = holds_event(data)
                    if not started:
                        continue
                if data:
                    yield data
                if framer.done:
                    return
        framer.close()
        self._ended = True
        yield DONE_EVENT  # the upstream ended cleanly but left [DONE] out

    async def body(self) -> bytes:
        return rewrite_model(await _whole_body(self._response), self._member)


class OpenAIProvider:
    """One OpenAI-compatible upstream as a provider (providers.contract.Provider, Passthrough)."""

    session_ttl = SESSION_TTL_S
    citation_line = "{title} - {url}\n"
    #: the upstream calls tools, follows formats, stops and counts by itself
    native_agents = True
    renews_sessions = False
    #: no image or video endpoints here
    media = None

    def __init__(self, transport: Transport, *, name: str, base_url: str,
                 names: ModelNames) -> None:
        """
        Args:
            transport: calls to this upstream over the relay's shared pool.
            name: the upstream's name (routes, logs, metrics).
            base_url: its OpenAI base URL, ``/v1`` included.
            names: which model names it serves, and what they are called upstream.
        """
        self._transport = transport
        self.name = name
        self._base = base_url.rstrip("/")
        self._names = names
        self.default_model = names.default

    def models(self) -> list[str]:
        return list(self._names.models)

    def owns_model(self, model: str) -> bool:
        return self._names.owns(model)

    def looks_like(self, credential: str) -> bool:
        """Never guessed: a key looks like any other provider's."""
        return False

    def validate_credential(self, credential: str) -> None:
        """Any non-empty key (the configuration checked its characters)."""

    async def login(self, credential: str) -> str:
        """The key is the session: nothing to call."""
        return credential

    def dump_session(self, session: str) -> str:
        """The session (the key) as JSON text (providers.contract.SessionCodec), for a
        relay that keeps its account state in Redis with the web chats' tokens."""
        return orjson.dumps({"key": session}).decode()

    def load_session(self, data: str) -> str:
        """The session :meth:`dump_session` wrote.

        Raises:
            ValueError: ``data`` is not one.
        """
        fields = orjson.loads(data)
        key = fields.get("key") if isinstance(fields, dict) else None
        if not isinstance(key, str) or not key:
            raise ValueError("an OpenAI-compatible upstream's session is {\"key\": \"...\"}")
        return key

    async def check(self, credential: str) -> bool:
        """Liveness of a key: ``GET /models`` with it.

        Returns:
            True on a 200, False when the upstream refused the key (401, 403).

        Raises:
            RelayError: any other failure (the upstream could not tell).
        """
        response = await self._transport.request(
            b"GET", self._base + prompt.MODELS_PATH, prompt.headers(credential, streamed=False))
        if response.status == 200:
            return True
        if response.status in (401, 403):
            return False
        raise error_from_response(response.status, response.body, self.name)

    async def upstream_models(self, credential: str) -> list[str]:
        """What ``GET /models`` lists now, each id under the prefix (contract.ModelLister).

        ``[]`` without a call for an upstream served under listed names only.

        Raises:
            RelayError: the call failed, the upstream answered an error (its
                status kept), or a body without a ``data`` list.
        """
        prefix = self._names.prefix
        if not prefix:
            return []
        response = await self._transport.request(
            b"GET", self._base + prompt.MODELS_PATH, prompt.headers(credential, streamed=False))
        if response.status != 200:
            raise error_from_response(response.status, response.body, self.name)
        return [prefix + model for model in model_ids(response.body)]

    def _upstream_model(self, request: ChatRequest) -> tuple[str, str]:
        """The served name of the request's model and its name upstream."""
        served = request.model or self.default_model
        return served, self._names.upstream(served)

    @asynccontextmanager
    async def chat(self, session: str, request: ChatRequest) -> AsyncIterator[OpenAIAnswer]:
        _served, upstream = self._upstream_model(request)
        body = prompt.chat_body(request, upstream)
        async with self._transport.stream(
            b"POST", self._base + prompt.CHAT_PATH, prompt.headers(session, streamed=True), body
        ) as response:
            if response.status != 200:
                raise error_from_response(response.status, await response.read(), self.name)
            media = _media_type(response)
            if media not in (SSE_TYPE, prompt.JSON_CONTENT_TYPE):
                raise UpstreamFailed(
                    f"{self.name} answered {media.decode('latin-1') or 'a body'}"
                    " instead of an event stream", code="not_a_stream")
            yield OpenAIAnswer(response, whole=media == prompt.JSON_CONTENT_TYPE)

    @asynccontextmanager
    async def passthrough(
        self, session: str, body: bytes, request: ChatRequest
    ) -> AsyncIterator[OpenAIRawAnswer]:
        served, upstream = self._upstream_model(request)
        data = prompt.passthrough_body(body, upstream)
        member = model_member(served) if served != upstream else None
        async with self._transport.stream(
            b"POST", self._base + prompt.CHAT_PATH,
            prompt.headers(session, streamed=request.stream), data,
        ) as response:
            if response.status in KEY_STATUSES:
                raise error_from_response(response.status, await response.read(), self.name)
            yield OpenAIRawAnswer(response, member, self.name)
