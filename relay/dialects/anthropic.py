"""Anthropic's Messages API as a dialect (``POST /v1/messages``, ``/v1/messages/count_tokens``).

The wire code lives in :mod:`protocol.anthropic` (the request, the stream
events, the whole message, the error shape); this module fits it to
:mod:`relay.dialects`' interfaces, adding only what those need: the message
id (``msg_`` and the upstream conversation, or a fresh one), the prompt's
token estimate, the stream's content type and a stopped stream's last
words (an ``error`` event: Anthropic's stream has no end marker after one).

:class:`MessageStream` *is* the protocol's
:class:`~protocol.anthropic.MessageEncoder` (a subclass with no state of its
own), so the writer's one ``encode`` call per batch stays one call. Errors
are ``{"type": "error", "error": {"type", "message"}}`` with the error's own
status and Anthropic's error type for it (:func:`protocol.anthropic.error_type`).
The relay's ``reasoning`` setting does not apply: reasoning is always a
``thinking`` block, Anthropic's own form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.anthropic import (
    MessageAccumulator,
    MessageEncoder,
    count_tokens_body,
    error_body,
    error_event,
    error_type,
    message_id,
    parse_messages_request,
)
from protocol.openai import prompt_tokens
from relay.dialects import JSON, ErrorReply
from relay.dialects.openai_chat import SSE_CONTENT_TYPE

if TYPE_CHECKING:
    from protocol.chunks import ReasoningMode
    from protocol.errors import RelayError
    from protocol.openai import ChatRequest


class MessageStream(MessageEncoder):
    """Anthropic's stream events (a :class:`relay.dialects.StreamEncoder`)."""

    __slots__ = ()

    content_type = SSE_CONTENT_TYPE

    def last_words(self, error: RelayError) -> bytes:
        """An in-band ``error`` event for ``error``: the end of an Anthropic stream."""
        return error_event(error_type(error.status), error.message)


class WholeMessage(MessageAccumulator):
    """One whole ``message`` object (a :class:`relay.dialects.WholeAnswer`)."""

    __slots__ = ("_model", "_request")

    def __init__(self, request: ChatRequest, *, model: str) -> None:
        super().__init__()
        self._request = request
        self._model = model

    def answer(self, conversation_id: str) -> bytes:
        """The ``message`` body (see :meth:`MessageAccumulator.body`)."""
        return self.body(message_id=message_id(conversation_id), model=self._model,
                         input_tokens=prompt_tokens(self._request))


class AnthropicMessages:
    """The Anthropic Messages dialect (a :class:`relay.dialects.Dialect`)."""

    name = "anthropic-messages"

    def parse(self, body: bytes) -> ChatRequest:
        """A Messages body as the neutral request (:func:`parse_messages_request`)."""
        return parse_messages_request(body)

    def count_tokens(self, body: bytes) -> bytes:
        """The ``count_tokens`` answer for a Messages body (``max_tokens`` not required).

        Raises:
            RequestError: (400) the body is malformed.
        """
        return count_tokens_body(parse_messages_request(body, require_max_tokens=False))

    def stream(
        self,
        request: ChatRequest,
        *,
        model: str,
        conversation_id: str,
        reasoning: ReasoningMode,
        citation_line: str,
    ) -> MessageStream:
        """An event encoder for one streamed message."""
        return MessageStream(
            message_id=message_id(conversation_id),
            model=model,
            input_tokens=prompt_tokens(request),
            citation_line=citation_line,
        )

    def whole(self, request: ChatRequest, *, model: str, reasoning: ReasoningMode) -> WholeMessage:
        """A builder of one ``message`` object."""
        return WholeMessage(request, model=model)

    def error(self, exc: RelayError) -> ErrorReply:
        """``exc`` as Anthropic's error object, with its own status."""
        return ErrorReply(exc.status, error_body(error_type(exc.status), exc.message), JSON)


ANTHROPIC_MESSAGES = AnthropicMessages()
