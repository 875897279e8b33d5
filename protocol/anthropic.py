"""Anthropic's Messages API: requests in, stream events and message bodies out (sans-IO).

Clients of Anthropic's API (the official ``anthropic`` SDK, Claude-Code-style
agents) send ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.
This module is the whole wire format of that dialect, with no I/O:
:func:`parse_messages_request` turns a body into the provider-neutral
:class:`~protocol.openai.ChatRequest`; :class:`MessageEncoder` turns neutral
events (:mod:`protocol.deltas`) into the server-sent events Anthropic streams;
:class:`MessageAccumulator` builds the whole ``message`` object;
:func:`error_body` and :func:`error_type` give Anthropic's error shape.
The ground truth for every shape is the installed SDK: its pydantic types
validate our bodies and its stream accumulator
(``anthropic.lib.streaming``) must rebuild the message from our events.

Theory of operation, request
----------------------------
Validation happens once, here, as in :mod:`protocol.openai`: a bad body is a
400 ``invalid_request_error`` whose message starts with the field's path in
Anthropic's dotted form (``messages.1.content.0.source.data: ...``), the same
path as the error's ``param``. The checks under the words (a JSON object
body, numbers, positive integers, lists of strings, nesting depth) are the
other parsers' (:mod:`protocol.request_fields`). What maps to what:

- ``system`` (a string or text blocks) becomes a ``system`` message, first;
- ``messages`` (roles ``user``, ``assistant`` and, as the SDK now allows,
  ``system``) keep their order.
  ``text`` blocks become text parts; ``image`` blocks an ``image_url`` part
  (a base64 source as a ``data:`` URL, a URL source as is); ``document``
  blocks a ``file`` part (base64 or URL source) or text parts (a plain-text
  or a content source). What a file reference will put into upstream
  headers is checked here (:func:`protocol.datauri.check_file_url`), where
  the field can be named. ``thinking`` and ``redacted_thinking`` blocks are
  dropped (no upstream can take them back), and so are block types no
  upstream can use (server tool results, search results, ...), as the
  OpenAI dialect drops unknown parts: refusing would break clients that
  replay whole conversations;
- an assistant's ``tool_use`` blocks become its
  :class:`~protocol.openai.ToolCall`\\ s (the input as compact JSON text);
- a user message's ``tool_result`` blocks become ``tool`` messages (one per
  result, naming the call and, from the earlier ``tool_use``, the
  function), placed *before* the rest of that user message, which is where
  Anthropic's API requires them to be: they answer the previous turn;
- ``tools`` (client tools: ``name``, ``description``, ``input_schema``)
  become :class:`~protocol.openai.ToolSpec`; a name follows Anthropic's rule
  (:data:`TOOL_NAME`: 1 to 128 letters, digits, ``_`` and ``-``). A server
  tool (any other ``type``, e.g. ``web_search_20250305``) is a 400: nothing
  here can run it.
  An ``input_schema``, and a ``tool_use`` block's ``input``, nest at most
  :data:`~protocol.request_fields.MAX_JSON_DEPTH` levels: the relay writes them
  back (the prompt, the token count), and orjson writes fewer levels than
  it reads;
- ``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none`` become the neutral
  ``auto`` / ``required`` / ``function`` / ``none``;
- ``stop_sequences`` become ``stop``; ``max_tokens`` (required, as Anthropic
  requires it, except for ``count_tokens``) becomes ``max_tokens``;
- ``temperature`` and ``top_p`` (numbers from 0 to 1, Anthropic's ranges:
  :data:`SAMPLING_RANGES`) become the neutral request's, so an
  OpenAI-compatible upstream gets them (the web chats ignore them); a wrong
  type is ``temperature: Input should be a valid number``, a number out of
  range ``temperature: range: 0..1``, as Anthropic's API words it.
  ``top_k`` (a non-negative integer) has no OpenAI counterpart: it is
  type-checked and ignored, whatever the upstream. ``metadata``,
  ``thinking`` and ``service_tier`` are type-checked and ignored (the
  upstreams have no such knobs); other fields are ignored.

Theory of operation, stream (:class:`MessageEncoder`)
-----------------------------------------------------
Anthropic's stream is a sequence of named SSE events: ``message_start``
(the message with empty ``content`` and usage), then for each content block
``content_block_start`` / ``content_block_delta``... / ``content_block_stop``
with an ``index`` counting blocks from 0, then ``message_delta`` (the
``stop_reason``, the output usage) and ``message_stop``. A block holds one
kind of content, so the encoder keeps at most one block open and its kind:
text (``text_delta``), thinking (``thinking_delta``) or one tool use
(``input_json_delta``, pieces of the input's JSON text). An event of another
kind stops the open block and starts the next one. Consequences:

- a neutral tool call (:class:`~protocol.deltas.ToolCallDelta`) is one
  ``tool_use`` block from its first delta to the next block: its id is the
  call's with ``toolu_`` for ``call_``. The argument pieces of a call whose
  block is no longer open cannot be sent (Anthropic has no way to reopen a
  block): that is a :class:`~protocol.errors.LocalProtocolError`, a bug of
  the event producer (the answer shaper gives each call's pieces in a row);
- reasoning is always a ``thinking`` block, whatever the relay's
  ``reasoning`` setting (``<think>`` tags are an OpenAI-client convention).
  Its ``signature`` is ``""``: clients send thinking blocks back only for
  Anthropic's own verification, and this relay drops them on the way in;
- citations, images and videos are rendered into text by the rules every
  dialect shares (:mod:`protocol.answer_text`): a citation is one
  ``citation_line``, the consecutive citations of one batch are followed by
  one blank line; an image or a video is a Markdown line of its own;
- :class:`~protocol.deltas.Finish` stops the open block (after its ``text``,
  a content filter's explanation, as text set off by a blank line), then
  ``message_delta`` and ``message_stop``. Its reason maps to Anthropic's
  ``stop_reason`` (:func:`stop_reason`);
- :class:`~protocol.deltas.UpstreamError` is an in-band ``error`` event,
  which the SDK raises as an ``APIStatusError``; the stream ends there, with
  no ``message_stop``, as Anthropic's does.

Within one :meth:`~MessageEncoder.encode` call, consecutive pieces of the
open block go out as one delta event, so the number of events depends on
how the upstream's reads were split, but the rebuilt message never does.
The JSON before each delta's text is built once per block. Anything after
the end is ignored. ``ping`` events are the keep-alives Anthropic itself
sends and its SDK skips.

Token counts are estimates (:func:`protocol.chunks.estimate_tokens`'s rule,
kept as running character counts): ``input_tokens`` is
:func:`protocol.openai.prompt_tokens`, ``output_tokens`` counts the text,
thinking and tool input sent, and is at least 1, as Anthropic's is even for
an empty answer. An upstream that counts puts its counts on the ``Finish``
(:class:`~protocol.deltas.Usage`, OpenAI's meanings); they replace the
estimates in Anthropic's meanings (:func:`counted_usage`): ``input_tokens``
without the cached tokens, which are ``cache_read_input_tokens``, and the
reasoning's share as ``output_tokens_details.thinking_tokens``. The stream's
``message_start`` comes before any count, so it keeps the estimate; its
``message_delta`` carries ``input_tokens`` as well as ``output_tokens``
(the SDK's accumulator copies both into the final message, as Anthropic's
own cumulative counts).
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, assert_never

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
from protocol.chunks import char_counts, counts_to_tokens
from protocol.datauri import check_file_url
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
from protocol.errors import LocalProtocolError, RequestError
from protocol.openai import (
    ChatRequest,
    ContentPart,
    Message,
    ToolCall,
    ToolChoice,
    ToolSpec,
    prompt_tokens,
)
from protocol.request_fields import (
    MAX_JSON_DEPTH,
    is_number,
    is_positive_int,
    is_string_list,
    load_json_object,
    nested_deeper_than,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from protocol.deltas import Delta, Usage

__all__ = [
    "KEEPALIVE",
    "SAMPLING_RANGES",
    "TOOL_NAME",
    "MessageAccumulator",
    "MessageEncoder",
    "StopReason",
    "count_tokens_body",
    "counted_usage",
    "error_body",
    "error_event",
    "error_type",
    "message_id",
    "parse_messages_request",
    "stop_reason",
    "tool_use_id",
]

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]

#: Anthropic's own keep-alive event (its SDK skips it), byte for byte.
KEEPALIVE: Final = b'event: ping\ndata: {"type": "ping"}\n\n'

#: Anthropic's rule for a client tool's name: 1 to 128 of a-z, A-Z, 0-9, ``_`` and ``-``
#: (its API answers any other name with "tools.N.custom.name: String should match
#: pattern '^[a-zA-Z0-9_-]{1,128}$'"; the SDK's custom tool types say "1-128 characters;
#: letters, digits, underscores, and hyphens"). The name goes into the prompt and back
#: out in tool_use blocks, so a control character or a newline in it is refused here.
TOOL_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,128}")

#: Anthropic's ranges of the sampling parameters that OpenAI-compatible upstreams take too
#: (API reference, "Create a Message": temperature and top_p, 0.0 to 1.0).
SAMPLING_RANGES: Final[dict[str, tuple[float, float]]] = {"temperature": (0, 1), "top_p": (0, 1)}

#: Image media types Anthropic accepts in a base64 image source.
IMAGE_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

#: Anthropic's error ``type`` per HTTP status (its "Errors" page); 408 and 504
#: are timeouts, 529 and 503 "overloaded".
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# ---------------------------------------------------------------------------
# ids, errors, token counts


def message_id(conversation_id: str = "") -> str:
    """A message id: ``msg_<conversation>``, or a fresh one when no conversation is known.

    An id that already starts with ``msg_`` is kept, so naming twice is harmless.
    """
    if not conversation_id:
        return f"msg_{uuid.uuid4().hex}"
    if conversation_id.startswith("msg_"):
        return conversation_id
    return "msg_" + conversation_id


def tool_use_id(call_id: str) -> str:
    """The ``tool_use`` id of a neutral call id: ``call_X`` -> ``toolu_X``.

    An id that is already ``toolu_...`` is kept; ``""`` gets a fresh one.
    """
    if call_id.startswith("toolu_"):
        return call_id
    if call_id.startswith("call_"):
        return "toolu_" + call_id[5:]
    return "toolu_" + (call_id or uuid.uuid4().hex[:24])


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status.

    The statuses of Anthropic's "Errors" page map as it says; any other 4xx
    is ``invalid_request_error`` (the client's to fix), anything else
    ``api_error``.
    """
    kind = _ERROR_TYPES.get(status)
    if kind is not None:
        return kind
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(kind: str, message: str) -> bytes:
    """``{"type": "error", "error": {"type": kind, "message": message}}``."""
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def error_event(kind: str, message: str) -> bytes:
    """The in-band ``error`` SSE event (the SDK raises it as an ``APIStatusError``)."""
    return b"event: error\ndata: " + error_body(kind, message) + b"\n\n"


