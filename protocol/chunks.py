"""OpenAI response bodies: stream chunks, whole completions, error objects.

The relay turns provider-neutral deltas (:mod:`protocol.deltas`) into the
bytes OpenAI's ``/v1/chat/completions`` sends, so that the official ``openai``
SDK, LobeChat and ChatGPT-Next-Web cannot tell us from OpenAI (the shapes of
PROTOCOLS.md 1.5, with OpenAI's own fields added: ``system_fingerprint``,
``logprobs``, an optional usage chunk, an in-band error object). The request
side lives in :mod:`protocol.openai`, which re-exports everything here.

Theory of operation, stream (:class:`ChunkEncoder`): one encoder per response.
:meth:`~ChunkEncoder.start` gives the first chunk (the assistant role), then
each upstream read's deltas go through one :meth:`~ChunkEncoder.encode` call,
whose bytes the relay writes in one ``send_all``. The relay may encode the
first read before it calls ``start()`` (it commits the response only once it
knows the upstream did not fail at once), so the two are independent: the
caller puts ``start()``'s bytes first. Every chunk of a response
carries the same ``id``, ``created`` and ``model``, so the JSON text before the
delta and after it never changes: it is built once, in ``__init__``, and a
text chunk costs one ``orjson.dumps`` of the text and one bytes concatenation.
Within one call, consecutive deltas that land in the same delta field are
merged into one chunk: several ``TextDelta`` (and, since they are content
too, rendered citations, images, videos and ``<think>`` tags) make one
``content`` chunk, several ``ReasoningDelta`` one ``reasoning_content`` chunk.
Order is kept. So the number of chunks depends on how the upstream's bytes were
split into reads, but the concatenated content never does, except for one
documented case: consecutive citations form one block per call (below).

Rendering rules:

- reasoning goes to ``delta.reasoning_content`` ("field" mode), or inline in
  ``content`` between ``<think>\\n`` and ``\\n</think>\\n\\n`` ("tags" mode,
  for clients that expect the older DeepSeek-R1 convention); the closing tag
  goes out before the first content after reasoning, or before the final
  chunk;
- citations, images, videos and the finish text become content by the
  rules every dialect shares (:mod:`protocol.answer_text`): a citation is a
  ``检索 {title} - {url} ...`` line ("searching ...", the references' stream
  rendering, PROTOCOLS.md 2.7), the consecutive citations of one call are
  followed by one blank line, and citations are also kept, structured, in
  :attr:`ChunkEncoder.citations`; an image is ``![图像](url)``, a video
  ``[video](url)``, each on its own line;
- tool calls (:class:`~protocol.deltas.ToolCallDelta`) become
  ``delta.tool_calls`` chunks of one call each, in OpenAI's shape: a call's
  first delta (it carries the id and name) gives
  ``{"index", "id", "type": "function", "function": {"name", "arguments"}}``
  whose ``arguments`` are the pieces of the same call that follow it in the
  same batch, joined (``""`` if none); later pieces give
  ``{"index", "function": {"arguments"}}``, merged within a batch as text
  is. Text queued before a call goes out first, an open ``<think>`` block is
  closed first; the openai SDK's stream accumulator concatenates the pieces
  by ``index``, so how the calls were batched does not show in its result;
- ``Finish`` ends the stream: the finish text (a content filter's
  explanation) in a content chunk, set off by a blank line; the final chunk
  with an empty delta and the finish reason; the usage chunk if the client
  asked for it (``stream_options.include_usage``); ``data: [DONE]``;
- ``UpstreamError`` ends it too, with an in-band OpenAI error object and
  ``data: [DONE]``: never as answer text, which is what the references do
  (PROTOCOLS.md 2.7) and what makes SDKs believe a failure was an answer.

Anything after the end is ignored: a translator that keeps talking after its
own ``Finish`` cannot make us write after ``[DONE]``.

Theory of operation, non-stream (:class:`CompletionAccumulator`): deltas are
collected as they come (:class:`~protocol.answer_text.AnswerCollector`) and
one ``chat.completion`` object is built at the end. There, citations are not
inline; they form the references' trailing list ``搜索结果来自：`` ("search
results from:"), duplicates dropped (:func:`~protocol.answer_text.citation_list`). In
"tags" mode all the reasoning goes in one ``<think>`` block before the answer.
Tool calls are gathered by index into ``message.tool_calls``, and
``content`` is ``null`` when they came without any text, as OpenAI sends it.

Token counts are estimates (:func:`estimate_tokens`): the web chats report
none. The encoder keeps two running integers (ASCII and other characters
emitted: content, reasoning, tool names and arguments), never the text
itself, so counting is linear and free of extra memory. An upstream that
counts puts its counts on the ``Finish`` (:class:`~protocol.deltas.Usage`):
then the usage chunk and the whole completion's ``usage`` are the
upstream's, with ``completion_tokens_details.reasoning_tokens`` and
``prompt_tokens_details.cached_tokens`` when it told them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, assert_never

import orjson

from protocol.answer_text import (
    CITATIONS_END,
    DEFAULT_CITATION_LINE,
    AnswerCollector,
    citation_list,
    citation_text,
    finish_text,
    media_text,
)
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
    from collections.abc import Sequence

    from protocol.deltas import Delta, FinishReason, Usage

ReasoningMode = Literal["field", "tags"]

THINK_OPEN = "<think>\n"
THINK_CLOSE = "\n</think>\n\n"
#: The OpenAI error ``type`` of an error reported by the upstream mid-stream.
UPSTREAM_ERROR_KIND = "upstream_error"

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One whole tool call: of an earlier assistant message, or of an answer.

    Requests carry them in assistant messages (history the client sends
    back); :class:`CompletionAccumulator` assembles the answer's from its
    :class:`~protocol.deltas.ToolCallDelta` pieces.

    Attributes:
        id: the call's id (``call_...``), as the client sent it (``""`` for
            a legacy ``function_call``, which has none).
        name: the function's name.
        arguments: the arguments as JSON text, as the client sent it (not parsed).
    """

    id: str
    name: str
    arguments: str


