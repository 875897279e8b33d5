"""OpenAI's Responses API as a dialect (``POST /v1/responses``).

The wire code lives in :mod:`protocol.responses` (the request) and
:mod:`protocol.response_output` (the stream events, the response object); this module fits it to
:mod:`relay.dialects`' interfaces, adding only what the protocol code does
not know: the response and item ids, the ``created_at`` time, the stream's
content type, and a stopped stream's last words.

The response id is ``resp_`` and the upstream conversation's id when the
upstream named one, a new random id otherwise
(:func:`protocol.response_output.response_id`). Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``, rendered as the chat
completions dialect renders them.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from protocol.response_output import ResponseAccumulator, ResponseEncoder, response_id
from protocol.responses import parse_responses_request
from relay.dialects.openai_chat import OPENAI_CHAT, SSE_CONTENT_TYPE

if TYPE_CHECKING:
    from protocol.chunks import ReasoningMode
    from protocol.errors import RelayError
    from protocol.openai import ChatRequest
    from protocol.responses import ResponsesRequest
    from relay.dialects import ErrorReply


def _item_base() -> str:
    """What makes one response's item ids (``msg_<base>_<n>``) unique."""
    return uuid.uuid4().hex


class ResponseStream(ResponseEncoder):
    """The Responses API event stream (a :class:`relay.dialects.StreamEncoder`)."""

    __slots__ = ()

    content_type = SSE_CONTENT_TYPE

    def last_words(self, error: RelayError) -> bytes:
        """``error`` in-band: the open item closed, ``error`` and ``response.failed``."""
        return self.fail(error.code or error.kind, error.message, error.status)


class WholeResponse(ResponseAccumulator):
    """One whole response object (a :class:`relay.dialects.WholeAnswer`)."""

    __slots__ = ("_model", "_request")

    def __init__(self, request: ChatRequest, *, model: str) -> None:
        super().__init__(item_base=_item_base())
        self._request = request
        self._model = model

    def answer(self, conversation_id: str) -> bytes:
        """The response object (see :meth:`ResponseAccumulator.body`)."""
        return self.body(self._request, response_id=response_id(conversation_id),
                         model=self._model, created_at=int(time.time()))


class Responses:
    """The Responses API dialect (a :class:`relay.dialects.Dialect`)."""

    name = "openai-responses"

    def parse(self, body: bytes) -> ResponsesRequest:
        """A Responses API body as the neutral request (:func:`parse_responses_request`)."""
        return parse_responses_request(body)

    def stream(
        self,
        request: ChatRequest,
        *,
        model: str,
        conversation_id: str,
        reasoning: ReasoningMode,
        citation_line: str,
    ) -> ResponseStream:
        """An event encoder for one streamed response.

        ``reasoning`` is not used: the Responses API has its own place for
        thinking (reasoning items), so it never goes inline.
        """
        return ResponseStream(
            request,
            response_id=response_id(conversation_id),
            model=model,
            created_at=int(time.time()),
            citation_line=citation_line,
            item_base=_item_base(),
        )

    def whole(
        self, request: ChatRequest, *, model: str, reasoning: ReasoningMode
    ) -> WholeResponse:
        """A builder of one whole response object (reasoning as items, whatever ``reasoning``)."""
        return WholeResponse(request, model=model)

    def error(self, exc: RelayError) -> ErrorReply:
        """``exc`` as an OpenAI error object with its own status (as chat completions)."""
        return OPENAI_CHAT.error(exc)


RESPONSES = Responses()