def count_tokens_body(request: ChatRequest) -> bytes:
    """The ``count_tokens`` answer: ``{"input_tokens": N}``, the relay's estimate."""
    return orjson.dumps({"input_tokens": prompt_tokens(request)})


def stop_reason(finish: Finish) -> tuple[StopReason, str | None]:
    """Anthropic's ``(stop_reason, stop_sequence)`` for a neutral finish.

    ``stop`` is ``end_turn``, or ``stop_sequence`` with the sequence when the
    client's stop sequence ended the answer; ``length`` is ``max_tokens``;
    ``tool_calls`` is ``tool_use``; ``content_filter`` is ``refusal``.
    """
    match finish.reason:
        case "stop":
            if finish.stop_sequence:
                return "stop_sequence", finish.stop_sequence
            return "end_turn", None
        case "length":
            return "max_tokens", None
        case "tool_calls":
            return "tool_use", None
        case "content_filter":
            return "refusal", None
        case _:
            assert_never(finish.reason)


def _tokens(ascii_chars: int, other_chars: int) -> int:
    """:func:`protocol.chunks.estimate_tokens`'s rule over running counts, at least 1."""
    return max(1, counts_to_tokens(ascii_chars, other_chars))


def counted_usage(counted: Usage) -> dict[str, Any]:
    """The upstream's counts as Anthropic's ``usage`` (module docstring).

    Anthropic counts cache reads apart from ``input_tokens``, where OpenAI's
    ``prompt_tokens`` include them: the total input stays the upstream's.
    """
    usage: dict[str, Any] = {
        "input_tokens": max(0, counted.input_tokens - counted.cached_tokens),
        "output_tokens": counted.output_tokens,
    }
    if counted.cached_tokens:
        usage["cache_read_input_tokens"] = counted.cached_tokens
    if counted.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": counted.reasoning_tokens}
    return usage