# ---------------------------------------------------------------------------
# token estimates


def counts_to_tokens(ascii_chars: int, other_chars: int) -> int:
    """:func:`estimate_tokens` of a text of ``ascii_chars`` ASCII and ``other_chars`` other
    characters: with :func:`char_counts`, a running count without keeping the text."""
    return other_chars + (ascii_chars + 3) // 4


def char_counts(text: str) -> tuple[int, int]:
    """(ASCII characters, other characters) of ``text``, in one C-level pass."""
    if text.isascii():  # O(1) in CPython: a flag of the string object
        return len(text), 0
    ascii_chars = len(text.encode("ascii", "ignore"))
    return ascii_chars, len(text) - ascii_chars


def estimate_tokens(text: str) -> int:
    """Roughly how many tokens ``text`` is, for the ``usage`` object.

    Neither upstream reports token counts, so this is an estimate in the
    spirit of OpenAI's rule of thumb: ASCII text (English, code, JSON) is
    about 4 characters per token, counted over all ASCII characters of the
    text together and rounded up; every other character (CJK ideographs,
    kana, Hangul, accented and Cyrillic letters, emoji, full-width
    punctuation) counts as one token, which is close for Chinese and a
    slight over-estimate elsewhere.

    Args:
        text: any text.

    Returns:
        0 for ``""``, otherwise at least 1.
    """
    ascii_chars, other_chars = char_counts(text)
    return counts_to_tokens(ascii_chars, other_chars)


def _usage(prompt_tokens: int, completion_tokens: int, counted: Usage | None) -> dict[str, Any]:
    """The ``usage`` object: the upstream's counts if it gave them, else the estimates."""
    if counted is None:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    usage: dict[str, Any] = {
        "prompt_tokens": counted.input_tokens,
        "completion_tokens": counted.output_tokens,
        "total_tokens": counted.input_tokens + counted.output_tokens,
    }
    if counted.reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": counted.reasoning_tokens}
    if counted.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": counted.cached_tokens}
    return usage


def error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    """An OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        message: what went wrong, for a human.
        kind: the OpenAI error ``type`` (``invalid_request_error``, ...).
        param: the request parameter at fault, if any.
        code: a short machine-readable code, if any.

    Returns:
        The JSON body.
    """
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


# ---------------------------------------------------------------------------
# stream


class _State(enum.Enum):
    OPEN = "open"  # deltas are encoded
    FINISHED = "finished"  # [DONE] was encoded; everything else is ignored


