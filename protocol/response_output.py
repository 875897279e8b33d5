"""OpenAI's Responses API (``POST /v1/responses``): events and bodies out (sans-IO).

:class:`ResponseEncoder` turns neutral events (:mod:`protocol.deltas`) into
the Responses API's streamed events, :class:`ResponseAccumulator` into its
whole response object (the request side is :mod:`protocol.responses`). The
shapes are those of the ``openai`` SDK's types (``openai.types.responses``:
``Response`` and ``ResponseStreamEvent``), which the tests hold every body
and every event to, and its stream helper (``client.responses.stream``)
must rebuild the response from the events.

Theory of operation, stream (:class:`ResponseEncoder`, one per response).
The stream is server-sent events named by their type (``event: <type>``
then ``data: <json>``), each carrying ``sequence_number`` 0, 1, 2, ...:
:meth:`~ResponseEncoder.start` gives ``response.created`` and
``response.in_progress`` (numbers 0 and 1, whenever it is called: the relay
may encode the first upstream read before it commits, so :meth:`encode`
numbers from 2). Then each output item is *added*, filled, and *done*:

- text goes to a message item (``msg_...``): ``response.output_item.added``,
  ``response.content_part.added`` (an empty ``output_text`` part), one
  ``response.output_text.delta`` per run of text of one batch, and at its
  end ``response.output_text.done``, ``response.content_part.done`` and
  ``response.output_item.done``, each carrying the whole text;
- reasoning goes to a reasoning item (``rs_...``) whose content is one
  ``reasoning_text`` part, the same way (``response.reasoning_text.delta``
  and ``.done``): the upstreams' thinking is raw reasoning, not a summary;
- each tool call is a ``function_call`` item (``fc_...``, its ``call_id``
  the call's ``call_...`` id) with ``response.function_call_arguments.delta``
  pieces and ``.done``.

An item ends when an item of another kind (or another call) starts, or at
the end. The end is ``response.completed`` with the whole response object
(every item, the ``usage``: the upstream's counts when its ``Finish``
carried them, :class:`~protocol.deltas.Usage`, else estimated); ``Finish("length")`` (and
``"content_filter"``) ends it with ``response.incomplete`` instead, status
``incomplete`` and ``incomplete_details.reason`` ``max_output_tokens`` (or
``content_filter``). An in-band ``UpstreamError`` closes the open item as
incomplete, then sends an ``error`` event (the relay's own code) and
``response.failed``, whose ``error.code`` is one of the few OpenAI defines
(``rate_limit_exceeded`` for a 429, else ``server_error``). Anything after
the end is ignored. Citations, images and videos become message text by the
rules every dialect shares (:mod:`protocol.answer_text`).

The encoder keeps the text of every item: the ``.done`` events and the final
response object carry it whole, as OpenAI's do; nothing else grows with the
answer. Text events are built from bytes prepared when their item opens (one
``orjson.dumps`` of the text per event, as :class:`~protocol.chunks.ChunkEncoder`).

Theory of operation, whole answer (:class:`ResponseAccumulator`): the same
items, built from the same events without the event bytes; citations are
not inline there but listed after the answer, as in a whole chat completion.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, assert_never

import orjson

from protocol.answer_text import (
    CITATIONS_END,
    DEFAULT_CITATION_LINE,
    citation_list,
    citation_text,
    final_finish,
    finish_text,
    media_text,
)
from protocol.chunks import KEEPALIVE, estimate_tokens
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
from protocol.openai import prompt_tokens
from protocol.responses import ResponsesRequest

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from protocol.deltas import Delta, Usage
    from protocol.openai import ChatRequest, ResponseFormat, ToolChoice

__all__ = ["ResponseAccumulator", "ResponseEncoder", "response_echo", "response_id"]

#: OpenAI's prefix of response ids (API reference, "The response object").
RESPONSE_ID_PREFIX = "resp_"


# ---------------------------------------------------------------------------
# the response object


def _text_format(fmt: ResponseFormat | None) -> dict[str, Any]:
    if fmt is None:
        return {"type": "text"}
    if fmt.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "name": fmt.name, "schema": fmt.schema, "strict": fmt.strict}


def _tool_choice(choice: ToolChoice) -> str | dict[str, str]:
    if choice.mode == "function":
        return {"type": "function", "name": choice.name}
    return choice.mode


#: What a plain ChatRequest echoes: OpenAI's defaults.
_DEFAULTS = ResponsesRequest(model="", messages=(), stream=False, include_usage=False,
                             conversation_id=None, use_search=None)


def response_echo(request: ChatRequest) -> dict[str, Any]:
    """The settings a response object repeats from its request (OpenAI echoes them).

    A plain :class:`ChatRequest` (not a :class:`ResponsesRequest`) gets
    OpenAI's defaults for what it does not say.
    """
    extra = request if isinstance(request, ResponsesRequest) else _DEFAULTS
    strict = extra.tool_strict
    return {
        "instructions": extra.instructions,
        "max_output_tokens": request.max_tokens,
        "metadata": dict(extra.metadata),
        "parallel_tool_calls": extra.parallel_tool_calls,
        "store": extra.store,
        "temperature": extra.temperature,
        "text": {"format": _text_format(request.response_format)},
        "tool_choice": _tool_choice(request.tool_choice),
        "tools": [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description or None,
                "parameters": tool.parameters,
                "strict": strict[index] if index < len(strict) else None,
            }
            for index, tool in enumerate(request.tools)
        ],
        "top_p": extra.top_p,
        "truncation": extra.truncation,
        "user": extra.user,
    }


def _response(
    response_id: str,
    created_at: int,
    model: str,
    echo: dict[str, Any],
    status: str,
    *,
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """One response object (``openai.types.responses.Response``)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": None if incomplete is None else {"reason": incomplete},
        "model": model,
        "output": [] if output is None else output,
        "previous_response_id": None,
        "usage": usage,
        **echo,
    }


