"""OpenAI chat completions as a dialect (``POST /v1/chat/completions``).

The wire code lives in :mod:`protocol.openai` (the request) and
:mod:`protocol.chunks` (stream chunks, the whole ``chat.completion``, error
objects); this module fits it to :mod:`relay.dialects`' interfaces, adding
only what those need and the protocol code does not know: the response id
when the upstream names no conversation, the ``created`` time, the stream's
content type, and a stopped stream's last words.

:class:`ChunkStream` *is* the protocol's :class:`~protocol.chunks.ChunkEncoder`
(a subclass with no state of its own), so the writer's one ``encode`` call
per batch stays one call. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``, with
``WWW-Authenticate: Bearer`` on a 401; the server renders its own refusals
this way too, unless told otherwise.

:class:`PassthroughStream` is the stream "encoder" of the passthrough fast
path (:func:`relay.chat.complete` with a provider that offers
:class:`~providers.contract.Passthrough`): the upstream's own events are the
stream, so it encodes nothing; it gives only what the relay adds itself:
keep-alive comments, and an in-band error and ``[DONE]`` when the upstream
fails mid-stream or the server stops it.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from protocol.chunks import DONE, KEEPALIVE, UPSTREAM_ERROR_KIND, error_body
from protocol.openai import (
    ChunkEncoder,
    CompletionAccumulator,
    error_from_exception,
    parse_chat_request,
    prompt_tokens,
)
from relay.dialects import JSON, ErrorReply

if TYPE_CHECKING:
    from collections.abc import Sequence

    from protocol.chunks import ReasoningMode
    from protocol.deltas import Delta
    from protocol.errors import RelayError
    from protocol.openai import ChatRequest

SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
#: RFC 9110 11.6.1: a 401 names the scheme the client should use
BEARER = ((b"www-authenticate", b"Bearer"),)


def new_completion_id() -> str:
    """An id for an answer whose upstream named no conversation."""
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChunkStream(ChunkEncoder):
    """The stream of ``chat.completion.chunk`` events (a :class:`relay.dialects.StreamEncoder`)."""

    __slots__ = ()

    content_type = SSE_CONTENT_TYPE

    def last_words(self, error: RelayError) -> bytes:
        """An in-band OpenAI error event for ``error``, then ``data: [DONE]``."""
        return b"data: " + error_from_exception(error) + b"\n\n" + DONE


class PassthroughStream:
    """The fast path's stream (a :class:`relay.dialects.StreamEncoder` that encodes nothing).

    The upstream's events go to the client as they are; this object opens
    the stream with nothing (the upstream's first chunk carries the role),
    fills silences with keep-alive comments, and ends a failed stream the
    way :class:`ChunkStream` does: an OpenAI error object, then ``[DONE]``.

    Attributes:
        finished: the stream's end was written (:meth:`end`, :meth:`fail`).
    """

    __slots__ = ("completion_id", "finished")

    content_type = SSE_CONTENT_TYPE

    def __init__(self) -> None:
        self.completion_id = ""  # the upstream's chunks carry their own id
        self.finished = False

    def start(self) -> bytes:
        """Nothing: the upstream's first event opens the stream."""
        return b""

    def encode(self, deltas: Sequence[Delta]) -> bytes:
        """Nothing to encode: the upstream's bytes are the stream."""
        return b""

    def keepalive(self) -> bytes:
        """An SSE comment, ``b""`` once finished."""
        return b"" if self.finished else KEEPALIVE

    def end(self) -> bytes:
        """The upstream's events ended the stream themselves: nothing to add."""
        self.finished = True
        return b""

    def fail(self, message: str, code: str | None) -> bytes:
        """An in-band upstream error, then ``[DONE]`` (:class:`ChunkStream`'s shape)."""
        self.finished = True
        return b"data: " + error_body(message, UPSTREAM_ERROR_KIND, code=code) + b"\n\n" + DONE

    def last_words(self, error: RelayError) -> bytes:
        """An in-band OpenAI error event for ``error``, then ``data: [DONE]``."""
        self.finished = True
        return b"data: " + error_from_exception(error) + b"\n\n" + DONE


class Completion(CompletionAccumulator):
    """One whole ``chat.completion`` (a :class:`relay.dialects.WholeAnswer`)."""

    __slots__ = ("_model", "_request")

    def __init__(self, request: ChatRequest, *, model: str, reasoning: ReasoningMode) -> None:
        super().__init__(reasoning=reasoning)
        self._request = request
        self._model = model

    def answer(self, conversation_id: str) -> bytes:
        """The ``chat.completion`` body (see :meth:`CompletionAccumulator.body`)."""
        return self.body(
            completion_id=conversation_id or new_completion_id(),
            model=self._model,
            created=int(time.time()),
            prompt_tokens=prompt_tokens(self._request),
        )


class OpenAIChat:
    """The OpenAI chat completions dialect (a :class:`relay.dialects.Dialect`)."""

    name = "openai-chat"

    def parse(self, body: bytes) -> ChatRequest:
        """A chat completion body as the neutral request (:func:`parse_chat_request`)."""
        return parse_chat_request(body)

    def stream(
        self,
        request: ChatRequest,
        *,
        model: str,
        conversation_id: str,
        reasoning: ReasoningMode,
        citation_line: str,
    ) -> ChunkStream:
        """A chunk encoder for one streamed answer."""
        return ChunkStream(
            completion_id=conversation_id or new_completion_id(),
            model=model,
            created=int(time.time()),
            reasoning=reasoning,
            include_usage=request.include_usage,
            prompt_tokens=prompt_tokens(request),
            citation_line=citation_line,
        )

    def whole(self, request: ChatRequest, *, model: str, reasoning: ReasoningMode) -> Completion:
        """A builder of one ``chat.completion``."""
        return Completion(request, model=model, reasoning=reasoning)

    def error(self, exc: RelayError) -> ErrorReply:
        """``exc`` as an OpenAI error object with its own status."""
        return ErrorReply(exc.status, error_from_exception(exc), JSON,
                          BEARER if exc.status == 401 else ())


OPENAI_CHAT = OpenAIChat()