# ---------------------------------------------------------------------------
# request


def _invalid(path: str, expected: str) -> RequestError:
    return RequestError(f"{path}: Input should be {expected}", param=path)


def _missing(path: str) -> RequestError:
    return RequestError(f"{path}: Field required", param=path)


def _string(obj: dict[str, Any], key: str, path: str) -> str:
    """``obj[key]``, a required string."""
    value = obj.get(key)
    if isinstance(value, str):
        return value
    if value is None and key not in obj:
        raise _missing(path)
    raise _invalid(path, "a valid string")


def _object(obj: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """``obj[key]``, a required JSON object."""
    value = obj.get(key)
    if isinstance(value, dict):
        return value
    if value is None and key not in obj:
        raise _missing(path)
    raise _invalid(path, "a valid dictionary")


def _block_type(block: object, path: str) -> tuple[dict[str, Any], str]:
    """A content block and its ``type``."""
    if not isinstance(block, dict):
        raise _invalid(path, "a valid dictionary")
    return block, _string(block, "type", f"{path}.type")


def _shallow(value: dict[str, Any], path: str) -> dict[str, Any]:
    """``value`` if it nests at most :data:`MAX_JSON_DEPTH` levels; else a 400 naming ``path``."""
    if nested_deeper_than(value, MAX_JSON_DEPTH):
        raise _invalid(path, f"nested at most {MAX_JSON_DEPTH} levels deep")
    return value


def _checked_url(url: str, path: str) -> str:
    """``url`` if :func:`check_file_url` passes; else its 400, naming ``path``."""
    try:
        check_file_url(url)
    except RequestError as exc:
        raise RequestError(f"{path}: {exc.message}", param=path, code=exc.code) from None
    return url


def _source_url(source: dict[str, Any], path: str, media_types: frozenset[str] | None) -> str:
    """The URL of a ``base64`` or ``url`` source (a base64 one as a ``data:`` URL)."""
    kind = _string(source, "type", f"{path}.type")
    if kind == "base64":
        media_type = _string(source, "media_type", f"{path}.media_type")
        if media_types is not None and media_type not in media_types:
            raise _invalid(f"{path}.media_type",
                           " or ".join(repr(m) for m in sorted(media_types)))
        data = _string(source, "data", f"{path}.data")
        return _checked_url(f"data:{media_type};base64,{data}", f"{path}.data")
    if kind == "url":
        return _checked_url(_string(source, "url", f"{path}.url"), f"{path}.url")
    if kind == "file":
        raise RequestError(
            f"{path}.type: file sources (Files API 'file_id') are not supported by this relay; "
            "send the file as a 'base64' or 'url' source",
            param=f"{path}.type",
        )
    raise _invalid(f"{path}.type", "'base64' or 'url'")


def _text_blocks(content: object, path: str) -> list[ContentPart]:
    """Text parts of a string or of an array of blocks (non-text blocks dropped)."""
    if isinstance(content, str):
        return [ContentPart("text", text=content)]
    if not isinstance(content, list):
        raise _invalid(path, "a valid string or a valid list")
    parts = []
    for index, raw in enumerate(content):
        block, kind = _block_type(raw, f"{path}.{index}")
        if kind == "text":
            parts.append(ContentPart("text", text=_string(block, "text", f"{path}.{index}.text")))
    return parts


def _document(block: dict[str, Any], path: str) -> list[ContentPart]:
    """A ``document`` block: a file part, or the text of a text or content source."""
    source = _object(block, "source", f"{path}.source")
    kind = _string(source, "type", f"{path}.source.type")
    if kind == "text":
        return [ContentPart("text", text=_string(source, "data", f"{path}.source.data"))]
    if kind == "content":
        if "content" not in source:
            raise _missing(f"{path}.source.content")
        return _text_blocks(source["content"], f"{path}.source.content")
    return [ContentPart("file", url=_source_url(source, f"{path}.source", None))]


def _tool_result(block: dict[str, Any], path: str, names: dict[str, str]) -> Message:
    """A ``tool_result`` block as a ``tool`` message (text and images of its content)."""
    call_id = _string(block, "tool_use_id", f"{path}.tool_use_id")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise _invalid(f"{path}.is_error", "a valid boolean")
    content = block.get("content")
    parts: list[ContentPart] = []
    if isinstance(content, str):
        parts.append(ContentPart("text", text=content))
    elif isinstance(content, list):
        for index, raw in enumerate(content):
            item_path = f"{path}.content.{index}"
            item, kind = _block_type(raw, item_path)
            if kind == "text":
                parts.append(ContentPart("text", text=_string(item, "text", f"{item_path}.text")))
            elif kind == "image":
                source = _object(item, "source", f"{item_path}.source")
                url = _source_url(source, f"{item_path}.source", IMAGE_MEDIA_TYPES)
                parts.append(ContentPart("image_url", url=url))
    elif content is not None:
        raise _invalid(f"{path}.content", "a valid string or a valid list")
    return Message("tool", tuple(parts), isinstance(content, list),
                   tool_call_id=call_id, name=names.get(call_id, ""))


def _tool_use(block: dict[str, Any], path: str, names: dict[str, str]) -> ToolCall:
    """An assistant's ``tool_use`` block as a call (its input as compact JSON)."""
    call_id = _string(block, "id", f"{path}.id")
    name = _string(block, "name", f"{path}.name")
    arguments = orjson.dumps(_shallow(_object(block, "input", f"{path}.input"),
                                      f"{path}.input")).decode()
    names[call_id] = name
    return ToolCall(call_id, name, arguments)


def _check_block_role(kind: str, role: str, allowed: str, path: str) -> None:
    """A 400 naming ``path.type`` unless a block of ``kind`` may be in a ``role`` message."""
    if role != allowed:
        raise RequestError(
            f"{path}.type: '{kind}' blocks may only be in {allowed} messages",
            param=f"{path}.type",
        )


def _parse_message(raw: object, path: str, names: dict[str, str]) -> list[Message]:
    """One Anthropic message: the neutral message, after its tool results if any.

    Args:
        raw: the message object.
        path: its path (``messages.3``).
        names: call id -> function name of the ``tool_use`` blocks so far;
            an assistant's calls are added, a tool result's name looked up.
    """
    if not isinstance(raw, dict):
        raise _invalid(path, "a valid dictionary")
    role = _string(raw, "role", f"{path}.role")
    if role not in ("user", "assistant", "system"):
        raise _invalid(f"{path}.role", "'user', 'assistant' or 'system'")
    if "content" not in raw:
        raise _missing(f"{path}.content")
    content = raw["content"]
    if isinstance(content, str):
        return [Message(role, (ContentPart("text", text=content),), False)]
    if not isinstance(content, list):
        raise _invalid(f"{path}.content", "a valid string or a valid list")
    parts: list[ContentPart] = []
    calls: list[ToolCall] = []
    results: list[Message] = []
    for index, item in enumerate(content):
        item_path = f"{path}.content.{index}"
        block, kind = _block_type(item, item_path)
        match kind:
            case "text":
                parts.append(ContentPart("text", text=_string(block, "text", f"{item_path}.text")))
            case "image":
                source = _object(block, "source", f"{item_path}.source")
                url = _source_url(source, f"{item_path}.source", IMAGE_MEDIA_TYPES)
                parts.append(ContentPart("image_url", url=url))
            case "document":
                parts += _document(block, item_path)
            case "tool_use":
                _check_block_role(kind, role, "assistant", item_path)
                calls.append(_tool_use(block, item_path, names))
            case "tool_result":
                _check_block_role(kind, role, "user", item_path)
                results.append(_tool_result(block, item_path, names))
            case _:
                pass  # thinking, redacted_thinking, server tool blocks, ...: dropped
    if results and not parts:
        return results  # the usual tool turn: nothing but results
    return [*results, Message(role, tuple(parts), True, tool_calls=tuple(calls))]


def _system(value: object) -> Message | None:
    """The ``system`` field as a system message (None for none, or an empty one)."""
    if value is None:
        return None
    if isinstance(value, str):
        return Message("system", (ContentPart("text", text=value),), False) if value else None
    if not isinstance(value, list):
        raise _invalid("system", "a valid string or a valid list")
    parts = []
    for index, raw in enumerate(value):
        block, kind = _block_type(raw, f"system.{index}")
        if kind != "text":
            raise _invalid(f"system.{index}.type", "'text'")
        parts.append(ContentPart("text", text=_string(block, "text", f"system.{index}.text")))
    return Message("system", tuple(parts), True) if parts else None


def _tools(value: object) -> tuple[ToolSpec, ...]:
    """``tools``: client tools only (a server tool is a 400)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid("tools", "a valid list")
    tools = []
    for index, raw in enumerate(value):
        path = f"tools.{index}"
        if not isinstance(raw, dict):
            raise _invalid(path, "a valid dictionary")
        kind = raw.get("type")
        if kind not in (None, "custom"):
            shown = kind[:60] if isinstance(kind, str) else kind
            raise RequestError(
                f"{path}.type: server tools ({shown!r}) are not supported by this relay; "
                "only client tools (name, description, input_schema) are",
                param=f"{path}.type",
            )
        name = _string(raw, "name", f"{path}.name")
        if not TOOL_NAME.fullmatch(name):
            raise RequestError(
                f"{path}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'",
                param=f"{path}.name",
            )
        description = raw.get("description")
        if description is not None and not isinstance(description, str):
            raise _invalid(f"{path}.description", "a valid string")
        schema = _shallow(_object(raw, "input_schema", f"{path}.input_schema"),
                          f"{path}.input_schema")
        tools.append(ToolSpec(name, description or "", schema))
    return tuple(tools)


def _tool_choice(value: object, tools: Sequence[ToolSpec]) -> ToolChoice:
    """``tool_choice``: ``{"type": "auto" | "any" | "tool" | "none", "name"?}``."""
    if value is None:
        return ToolChoice()
    if not isinstance(value, dict):
        raise _invalid("tool_choice", "a valid dictionary")
    kind = _string(value, "type", "tool_choice.type")
    parallel = value.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid("tool_choice.disable_parallel_tool_use", "a valid boolean")
    match kind:
        case "auto":
            return ToolChoice("auto")
        case "any":
            return ToolChoice("required")
        case "none":
            return ToolChoice("none")
        case "tool":
            name = _string(value, "name", "tool_choice.name")
            if all(tool.name != name for tool in tools):
                raise RequestError(
                    f"tool_choice.name: {name[:60]!r} is not one of the tools",
                    param="tool_choice.name",
                )
            return ToolChoice("function", name)
        case _:
            raise _invalid("tool_choice.type", "'auto', 'any', 'tool' or 'none'")


def _stop_sequences(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not is_string_list(value):
        raise _invalid("stop_sequences", "a valid list of strings")
    return tuple(item for item in value if item)


def _check(body: dict[str, Any], key: str, ok: Callable[[object], bool], expected: str) -> None:
    """Type-check an optional field that is then ignored."""
    value = body.get(key)
    if value is not None and not ok(value):
        raise _invalid(key, expected)


def _sampling(body: dict[str, Any], key: str) -> float | None:
    """The sampling parameter ``key`` of :data:`SAMPLING_RANGES`, ``None`` if absent."""
    value = body.get(key)
    if value is None:
        return None
    if not is_number(value):
        raise _invalid(key, "a valid number")
    low, high = SAMPLING_RANGES[key]
    if not low <= value <= high:
        raise RequestError(f"{key}: range: {low}..{high}", param=key)
    return float(value)


def _check_ignored(body: dict[str, Any]) -> None:
    """The sampling and account fields the upstreams cannot honour, type-checked."""
    _check(body, "top_k", lambda v: type(v) is int and v >= 0, "a non-negative integer")
    _check(body, "metadata", lambda v: isinstance(v, dict), "a valid dictionary")
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        _check(metadata, "user_id", lambda v: isinstance(v, str), "a valid string")
    _check(body, "thinking",
           lambda v: isinstance(v, dict) and isinstance(v.get("type"), str),
           "a valid dictionary with a 'type' string")
    _check(body, "service_tier", lambda v: isinstance(v, str), "a valid string")


def parse_messages_request(body: bytes, *, require_max_tokens: bool = True) -> ChatRequest:
    """Parse and validate a ``POST /v1/messages`` body (module docstring).

    Args:
        body: the raw request body.
        require_max_tokens: ``False`` for ``count_tokens``, whose body has no
            ``max_tokens`` (it is still type-checked when present).

    Returns:
        The neutral request: the system message first, tool results as
        ``tool`` messages, ``include_usage`` false (Anthropic's stream always
        carries usage), no ``conversation_id`` or ``use_search``;
        ``temperature`` and ``top_p`` as sent (floats). ``top_k`` is checked
        (a non-negative integer) and dropped: OpenAI's API has no such
        parameter, so no upstream gets it.

    Raises:
        RequestError: (400) the body is not a JSON object (``param`` None), or
            a field is missing or malformed (``param`` and the message's
            start name it, e.g. ``messages.0.content.1.source.media_type``).
    """
    data = load_json_object(body)
    model = _string(data, "model", "model")
    max_tokens = data.get("max_tokens")
    if max_tokens is None:
        if require_max_tokens:
            raise _missing("max_tokens")
    elif not is_positive_int(max_tokens):
        raise _invalid("max_tokens", "a positive integer")

    raw_messages = data.get("messages")
    if raw_messages is None:
        raise _missing("messages")
    if not isinstance(raw_messages, list):
        raise _invalid("messages", "a valid list")
    if not raw_messages:
        raise RequestError("messages: at least one message is required", param="messages")
    names: dict[str, str] = {}
    messages: list[Message] = []
    system = _system(data.get("system"))
    if system is not None:
        messages.append(system)
    for index, raw in enumerate(raw_messages):
        messages += _parse_message(raw, f"messages.{index}", names)

    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", "a valid boolean")
    tools = _tools(data.get("tools"))
    tool_choice = _tool_choice(data.get("tool_choice"), tools)
    stop = _stop_sequences(data.get("stop_sequences"))
    temperature = _sampling(data, "temperature")
    top_p = _sampling(data, "top_p")
    _check_ignored(data)
    return ChatRequest(
        model=model,
        messages=tuple(messages),
        stream=bool(stream),
        include_usage=False,
        conversation_id=None,
        use_search=None,
        tools=tools,
        tool_choice=tool_choice,
        stop=stop,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
    )


# ---------------------------------------------------------------------------
# stream


class _State(enum.Enum):
    OPEN = "open"  # events are encoded
    FINISHED = "finished"  # message_stop or an error was encoded; the rest is ignored


class _Block(enum.Enum):
    """The kind of the open content block (one delta type each)."""

    NONE = "none"  # no block is open
    TEXT = "text"
    THINKING = "thinking"
    TOOL_USE = "tool_use"


#: The JSON after a delta's text: it closes the delta and the event.
_DELTA_END = b"}}\n\n"
#: The delta type and text field of each block kind.
_DELTA_FIELDS: Final = {
    _Block.TEXT: b'{"type":"text_delta","text":',
    _Block.THINKING: b'{"type":"thinking_delta","thinking":',
    _Block.TOOL_USE: b'{"type":"input_json_delta","partial_json":',
}
_EMPTY_BLOCKS: Final = {
    _Block.TEXT: {"type": "text", "text": ""},
    _Block.THINKING: {"type": "thinking", "thinking": "", "signature": ""},
}


def _event(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


class MessageEncoder:
    """One per streamed message: neutral events in, Anthropic's SSE events out.

    Attributes:
        citations: every citation encoded so far, in order.
    """

    __slots__ = (
        "_ascii_chars",
        "_block",
        "_blocks",
        "_citation_line",
        "_delta_prefix",
        "_id_used",
        "_input_tokens",
        "_line_open",
        "_message_id",
        "_model",
        "_other_chars",
        "_pending",
        "_started",
        "_state",
        "_text_sent",
        "_tool_index",
        "_usage",
        "citations",
    )

    def __init__(
        self,
        *,
        message_id: str,
        model: str,
        input_tokens: int = 0,
        citation_line: str = DEFAULT_CITATION_LINE,
    ) -> None:
        """
        Args:
            message_id: the message's ``id`` (``msg_...``); may be set again
                until :meth:`start` gave the event that carries it.
            model: the message's ``model`` (usually what the client asked for).
            input_tokens: the prompt's estimate.
            citation_line: the rendering of one citation, a :meth:`str.format`
                template with ``title`` and ``url``.
        """
        self._message_id = message_id
        self._model = model
        self._input_tokens = input_tokens
        self._citation_line = citation_line
        self._state = _State.OPEN
        self._started = False
        self._id_used = False  # message_start (the only event with the id) was made
        self._block = _Block.NONE
        self._blocks = 0  # blocks started: the open block's index is this minus one
        self._tool_index = -1  # the neutral index of the call whose block is open
        self._delta_prefix = b""  # the open block's delta event up to its text
        self._pending: list[str] = []  # the open block's text not yet in an event
        self._text_sent = False  # answer text went out (for the finish text's separator)
        self._line_open = False  # the last text did not end with a newline
        self._ascii_chars = 0
        self._other_chars = 0
        self._usage: Usage | None = None  # the upstream's counts, from its Finish
        self.citations: list[Citation] = []

    @property
    def completion_id(self) -> str:
        """The message's ``id``."""
        return self._message_id

    @completion_id.setter
    def completion_id(self, value: str) -> None:
        """Name the message after the upstream conversation ``value`` (:func:`message_id`).

        Raises:
            LocalProtocolError: ``message_start`` with the old id was made.
        """
        new = message_id(value)
        if new == self._message_id:
            return
        if self._id_used:
            raise LocalProtocolError(
                "cannot change the message id: message_start carrying the old one was produced"
            )
        self._message_id = new

    @property
    def finished(self) -> bool:
        """True after a ``Finish`` or an ``UpstreamError`` was encoded."""
        return self._state is _State.FINISHED

    @property
    def output_tokens(self) -> int:
        """The upstream's count once its ``Finish`` gave one; until then the estimate
        over the text, thinking and tool input encoded so far (at least 1)."""
        if self._usage is not None:
            return self._usage.output_tokens
        return _tokens(self._ascii_chars, self._other_chars)

    def start(self) -> bytes:
        """The ``message_start`` event: the message with no content yet.

        Its bytes go out before any of :meth:`encode`'s, but it may be
        called after :meth:`encode` (see :class:`protocol.chunks.ChunkEncoder`).

        Raises:
            LocalProtocolError: called twice.
        """
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = self._id_used = True
        message: dict[str, Any] = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self._model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._input_tokens, "output_tokens": 1},
        }
        return _event(b"message_start", orjson.dumps({"type": "message_start",
                                                      "message": message}))

    def keepalive(self) -> bytes:
        """A ``ping`` event, or ``b""`` once the stream is finished."""
        return b"" if self._state is _State.FINISHED else KEEPALIVE

    def encode(self, deltas: Iterable[Delta]) -> bytes:
        """All SSE events for ``deltas`` (neutral events), in order, as one bytes object.

        Args:
            deltas: what one upstream read produced.

        Returns:
            The events (``b""`` if there are none, or once finished). After a
            ``Finish`` or an ``UpstreamError`` the stream is finished: the
            rest of ``deltas`` and every later call are ignored.

        Raises:
            LocalProtocolError: an argument piece of a tool call whose block
                is no longer open (module docstring).
        """
        if self._state is _State.FINISHED:
            return b""
        out: list[bytes] = []
        citing = False  # the previous delta was a citation: its block of lines is open
        for delta in deltas:
            if citing and type(delta) is not Citation:
                self._text(out, CITATIONS_END)  # one blank line ends a run of citations
                citing = False
            match delta:
                case TextDelta(text=text):
                    if text:
                        self._text(out, text)
                case ReasoningDelta(text=text):
                    if text:
                        self._put(out, _Block.THINKING, text)
                case Citation():
                    self.citations.append(delta)
                    self._text(out, citation_text(delta, self._citation_line))
                    citing = True
                case ImageResult() | VideoResult():
                    self._text(out, media_text(delta, self._line_open))
                case ToolCallDelta(index=index, id=call_id, name=name, arguments_part=part):
                    if call_id or name:
                        self._open(out, _Block.TOOL_USE, {
                            "type": "tool_use", "id": tool_use_id(call_id), "name": name,
                            "input": {},
                        })
                        self._tool_index = index
                    elif self._block is not _Block.TOOL_USE or self._tool_index != index:
                        raise LocalProtocolError(
                            f"arguments of tool call {index} after its block was closed"
                        )
                    if part:
                        self._pending.append(part)
                case Finish(text=text, usage=counted):
                    if text:
                        self._text(out, finish_text(text, self._text_sent))
                    self._close(out)
                    reason, sequence = stop_reason(delta)
                    self._usage = counted
                    out.append(_event(b"message_delta", orjson.dumps({
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": ({"output_tokens": self.output_tokens} if counted is None
                                  else counted_usage(counted)),
                    })))
                    out.append(_event(b"message_stop", b'{"type":"message_stop"}'))
                    self._state = _State.FINISHED
                    return b"".join(out)
                case UpstreamError(code=code, message=message, status=status):
                    self._flush(out)
                    out.append(error_event(error_type(status), message or code))
                    self._state = _State.FINISHED
                    return b"".join(out)
                case _:
                    assert_never(delta)
        if citing:
            self._text(out, CITATIONS_END)
        self._flush(out)
        return b"".join(out)

    def _text(self, out: list[bytes], text: str) -> None:
        """Queue answer text (in a text block)."""
        self._text_sent = True
        self._line_open = not text.endswith("\n")
        self._put(out, _Block.TEXT, text)

    def _put(self, out: list[bytes], kind: _Block, text: str) -> None:
        """Queue ``text`` in a block of ``kind``, starting one if the open block is another."""
        if self._block is not kind:
            self._open(out, kind, _EMPTY_BLOCKS[kind])
        self._pending.append(text)

    def _open(self, out: list[bytes], kind: _Block, block: dict[str, Any]) -> None:
        """Stop the open block, if any, and start ``block`` (of ``kind``)."""
        self._close(out)
        index = self._blocks
        self._blocks += 1
        self._block = kind
        out.append(_event(b"content_block_start", orjson.dumps(
            {"type": "content_block_start", "index": index, "content_block": block}
        )))
        self._delta_prefix = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
            b'"delta":' % index + _DELTA_FIELDS[kind]
        )

    def _close(self, out: list[bytes]) -> None:
        """Send the open block's queued text and stop it."""
        if self._block is _Block.NONE:
            return
        self._flush(out)
        out.append(_event(b"content_block_stop",
                          b'{"type":"content_block_stop","index":%d}' % (self._blocks - 1)))
        self._block = _Block.NONE
        self._tool_index = -1

    def _flush(self, out: list[bytes]) -> None:
        """Turn the open block's queued text into one delta event."""
        pending = self._pending
        if not pending:
            return
        text = pending[0] if len(pending) == 1 else "".join(pending)
        pending.clear()
        ascii_chars, other_chars = char_counts(text)
        self._ascii_chars += ascii_chars
        self._other_chars += other_chars
        out.append(self._delta_prefix + orjson.dumps(text) + _DELTA_END)