def response_id(conversation_id: str) -> str:
    """A response's id: ``resp_<conversation>``, or a new one for ``""`` (no conversation).

    Named after the upstream conversation, the relay's log and the upstream's
    history can be matched; an id that is a response id already is kept.
    """
    if not conversation_id:
        return RESPONSE_ID_PREFIX + uuid.uuid4().hex
    if conversation_id.startswith(RESPONSE_ID_PREFIX):
        return conversation_id
    return RESPONSE_ID_PREFIX + conversation_id


#: An output item's ``status``.
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class _Kind(enum.Enum):
    """An output item's type; the value is its id prefix."""

    MESSAGE = "msg"
    REASONING = "rs"
    FUNCTION_CALL = "fc"


@dataclass(slots=True)
class _Item:
    """One output item as it is built."""

    kind: _Kind
    id: str
    index: int
    call: int = -1  # a function call's ToolCallDelta.index
    call_id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    status: ItemStatus = "in_progress"

    @property
    def text(self) -> str:
        """The text (a function call's: its arguments) so far, joined once."""
        pieces = self.pieces
        if len(pieces) > 1:
            pieces[:] = ["".join(pieces)]
        return pieces[0] if pieces else ""

    def json(self) -> dict[str, Any]:
        """The item as ``output`` holds it (its text so far)."""
        match self.kind:
            case _Kind.MESSAGE:
                content = [{"type": "output_text", "annotations": [], "logprobs": [],
                            "text": self.text}] if self.status != "in_progress" else []
                return {"id": self.id, "type": "message", "status": self.status,
                        "content": content, "role": "assistant"}
            case _Kind.REASONING:
                content = [{"type": "reasoning_text", "text": self.text}] if (
                    self.status != "in_progress") else []
                return {"id": self.id, "type": "reasoning", "summary": [],
                        "content": content, "status": self.status}
            case _Kind.FUNCTION_CALL:
                return {"id": self.id, "type": "function_call", "status": self.status,
                        "arguments": self.text, "call_id": self.call_id, "name": self.name}
            case _:
                assert_never(self.kind)


