"""An OpenAI-compatible upstream's answers: SSE chunks in, deltas or raw events out (sans-IO).

Two readers of the same wire, one per path through the relay:

- :class:`ChunkStream` (the neutral path, every dialect): the I/O layer
  decodes the body with :class:`protocol.sse.SSEDecoder` and hands every
  event to it; it returns the provider-neutral deltas of
  :mod:`protocol.deltas`.
- :class:`EventFramer` (the passthrough fast path, OpenAI chat completions in
  and out): raw body bytes in, the same bytes out cut at event boundaries,
  with only the ``"model"`` value rewritten to the name the client asked for
  when it differs. No JSON is decoded or encoded per chunk.

And :func:`error_from_response`: a non-2xx upstream answer as the
:class:`~protocol.errors.RelayError` the relay raises, with the upstream's
status and the fields of its OpenAI error object. An error the upstream
sends in-band (``data: {"error": {...}}`` under its 200) stands for the
status :func:`in_band_status` reads from it, on both paths: ChunkStream's
UpstreamError carries it, and :func:`leading_error` gives the fast path the
same exception :func:`error_from_response` would when such an error is the
stream's first event (before the relay has sent anything).

Theory of operation (:class:`ChunkStream`). Each ``data:`` event is one
``chat.completion.chunk`` JSON object, or ``[DONE]``. Per chunk, in order:

1. ``error`` (an object): the upstream failed after the stream started ->
   UpstreamError (the answer ends);
2. ``usage`` (an object): kept in :attr:`ChunkStream.usage`;
3. the first choice's ``delta``: ``reasoning_content`` (DeepSeek; ``reasoning``
   as vLLM and OpenRouter name it) -> ReasoningDelta, ``content`` ->
   TextDelta, each ``tool_calls`` item -> ToolCallDelta (the first delta of
   a call index carries its id and name; an upstream that sends no id gets
   ``call_<n>``);
4. the choice's ``finish_reason``: remembered, not yet a Finish: the usage
   chunk (``stream_options.include_usage``) comes after it.

``[DONE]`` ends the answer with Finish(the remembered reason, ``stop`` if none
came). EOF (:meth:`ChunkStream.close`) after a finish reason but without
``[DONE]`` is a Finish too (some servers leave it out); EOF before one is
UpstreamError("truncated"). Reasons outside OpenAI's four become ``stop``
(``function_call``, the legacy name, becomes ``tool_calls``). The Finish
carries the upstream's token counts (:attr:`~protocol.deltas.Finish.usage`,
:func:`usage_from`) when a chunk before it had a ``usage`` object with
``prompt_tokens`` and ``completion_tokens``; that is why the Finish waits for
``[DONE]``: the usage chunk comes after the finish reason.

An upstream that answers ``stream: true`` with one whole ``chat.completion``
object anyway (some servers ignore the flag) is read by
:meth:`ChunkStream.completion`: the same deltas, in the same order, and a Finish
with its usage.

Invariants (h11's): any event gives deltas or RemoteProtocolError, never
anything else; every answer ends with exactly one Finish or UpstreamError and
nothing follows it; no text delta is empty.

Theory of operation (:class:`EventFramer`). An event ends at a blank line
(``\\n\\n``, ``\\r\\n\\r\\n`` or ``\\r\\r``). ``feed`` appends the read to what
was pending, finds the *last* blank line (one ``rfind`` per kind, C speed)
and returns everything before it: whole events, ready for the client in one
write; the rest waits for its own remaining bytes only. When the served
name differs from what the upstream says (a prefix upstream: ``deepseek/x``
goes up as ``x``), one ``re.sub`` over those whole events puts the served
name into every top-level ``"model": "..."`` member. Inside a JSON string
every ``"`` is escaped, so the pattern (an unescaped quote, ``model``, an
unescaped quote and a colon) matches member names only, never answer text.
``[DONE]`` is found the same way: a line that begins ``data: [DONE]`` (an
LF inside a JSON string is escaped, so such a line is the event's own).
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Any

import orjson

from protocol.deltas import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    Usage,
)
from protocol.errors import (
    AuthError,
    RateLimited,
    RelayError,
    RemoteProtocolError,
    RequestError,
    UpstreamFailed,
    UpstreamTimeout,
)
from protocol.sse import SSEDecoder

if TYPE_CHECKING:
    from protocol.deltas import Delta, FinishReason
    from protocol.sse import SSEEvent

#: OpenAI's end of a chat completions stream.
DONE_DATA = "[DONE]"
#: Longest upstream error message passed on, in characters.
MAX_MESSAGE_CHARS = 1000
#: Longest error code or type kept.
MAX_CODE_CHARS = 64
#: Longest event :class:`EventFramer` waits for the end of.
MAX_EVENT_BYTES = 16 * 1024 * 1024

_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "tool_calls",
}

#: A top-level ``"model": "..."`` member of a chunk (module docstring: never answer text).
MODEL_MEMBER = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
#: The start of a ``[DONE]`` line at the start of a block or after an LF or CR.
_DONE_LINE = re.compile(rb"(?:^|[\r\n])data: ?\[DONE\]")
#: Blank lines: the ends of events.
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_fields(body: bytes) -> tuple[str, str, str | None, str | None]:
    """The ``(message, type, param, code)`` of an OpenAI error body (``""``/None if absent).

    Accepts ``{"error": {...}}``, a bare ``{"message", ...}`` and, as some
    servers send, ``{"error": "text"}`` or ``{"detail": "text"}``. Never raises.
    """
    try:
        value: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", "", None, None
    if not isinstance(value, dict):
        return "", "", None, None
    error = value.get("error", value)
    if isinstance(error, str):
        return _clip(error, MAX_MESSAGE_CHARS), "", None, None
    if not isinstance(error, dict):
        return "", "", None, None
    message = error.get("message", error.get("detail"))
    kind, param, code = error.get("type"), error.get("param"), error.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    return (
        _clip(message, MAX_MESSAGE_CHARS) if isinstance(message, str) else "",
        _clip(kind, MAX_CODE_CHARS) if isinstance(kind, str) else "",
        _clip(param, MAX_CODE_CHARS) if isinstance(param, str) else None,
        _clip(code, MAX_CODE_CHARS) if isinstance(code, str) else None,
    )


def error_from_response(status: int, body: bytes, upstream: str) -> RelayError:
    """The exception a non-2xx upstream answer becomes, keeping its status and error fields.

    401 and 403 are :class:`AuthError` (the key is at fault: the relay fails
    over to another key), 429 :class:`RateLimited` (the key is limited for a
    while: the relay rests it and fails over), other 4xx :class:`RequestError` (never retried), 504
    :class:`UpstreamTimeout`, the rest :class:`UpstreamFailed`. The error's
    ``kind`` (OpenAI's ``type``), ``code``, ``param`` and message are the
    upstream's when it sent them.

    Args:
        status: the HTTP status, not 2xx.
        body: the response body (an OpenAI error object, usually).
        upstream: the upstream's name, for a message when the body has none.
    """
    message, kind, param, code = error_fields(body)
    if not message:
        message = f"{upstream} answered HTTP {status}"
    error: RelayError
    if status in (401, 403):
        error = AuthError(message, param=param, code=code, status=status)
    elif status == 429:
        error = RateLimited(message, param=param, code=code)
    elif 400 <= status < 500:
        error = RequestError(message, param=param, code=code, status=status)
    elif status == 504:
        error = UpstreamTimeout(message, param=param, code=code)
    else:
        error = UpstreamFailed(message, param=param, code=code,
                               status=status if 500 <= status < 600 else 502)
    if kind:
        error.kind = kind
    return error


def _in_band_error(error: object) -> UpstreamError:
    """The UpstreamError an in-band ``error`` member describes."""
    message, kind, _param, code = error_fields(orjson.dumps({"error": error}))
    return UpstreamError(code or kind or "upstream_error",
                         message or "the upstream reported an error", in_band_status(error))


def _count(value: object) -> int | None:
    """A token count: a non-negative integer (a bool is not one), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _detail(usage: dict[str, Any], details: str, name: str) -> int:
    """``usage[details][name]`` as a count, 0 if it is absent or not one."""
    inner = usage.get(details)
    count = _count(inner.get(name)) if isinstance(inner, dict) else None
    return count or 0


def usage_from(usage: object) -> Usage | None:
    """An OpenAI ``usage`` object as neutral counts (None: it has no usable counts).

    ``prompt_tokens`` and ``completion_tokens`` must both be counts;
    ``completion_tokens_details.reasoning_tokens`` and
    ``prompt_tokens_details.cached_tokens`` are read when present (0 if not).
    """
    if not isinstance(usage, dict):
        return None
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion,
                 _detail(usage, "completion_tokens_details", "reasoning_tokens"),
                 _detail(usage, "prompt_tokens_details", "cached_tokens"))


