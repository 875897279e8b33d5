"""The OpenAI side of the relay: chat requests in, OpenAI bodies out (sans-IO).

Clients (the official ``openai`` SDK, LobeChat, ChatGPT-Next-Web, Dify) send
OpenAI's ``POST /v1/chat/completions`` body. :func:`parse_chat_request`
validates it once, at the edge, and hands the rest of the relay a
:class:`ChatRequest` of frozen dataclasses, so that providers never touch raw
JSON. What goes back out is built here too: error objects
(:func:`error_body`), the model list (:func:`models_body`), and, from
:mod:`protocol.chunks` (re-exported here), the stream encoder
:class:`ChunkEncoder` and the non-stream :class:`CompletionAccumulator`.

Validation follows OpenAI's API: a bad request is a 400
``invalid_request_error`` whose ``param`` names the field at fault, with an
index path (``messages[2].content[0].text``), so a client's developer sees
what to fix. The references instead answer every failure with HTTP 200 and
their own envelope (PROTOCOLS.md 1.2, 5), which SDKs cannot detect.

What is accepted, and why:

- OpenAI's roles only: system, developer, user, assistant, tool and
  function (the chat service renders calls and their results into the
  prompt before a provider sees them). Any other role is a 400 naming
  ``messages[i].role`` (a provider would otherwise merge it into the
  prompt as if it were text);
- ``content`` as a string or an array of parts; null or missing only in
  assistant messages (those with tool calls carry none) and tool messages,
  as OpenAI: a system, user or developer message without content is a
  400. Text parts, ``image_url``
  parts (``{"url": ...}`` or, as some clients send, a plain string) and
  ``file`` parts are kept; a file is named by ``file_url`` (the references'
  form, 1.4) or by OpenAI's ``file.file_data`` data URL with its
  ``filename``. Other part types (``input_audio``, ``refusal``, ...) are
  dropped: no upstream can use them and refusing would break clients that
  replay whole conversations. What a file reference will put into
  upstream headers is checked here, where the field can be named
  (``messages[0].content[1].image_url.url``): a data URL's media type
  must be ``type/subtype``, and a file name (OpenAI's ``filename``, or an
  http(s) URL's last path segment) may hold no control character
  (:mod:`protocol.datauri`). The rest of a URL is the fetcher's to judge
  (scheme, address and size) when, and if, it fetches;
- optional parameters may be null, which means absent, as with OpenAI;
- what agents send is parsed into neutral fields of :class:`ChatRequest`,
  which the chat service emulates (the web upstreams have no such knobs:
  tools and structured output become prompt instructions, ``stop`` and
  ``max_tokens`` cut the answer as it streams):

  - ``tools`` (function tools only: a built-in or custom tool type is a 400,
    there is nothing to emulate it with) with OpenAI's rule for names
    (``[a-zA-Z0-9_-]``, 1 to 64 characters); ``strict`` is checked and
    dropped. The legacy ``functions`` stand in when there are no ``tools``;
  - ``tool_choice`` (``none``, ``auto``, ``required`` or a named function),
    or the legacy ``function_call``. A named function must be one of the
    tools, and anything but ``none`` and ``auto`` needs tools, as OpenAI
    checks; ``none`` and ``auto`` without tools pass, since clients send
    them on every request;
  - ``response_format``: ``text`` is the default (``None``), ``json_object``
    and ``json_schema`` (its ``name`` is required, the ``schema`` an object);
  - a function's ``parameters`` and a format's ``schema`` may nest at most
    :data:`MAX_JSON_DEPTH` levels: the relay writes them back, and orjson
    writes fewer levels than it reads;
  - ``stop``: a string or up to four; empty strings are dropped (they could
    only match everywhere);
  - ``max_tokens`` and ``max_completion_tokens`` (positive integers): the
    smaller of the two when both are given;
  - in messages: an assistant's ``tool_calls`` (or legacy ``function_call``,
    whose call has no id: ``""``), whose ``arguments`` stay the JSON text the
    client sent; a ``tool`` message's ``tool_call_id`` (required, as OpenAI
    requires it) and optional ``name``; a ``function`` message's ``name``
    (required);
- the sampling parameters ``temperature`` (0 to 2), ``top_p`` (0 to 1),
  ``presence_penalty`` and ``frequency_penalty`` (-2 to 2) and ``seed`` (a
  64-bit integer) are checked as OpenAI checks them (a wrong type is
  ``Invalid type for ...``, a number out of range OpenAI's
  ``decimal_above_max_value`` and the like, :data:`SAMPLING_RANGES`) and
  kept in :class:`ChatRequest`: an OpenAI-compatible upstream gets them
  (:mod:`providers.openai.prompt`), the web chats have no such knobs and
  ignore them. ``user`` is type-checked and ignored. ``n`` must be 1: the
  upstreams give one answer.

JSON is parsed by orjson, which refuses ``NaN`` and ``Infinity`` literals,
lone surrogates and invalid UTF-8, and handles multi-megabyte documents in
message contents at C speed. The body size limit is the HTTP layer's job.

The field checks and OpenAI's wording of their errors are shared with the
other parsers (:mod:`protocol.request_fields`); the shapes both OpenAI
dialects read, a function definition (:func:`parse_function`), a
structured-output format (:func:`parse_format`) and a tool choice
(:func:`tool_choice_mode`, :func:`check_tool_choice`), are read here for
both (:mod:`protocol.responses` is the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

from protocol.chunks import (
    ChunkEncoder,
    CompletionAccumulator,
    ReasoningMode,
    ToolCall,
    error_body,
    estimate_tokens,
)
from protocol.datauri import check_file_name, check_file_url
from protocol.errors import RequestError
from protocol.request_fields import (
    MAX_JSON_DEPTH,
    checked,
    function_name,
    invalid_type,
    invalid_value,
    is_string_list,
    load_json_object,
    missing,
    nested_deeper_than,
    optional_bool,
    optional_int,
    optional_number,
    optional_positive_int,
    optional_str,
    part_url,
    required_object,
    required_str,
    schema_object,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from protocol.errors import RelayError

__all__ = [
    "MAX_JSON_DEPTH",
    "SAMPLING_RANGES",
    "SEED_RANGE",
    "ChatRequest",
    "ChunkEncoder",
    "CompletionAccumulator",
    "ContentPart",
    "Message",
    "ReasoningMode",
    "ResponseFormat",
    "ToolCall",
    "ToolChoice",
    "ToolSpec",
    "check_tool_choice",
    "error_body",
    "error_from_exception",
    "estimate_tokens",
    "models_body",
    "nested_deeper_than",
    "parse_chat_request",
    "parse_format",
    "parse_function",
    "parse_sampling",
    "prompt_tokens",
    "tool_choice_mode",
]

#: Rough per-message overhead of the chat format (role and separators), and
#: the priming of the reply, as OpenAI's cookbook counts them.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3

#: OpenAI's ranges of the sampling parameters (API reference, chat completions; the
#: Responses API has the first two, with the same ranges).
SAMPLING_RANGES: Final[dict[str, tuple[float, float]]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
}
#: ``seed``: a 64-bit signed integer, as OpenAI takes it.
SEED_RANGE: Final = (-(2**63), 2**63 - 1)

@dataclass(frozen=True, slots=True)
class ContentPart:
    """One part of a message's content.

    Attributes:
        type: "text", "image_url" or "file".
        text: the text of a "text" part.
        url: for "image_url" and "file": an http(s) URL or a data: URL, as
            the client sent it (not checked yet).
        name: an optional file name (OpenAI "file" parts carry one).
    """

    type: Literal["text", "image_url", "file"]
    text: str = ""
    url: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function the model may call.

    Attributes:
        name: the function's name.
        description: what it does (``""`` if none).
        parameters: its JSON Schema (an object), ``None`` if none was given.
    """

    name: str
    description: str = ""
    parameters: Any = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Whether and which tools the model should call.

    Attributes:
        mode: ``"auto"`` (the model decides), ``"none"`` (tools are not
            offered), ``"required"`` (at least one call), ``"function"``
            (exactly the function ``name``).
        name: the function, with ``mode="function"``.
    """

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str = ""


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: the answer must be one JSON document.

    Attributes:
        type: ``"json_object"`` (any JSON object) or ``"json_schema"``.
        schema: the JSON Schema, with ``"json_schema"``.
        name: the schema's name (``""`` if none).
        strict: the answer must satisfy the schema, not merely parse.
    """

    type: Literal["json_object", "json_schema"]
    schema: Any = None
    name: str = ""
    strict: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message.

    Attributes:
        role: as the client sent it (any string).
        parts: a string content becomes one text part; null or missing
            content gives ``()``.
        is_list: the content was an array of parts.
        tool_calls: an assistant message's calls (``()`` if none).
        tool_call_id: a ``tool`` message's answer names the call it answers.
        name: a ``tool``/``function`` message's function name (``""`` if none).
    """

    role: str
    parts: tuple[ContentPart, ...]
    is_list: bool
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        """The text parts joined with ``"\\n"``."""
        parts = self.parts
        if len(parts) == 1 and parts[0].type == "text":
            return parts[0].text  # the common case: a string content
        return "\n".join(part.text for part in parts if part.type == "text")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat completion request.

    Attributes:
        model: the requested model, ``""`` when absent (the caller picks the
            provider's default).
        messages: the conversation, at least one message.
        stream: answer as server-sent events.
        include_usage: ``stream_options.include_usage``: end the stream with
            a usage chunk.
        conversation_id: the ChatGLM extension field: ``None`` when the body
            has no such key; ``""`` when it is null or empty (start a new
            conversation and keep it); else the conversation to continue.
        use_search: the StepChat extension field (may be ignored).
        tools: the functions the model may call (``()``: none).
        tool_choice: whether and which of ``tools`` to call.
        response_format: structured output, ``None`` for free text.
        stop: up to four sequences that end the answer where they appear.
        max_tokens: the most answer tokens (estimated), ``None`` for no limit.
        temperature: the sampling parameters as the client sent them (checked
            against the dialect's ranges), ``None`` when absent. An
            OpenAI-compatible upstream gets those that are set; the web chats
            ignore them all. ``top_p`` likewise; ``presence_penalty``,
            ``frequency_penalty`` and ``seed`` only come from the OpenAI chat
            dialect (the Responses and Messages APIs have no such fields).
        top_p: see ``temperature``.
        presence_penalty: see ``temperature``.
        frequency_penalty: see ``temperature``.
        seed: see ``temperature``.
    """

    model: str
    messages: tuple[Message, ...]
    stream: bool
    include_usage: bool
    conversation_id: str | None
    use_search: bool | None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    response_format: ResponseFormat | None = None
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None


