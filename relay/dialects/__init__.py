"""The dialect seam: what a client wire format gives the chat service and the router.

Theory of operation
-------------------
A *dialect* is one client-facing API (OpenAI chat completions today; the
OpenAI Responses API and Anthropic's Messages API are meant to be next).
It stands between the router and the chat service (DESIGN.md, "The shape of
relay/") and does four things, nothing else:

- decodes its request body into the provider-neutral :class:`ChatRequest`
  (:meth:`Dialect.parse`), raising :class:`~protocol.errors.RequestError`
  for a bad one;
- encodes neutral events (:mod:`protocol.deltas`) into its streamed wire
  (:meth:`Dialect.stream`, a :class:`StreamEncoder`);
- builds its whole, non-streamed answer from the same events
  (:meth:`Dialect.whole`, a :class:`WholeAnswer`);
- renders any :class:`~protocol.errors.RelayError` as its own error
  response (:meth:`Dialect.error`, an :class:`ErrorReply`).

The chat service (:mod:`relay.chat`) knows only these interfaces; the router
(:mod:`relay.routes`) names a dialect per route, and every error of a route
(404, 405, 408, 413, a bad body, a refused key, a failed upstream) is
rendered by that route's dialect. The server's own refusals before a route
is known (malformed HTTP, 431, 505) use the renderer the server was given,
OpenAI's by default.

The hot path: the SSE writer calls :meth:`StreamEncoder.encode` once per
upstream batch and nothing else per batch, so a dialect's encoder should be
the object that encodes (no wrapper that forwards each call). A new dialect
is one module that provides a :class:`Dialect`, plus one routing line
(:func:`relay.routes.chat_route`).

This module imports nothing of ``relay``: the server, the router and the
chat service all import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from protocol.chunks import ReasoningMode
    from protocol.deltas import Delta, UpstreamError
    from protocol.errors import RelayError
    from protocol.openai import ChatRequest

JSON = b"application/json"


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A whole error response in some dialect's shape.

    Attributes:
        status: the HTTP status (usually the error's own).
        body: the response body.
        content_type: the body's media type.
        headers: extra response headers (e.g. ``WWW-Authenticate`` on a 401).
    """

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


#: How a server or a route turns an error into a response (:meth:`Dialect.error`).
ErrorRenderer: TypeAlias = "Callable[[RelayError], ErrorReply]"


class StreamEncoder(Protocol):
    """One per streamed answer: neutral batches in, the dialect's SSE bytes out.

    The writer calls, in this order: :meth:`encode` for each batch (until
    :attr:`finished`), and :meth:`start` once, when it commits the response
    (possibly after the first :meth:`encode`: its bytes go first);
    :meth:`keepalive` during silences; :meth:`last_words` if the server
    stops the stream.
    """

    @property
    def content_type(self) -> bytes:
        """The ``Content-Type`` of the stream (``text/event-stream; ...``)."""
        ...

    @property
    def completion_id(self) -> str:
        """The id the answer carries (OpenAI: every chunk's ``id``)."""
        ...

    @completion_id.setter
    def completion_id(self, value: str) -> None:
        """Name the answer after the upstream conversation (before its id was sent).

        Raises:
            LocalProtocolError: bytes carrying the old id were produced.
        """
        ...

    @property
    def finished(self) -> bool:
        """True once the end of the stream (an answer's, or an error's) was encoded."""
        ...

    def start(self) -> bytes:
        """The bytes that open the stream (OpenAI: the assistant role chunk)."""
        ...

    def encode(self, deltas: Sequence[Delta]) -> bytes:
        """Every event of one batch, as one bytes object (``b""`` once finished).

        A ``Finish`` or an ``UpstreamError`` ends the stream (the error
        in-band, in the dialect's shape).
        """
        ...

    def keepalive(self) -> bytes:
        """Bytes a client ignores, written during a long silence (``b""`` once finished)."""
        ...

    def last_words(self, error: RelayError) -> bytes:
        """``error`` in-band, then the end of the stream: what a stopped stream ends with."""
        ...


class WholeAnswer(Protocol):
    """One per non-streamed answer: add every batch, then build the body."""

    @property
    def finished(self) -> bool:
        """True once a ``Finish`` was added."""
        ...

    @property
    def error(self) -> UpstreamError | None:
        """The ``UpstreamError`` that was added, if one was (the answer is then closed)."""
        ...

    @property
    def text(self) -> str:
        """The answer text so far (none: a failure may still move to another account)."""
        ...

    def add(self, deltas: Sequence[Delta]) -> None:
        """Collect one batch (ignored after the end)."""
        ...

    def answer(self, conversation_id: str) -> bytes:
        """The whole response body, named after ``conversation_id`` (``""``: a new id).

        Raises:
            LocalProtocolError: called before a ``Finish``, or after an error.
        """
        ...


class Dialect(Protocol):
    """One client wire format (module docstring)."""

    @property
    def name(self) -> str:
        """A short name for logs (``openai-chat``)."""
        ...

    def parse(self, body: bytes) -> ChatRequest:
        """The neutral request a body asks for.

        Raises:
            RequestError: (400) the body is malformed; ``param`` names the field.
        """
        ...

    def stream(
        self,
        request: ChatRequest,
        *,
        model: str,
        conversation_id: str,
        reasoning: ReasoningMode,
        citation_line: str,
    ) -> StreamEncoder:
        """A stream encoder for one answer to ``request``.

        Args:
            request: the request being answered.
            model: the model the answer names (the client's, or the provider's default).
            conversation_id: the upstream conversation, ``""`` if not known yet.
            reasoning: how thinking text is shown (``relay.config``'s ``reasoning``).
            citation_line: the provider's rendering of one search hit.
        """
        ...

    def whole(self, request: ChatRequest, *, model: str, reasoning: ReasoningMode) -> WholeAnswer:
        """A builder of one whole answer to ``request`` (arguments as :meth:`stream`'s)."""
        ...

    def error(self, exc: RelayError) -> ErrorReply:
        """``exc`` as a whole response in this dialect's shape (status, headers, body)."""
        ...
