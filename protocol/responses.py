"""OpenAI's Responses API (``POST /v1/responses``): the request (sans-IO).

Clients of the Responses API (the ``openai`` SDK's ``client.responses``,
Codex-style agents) send a body of *input items* instead of chat messages
and read back a *response object* whose ``output`` is a list of items:
messages, reasoning, function calls. This module maps the request onto the
relay's neutral shapes: :func:`parse_responses_request` turns the body into
a :class:`ResponsesRequest` (a :class:`~protocol.openai.ChatRequest` that
also remembers what the response object must echo); the way back, neutral
events into streamed events or the whole response object, is
:mod:`protocol.response_output`'s. The shapes are those of the ``openai``
SDK's types (``openai.types.responses``), which the tests hold every body
and every event to.

Theory of operation, request. Validation follows :mod:`protocol.openai`'s
rules and messages (a 400 ``invalid_request_error`` whose ``param`` is an
index path such as ``input[2].content[0].image_url``), with the same code:
the field checks of :mod:`protocol.request_fields`, and
:mod:`protocol.openai`'s readers of a function definition, a format and a
tool choice:

- ``input`` is a string (one user message) or a list of items. A message
  item (``type`` ``"message"`` or absent) has a role among user, assistant,
  system and developer and a string or a list of parts: ``input_text`` and
  ``output_text`` (text), ``input_image`` (an http(s) or data URL) and
  ``input_file`` (``file_data`` as a data URL with its ``filename``, or
  ``file_url``); uploaded-file ids are refused, other part types dropped as
  the chat dialect drops them. A ``function_call`` item joins the assistant
  message before it (the calls of one turn, and their text, make one
  assistant message, as in chat completions); a ``function_call_output``
  becomes a ``tool`` message answering its ``call_id``. ``reasoning`` items
  are dropped (the upstreams take no reasoning back); any other item type
  (built-in tool calls, item references) is a 400;
- ``instructions`` become a system message placed first;
- ``tools`` are function tools only (a built-in tool such as ``web_search``
  is a 400: there is nothing to run it with), ``tool_choice``,
  ``text.format`` and ``max_output_tokens`` map onto the neutral fields; a
  tool's ``parameters`` and the format's ``schema`` nest at most
  :data:`~protocol.request_fields.MAX_JSON_DEPTH` levels (the response object echoes
  them, and orjson writes fewer levels than it reads);
- nothing is stored: ``previous_response_id``, ``conversation`` and
  ``background`` (which need stored responses) are a 400 saying so, and
  ``store`` is accepted and ignored; ``metadata``, ``parallel_tool_calls``,
  ``reasoning``, ``user``, ``truncation`` and ``include`` are type-checked,
  then only echoed;
- the sampling parameters ``temperature`` (0 to 2) and ``top_p`` (0 to 1)
  are checked as the chat dialect checks them
  (:func:`~protocol.openai.parse_sampling`: a wrong type or a number out of
  range is a 400 naming the field) and go into the neutral request, so an
  OpenAI-compatible upstream gets them (the web chats ignore them); the
  response object echoes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from protocol.datauri import check_file_name, check_file_url
from protocol.errors import RequestError
from protocol.openai import (
    ChatRequest,
    ContentPart,
    Message,
    ToolCall,
    ToolChoice,
    check_tool_choice,
    parse_format,
    parse_function,
    parse_sampling,
    tool_choice_mode,
)
from protocol.request_fields import (
    checked,
    invalid_type,
    invalid_value,
    is_string_list,
    load_json_object,
    missing,
    optional_bool,
    optional_positive_int,
    optional_str,
    part_url,
    required_object,
    required_str,
)

if TYPE_CHECKING:
    from protocol.openai import ResponseFormat, ToolSpec

__all__ = ["ResponsesRequest", "parse_responses_request"]

#: The roles of a message item (API reference, "input", EasyInputMessage).
ITEM_ROLES = frozenset({"user", "assistant", "system", "developer"})
#: Request fields that need responses stored by the server, which the relay never does.
_STORED_STATE = {
    "previous_response_id": "'previous_response_id' cannot be used",
    "conversation": "'conversation' cannot be used",
}
_NO_STORE = (
    ": this relay keeps no stored responses or conversations. Send the whole "
    "conversation in 'input' instead ('store' is accepted and ignored)."
)


@dataclass(frozen=True, slots=True)
class ResponsesRequest(ChatRequest):
    """A validated Responses API request: the neutral request plus what the answer echoes.

    The chat service sees a :class:`ChatRequest` (its ``temperature`` and
    ``top_p`` included, which the response object echoes too); the fields
    below only go back into the response object (OpenAI echoes the
    request's settings).

    Attributes:
        instructions: the ``instructions`` string (also the first message).
        tool_strict: each tool's ``strict`` as sent (``None``: absent).
        parallel_tool_calls: as sent (default true).
        store: as sent (default true; nothing is stored either way).
        metadata: the ``metadata`` pairs, in order.
        user: as sent.
        truncation: as sent (default ``"disabled"``).
    """

    instructions: str | None = None
    tool_strict: tuple[bool | None, ...] = ()
    parallel_tool_calls: bool = True
    store: bool = True
    metadata: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    truncation: Literal["auto", "disabled"] = "disabled"


# ---------------------------------------------------------------------------
# request


def _no_file_ids(part: dict[str, Any], param: str) -> None:
    if part.get("file_id") is not None:
        raise RequestError(
            "Uploaded file references ('file_id') are not supported; send the file as a "
            "data URL or an http(s) URL.",
            param=f"{param}.file_id",
        )


def _parse_part(raw: object, param: str) -> ContentPart | None:
    """One content part of a message item or a function output; None: dropped."""
    part = required_object(raw, param)
    kind = required_str(part, "type", f"{param}.type")
    if kind in ("input_text", "output_text"):
        return ContentPart("text", text=required_str(part, "text", f"{param}.text"))
    if kind == "input_image":
        url = part.get("image_url")
        if url is None:
            _no_file_ids(part, param)
        return ContentPart("image_url", url=part_url(url, f"{param}.image_url"))
    if kind == "input_file":
        if part.get("file_url") is not None:
            url = required_str(part, "file_url", f"{param}.file_url")
            return ContentPart("file", url=checked(check_file_url, url, f"{param}.file_url"))
        data = part.get("file_data")
        if data is None:
            _no_file_ids(part, param)
            raise RequestError(
                f"Missing required parameter: '{param}.file_data' (or '{param}.file_url').",
                param=f"{param}.file_data",
            )
        if not isinstance(data, str):
            raise invalid_type(f"{param}.file_data", "a data: URL string")
        url = checked(check_file_url, data, f"{param}.file_data")
        name = optional_str(part, "filename", f"{param}.filename") or ""
        if name:
            checked(check_file_name, name, f"{param}.filename")
        return ContentPart("file", url=url, name=name)
    return None  # refusal, input_audio, ...: dropped, as protocol.openai drops them


def _parse_parts(content: list[Any], param: str) -> tuple[ContentPart, ...]:
    parts = (_parse_part(item, f"{param}[{index}]") for index, item in enumerate(content))
    return tuple(part for part in parts if part is not None)


def _parse_message_item(item: dict[str, Any], param: str) -> Message:
    role = required_str(item, "role", f"{param}.role")
    if role not in ITEM_ROLES:
        raise invalid_value(f"{param}.role", role, ", ".join(sorted(ITEM_ROLES)))
    content = item.get("content")
    if isinstance(content, str):
        return Message(role, (ContentPart("text", text=content),), False)
    if isinstance(content, list):
        return Message(role, _parse_parts(content, f"{param}.content"), True)
    if content is None:
        raise missing(f"{param}.content")
    raise invalid_type(f"{param}.content", "a string or an array of content parts")


def _parse_input(raw: object, instructions: str | None) -> tuple[Message, ...]:
    """``instructions`` and ``input`` as neutral messages (module docstring)."""
    messages: list[Message] = []
    if instructions is not None:
        messages.append(Message("system", (ContentPart("text", text=instructions),), False))
    if isinstance(raw, str):
        messages.append(Message("user", (ContentPart("text", text=raw),), False))
        return tuple(messages)
    if raw is None:
        raise missing("input")
    if not isinstance(raw, list):
        raise invalid_type("input", "a string or an array of input items")
    start = len(messages)
    names: dict[str, str] = {}  # call_id -> function name, for the results
    for index, value in enumerate(raw):
        param = f"input[{index}]"
        item = required_object(value, param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_parse_message_item(item, param))
        elif kind == "function_call":
            call_id = required_str(item, "call_id", f"{param}.call_id")
            call = ToolCall(
                call_id,
                required_str(item, "name", f"{param}.name"),
                required_str(item, "arguments", f"{param}.arguments"),
            )
            names[call_id] = call.name
            last = messages[-1] if len(messages) > start else None
            if last is not None and last.role == "assistant":
                messages[-1] = replace(last, tool_calls=(*last.tool_calls, call))
            else:
                messages.append(Message("assistant", (), False, tool_calls=(call,)))
        elif kind == "function_call_output":
            call_id = required_str(item, "call_id", f"{param}.call_id")
            output = item.get("output")
            if isinstance(output, str):
                parts: tuple[ContentPart, ...] = (ContentPart("text", text=output),)
            elif isinstance(output, list):
                parts = _parse_parts(output, f"{param}.output")
            elif output is None:
                raise missing(f"{param}.output")
            else:
                raise invalid_type(f"{param}.output", "a string or an array of content parts")
            name = optional_str(item, "name", f"{param}.name") or names.get(call_id, "")
            messages.append(Message("tool", parts, isinstance(output, list),
                                    tool_call_id=call_id, name=name))
        elif kind == "reasoning":
            continue  # the model's earlier thinking: the upstreams take none back
        elif isinstance(kind, str):
            raise invalid_value(
                f"{param}.type", kind,
                "'message', 'function_call', 'function_call_output' and 'reasoning' "
                "(this relay runs no built-in tools and keeps no stored items)",
            )
        else:
            raise invalid_type(f"{param}.type", "a string")
    if len(messages) == start:
        raise RequestError("Invalid 'input': it holds no message to answer.", param="input")
    return tuple(messages)


def _parse_tools(body: dict[str, Any]) -> tuple[tuple[ToolSpec, ...], tuple[bool | None, ...]]:
    """``tools`` (function tools only) and each one's ``strict``."""
    tools = body.get("tools")
    if tools is None:
        return (), ()
    if not isinstance(tools, list):
        raise invalid_type("tools", "an array of tools")
    specs: list[ToolSpec] = []
    strict: list[bool | None] = []
    for index, value in enumerate(tools):
        param = f"tools[{index}]"
        tool = required_object(value, param)
        kind = required_str(tool, "type", f"{param}.type")
        if kind != "function":
            raise RequestError(
                f"Invalid value for '{param}.type': {kind[:40]!r}. Only function tools "
                "('type': 'function') are supported: this relay runs no built-in tools.",
                param=f"{param}.type", code="invalid_value",
            )
        spec, is_strict = parse_function(tool, param)  # the function's fields are the tool's
        specs.append(spec)
        strict.append(is_strict)
    return tuple(specs), tuple(strict)


def _parse_tool_choice(body: dict[str, Any], tools: tuple[ToolSpec, ...]) -> ToolChoice:
    """``tool_choice``: a mode, or ``{"type": "function", "name"}`` naming one of the tools."""
    raw = body.get("tool_choice")
    if raw is None:
        return ToolChoice()
    if isinstance(raw, str):
        choice = tool_choice_mode(raw, "tool_choice")
    else:
        obj = required_object(raw, "tool_choice")
        kind = required_str(obj, "type", "tool_choice.type")
        if kind != "function":
            raise invalid_value("tool_choice.type", kind,
                                 "'function' (this relay runs no built-in tools)")
        choice = ToolChoice("function", required_str(obj, "name", "tool_choice.name"))
    return check_tool_choice(choice, tools, "tool_choice", name_param="tool_choice.name")


def _parse_text_format(body: dict[str, Any]) -> ResponseFormat | None:
    """``text.format``: ``None`` for text, else what the answer must be."""
    text = body.get("text")
    if text is None:
        return None
    raw = required_object(text, "text").get("format")
    if raw is None:
        return None
    return parse_format(required_object(raw, "text.format"), "text.format", flat=True)


def _parse_metadata(body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    raw = body.get("metadata")
    if raw is None:
        return ()
    metadata = required_object(raw, "metadata")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise invalid_type(f"metadata.{key}", "a string")
    return tuple(metadata.items())


def _check_echoed(body: dict[str, Any]) -> None:
    """Type-check the parameters that are only echoed (or ignored)."""
    reasoning = body.get("reasoning")
    if reasoning is not None:
        required_object(reasoning, "reasoning")
    include = body.get("include")
    if include is not None and not is_string_list(include):
        raise invalid_type("include", "an array of strings")
    truncation = body.get("truncation")
    if truncation is not None and truncation not in ("auto", "disabled"):
        raise invalid_value("truncation", truncation, "'auto' and 'disabled'")


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """Parse and validate a ``POST /v1/responses`` body.

    Args:
        body: the raw request body.

    Returns:
        The validated request: its messages are ``instructions`` (a system
        message) then the input items as neutral messages.

    Raises:
        RequestError: (400) the body is not a JSON object (``param`` None), a
            parameter is missing or malformed (``param`` names it, e.g.
            ``input[0].content[1].image_url``), or it needs stored responses
            (``previous_response_id``, ``conversation``, ``background``).
    """
    data = load_json_object(body)
    for key, what in _STORED_STATE.items():
        if data.get(key) is not None:
            raise RequestError(what + _NO_STORE, param=key, code="unsupported_parameter")
    if optional_bool(data, "background", "background"):
        raise RequestError("'background' responses cannot be used" + _NO_STORE,
                           param="background", code="unsupported_parameter")
    instructions = optional_str(data, "instructions", "instructions")
    messages = _parse_input(data.get("input"), instructions)
    max_tokens = optional_positive_int(data, "max_output_tokens")
    tools, tool_strict = _parse_tools(data)
    temperature = parse_sampling(data, "temperature")
    top_p = parse_sampling(data, "top_p")
    _check_echoed(data)
    parallel = optional_bool(data, "parallel_tool_calls", "parallel_tool_calls")
    store = optional_bool(data, "store", "store")
    return ResponsesRequest(
        model=optional_str(data, "model", "model") or "",
        messages=messages,
        stream=optional_bool(data, "stream", "stream") or False,
        include_usage=False,
        conversation_id=None,
        use_search=None,
        tools=tools,
        tool_choice=_parse_tool_choice(data, tools),
        response_format=_parse_text_format(data),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        instructions=instructions,
        tool_strict=tool_strict,
        parallel_tool_calls=True if parallel is None else parallel,
        store=True if store is None else store,
        metadata=_parse_metadata(data),
        user=optional_str(data, "user", "user"),
        truncation=data.get("truncation") or "disabled",
    )