def _parse_file(part: dict[str, Any], param: str) -> ContentPart:
    """A "file" part: ``file_url`` (the references' form) or OpenAI's ``file`` object."""
    if part.get("file_url") is not None:
        return ContentPart("file", url=part_url(part["file_url"], f"{param}.file_url"))
    file = part.get("file")
    if isinstance(file, str):
        return ContentPart("file", url=checked(check_file_url, file, f"{param}.file"))
    if not isinstance(file, dict):
        if file is None:
            raise RequestError(
                f"Missing required parameter: '{param}.file' (or '{param}.file_url').",
                param=f"{param}.file",
            )
        raise invalid_type(f"{param}.file", "an object")
    data = file.get("file_data")
    if not isinstance(data, str):
        if data is None and "file_id" in file:
            raise RequestError(
                "Uploaded file references ('file_id') are not supported; "
                "send 'file_data' as a data URL, or use 'file_url'.",
                param=f"{param}.file",
            )
        raise invalid_type(f"{param}.file", "an object with a 'file_data' data: URL string")
    name = file.get("filename")
    if name is not None and not isinstance(name, str):
        raise invalid_type(f"{param}.file", "a 'filename' string")
    url = checked(check_file_url, data, f"{param}.file.file_data")
    if name:
        checked(check_file_name, name, f"{param}.file.filename")
    return ContentPart("file", url=url, name=name or "")


