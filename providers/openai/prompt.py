"""Requests to an OpenAI-compatible upstream: the neutral request as its chat body (sans-IO).

Two builders, one per path through the relay:

- :func:`chat_body` (the neutral path): a :class:`~protocol.openai.ChatRequest`
  as the upstream's ``POST /chat/completions`` JSON body, everything natively:
  messages with an assistant's ``tool_calls`` and ``tool`` results,
  ``image_url`` parts, ``tools``, ``tool_choice``, ``response_format``,
  ``stop``, ``max_tokens``, and the sampling parameters the client set
  (``temperature``, ``top_p``; from OpenAI chat bodies also
  ``presence_penalty``, ``frequency_penalty``, ``seed``), none of them when
  unset, so the upstream's defaults hold; always streamed (the relay
  accumulates a whole answer itself), with ``stream_options.include_usage``.
  This is how a Responses or Anthropic Messages client's ``temperature``
  reaches the upstream.
- :func:`passthrough_body` (the fast path): the client's own body, with the
  upstream's model name and without the relay's extension fields; what the
  relay does not model (temperature, seed, logprobs, ...) goes up as the
  client sent it.

Names: :class:`ModelNames` says which served names an upstream owns (an
explicit list, or everything under a prefix) and what each is called
upstream: a listed name is sent as it is, ``deepseek/x`` under the prefix
``deepseek/`` is sent as ``x``.

Conversions, where the neutral request is richer or older than what
OpenAI-compatible servers accept: a ``developer`` message goes up as
``system`` (DeepSeek and vLLM know no ``developer``); a legacy
``function_call`` (no id) and ``function`` result become a tool call with
the id ``call_legacy_<n>`` and its ``tool`` result; a ``file`` part with a
data URL is OpenAI's ``file`` part (``file_data``, ``filename``), one with an
http(s) URL a text part naming it (the upstream fetches no files by URL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from protocol.errors import RequestError

if TYPE_CHECKING:
    from protocol.openai import ChatRequest, ContentPart, Message

#: OpenAI's chat completions and model list, under the base URL (which ends in ``/v1``).
CHAT_PATH = "/chat/completions"
MODELS_PATH = "/models"
JSON_CONTENT_TYPE = b"application/json"
#: The relay's extension fields: never sent upstream (an upstream may refuse unknown ones).
EXTENSION_FIELDS = ("conversation_id", "use_search")


@dataclass(frozen=True, slots=True)
class ModelNames:
    """The served model names of one upstream, and their names upstream.

    Attributes:
        models: served under exactly these names (and sent as they are).
        prefix: or everything under this prefix (sent without it); ``""``: none.
    """

    models: tuple[str, ...] = ()
    prefix: str = ""

    def owns(self, model: str) -> bool:
        """Whether ``model`` is a served name of this upstream."""
        if model in self.models:
            return True
        return bool(self.prefix) and model.startswith(self.prefix) and len(model) > len(
            self.prefix)

    def upstream(self, model: str) -> str:
        """What ``model`` is called upstream (a name not under the prefix: as it is)."""
        if model not in self.models and self.prefix and model.startswith(self.prefix):
            return model[len(self.prefix):]
        return model

    @property
    def default(self) -> str:
        """The model an answer names when the request named none (``""``: none)."""
        return self.models[0] if self.models else ""


def _part(part: ContentPart) -> dict[str, Any]:
    match part.type:
        case "text":
            return {"type": "text", "text": part.text}
        case "image_url":
            return {"type": "image_url", "image_url": {"url": part.url}}
        case "file":
            if part.url.startswith("data:"):
                file: dict[str, str] = {"file_data": part.url}
                if part.name:
                    file["filename"] = part.name
                return {"type": "file", "file": file}
            return {"type": "text", "text": f"[file: {part.url}]"}


def _content(message: Message) -> str | list[dict[str, Any]] | None:
    if message.is_list:
        return [_part(part) for part in message.parts]
    if not message.parts:
        return None
    return message.text


def messages_body(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """The ``messages`` array (module docstring: conversions)."""
    out: list[dict[str, Any]] = []
    legacy = 0
    legacy_ids: dict[str, str] = {}  # a function's name -> its last legacy call id
    for message in messages:
        role = message.role
        item: dict[str, Any] = {"role": "system" if role == "developer" else role}
        if role == "function":
            item["role"] = "tool"
            item["tool_call_id"] = legacy_ids.get(message.name, "call_legacy_0")
        elif role == "tool":
            item["tool_call_id"] = message.tool_call_id
        content = _content(message)
        item["content"] = content if content is not None or role == "assistant" else ""
        if message.name and role in ("tool", "function"):
            item["name"] = message.name
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                call_id = call.id
                if not call_id:
                    call_id = f"call_legacy_{legacy}"
                    legacy += 1
                    legacy_ids[call.name] = call_id
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}})
            item["tool_calls"] = calls
        out.append(item)
    return out


def _tools(request: ChatRequest, out: dict[str, Any]) -> None:
    if not request.tools:
        return
    tools = []
    for tool in request.tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        tools.append({"type": "function", "function": function})
    out["tools"] = tools
    choice = request.tool_choice
    match choice.mode:
        case "auto":
            pass
        case "none" | "required":
            out["tool_choice"] = choice.mode
        case "function":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}


def _sampling(request: ChatRequest, out: dict[str, Any]) -> None:
    """The sampling parameters the client set (an unset one leaves the upstream's default)."""
    sampling: tuple[tuple[str, float | None], ...] = (
        ("temperature", request.temperature),
        ("top_p", request.top_p),
        ("presence_penalty", request.presence_penalty),
        ("frequency_penalty", request.frequency_penalty),
        ("seed", request.seed),
    )
    out.update((key, value) for key, value in sampling if value is not None)


def chat_body(request: ChatRequest, upstream_model: str) -> bytes:
    """The upstream's chat body for ``request``, streamed, asking for usage.

    Raises:
        RequestError: no model was named and the upstream has no default one.
    """
    if not upstream_model:
        raise RequestError("you must provide a model parameter", param="model")
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": messages_body(request.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _tools(request, body)
    fmt = request.response_format
    if fmt is not None:
        if fmt.type == "json_schema":
            schema: dict[str, Any] = {"name": fmt.name or "answer", "schema": fmt.schema}
            if fmt.strict:
                schema["strict"] = True
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        else:
            body["response_format"] = {"type": "json_object"}
    if request.stop:
        body["stop"] = list(request.stop)
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    _sampling(request, body)
    return orjson.dumps(body)


def passthrough_body(raw: bytes, upstream_model: str) -> bytes:
    """The client's body (already validated by the relay) for the upstream.

    The model is the upstream's name; the relay's extension fields are
    dropped; everything else is the client's.

    Raises:
        RequestError: the body is not a JSON object (it was validated, so: a
            bug), or no model was named and the upstream has no default one.
    """
    if not upstream_model:
        raise RequestError("you must provide a model parameter", param="model")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError("invalid JSON body") from exc
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    body["model"] = upstream_model
    for name in EXTENSION_FIELDS:
        body.pop(name, None)
    return orjson.dumps(body)


def headers(key: str, *, streamed: bool) -> list[tuple[bytes, bytes]]:
    """The request headers of a call with the API key ``key``."""
    return [
        (b"authorization", b"Bearer " + key.encode("latin-1")),
        (b"content-type", JSON_CONTENT_TYPE),
        (b"accept", b"text/event-stream" if streamed else JSON_CONTENT_TYPE),
    ]