class ChunkEncoder:
    """One per streamed response: deltas in, SSE bytes out.

    Attributes:
        citations: every citation encoded so far, in order.
    """

    __slots__ = (
        "_ascii_chars",
        "_citation_line",
        "_completion_id",
        "_content_prefix",
        "_content_sent",
        "_created",
        "_field",
        "_head",
        "_id_used",
        "_include_usage",
        "_line_open",
        "_model",
        "_other_chars",
        "_pending",
        "_prompt_tokens",
        "_reasoning_prefix",
        "_started",
        "_state",
        "_tags",
        "_tail",
        "_think_open",
        "_tool_field",
        "_tool_index",
        "_top",
        "_usage",
        "citations",
    )

    #: What follows the last field of the delta object in every non-final
    #: chunk: it closes that object, so prefixes leave it open.
    _SUFFIX = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    #: The same after a tool call's ``arguments``: it closes the function,
    #: the call and the ``tool_calls`` array first.
    _TOOL_SUFFIX = b"}}]" + _SUFFIX

    def __init__(
        self,
        *,
        completion_id: str,
        model: str,
        created: int,
        reasoning: ReasoningMode = "field",
        include_usage: bool = False,
        prompt_tokens: int = 0,
        citation_line: str = DEFAULT_CITATION_LINE,
    ) -> None:
        """
        Args:
            completion_id: the ``id`` of every chunk; may be set again until
                a chunk carrying it was produced (ChatGLM names its
                conversation in its first event).
            model: the ``model`` of every chunk (usually what the client asked for).
            created: the ``created`` Unix time of every chunk.
            reasoning: "field" for ``reasoning_content``, "tags" for ``<think>``.
            include_usage: end with a usage chunk (``stream_options.include_usage``).
            prompt_tokens: the prompt's estimate, for the usage chunk.
            citation_line: the rendering of one citation, a :meth:`str.format`
                template with ``title`` and ``url``.
        """
        self._model = model
        self._created = created
        self._tags = reasoning == "tags"
        self._include_usage = include_usage
        self._prompt_tokens = prompt_tokens
        self._citation_line = citation_line
        self._state = _State.OPEN
        self._started = False  # start() gave the role chunk
        self._id_used = False  # bytes carrying completion_id were produced
        self._pending: list[str] = []  # texts of the chunk being built
        self._field = b""  # the prefix (delta field) of the chunk being built
        self._tail = self._SUFFIX  # what follows the queued text in that chunk
        self._tool_field = b""  # the prefix of the last tool call chunk begun
        self._tool_index = -1  # the call that chunk belongs to
        self._think_open = False  # tags mode: a <think> block is open
        self._content_sent = False  # answer content went out (think tags aside)
        self._line_open = False  # the last content did not end with a newline
        self._ascii_chars = 0
        self._other_chars = 0
        self._usage: Usage | None = None  # the upstream's counts, from its Finish
        self.citations: list[Citation] = []
        self._completion_id = completion_id
        self._build_prefixes()

    def _build_prefixes(self) -> None:
        # The JSON of every chunk up to its delta object. orjson escapes the
        # id and model once here; nothing on the hot path escapes them again.
        self._top = b"".join(
            (
                b'data: {"id":',
                orjson.dumps(self._completion_id),
                b',"object":"chat.completion.chunk","created":',
                b"%d" % self._created,
                b',"model":',
                orjson.dumps(self._model),
                b',"system_fingerprint":null,',
            )
        )
        self._head = self._top + b'"choices":[{"index":0,"delta":'
        self._content_prefix = self._head + b'{"content":'
        self._reasoning_prefix = self._head + b'{"reasoning_content":'

    @property
    def completion_id(self) -> str:
        """The ``id`` of every chunk."""
        return self._completion_id

    @completion_id.setter
    def completion_id(self, value: str) -> None:
        if value == self._completion_id:
            return
        if self._id_used:
            raise LocalProtocolError(
                "cannot change completion_id: chunks carrying the old one were produced"
            )
        self._completion_id = value
        self._build_prefixes()

    @property
    def finished(self) -> bool:
        """True after a ``Finish`` or an ``UpstreamError`` was encoded."""
        return self._state is _State.FINISHED

    @property
    def completion_tokens(self) -> int:
        """The upstream's count once its ``Finish`` gave one; until then the estimate
        over all content, reasoning and tool calls encoded so far."""
        if self._usage is not None:
            return self._usage.output_tokens
        return counts_to_tokens(self._ascii_chars, self._other_chars)

    def start(self) -> bytes:
        """The first chunk: ``delta {"role": "assistant", "content": ""}``.

        Its bytes go out before any bytes of :meth:`encode`, but it may be
        called after :meth:`encode` (even after the end was encoded): the
        relay encodes an upstream read first and only then decides to commit
        the response, sending ``start() + data`` in one write.

        Raises:
            LocalProtocolError: called twice.
        """
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = self._id_used = True
        return self._head + b'{"role":"assistant","content":""' + self._SUFFIX

    def keepalive(self) -> bytes:
        """An SSE comment that keeps idle proxies from closing the stream.

        Returns:
            ``b": keep-alive\\n\\n"``, or ``b""`` once the stream is finished.
        """
        return b"" if self._state is _State.FINISHED else KEEPALIVE

    def encode(self, deltas: Sequence[Delta]) -> bytes:
        """All SSE events for ``deltas``, in order, as one bytes object.

        Args:
            deltas: what one upstream read produced.

        Returns:
            The events (``b""`` if there are none, or once finished). After a
            ``Finish`` or an ``UpstreamError`` the stream is finished: the rest
            of ``deltas`` and every later call are ignored. The caller sends
            :meth:`start`'s chunk before the first of these bytes (it may
            call :meth:`start` later, see there).
        """
        if self._state is _State.FINISHED:
            return b""
        out: list[bytes] = []
        citing = False  # the previous delta was a citation: its block is open
        for delta in deltas:
            if citing and type(delta) is not Citation:
                self._content(out, CITATIONS_END)  # one blank line ends a citation block
                citing = False
            match delta:
                case TextDelta(text=text):
                    if text:
                        self._content(out, text)
                case ReasoningDelta(text=text):
                    if not text:
                        pass
                    elif not self._tags:
                        self._put(out, self._reasoning_prefix, text)
                    elif self._think_open:
                        self._put(out, self._content_prefix, text)
                    else:
                        self._think_open = True
                        self._put(out, self._content_prefix, THINK_OPEN)
                        self._put(out, self._content_prefix, text)
                case Citation():
                    self.citations.append(delta)
                    self._content(out, citation_text(delta, self._citation_line))
                    citing = True
                case ImageResult() | VideoResult():
                    self._content(out, media_text(delta, self._line_open))
                case ToolCallDelta():
                    self._tool_call(out, delta)
                case Finish(reason=reason, text=text, usage=usage):
                    self._usage = usage
                    self._finish(out, reason, text)
                    return b"".join(out)
                case UpstreamError(code=code, message=message):
                    self._flush(out)
                    error = error_body(message, UPSTREAM_ERROR_KIND, code=code)
                    out.append(b"data: " + error + b"\n\n")
                    out.append(DONE)
                    self._state = _State.FINISHED
                    self._id_used = True
                    return b"".join(out)
                case _:
                    assert_never(delta)
        if citing:
            self._content(out, CITATIONS_END)
        self._flush(out)
        return b"".join(out)

    def _content(self, out: list[bytes], text: str) -> None:
        """Queue answer text, closing an open ``<think>`` block first."""
        if self._think_open:
            self._think_open = False
            self._put(out, self._content_prefix, THINK_CLOSE)
        self._content_sent = True
        self._line_open = not text.endswith("\n")
        self._put(out, self._content_prefix, text)

    def _put(self, out: list[bytes], field: bytes, text: str) -> None:
        """Queue ``text`` for the delta field ``field``, flushing another field's chunk."""
        if field is not self._field:
            self._flush(out)
            self._field = field
            self._tail = self._SUFFIX
        self._pending.append(text)

    def _tool_call(self, out: list[bytes], delta: ToolCallDelta) -> None:
        """Queue a piece of a tool call: a new chunk for a call's first delta.

        A call's first delta (it has an id or a name) opens a chunk that
        names the call; the arguments pieces that follow it, of the same
        index and within one batch, join that chunk's ``arguments`` as text
        pieces join a content chunk. Pieces of a call whose chunk went out
        open a chunk of ``{"index", "function": {"arguments"}}`` alone: the
        shape the openai SDK's stream accumulator merges by index.
        """
        if self._think_open:  # tags mode: the reasoning is over
            self._think_open = False
            self._put(out, self._content_prefix, THINK_CLOSE)
        index = delta.index
        if delta.id or delta.name:
            self._flush(out)
            ascii_chars, other_chars = char_counts(delta.name)
            self._ascii_chars += ascii_chars
            self._other_chars += other_chars
            field = b"".join(
                (
                    self._head,
                    b'{"tool_calls":[{"index":%d,"id":' % index,
                    orjson.dumps(delta.id),
                    b',"type":"function","function":{"name":',
                    orjson.dumps(delta.name),
                    b',"arguments":',
                )
            )
        elif not delta.arguments_part:
            return  # nothing to say
        elif self._pending and self._field is self._tool_field and self._tool_index == index:
            self._pending.append(delta.arguments_part)  # the same call's chunk
            return
        else:
            self._flush(out)
            field = self._head + b'{"tool_calls":[{"index":%d,"function":{"arguments":' % index
        self._field = self._tool_field = field
        self._tail = self._TOOL_SUFFIX
        self._tool_index = index
        self._pending.append(delta.arguments_part)  # may be "": the chunk goes out anyway

    def _flush(self, out: list[bytes]) -> None:
        """Turn the queued text into one chunk."""
        pending = self._pending
        if not pending:
            return
        text = pending[0] if len(pending) == 1 else "".join(pending)
        pending.clear()
        self._id_used = True
        if text.isascii():
            self._ascii_chars += len(text)
        else:
            ascii_chars, other_chars = char_counts(text)
            self._ascii_chars += ascii_chars
            self._other_chars += other_chars
        out.append(self._field + orjson.dumps(text) + self._tail)

    def _finish(self, out: list[bytes], reason: FinishReason, text: str) -> None:
        """Emit the finish text, the final chunk, the usage chunk and ``[DONE]``."""
        if text:
            self._content(out, finish_text(text, self._content_sent))
        elif self._think_open:
            self._think_open = False
            self._put(out, self._content_prefix, THINK_CLOSE)
        self._flush(out)
        out.append(
            self._head + b'{},"logprobs":null,"finish_reason":' + orjson.dumps(reason) + b"}]}\n\n"
        )
        if self._include_usage:
            usage = _usage(self._prompt_tokens, self.completion_tokens, self._usage)
            out.append(self._top + b'"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
        out.append(DONE)
        self._state = _State.FINISHED
        self._id_used = True


# ---------------------------------------------------------------------------
# non-stream


class CompletionAccumulator(AnswerCollector):
    """Non-stream: add all deltas, then build one ``chat.completion`` object.

    What it collects, and how, is :class:`~protocol.answer_text.AnswerCollector`'s
    (its attributes too: ``finished``, ``error``, ``citations``, ``images``,
    ``videos``); tool call pieces are gathered by index, the first id and
    name given winning.
    """

    __slots__ = ("_calls", "_tags")

    def __init__(self, *, reasoning: ReasoningMode = "field") -> None:
        """
        Args:
            reasoning: "field" puts reasoning in ``message.reasoning_content``,
                "tags" in a ``<think>`` block before the content.
        """
        super().__init__()
        self._tags = reasoning == "tags"
        # index -> [id, name, arguments pieces...]: each call's deltas as they came
        self._calls: dict[int, list[str]] = {}

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The answer's tool calls so far, by index, arguments joined."""
        return [
            ToolCall(call[0], call[1], "".join(call[2:]))
            for _, call in sorted(self._calls.items())
        ]

    def _tool_call(self, delta: ToolCallDelta) -> None:
        call = self._calls.setdefault(delta.index, ["", ""])
        call[0] = call[0] or delta.id  # the first id and name given win
        call[1] = call[1] or delta.name
        if delta.arguments_part:
            call.append(delta.arguments_part)

    def body(self, *, completion_id: str, model: str, created: int, prompt_tokens: int) -> bytes:
        """The whole ``chat.completion`` object.

        Content is the answer text, then, if there were citations, the
        references' list ``\\n\\n搜索结果来自：\\n`` + ``{title} - {url}`` lines
        (duplicate URLs dropped, first title kept). In "tags" mode a
        ``<think>`` block with all the reasoning comes first; in "field" mode
        the reasoning is ``message.reasoning_content`` (absent without any).
        Tool calls are ``message.tool_calls`` (``{"id", "type": "function",
        "function": {"name", "arguments"}}`` in index order; absent without
        any), and with calls an empty content is ``null``, as OpenAI sends it.
        The finish reason is the ``Finish``'s; so is ``usage`` when the
        upstream counted (:func:`_usage`), else it is estimated.

        Raises:
            LocalProtocolError: no ``Finish`` was added, or an
                ``UpstreamError`` was: the caller must answer with an error
                (check :attr:`error` and :attr:`finished` first).
        """
        finish = self._final_finish("completion")
        content = self.text + citation_list(self.citations)
        reasoning = self.reasoning
        if reasoning and self._tags:
            content = THINK_OPEN + reasoning + THINK_CLOSE + content
        # Counted as the stream counts them: all the characters together.
        counted = [content]
        message: dict[str, object] = {"role": "assistant", "content": content}
        if reasoning and not self._tags:
            message["reasoning_content"] = reasoning
            counted.append(reasoning)
        calls = self.tool_calls
        if calls:
            if not content:
                message["content"] = None
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in calls
            ]
            for call in calls:
                counted += (call.name, call.arguments)
        ascii_chars = other_chars = 0
        for text in counted:
            ascii_count, other_count = char_counts(text)
            ascii_chars += ascii_count
            other_chars += other_count
        completion_tokens = counts_to_tokens(ascii_chars, other_chars)
        return orjson.dumps(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish.reason,
                    }
                ],
                "usage": _usage(prompt_tokens, completion_tokens, finish.usage),
            }
        )