#: Finish reasons that leave the response incomplete, with OpenAI's reason.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _usage(input_tokens: int, items: Iterable[_Item], counted: Usage | None) -> dict[str, Any]:
    """The ``usage`` object: the upstream's counts (``counted``) if it gave them, else
    estimated (:func:`protocol.chunks.estimate_tokens`)."""
    cached = 0
    if counted is not None:
        input_tokens, output, reasoning = (counted.input_tokens, counted.output_tokens,
                                           counted.reasoning_tokens)
        cached = counted.cached_tokens
    else:
        reasoning = output = 0
        for item in items:
            tokens = estimate_tokens(item.text) + estimate_tokens(item.name)
            output += tokens
            if item.kind is _Kind.REASONING:
                reasoning += tokens
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output,
    }


def _failure(delta: UpstreamError) -> dict[str, str]:
    """A response object's ``error``: its ``code`` is one of OpenAI's few."""
    code = "rate_limit_exceeded" if delta.status == 429 else "server_error"
    return {"code": code, "message": delta.message or delta.code}


class _Output:
    """The output items of one response, built from neutral events.

    Subclasses hear of every item opened, every piece added and every item
    closed (the hooks below), and decide how citations show.
    """

    __slots__ = ("_content_sent", "_item_base", "_line_open", "_open", "error", "finish",
                 "items")

    def __init__(self, item_base: str) -> None:
        self._item_base = item_base
        self.items: list[_Item] = []
        self._open: _Item | None = None
        self._line_open = False  # the open message's text does not end with a newline
        self._content_sent = False  # message text was added
        self.finish: Finish | None = None
        self.error: UpstreamError | None = None

    @property
    def done(self) -> bool:
        """A ``Finish`` or an ``UpstreamError`` was fed."""
        return self.finish is not None or self.error is not None

    def _feed(self, deltas: Iterable[Delta]) -> None:
        """Build items from ``deltas``; the end (``Finish``, ``UpstreamError``) stops it."""
        if self.done:
            return
        citing = False
        for delta in deltas:
            if citing and type(delta) is not Citation:
                self._citations_end()
                citing = False
            match delta:
                case TextDelta(text=text):
                    if text:
                        self._add(_Kind.MESSAGE, text)
                case ReasoningDelta(text=text):
                    if text:
                        self._add(_Kind.REASONING, text)
                case Citation():
                    self._cite(delta)
                    citing = True
                case ImageResult() | VideoResult():
                    self._add(_Kind.MESSAGE, media_text(delta, self._mid_line()))
                case ToolCallDelta():
                    self._tool_call(delta)
                case Finish(reason=reason, text=text):
                    if text:
                        self._add(_Kind.MESSAGE, finish_text(text, self._content_sent))
                    self._close("incomplete" if reason in _INCOMPLETE else "completed")
                    self.finish = delta
                    self._ended()
                    return
                case UpstreamError():
                    self._close("incomplete")
                    self.error = delta
                    self._ended()
                    return
                case _:
                    assert_never(delta)
        if citing:
            self._citations_end()

    def _mid_line(self) -> bool:
        """The open message's text ends mid-line."""
        return self._line_open and self._open is not None and self._open.kind is _Kind.MESSAGE

    def _add(self, kind: _Kind, text: str) -> None:
        item = self._open
        if item is None or item.kind is not kind:
            item = self._start(kind)
        if kind is _Kind.MESSAGE:
            self._content_sent = True
            self._line_open = not text.endswith("\n")
        item.pieces.append(text)
        self._added(item, text)

    def _start(self, kind: _Kind, call: int = -1, call_id: str = "", name: str = "") -> _Item:
        self._close("completed")
        index = len(self.items)
        item = _Item(kind, f"{kind.value}_{self._item_base}_{index}", index, call, call_id, name)
        self.items.append(item)
        self._open = item
        self._line_open = False
        self._opened(item)
        return item

    def _tool_call(self, delta: ToolCallDelta) -> None:
        item = self._open
        if delta.id:
            item = self._start(_Kind.FUNCTION_CALL, delta.index, delta.id, delta.name)
        elif item is None or item.kind is not _Kind.FUNCTION_CALL or item.call != delta.index:
            raise LocalProtocolError(f"arguments of tool call {delta.index}, which is not open")
        if delta.arguments_part:
            item.pieces.append(delta.arguments_part)
            self._added(item, delta.arguments_part)

    def _close(self, status: ItemStatus) -> None:
        item = self._open
        if item is not None:
            self._open = None
            item.status = status
            self._closed(item)

    # hooks: the encoder writes events, the accumulator needs none of them

    def _opened(self, item: _Item) -> None:
        pass

    def _added(self, item: _Item, text: str) -> None:
        pass

    def _closed(self, item: _Item) -> None:
        pass

    def _ended(self) -> None:
        pass

    def _cite(self, citation: Citation) -> None:
        raise NotImplementedError

    def _citations_end(self) -> None:
        pass