class _State(enum.Enum):
    """Where one answer is."""

    OPEN = enum.auto()  #: deltas may still arrive
    ENDED = enum.auto()  #: a Finish or an UpstreamError was produced


def _json_object(data: str | bytes, what: str) -> dict[str, Any]:
    """``data`` parsed as a JSON object.

    Raises:
        RemoteProtocolError: it is not JSON, or not an object (``what`` names it).
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RemoteProtocolError(f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    return value


class ChunkStream:
    """One per upstream response: SSE events in, deltas out.

    Attributes:
        usage: the upstream's ``usage`` object, once a chunk carried one.
        finish_reason: the finish reason seen so far (None: none yet).
    """

    __slots__ = ("_calls", "_state", "finish_reason", "usage")

    def __init__(self) -> None:
        self._state = _State.OPEN
        self._calls: dict[int, str] = {}  # call index -> its id
        self.usage: dict[str, Any] | None = None
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        """True once a Finish or UpstreamError was produced."""
        return self._state is _State.ENDED

    def feed(self, event: SSEEvent) -> list[Delta]:
        """Translate one SSE event.

        Returns:
            Its deltas, possibly none; the last is Finish or UpstreamError
            when the answer ended with it (then :attr:`finished`).

        Raises:
            RemoteProtocolError: the data is neither ``[DONE]`` nor a JSON
                object, or an event came after the answer ended.
        """
        if self._state is _State.ENDED:
            raise RemoteProtocolError("upstream event after the answer ended")
        data = event.data
        if data == DONE_DATA:
            self._state = _State.ENDED
            return [Finish(self.finish_reason or "stop", usage=usage_from(self.usage))]
        if event.event == "error" and not data.startswith("{"):
            self._state = _State.ENDED
            return [UpstreamError("upstream_error", _clip(data, MAX_MESSAGE_CHARS))]
        chunk = _json_object(data, "upstream chunk")
        if chunk.get("error") is not None:
            self._state = _State.ENDED
            return [_in_band_error(chunk["error"])]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return []
        choice = choices[0]
        if not isinstance(choice, dict):
            raise RemoteProtocolError("upstream choice is not a JSON object")
        out: list[Delta] = []
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._delta(delta, out)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self.finish_reason = _REASONS.get(reason, "stop")
        return out

    def completion(self, body: bytes) -> list[Delta]:
        """Translate a whole ``chat.completion`` object (module docstring), ending the answer.

        Returns:
            The message's deltas (reasoning, content, tool calls) and a
            Finish with the finish reason and the usage; an UpstreamError
            for an ``error`` object.

        Raises:
            RemoteProtocolError: the body is not a JSON object with a choice,
                or the answer already ended.
        """
        if self._state is _State.ENDED:
            raise RemoteProtocolError("upstream answer after the answer ended")
        self._state = _State.ENDED
        value = _json_object(body, "upstream answer")
        if value.get("error") is not None:
            return [_in_band_error(value["error"])]
        choices = value.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise RemoteProtocolError("upstream answer has no choice")
        choice = choices[0]
        out: list[Delta] = []
        message = choice.get("message")
        if isinstance(message, dict):
            self._delta(message, out)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self.finish_reason = _REASONS.get(reason, "stop")
        usage = value.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        out.append(Finish(self.finish_reason or "stop", usage=usage_from(usage)))
        return out

    def _delta(self, delta: dict[str, Any], out: list[Delta]) -> None:
        reasoning = delta.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning = delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out.append(ReasoningDelta(reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            out.append(TextDelta(content))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if isinstance(call, dict):
                    out.append(self._call(call, position))

    def _call(self, call: dict[str, Any], position: int) -> ToolCallDelta:
        index = call.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            index = position
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        name = function.get("name")
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        if index in self._calls:
            return ToolCallDelta(index, "", "", arguments)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = f"call_{index}"
        self._calls[index] = call_id
        return ToolCallDelta(index, call_id, name if isinstance(name, str) else "", arguments)

    def close(self) -> list[Delta]:
        """The upstream body ended (EOF).

        Returns:
            Nothing if the answer already ended; Finish if a finish reason
            came (``[DONE]`` left out); else UpstreamError("truncated"). The
            translator is :attr:`finished` afterwards.
        """
        if self._state is _State.ENDED:
            return []
        self._state = _State.ENDED
        if self.finish_reason is not None:
            return [Finish(self.finish_reason, usage=usage_from(self.usage))]
        return [UpstreamError("truncated", "upstream stream ended before the answer was complete")]


def model_member(name: str) -> bytes:
    """``"model":"<name>"`` as JSON bytes, for :class:`EventFramer` and whole bodies."""
    return b'"model":' + orjson.dumps(name)


def rewrite_model(body: bytes, member: bytes | None) -> bytes:
    """``body`` with every ``"model": "..."`` member replaced by ``member`` (None: as is)."""
    if member is None:
        return body
    return MODEL_MEMBER.sub(member.replace(b"\\", b"\\\\"), body)


def _event_end(block: bytes) -> int:
    """Where the last whole event of ``block`` ends (0: none ends in it)."""
    if block.endswith(_EVENT_ENDS):  # the usual read: it ends with an event
        return len(block)
    cut = 0
    for end in _EVENT_ENDS:
        at = block.rfind(end)
        if at >= 0:
            cut = max(cut, at + len(end))
    return cut


class EventFramer:
    """Raw SSE bytes in, whole events out, the model name rewritten (module docstring).

    The rewrite learns the upstream's member from the first event that has
    one (``"model":"x"``, as that upstream writes it) and from then on
    replaces it with ``bytes.replace``; a block with another ``"model"``
    member (the growth of the block tells, as the served name is longer or
    shorter than the upstream's) goes through the regular expression again.

    Attributes:
        done: a ``data: [DONE]`` event went out.
    """

    __slots__ = ("_escaped", "_member", "_needle", "_pending", "done", "max_event_bytes")

    def __init__(self, member: bytes | None, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        """
        Args:
            member: the ``"model":...`` member to put in (:func:`model_member`),
                None to leave the events as they are.
            max_event_bytes: the longest event waited for.
        """
        self._member = member
        # re.sub reads backslashes in the replacement: escape them once, here
        self._escaped = member.replace(b"\\", b"\\\\") if member is not None else None
        self._needle: bytes | None = None  # the upstream's own member, once seen
        self._pending = b""
        self.done = False
        self.max_event_bytes = max_event_bytes

    def feed(self, data: bytes) -> bytes:
        """The whole events ``data`` completed (``b""`` if none), rewritten.

        Raises:
            RemoteProtocolError: an event grew past ``max_event_bytes``.
        """
        pending = self._pending
        block = pending + data if pending else data
        cut = _event_end(block)
        if cut == 0:  # no event ended in this read
            if len(block) > self.max_event_bytes:
                raise RemoteProtocolError("upstream SSE event over the size limit")
            self._pending = block
            return b""
        if cut == len(block):
            self._pending = b""
        else:
            self._pending = block[cut:]
            block = block[:cut]
        if not self.done and b"[DONE]" in block and _DONE_LINE.search(block) is not None:
            self.done = True
        member, escaped = self._member, self._escaped
        if member is None or escaped is None:
            return block
        return self._rewrite(block, member, escaped)

    def _rewrite(self, block: bytes, member: bytes, escaped: bytes) -> bytes:
        needle = self._needle
        if needle is not None:
            out = block.replace(needle, member)
            # every "model" member was the needle: each one grew the block by the same
            growth = len(member) - len(needle)
            members = block.count(b'"model"')
            if (len(out) - len(block) == members * growth if growth
                    else block.count(needle) == members):
                return out
        found = MODEL_MEMBER.search(block)
        if found is None:
            return block
        self._needle = found.group()
        return MODEL_MEMBER.sub(escaped, block)

    def close(self) -> None:
        """The body ended.

        Raises:
            RemoteProtocolError: it ended inside an event.
        """
        if self._pending.strip():
            raise RemoteProtocolError("upstream stream ended inside an event")


# --- in-band errors (both paths) ------------------------------------------------------------

#: In-band error codes and types that say the key is at fault, and the HTTP status each
#: stands for: OpenAI's codes (401 ``invalid_api_key``; 429 ``rate_limit_exceeded`` and
#: ``insufficient_quota``) and the ``*_error`` types Anthropic's API and some gateways use.
KEY_FAULTS: dict[str, int] = {
    "invalid_api_key": 401,
    "authentication_error": 401,
    "permission_error": 403,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "rate_limit_error": 429,
}


def _http_status(value: object) -> int | None:
    """``value`` as an HTTP error status (400-599): an int or a string of ASCII digits."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) == 3:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 400 <= value < 600:
        return value
    return None


def in_band_status(error: object) -> int:
    """The HTTP status an in-band ``error`` object stands for.

    Its own ``status``, else its ``code``, when that is an HTTP error status
    (``429`` or ``"429"``; a platform's own numbers, such as Zhipu's
    ``"1301"``, are not); else the status of a key-fault ``code`` or ``type``
    (:data:`KEY_FAULTS`); else 502. As for an error in a response head
    (:func:`error_from_response`), 401 and 403 say the key was refused and
    429 that it is busy: the relay tries another key while it has sent
    nothing.
    """
    if not isinstance(error, dict):
        return 502
    for name in ("status", "code"):
        status = _http_status(error.get(name))
        if status is not None:
            return status
    for name in ("code", "type"):
        value = error.get(name)
        if isinstance(value, str) and value in KEY_FAULTS:
            return KEY_FAULTS[value]
    return 502


def in_band_exception(error: object, upstream: str) -> RelayError:
    """The exception an in-band ``error`` object becomes before anything was sent.

    :func:`error_from_response`'s, for the status :func:`in_band_status`
    reads: the upstream's message, type, param and code kept, so the client
    sees the error the upstream reported, under its own status.
    """
    body = orjson.dumps({"error": error})
    if not error_fields(body)[0]:
        fields = error if isinstance(error, dict) else {}
        body = orjson.dumps({"error": {**fields,
                                       "message": f"{upstream} reported an error in its stream"}})
    return error_from_response(in_band_status(error), body, upstream)


def holds_event(block: bytes) -> bool:
    """Whether ``block`` (whole events, as :class:`EventFramer` gives) has an event at all.

    A block of SSE comments only (``: PROCESSING``) has none: it keeps a
    connection open and carries nothing a client reads.
    """
    if b"data" not in block:
        return False
    try:
        return bool(SSEDecoder().feed(block))
    except RemoteProtocolError:
        return True  # not ours to judge: it goes out as it is


def leading_error(block: bytes, upstream: str) -> RelayError | None:
    """The error the first event of ``block`` reports in-band, as :func:`in_band_exception`.

    ``block`` is the first block of whole events the fast path would send
    (:class:`EventFramer`); it is decoded only when it holds the word
    ``error`` at all, so an ordinary stream costs one scan of its first
    read. The first event counts as ChunkStream reads it: a chunk with an
    ``error`` member, or an ``event: error`` whose data is not JSON.

    Returns:
        The exception, or None when the first event reports no error (a
        block that cannot be decoded is None too: it goes out as it is).
    """
    if b"error" not in block:
        return None
    try:
        events = SSEDecoder().feed(block)
    except RemoteProtocolError:
        return None
    if not events:
        return None
    first = events[0]
    data = first.data
    if first.event == "error" and not data.startswith("{"):
        return UpstreamFailed(_clip(data, MAX_MESSAGE_CHARS)
                              or f"{upstream} reported an error in its stream",
                              code="upstream_error")
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(chunk, dict) or chunk.get("error") is None:
        return None
    return in_band_exception(chunk["error"], upstream)
