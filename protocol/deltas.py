"""The provider-neutral event model.

Providers speak to the rest of the relay only in these events, so the OpenAI
encoder, the non-stream accumulator and the benchmarks never know which
upstream produced them. Events are small frozen dataclasses, compared with
``==`` in tests, and dispatched with ``match`` ending in ``assert_never``.

Token counts: the web chats report none, so every dialect estimates its
``usage``; an upstream that counts (an OpenAI-compatible one) hands its
counts over on the :class:`Finish`, as a :class:`Usage`, and the dialects
report those instead of their estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Answer text to append."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Reasoning ("thinking") text to append."""

    text: str


@dataclass(frozen=True, slots=True)
class Citation:
    """One web-search result the answer may cite."""

    title: str
    url: str


@dataclass(frozen=True, slots=True)
class ImageResult:
    """A generated image, by URL."""

    url: str


@dataclass(frozen=True, slots=True)
class VideoResult:
    """A generated video."""

    conversation_id: str
    video_url: str
    cover_url: str = ""
    video_duration: str = ""
    resolution: str = ""


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool (function) call of the answer.

    The first delta of a call carries its ``index`` (0, 1, ... in the order
    the calls began), its ``id`` (``call_...``) and its function ``name``,
    with ``arguments_part`` usually empty; the following deltas of the same
    index carry only ``arguments_part``, pieces of the arguments' JSON text
    whose concatenation is that text. ``id`` and ``name`` are ``""`` on the
    following deltas.
    """

    index: int
    id: str = ""
    name: str = ""
    arguments_part: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    """The token counts the upstream reported for one answer (OpenAI's meanings).

    Attributes:
        input_tokens: the prompt's tokens, cached ones included (``prompt_tokens``).
        output_tokens: the answer's tokens, reasoning included (``completion_tokens``).
        reasoning_tokens: of ``output_tokens``, those of the reasoning (0: none or not told).
        cached_tokens: of ``input_tokens``, those read from the upstream's
            prompt cache (0: none or not told).
    """

    input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    """The answer is complete. Always the last event of a successful stream."""

    reason: FinishReason = "stop"
    #: Text that goes with the finish, e.g. the content filter's explanation.
    text: str = ""
    #: With ``reason="stop"``: the client's stop sequence that ended the
    #: answer (``""``: the model ended it).
    stop_sequence: str = ""
    #: The upstream's own token counts (None: it reported none; the dialects estimate).
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """The upstream reported a failure; the last event of a failed stream.

    ``status`` is the HTTP status the client sees if nothing was sent yet;
    once a stream has started the error travels in-band.
    """

    code: str
    message: str
    status: int = 502


Delta = (
    TextDelta | ReasoningDelta | Citation | ImageResult | VideoResult | ToolCallDelta | Finish
    | UpstreamError
)