# ---------------------------------------------------------------------------
# whole message


@dataclass(slots=True)
class _Call:
    """A tool call being collected."""

    id: str
    name: str
    arguments: list[str]


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's input object from its arguments' JSON text.

    ``""`` is ``{}``. The answer shaper gives a JSON object; anything else
    (which Anthropic's ``input``, an object, cannot hold) is kept whole as
    ``{"arguments": <the text>}`` rather than lost.
    """
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": arguments}


class MessageAccumulator(AnswerCollector):
    """Non-stream: add all events, then build one ``message`` object.

    What it collects, and how, is :class:`~protocol.answer_text.AnswerCollector`'s
    (its attributes too: ``finished``, ``error``, ``citations``, ...); a
    tool call's first piece (an id or a name) starts the call of its index
    afresh, later pieces add to its arguments.
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[int, _Call] = {}  # by neutral index, in the order calls began

    def _tool_call(self, delta: ToolCallDelta) -> None:
        call = self._calls.get(delta.index)
        if call is None or delta.id or delta.name:
            call = self._calls[delta.index] = _Call(delta.id, delta.name, [])
        if delta.arguments_part:
            call.arguments.append(delta.arguments_part)

    def body(self, *, message_id: str, model: str, input_tokens: int) -> bytes:
        """The whole ``message`` object.

        ``content`` is a ``thinking`` block (all the reasoning) if there was
        any, the ``text`` block (the answer text, then the references' list
        of citations, as the OpenAI non-stream answer has it) if there was
        text, and one ``tool_use`` block per call, its ``input`` the
        arguments' JSON object. An answer with none of these has one empty
        text block: clients read ``content[0].text``. ``usage`` is the
        upstream's (:func:`counted_usage`) when its ``Finish`` carried counts;
        else ``input_tokens`` and the estimate of the output.

        Raises:
            LocalProtocolError: no ``Finish`` was added, or an
                ``UpstreamError`` was (check :attr:`error` and
                :attr:`finished` first).
        """
        finish = self._final_finish("message")
        text = self.text + citation_list(self.citations)
        thinking = self.reasoning
        content: list[dict[str, Any]] = []
        counted = [thinking, text]
        if thinking:
            content.append({"type": "thinking", "thinking": thinking, "signature": ""})
        if text:
            content.append({"type": "text", "text": text})
        for call in self._calls.values():
            arguments = "".join(call.arguments)
            counted.append(arguments)
            content.append({"type": "tool_use", "id": tool_use_id(call.id), "name": call.name,
                            "input": _tool_input(arguments)})
        if not content:
            content.append({"type": "text", "text": ""})
        ascii_chars = other_chars = 0
        for piece in counted:
            a, o = char_counts(piece)
            ascii_chars += a
            other_chars += o
        reason, sequence = stop_reason(finish)
        return orjson.dumps({
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": ({"input_tokens": input_tokens,
                       "output_tokens": _tokens(ascii_chars, other_chars)}
                      if finish.usage is None else counted_usage(finish.usage)),
        })