# ---------------------------------------------------------------------------
# stream


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _text_event_bytes(kind: str) -> bytes:
    """The fixed start of a text event, up to its sequence number."""
    return (b"event: " + kind.encode() + b'\ndata: {"type":"' + kind.encode()
            + b'","sequence_number":')


_DELTA_HEADS = {
    _Kind.MESSAGE: _text_event_bytes("response.output_text.delta"),
    _Kind.REASONING: _text_event_bytes("response.reasoning_text.delta"),
    _Kind.FUNCTION_CALL: _text_event_bytes("response.function_call_arguments.delta"),
}
_DELTA_TAILS = {
    _Kind.MESSAGE: b',"logprobs":[]}\n\n',
    _Kind.REASONING: b"}\n\n",
    _Kind.FUNCTION_CALL: b"}\n\n",
}


class _State(enum.Enum):
    OPEN = "open"  # deltas are encoded
    FINISHED = "finished"  # the final event was encoded; everything else is ignored


class ResponseEncoder(_Output):
    """One per streamed response: neutral deltas in, Responses API SSE bytes out.

    Attributes:
        citations: every citation encoded so far, in order.
    """

    __slots__ = (
        "_citation_line",
        "_created_at",
        "_delta_mid",
        "_echo",
        "_id_used",
        "_model",
        "_out",
        "_pending",
        "_pending_item",
        "_prompt_tokens",
        "_response_id",
        "_seq",
        "_started",
        "_state",
        "citations",
    )

    def __init__(
        self,
        request: ChatRequest,
        *,
        response_id: str,
        model: str,
        created_at: int,
        citation_line: str = DEFAULT_CITATION_LINE,
        item_base: str,
    ) -> None:
        """
        Args:
            request: the request being answered (echoed, and its prompt estimated).
            response_id: the response's ``id`` (``resp_...``); may be set again
                (to the upstream conversation) until bytes carrying it were produced.
            model: the ``model`` the response names.
            created_at: its ``created_at`` Unix time.
            citation_line: the rendering of one citation, a :meth:`str.format`
                template with ``title`` and ``url``.
            item_base: what makes the item ids unique (``msg_<base>_<n>``).
        """
        super().__init__(item_base)
        self._response_id = response_id
        self._model = model
        self._created_at = created_at
        self._echo = response_echo(request)
        self._prompt_tokens = prompt_tokens(request)
        self._citation_line = citation_line
        self._state = _State.OPEN
        self._started = False
        self._id_used = False
        self._seq = 2  # start()'s two events are 0 and 1, whenever it is called
        self._pending: list[str] = []  # text of the next delta event
        self._pending_item: _Item | None = None
        self._delta_mid = b""  # the open item's delta bytes after the sequence number
        self.citations: list[Citation] = []
        self._out: list[bytes] = []  # the events of the encode() call under way

    @property
    def completion_id(self) -> str:
        """The response's ``id``."""
        return self._response_id

    @completion_id.setter
    def completion_id(self, value: str) -> None:
        """Name the response after the upstream conversation ``value`` (:func:`response_id`).

        Raises:
            LocalProtocolError: events carrying the old id were produced.
        """
        value = response_id(value)
        if value == self._response_id:
            return
        if self._id_used:
            raise LocalProtocolError(
                "cannot change the response id: events carrying the old one were produced"
            )
        self._response_id = value

    @property
    def finished(self) -> bool:
        """True after a ``Finish`` or an ``UpstreamError`` was encoded."""
        return self._state is _State.FINISHED

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress`` (sequence numbers 0 and 1).

        Their bytes go first, but this may be called after :meth:`encode`
        (even after the end was encoded): the relay encodes an upstream read
        before it commits the response.

        Raises:
            LocalProtocolError: called twice.
        """
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = self._id_used = True
        response = self._response("in_progress")
        return (
            _sse("response.created",
                 {"type": "response.created", "sequence_number": 0, "response": response})
            + _sse("response.in_progress",
                   {"type": "response.in_progress", "sequence_number": 1, "response": response})
        )

    def keepalive(self) -> bytes:
        """An SSE comment (``: keep-alive``), or ``b""`` once the stream is finished."""
        return b"" if self._state is _State.FINISHED else KEEPALIVE

    def encode(self, deltas: Sequence[Delta]) -> bytes:
        """All events for ``deltas``, in order, as one bytes object.

        Args:
            deltas: one batch of neutral events.

        Returns:
            The events (``b""`` if there are none, or once finished). After a
            ``Finish`` or an ``UpstreamError`` the stream is finished: the
            rest of ``deltas`` and every later call are ignored.

        Raises:
            LocalProtocolError: arguments of a tool call that is not open.
        """
        if self._state is _State.FINISHED:
            return b""
        self._feed(deltas)
        self._flush()
        data = b"".join(self._out)
        self._out.clear()
        return data

    def fail(self, code: str, message: str, status: int = 500) -> bytes:
        """The failure events for an error of the relay's (a stopped stream's last words).

        Returns:
            The events that close the open item and fail the response, or
            ``b""`` if the stream is finished already.
        """
        return self.encode([UpstreamError(code, message, status)])

    # events

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        seq = self._seq
        self._seq = seq + 1
        self._out.append(_sse(kind, {"type": kind, "sequence_number": seq, **data}))

    def _response(
        self,
        status: str,
        *,
        error: dict[str, str] | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        """The response object; its output and usage once it is over."""
        if status == "in_progress":
            return _response(self._response_id, self._created_at, self._model, self._echo,
                             status)
        return _response(self._response_id, self._created_at, self._model, self._echo, status,
                         output=[item.json() for item in self.items],
                         usage=_usage(self._prompt_tokens, self.items,
                                      None if self.finish is None else self.finish.usage),
                         error=error, incomplete=incomplete)

    def _flush(self) -> None:
        """The queued text of the open item as one delta event."""
        pending = self._pending
        item = self._pending_item
        if not pending or item is None:
            return
        text = pending[0] if len(pending) == 1 else "".join(pending)
        pending.clear()
        seq = self._seq
        self._seq = seq + 1
        self._out.append(_DELTA_HEADS[item.kind] + b"%d" % seq + self._delta_mid
                        + orjson.dumps(text) + _DELTA_TAILS[item.kind])

    def _opened(self, item: _Item) -> None:
        self._flush()
        self._pending_item = item
        ids = b'"item_id":' + orjson.dumps(item.id) + b',"output_index":%d' % item.index
        if item.kind is _Kind.FUNCTION_CALL:
            self._delta_mid = b"," + ids + b',"delta":'
        else:
            self._delta_mid = b"," + ids + b',"content_index":0,"delta":'
        self._event("response.output_item.added", {"output_index": item.index,
                                                    "item": item.json()})
        if item.kind is not _Kind.FUNCTION_CALL:
            self._event("response.content_part.added", self._part(item, ""))

    def _added(self, item: _Item, text: str) -> None:
        self._pending.append(text)

    def _part(self, item: _Item, text: str) -> dict[str, Any]:
        if item.kind is _Kind.MESSAGE:
            part: dict[str, Any] = {"type": "output_text", "annotations": [], "logprobs": [],
                                    "text": text}
        else:
            part = {"type": "reasoning_text", "text": text}
        return {"item_id": item.id, "output_index": item.index, "content_index": 0,
                "part": part}

    def _closed(self, item: _Item) -> None:
        self._flush()
        self._pending_item = None
        text = item.text
        ids = {"item_id": item.id, "output_index": item.index}
        match item.kind:
            case _Kind.MESSAGE:
                self._event("response.output_text.done",
                            {**ids, "content_index": 0, "text": text, "logprobs": []})
                self._event("response.content_part.done", self._part(item, text))
            case _Kind.REASONING:
                self._event("response.reasoning_text.done",
                            {**ids, "content_index": 0, "text": text})
                self._event("response.content_part.done", self._part(item, text))
            case _Kind.FUNCTION_CALL:
                self._event("response.function_call_arguments.done", {**ids, "arguments": text})
            case _:
                assert_never(item.kind)
        self._event("response.output_item.done", {"output_index": item.index,
                                                   "item": item.json()})

    def _ended(self) -> None:
        self._state = _State.FINISHED
        self._id_used = True
        error = self.error
        if error is not None:
            self._event("error", {"code": error.code, "message": error.message, "param": None})
            self._event("response.failed",
                        {"response": self._response("failed", error=_failure(error))})
            return
        assert self.finish is not None
        reason = _INCOMPLETE.get(self.finish.reason)
        if reason is None:
            self._event("response.completed", {"response": self._response("completed")})
        else:
            self._event("response.incomplete",
                        {"response": self._response("incomplete", incomplete=reason)})

    def _cite(self, citation: Citation) -> None:
        self.citations.append(citation)
        self._add(_Kind.MESSAGE, citation_text(citation, self._citation_line))

    def _citations_end(self) -> None:
        self._add(_Kind.MESSAGE, CITATIONS_END)  # one blank line ends a citation block


# ---------------------------------------------------------------------------
# whole answer


class ResponseAccumulator(_Output):
    """Non-stream: add all deltas, then build one response object.

    Attributes:
        citations: every citation added, in order (duplicates kept).
    """

    __slots__ = ("citations",)

    def __init__(self, *, item_base: str) -> None:
        """
        Args:
            item_base: what makes the item ids unique (``msg_<base>_<n>``).
        """
        super().__init__(item_base)
        self.citations: list[Citation] = []

    @property
    def finished(self) -> bool:
        """A ``Finish`` was added."""
        return self.finish is not None

    @property
    def text(self) -> str:
        """The message text so far."""
        return "".join(item.text for item in self.items if item.kind is _Kind.MESSAGE)

    def add(self, deltas: Iterable[Delta]) -> None:
        """Collect ``deltas`` (ignored after a ``Finish`` or an ``UpstreamError``).

        Raises:
            LocalProtocolError: arguments of a tool call that is not open.
        """
        self._feed(deltas)

    def _cite(self, citation: Citation) -> None:
        self.citations.append(citation)

    def body(
        self, request: ChatRequest, *, response_id: str, model: str, created_at: int
    ) -> bytes:
        """The whole response object (``openai.types.responses.Response``).

        Citations are listed after the answer text, as in a whole chat
        completion: ``\\n\\n搜索结果来自：\\n`` then ``{title} - {url}`` lines,
        duplicate URLs dropped (a message item is added if there is none).

        Raises:
            LocalProtocolError: no ``Finish`` was added, or an
                ``UpstreamError`` was: the caller must answer with an error.
        """
        finish = final_finish(self.finish, self.error, "response")
        listing = citation_list(self.citations)
        if listing:
            messages = [item for item in self.items if item.kind is _Kind.MESSAGE]
            if messages:
                messages[-1].pieces.append(listing)
            else:
                index = len(self.items)
                self.items.append(_Item(_Kind.MESSAGE, f"msg_{self._item_base}_{index}", index,
                                        pieces=[listing.lstrip("\n")], status="completed"))
            self.citations.clear()
        reason = _INCOMPLETE.get(finish.reason)
        return orjson.dumps(_response(
            response_id, created_at, model, response_echo(request),
            "completed" if reason is None else "incomplete",
            output=[item.json() for item in self.items],
            usage=_usage(prompt_tokens(request), self.items, finish.usage),
            incomplete=reason,
        ))
