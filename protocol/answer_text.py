"""Answer text that is not the model's own words, the same in every dialect (sans-IO).

Besides text, reasoning and tool calls, a provider's answer carries search
hits (:class:`~protocol.deltas.Citation`), generated images and videos and,
with a content filter, a finish text. No client dialect has a field for them,
so every encoder and accumulator (OpenAI's chat chunks and completion,
Anthropic's messages, OpenAI's Responses) renders them into the answer text,
by the rules written once here:

- streamed, a citation is one line, the provider's ``citation_line``
  template filled with its title and URL (:func:`citation_text`; the
  references' stream rendering, PROTOCOLS.md 2.7), and a run of consecutive
  citations within one batch ends with one blank line (:data:`CITATIONS_END`
  after the last one's own newline);
- in a whole answer citations are not inline: the body ends with the
  references' list of sources (:func:`citation_list`: a heading, then
  ``{title} - {url}`` lines, duplicate URLs dropped);
- an image is ``![图像](url)`` ("图像" = image, as the GLM reference writes it,
  3.11), a video ``[video](url)``, each on a line of its own: a newline goes
  first when the answer so far ends mid-line (:func:`media_text`);
- a finish text is set off by a blank line when answer text came before it
  (:func:`finish_text`).

A streaming encoder keeps "the answer ends mid-line" and "answer text was
sent" as two booleans it updates as it queues text (no call per text piece:
the encoders' text path is the hot path); an accumulator of whole pieces
asks :func:`ends_mid_line`.

:class:`AnswerCollector` is the part of a non-stream accumulator that every
dialect shares: it collects one whole answer's events (text, images, videos
and the finish text as answer text; reasoning apart; citations kept for the
list; tool call pieces to the dialect) until the end. OpenAI's completion and
Anthropic's message accumulators are subclasses; the Responses API's builds
output items instead, with the functions above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, assert_never

from protocol.deltas import (
    Citation,
    Finish,
    ImageResult,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    VideoResult,
)
from protocol.errors import LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from protocol.deltas import Delta

__all__ = [
    "CITATIONS_END",
    "CITATIONS_HEADING",
    "DEFAULT_CITATION_LINE",
    "AnswerCollector",
    "citation_list",
    "citation_text",
    "ends_mid_line",
    "final_finish",
    "finish_text",
    "image_markdown",
    "media_text",
    "video_markdown",
]

#: The references' stream rendering of one search hit (PROTOCOLS.md 2.7).
DEFAULT_CITATION_LINE: Final = "检索 {title} - {url} ...\n"
#: What ends a run of citations in a stream: with the last line's own newline, a blank line.
CITATIONS_END: Final = "\n"
#: The references' non-stream heading of the hit list ("search results from:").
CITATIONS_HEADING: Final = "\n\n搜索结果来自：\n"
#: What sets a finish text off from the answer text before it.
FINISH_SEPARATOR: Final = "\n\n"


def image_markdown(url: str) -> str:
    """The answer text that shows a generated image (a line of its own)."""
    return "![图像](" + url + ")\n"


def video_markdown(url: str) -> str:
    """The answer text that links a generated video (a line of its own)."""
    return "[video](" + url + ")\n"


def citation_text(citation: Citation, citation_line: str) -> str:
    """One citation as streamed answer text.

    Args:
        citation: the search hit.
        citation_line: the provider's rendering, a :meth:`str.format`
            template with ``title`` and ``url``.
    """
    return citation_line.format(title=citation.title, url=citation.url)


def media_text(delta: ImageResult | VideoResult, mid_line: bool) -> str:
    """An image or a video as answer text: its Markdown on a line of its own.

    Args:
        delta: the image or the video.
        mid_line: the answer so far ends mid-line (a newline goes first).
    """
    if isinstance(delta, ImageResult):
        markdown = image_markdown(delta.url)
    else:
        markdown = video_markdown(delta.video_url)
    return "\n" + markdown if mid_line else markdown


def finish_text(text: str, after_answer: bool) -> str:
    """A finish's text (a content filter's explanation) as answer text.

    Args:
        text: the finish text.
        after_answer: answer text came before it (a blank line goes first).
    """
    return FINISH_SEPARATOR + text if after_answer else text


def ends_mid_line(pieces: list[str]) -> bool:
    """Whether answer text collected as ``pieces`` ends mid-line (not empty, no final newline)."""
    return bool(pieces and pieces[-1] and not pieces[-1].endswith("\n"))


def citation_list(citations: Iterable[Citation]) -> str:
    """The list of sources a whole answer ends with; ``""`` without citations.

    The references' rendering: :data:`CITATIONS_HEADING`, then one
    ``{title} - {url}`` line per URL, in the order first cited, with the
    title it was first cited with.
    """
    seen: dict[str, str] = {}
    for citation in citations:
        seen.setdefault(citation.url, citation.title)
    if not seen:
        return ""
    return CITATIONS_HEADING + "\n".join(f"{title} - {url}" for url, title in seen.items())


def final_finish(finish: Finish | None, error: UpstreamError | None, what: str) -> Finish:
    """The ``Finish`` a whole answer's body is built after.

    Args:
        finish: the ``Finish`` that was collected, if one was.
        error: the ``UpstreamError`` that was collected, if one was.
        what: the body's name, for the error message (``completion``).

    Raises:
        LocalProtocolError: there is no ``Finish``, or an ``UpstreamError``
            came: the caller must answer with an error instead.
    """
    if error is not None or finish is None:
        state = "an upstream error" if error is not None else "no Finish"
        raise LocalProtocolError(f"{what} body requested after {state}")
    return finish


class AnswerCollector:
    """Non-stream: one whole answer's events, collected for a dialect's body.

    Text, images and videos (each on a line of its own) and the finish text
    make the answer text (:attr:`text`); reasoning is kept apart
    (:attr:`reasoning`); citations are kept, structured, for the list that
    ends the body (:func:`citation_list`). Tool call pieces go to
    :meth:`_tool_call`, which each dialect defines (how a call's pieces
    combine is the dialect's). After a ``Finish`` or an ``UpstreamError``
    the collector is closed.

    Attributes:
        finished: a ``Finish`` was added.
        error: the ``UpstreamError`` that was added, if one was.
        citations: every citation added, in order (duplicates kept).
        images: the URL of every image added, in order.
        videos: every video added, in order.
    """

    __slots__ = (
        "_finish",
        "_reasoning",
        "_text",
        "citations",
        "error",
        "finished",
        "images",
        "videos",
    )

    def __init__(self) -> None:
        self._text: list[str] = []  # answer pieces; joined lazily by `text`
        self._reasoning: list[str] = []
        self._finish: Finish | None = None
        self.finished = False
        self.error: UpstreamError | None = None
        self.citations: list[Citation] = []
        self.images: list[str] = []
        self.videos: list[VideoResult] = []

    @property
    def text(self) -> str:
        """The answer text so far: text, images, videos and the finish text."""
        text = self._text
        if len(text) > 1:  # join once and keep the result: no quadratic rejoining
            text[:] = ["".join(text)]
        return text[0] if text else ""

    @property
    def reasoning(self) -> str:
        """The reasoning text so far."""
        reasoning = self._reasoning
        if len(reasoning) > 1:
            reasoning[:] = ["".join(reasoning)]
        return reasoning[0] if reasoning else ""

    def add(self, deltas: Iterable[Delta]) -> None:
        """Collect ``deltas`` (neutral events).

        After a ``Finish`` or an ``UpstreamError`` the collector is closed:
        the rest of ``deltas`` and everything added later is ignored.
        """
        if self.finished or self.error is not None:
            return
        text = self._text
        for delta in deltas:
            match delta:
                case TextDelta(text=piece):
                    if piece:
                        text.append(piece)
                case ReasoningDelta(text=piece):
                    if piece:
                        self._reasoning.append(piece)
                case Citation():
                    self.citations.append(delta)
                case ImageResult(url=url):
                    self.images.append(url)
                    text.append(media_text(delta, ends_mid_line(text)))
                case VideoResult():
                    self.videos.append(delta)
                    text.append(media_text(delta, ends_mid_line(text)))
                case ToolCallDelta():
                    self._tool_call(delta)
                case Finish(text=piece):
                    if piece:  # the same separator as the streams: only after answer text
                        text.append(finish_text(piece, any(text)))
                    self._finish = delta
                    self.finished = True
                    return
                case UpstreamError():
                    self.error = delta
                    return
                case _:
                    assert_never(delta)

    def _tool_call(self, delta: ToolCallDelta) -> None:
        """Collect one piece of a tool call (the dialect's to define)."""
        raise NotImplementedError

    def _final_finish(self, what: str) -> Finish:
        """:func:`final_finish` of what was collected."""
        return final_finish(self._finish, self.error, what)