def _parse_part(part: object, param: str) -> ContentPart | None:
    """One content part, or None for a part type no upstream can use."""
    if not isinstance(part, dict):
        raise invalid_type(param, "an object")
    kind = required_str(part, "type", f"{param}.type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid_type(f"{param}.text", "a string")
        return ContentPart("text", text=text)
    if kind == "image_url":
        url = part_url(part.get("image_url"), f"{param}.image_url")
        return ContentPart("image_url", url=url)
    if kind == "file":
        return _parse_file(part, param)
    return None  # input_audio, refusal, ...: dropped (see the module comment)


#: Roles whose messages must carry content (a string or parts; "" is fine).
_CONTENT_REQUIRED = frozenset({"system", "user", "developer"})
#: OpenAI's chat roles (API reference, "messages"); "function" is deprecated but sent.
ROLES = frozenset({*_CONTENT_REQUIRED, "assistant", "tool", "function"})


def _parse_content(
    role: str, raw: dict[str, Any], param: str
) -> tuple[tuple[ContentPart, ...], bool]:
    """A message's parts and whether its content was an array."""
    content = raw.get("content")
    if isinstance(content, str):
        return (ContentPart("text", text=content),), False
    if content is None:
        if role in _CONTENT_REQUIRED:  # as OpenAI: only assistant (and tool) may omit it
            if "content" not in raw:
                raise missing(f"{param}.content")
            raise invalid_type(f"{param}.content", "a string or an array of content parts")
        return (), False
    if isinstance(content, list):
        parts = []
        for index, item in enumerate(content):
            part = _parse_part(item, f"{param}.content[{index}]")
            if part is not None:
                parts.append(part)
        return tuple(parts), True
    raise invalid_type(f"{param}.content", "a string, an array of content parts, or null")


def _parse_function_call(raw: object, param: str, call_id: str) -> ToolCall:
    """A call's ``{"name", "arguments"}`` (``arguments``: JSON text, kept as sent)."""
    function = required_object(raw, param)
    name = required_str(function, "name", f"{param}.name")
    arguments = required_str(function, "arguments", f"{param}.arguments")
    return ToolCall(call_id, name, arguments)


def _parse_tool_calls(raw: dict[str, Any], param: str) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls``, or its legacy ``function_call`` (id ``""``)."""
    calls = raw.get("tool_calls")
    if calls is None:
        legacy = raw.get("function_call")
        if legacy is None:
            return ()
        return (_parse_function_call(legacy, f"{param}.function_call", ""),)
    if not isinstance(calls, list):
        raise invalid_type(f"{param}.tool_calls", "an array of tool calls")
    parsed = []
    for index, item in enumerate(calls):
        at = f"{param}.tool_calls[{index}]"
        call = required_object(item, at)
        kind = required_str(call, "type", f"{at}.type")
        if kind != "function":
            raise invalid_value(f"{at}.type", kind, "'function'")
        call_id = required_str(call, "id", f"{at}.id")
        parsed.append(_parse_function_call(call.get("function"), f"{at}.function", call_id))
    return tuple(parsed)


def _parse_message(raw: object, param: str) -> Message:
    if not isinstance(raw, dict):
        raise invalid_type(param, "an object")
    role = required_str(raw, "role", f"{param}.role")
    if role not in ROLES:
        raise invalid_value(f"{param}.role", role, ", ".join(sorted(ROLES)))
    parts, is_list = _parse_content(role, raw, param)
    if role == "assistant":
        return Message(role, parts, is_list, tool_calls=_parse_tool_calls(raw, param))
    if role == "tool":  # OpenAI requires the id of the call it answers; a name is an extra
        call_id = required_str(raw, "tool_call_id", f"{param}.tool_call_id")
        name = optional_str(raw, "name", f"{param}.name") or ""
        return Message(role, parts, is_list, tool_call_id=call_id, name=name)
    if role == "function":  # legacy: the result names its function, there are no ids
        name = required_str(raw, "name", f"{param}.name")
        return Message(role, parts, is_list, name=name)
    return Message(role, parts, is_list)


def parse_function(function: dict[str, Any], param: str) -> tuple[ToolSpec, bool | None]:
    """One function definition: ``{"name", "description"?, "parameters"?, "strict"?}``.

    Chat completions nest these fields in ``tools[i].function``, the
    Responses API puts them in the tool itself (:mod:`protocol.responses`).

    Args:
        function: the object holding the fields.
        param: its path, for errors (``tools[0].function``).

    Returns:
        The spec (``name`` by OpenAI's rule, ``parameters`` a JSON Schema
        object or ``None``) and ``strict`` as sent (``None``: absent).

    Raises:
        RequestError: a field is missing or malformed, naming it.
    """
    name = function_name(required_str(function, "name", f"{param}.name"), f"{param}.name")
    description = optional_str(function, "description", f"{param}.description") or ""
    parameters = schema_object(function, "parameters", f"{param}.parameters")
    strict = optional_bool(function, "strict", f"{param}.strict")
    return ToolSpec(name, description, parameters), strict


def _parse_function(raw: object, param: str) -> ToolSpec:
    """A chat completions function definition (:func:`parse_function`)."""
    # strict: the shaper cannot hold a model to a schema while it streams, so
    # it is checked and dropped (arguments are passed on as the model wrote them)
    spec, _ = parse_function(required_object(raw, param), param)
    return spec


def _parse_tools(body: dict[str, Any]) -> tuple[ToolSpec, ...]:
    """``tools``, or the legacy ``functions`` when there are no ``tools``."""
    tools = body.get("tools")
    functions = body.get("functions")
    if tools is None and functions is not None:
        if not isinstance(functions, list):
            raise invalid_type("functions", "an array of functions")
        return tuple(_parse_function(f, f"functions[{i}]") for i, f in enumerate(functions))
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise invalid_type("tools", "an array of tools")
    specs = []
    for index, item in enumerate(tools):
        at = f"tools[{index}]"
        tool = required_object(item, at)
        kind = required_str(tool, "type", f"{at}.type")
        if kind != "function":  # custom tools, OpenAI's built-in ones: nothing to emulate
            raise invalid_value(f"{at}.type", kind, "'function'")
        specs.append(_parse_function(tool.get("function"), f"{at}.function"))
    return tuple(specs)


_CHOICE_MODES: dict[str, Literal["auto", "none", "required"]] = {
    "auto": "auto", "none": "none", "required": "required",
}


def tool_choice_mode(raw: str, param: str) -> ToolChoice:
    """A ``tool_choice`` given as a string: ``"none"``, ``"auto"`` or ``"required"``.

    Raises:
        RequestError: (``invalid_value``) any other string, naming ``param``.
    """
    mode = _CHOICE_MODES.get(raw)
    if mode is None:
        raise invalid_value(param, raw, "'none', 'auto', 'required' or an object naming a function")
    return ToolChoice(mode)


def check_tool_choice(
    choice: ToolChoice,
    tools: Sequence[ToolSpec],
    param: str,
    *,
    tools_field: str = "tools",
    name_param: str | None = None,
) -> ToolChoice:
    """``choice`` if the request's ``tools`` allow it, as OpenAI checks.

    ``"none"`` and ``"auto"`` are accepted without tools (clients send them
    always); anything else needs tools, and a named function must be one of them.

    Args:
        choice: the parsed choice.
        tools: the request's tools.
        param: the choice's field (``tool_choice``, the legacy ``function_call``).
        tools_field: the tools' field, for the message (the legacy ``functions``).
        name_param: the field a function that is not among the tools is
            reported for (``param`` itself if ``None``).

    Raises:
        RequestError: (``invalid_value``) the choice needs tools there are not.
    """
    if choice.mode in ("auto", "none"):
        return choice
    if not tools:
        raise RequestError(
            f"Invalid value for '{param}': '{param}' is only allowed when "
            f"'{tools_field}' are specified.",
            param=param, code="invalid_value",
        )
    if choice.mode == "function" and all(tool.name != choice.name for tool in tools):
        raise RequestError(
            f"Invalid value for '{param}': no function named {choice.name[:70]!r} is "
            "among the tools.",
            param=name_param or param, code="invalid_value",
        )
    return choice


def _parse_tool_choice(body: dict[str, Any], tools: tuple[ToolSpec, ...]) -> ToolChoice:
    """``tool_choice``, or the legacy ``function_call`` when there is no ``tool_choice``."""
    raw = body.get("tool_choice")
    param = "tool_choice"
    if raw is None:
        raw = body.get("function_call")
        if raw is None:
            return ToolChoice()
        param = "function_call"
        if raw == "required":  # the legacy field never had it
            raise invalid_value(param, raw, "'none', 'auto' or an object naming a function")
    if isinstance(raw, str):
        choice = tool_choice_mode(raw, param)
    else:
        obj = required_object(raw, param)
        if param == "tool_choice":
            kind = required_str(obj, "type", "tool_choice.type")
            if kind != "function":
                raise invalid_value("tool_choice.type", kind, "'function'")
            obj = required_object(obj.get("function"), "tool_choice.function")
            name_param = "tool_choice.function.name"
        else:
            name_param = "function_call.name"
        choice = ToolChoice("function", required_str(obj, "name", name_param))
    return check_tool_choice(choice, tools, param,
                             tools_field="tools" if param == "tool_choice" else "functions")


def parse_format(fmt: dict[str, Any], param: str, *, flat: bool) -> ResponseFormat | None:
    """A structured-output format: ``{"type": "text" | "json_object" | "json_schema", ...}``.

    Args:
        fmt: the format object.
        param: its path (``response_format``, ``text.format``).
        flat: the Responses API's form: a JSON Schema's ``name``,
            ``description``, ``schema`` (required) and ``strict`` are in
            ``fmt`` itself. Chat completions' form (``flat=False``) nests
            them in ``fmt["json_schema"]``, its ``schema`` optional.

    Returns:
        ``None`` for text, else what the answer must be (a schema's name by
        OpenAI's rule for names, its schema a JSON Schema object).

    Raises:
        RequestError: a field is missing or malformed, naming it.
    """
    kind = required_str(fmt, "type", f"{param}.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise invalid_value(f"{param}.type", kind, "'text', 'json_object' and 'json_schema'")
    if not flat:
        param = f"{param}.json_schema"
        fmt = required_object(fmt.get("json_schema"), param)
    name = function_name(required_str(fmt, "name", f"{param}.name"), f"{param}.name")
    optional_str(fmt, "description", f"{param}.description")
    schema = schema_object(fmt, "schema", f"{param}.schema", required=flat)
    strict = optional_bool(fmt, "strict", f"{param}.strict") or False
    return ResponseFormat("json_schema", schema=schema, name=name, strict=strict)


def _parse_response_format(body: dict[str, Any]) -> ResponseFormat | None:
    """``response_format``: ``None`` for text, else what the answer must be."""
    raw = body.get("response_format")
    if raw is None:
        return None
    return parse_format(required_object(raw, "response_format"), "response_format", flat=False)


#: OpenAI's limit on stop sequences (API reference, "stop").
MAX_STOP_SEQUENCES = 4


def _parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty sequences (an empty one could never end anything)."""
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if not is_string_list(stop):
        raise invalid_type("stop", "a string or an array of strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(
            f"Invalid 'stop': array too long. Expected an array with maximum length "
            f"{MAX_STOP_SEQUENCES}, but got an array with length {len(stop)} instead.",
            param="stop", code="array_above_max_length",
        )
    return tuple(item for item in stop if item)


def _parse_max_tokens(body: dict[str, Any]) -> int | None:
    """``max_tokens`` / ``max_completion_tokens`` (the smaller, if both are given)."""
    limits = [optional_positive_int(body, key) for key in ("max_tokens", "max_completion_tokens")]
    return min((limit for limit in limits if limit is not None), default=None)


def parse_sampling(body: dict[str, Any], key: str) -> float | None:
    """The sampling parameter ``key`` of :data:`SAMPLING_RANGES`, ``None`` if absent.

    Raises:
        RequestError: it is not a number, or out of OpenAI's range, naming ``key``.
    """
    low, high = SAMPLING_RANGES[key]
    return optional_number(body, key, low, high)


def _check_ignored_params(body: dict[str, Any]) -> None:
    """Check the parameters the upstreams cannot honour (then they are ignored)."""
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise RequestError("Only n=1 is supported: the upstream gives one answer.", param="n")
    optional_str(body, "user", "user")


def parse_chat_request(body: bytes) -> ChatRequest:
    """Parse and validate a ``POST /v1/chat/completions`` body.

    Args:
        body: the raw request body.

    Returns:
        The validated request.

    Raises:
        RequestError: (400) the body is not a JSON object (``param`` None), or
            a parameter is missing or malformed (``param`` names it, e.g.
            ``messages[0].content[1].image_url``).
    """
    data = load_json_object(body)

    raw_messages = data.get("messages")
    if raw_messages is None:
        raise missing("messages")
    if not isinstance(raw_messages, list):
        raise invalid_type("messages", "an array of messages")
    if not raw_messages:
        raise RequestError(
            "Invalid 'messages': empty array. Expected at least one message.", param="messages"
        )
    messages = tuple(
        _parse_message(raw, f"messages[{index}]") for index, raw in enumerate(raw_messages)
    )

    model = optional_str(data, "model", "model") or ""
    stream = optional_bool(data, "stream", "stream") or False
    options = data.get("stream_options")
    if options is None:
        include_usage = False
    elif isinstance(options, dict):
        include_usage = (
            optional_bool(options, "include_usage", "stream_options.include_usage") or False
        )
    else:
        raise invalid_type("stream_options", "an object or null")
    conversation_id = optional_str(data, "conversation_id", "conversation_id")
    if conversation_id is None and "conversation_id" in data:
        conversation_id = ""  # present but null: a conversation-aware client, new conversation
    use_search = optional_bool(data, "use_search", "use_search")
    _check_ignored_params(data)
    sampling = {key: parse_sampling(data, key) for key in SAMPLING_RANGES}
    seed = optional_int(data, "seed", *SEED_RANGE)
    tools = _parse_tools(data)
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        conversation_id=conversation_id,
        use_search=use_search,
        tools=tools,
        tool_choice=_parse_tool_choice(data, tools),
        response_format=_parse_response_format(data),
        stop=_parse_stop(data),
        max_tokens=_parse_max_tokens(data),
        temperature=sampling["temperature"],
        top_p=sampling["top_p"],
        presence_penalty=sampling["presence_penalty"],
        frequency_penalty=sampling["frequency_penalty"],
        seed=seed,
    )


def file_parts(messages: Sequence[Message]) -> list[ContentPart]:
    """The parts a provider fetches: ``file`` and ``image_url`` of the last message (1.4)."""
    if not messages:
        return []
    return [part for part in messages[-1].parts if part.type in ("file", "image_url")]


def check_file_count(request: ChatRequest, max_files: int) -> None:
    """Refuse a request naming more than ``max_files`` files, before any is fetched.

    Raises:
        RequestError: (400, ``too_many_files``, ``param`` the last message's content).
    """
    count = len(file_parts(request.messages))
    if count > max_files:
        raise RequestError(
            f"a request may carry at most {max_files} file and image parts; this one has "
            f"{count} (RELAY_MAX_FILES)",
            param=f"messages[{len(request.messages) - 1}].content",
            code="too_many_files",
        )


def prompt_tokens(request: ChatRequest) -> int:
    """Estimate the prompt's tokens: every message's text plus a few per message.

    An assistant message's tool calls count by their names and arguments,
    and the tools offered by their definitions as compact JSON (what the
    model reads of them, near enough). Meant for the client's request, not
    one whose tools were already rendered into messages (they would count
    twice). Images and files are not counted (the upstreams do not say what
    they cost).
    """
    total = TOKENS_PER_REPLY
    for message in request.messages:
        total += TOKENS_PER_MESSAGE + estimate_tokens(message.text)
        for call in message.tool_calls:
            total += estimate_tokens(call.name) + estimate_tokens(call.arguments)
    if request.tools and request.tool_choice.mode != "none":
        total += estimate_tokens(
            orjson.dumps(
                [
                    {"name": t.name, "description": t.description, "parameters": t.parameters}
                    for t in request.tools
                ]
            ).decode()
        )
    return total


def error_from_exception(exc: RelayError) -> bytes:
    """The OpenAI error body for ``exc`` (its message, kind, param and code)."""
    return error_body(exc.message, exc.kind, param=exc.param, code=exc.code)


def models_body(models: Iterable[tuple[str, str]], created: int) -> bytes:
    """The ``GET /v1/models`` body.

    Args:
        models: ``(id, owned_by)`` pairs, in the order to list them.
        created: the ``created`` Unix time of every entry.

    Returns:
        ``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}``.
    """
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
                for model_id, owned_by in models
            ],
        }
    )
