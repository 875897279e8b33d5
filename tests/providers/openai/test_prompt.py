"""Tests of the request builders of an OpenAI-compatible upstream (sans-IO)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from protocol.anthropic import parse_messages_request
from protocol.errors import RequestError
from protocol.openai import ChatRequest, parse_chat_request
from protocol.responses import parse_responses_request
from providers.openai.prompt import ModelNames, chat_body, passthrough_body


def build(body: dict[str, Any], model: str = "up-x") -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(chat_body(parse_chat_request(orjson.dumps(body)),
                                                    model))
    return result


def test_names_by_list_and_prefix() -> None:
    """A listed name is itself upstream; a prefixed one loses its prefix; others are not owned."""
    names = ModelNames(("deepseek-chat",), "deepseek/")
    assert [names.owns(m) for m in ("deepseek-chat", "deepseek/x", "deepseek/", "gpt-4")] == [
        True, True, False, False]
    assert names.upstream("deepseek-chat") == "deepseek-chat"
    assert names.upstream("deepseek/x") == "x"
    assert names.default == "deepseek-chat"
    assert ModelNames((), "p/").default == ""


def test_everything_goes_natively() -> None:
    """Messages with tool calls and results, images, tools, tool_choice, response_format,
    stop and max_tokens go up as OpenAI fields; always streamed, with usage."""
    body = build({
        "model": "deepseek/x",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "f", "description": "d", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "s", "schema": {"type": "object"},
                                            "strict": True}},
        "stop": ["END"],
        "max_tokens": 50,
    })
    assert body == {
        "model": "up-x",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {
            "name": "f", "description": "d", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "s", "schema": {"type": "object"},
                                            "strict": True}},
        "stop": ["END"],
        "max_tokens": 50,
    }


SAMPLING_KEYS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")
HI: Any = [{"role": "user", "content": "hi"}]


def sent_sampling(request: ChatRequest) -> dict[str, Any]:
    """The sampling fields of the upstream body built for ``request``."""
    body = orjson.loads(chat_body(request, "up-x"))
    return {key: body[key] for key in SAMPLING_KEYS if key in body}


def test_sampling_parameters_go_up_from_every_dialect() -> None:
    """What the client set goes up, zero included; what it did not set is left out, so the
    upstream's defaults hold; Anthropic's top_k goes nowhere (issue 16)."""
    chat = parse_chat_request(orjson.dumps({
        "messages": HI, "temperature": 0, "top_p": 0.5, "presence_penalty": -1,
        "frequency_penalty": 0.5, "seed": 42}))
    assert sent_sampling(chat) == {"temperature": 0.0, "top_p": 0.5, "presence_penalty": -1.0,
                                   "frequency_penalty": 0.5, "seed": 42}
    responses = parse_responses_request(orjson.dumps({"input": "hi", "temperature": 0.3}))
    assert sent_sampling(responses) == {"temperature": 0.3}
    messages = parse_messages_request(orjson.dumps({
        "model": "m", "max_tokens": 10, "messages": HI, "temperature": 0.2, "top_p": 0.9,
        "top_k": 40}))
    assert sent_sampling(messages) == {"temperature": 0.2, "top_p": 0.9}
    unset = [parse_chat_request(orjson.dumps({"messages": HI})),
             parse_responses_request(b'{"input": "hi"}'),
             parse_messages_request(orjson.dumps({"model": "m", "max_tokens": 1,
                                                  "messages": HI, "top_k": 3}))]
    assert [sent_sampling(request) for request in unset] == [{}, {}, {}]


def test_legacy_function_calls_become_tool_calls() -> None:
    """A legacy function_call and its function result are paired by a made-up id."""
    body = build({"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "done"},
    ], "functions": [{"name": "f"}]})
    call = body["messages"][1]["tool_calls"][0]
    assert call["id"] == "call_legacy_0"
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "call_legacy_0",
                                   "content": "done", "name": "f"}


def test_file_parts() -> None:
    """A data-URL file is OpenAI's file part; an http(s) one is named in text."""
    body = build({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": "data:text/plain;base64,aGk=",
                                  "filename": "a.txt"}},
        {"type": "file", "file_url": {"url": "https://e.com/b.pdf"}},
    ]}]})
    parts = body["messages"][0]["content"]
    assert parts[0] == {"type": "file", "file": {"file_data": "data:text/plain;base64,aGk=",
                                                 "filename": "a.txt"}}
    assert parts[1] == {"type": "text", "text": "[file: https://e.com/b.pdf]"}


def test_passthrough_body_keeps_what_the_relay_does_not_model() -> None:
    """The client's body goes up with the upstream's model name and without the relay's
    extension fields; sampling parameters stay."""
    raw = orjson.dumps({"model": "deepseek/x", "temperature": 0.2, "seed": 7,
                        "conversation_id": "", "use_search": True, "messages": []})
    assert orjson.loads(passthrough_body(raw, "x")) == {
        "model": "x", "temperature": 0.2, "seed": 7, "messages": []}


def test_a_model_is_required_without_a_default() -> None:
    """No model and no default: a 400 naming the model."""
    request = parse_chat_request(b'{"messages": [{"role": "user", "content": "hi"}]}')
    with pytest.raises(RequestError) as info:
        chat_body(request, "")
    assert info.value.param == "model"
    with pytest.raises(RequestError):
        passthrough_body(b"{}", "")
