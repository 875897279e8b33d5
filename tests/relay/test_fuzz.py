"""Generated request bodies against a live relay: no 5xx, every answer well-formed.

Hypothesis drives plain synchronous tests here, because a ``@given`` test
cannot await and pytest-trio's fixtures are made anew for each test
function, not for each example. So the relay runs in a thread of its own:
one :func:`trio.run` holds a StepChat and a ChatGLM emulator and an
:class:`relay.app.App` over them, on loopback, for the whole module; the
examples are sent with httpcore's synchronous pool, one request each, and
the module's teardown stops the relay and joins the thread (an exception
in it fails the run, since warnings are errors).

The relay runs as in production with server-side accounts: ``api_keys``
set, credentials from ``step_tokens`` and ``glm_tokens``, private file URLs
refused (``allow_private_urls`` off; only the ChatGLM emulator's origin is
trusted, for the images ``b64_json`` downloads, as in demo mode). The
emulators stay healthy: StepChat answers "Hello!" to everything, ChatGLM's
scripted agent (:mod:`providers.emulator_agent`) calls a tool when the last
user text asks ``call NAME with {...}`` and writes JSON when told to. Known
traps are pinned with ``@example`` and always tried first, with requests
that must work (a call, structured output, stop, a one-token limit,
streamed and whole, on both providers). The other bodies are mostly valid
requests with a few parts swapped for junk: wrong types, unknown roles, odd
content parts, data URLs with strange media types, file URLs naming
loopback or names under ``.invalid`` (RFC 6761: they never resolve, so no
fetch leaves the machine), huge and negative numbers, deep nesting; and
some are not JSON, or not UTF-8, at all. Valid requests carry the agents'
fields (issue 14): tools and their schemas, tool choices, legacy functions,
structured output, stop sequences, token limits, calls and their results in
the history; in each dialect: chat completions, Anthropic's Messages
(``/v1/messages`` and ``count_tokens``) and the Responses API.

Every answer must be a 4xx error in the route's dialect (OpenAI's object,
or Anthropic's ``{"type": "error", "error": {...}}`` on the Messages
routes) or the route's success shape: a completion, or an SSE stream ending
in ``[DONE]``; a message, or events ending in ``message_stop``; a response
object, or events ending in ``response.completed`` or
``response.incomplete``; never an in-band error event. The one 5xx allowed
is a 502 ``invalid_json_output`` to a whole structured answer that is not
the JSON asked for. The relay must log no error (an unhandled exception
is logged so), still answer ``/ping`` after each test, and have deleted
every upstream conversation it created, except those a client kept (a
ChatGLM request that sent ``conversation_id``). ``FUZZ_EXAMPLES`` sets the
examples per test (60: about 6 s for the module under the CI profile).
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpcore
import orjson
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.openai import MAX_JSON_DEPTH, ROLES
from protocol.urls import origin_of
from providers.glm.emulator import TINY_PNG, GlmBehavior, GlmEmulator
from providers.glm.media import (
    EMOTIONAL_ATMOSPHERES,
    MIRROR_MODES,
    RESPONSE_FORMATS,
    VIDEO_MODELS,
    VIDEO_STYLES,
)
from providers.glm.prompt import MODELS as GLM_MODELS
from providers.openai.emulator import OpenAIEmulator
from providers.step.client import MODELS as STEP_MODELS
from providers.step.emulator import StepBehavior, StepEmulator
from relay import config
from relay.app import App
from tests.relay.conftest import GLM_TOKEN, STEP_CREDENTIAL, STEP_TOKEN, sse_events

if TYPE_CHECKING:
    from collections.abc import Iterator

API_KEY = "fuzz-key"
#: Generous: one example is one request on loopback; this only stops a hang.
REQUEST_TIMEOUT_S = 30.0
#: Starting and stopping the relay thread.
THREAD_TIMEOUT_S = 30.0
#: Shaped like an upstream conversation id (24+ letters and digits), but never created.
UNKNOWN_CONVERSATION = "0123456789abcdef01234567"
CHAT_ROUTES = ("/v1/chat/completions", "/step/v1/chat/completions", "/glm/v1/chat/completions")
#: Examples per test and route: the whole module takes about 6 s with the CI profile.
#: The OpenAI-compatible upstream's key, its listed model and a name under its prefix.
UPSTREAM_KEY = "sk-fuzz-upstream"
UPSTREAM_MODELS = ("up-chat", "up/emu-reasoner")
#: ``FUZZ_EXAMPLES=2000`` hunts longer.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


@dataclass
class LiveRelay:
    """The relay in its thread, and a client pool to it."""

    base_url: str
    client: httpcore.ConnectionPool
    app: App
    step: StepEmulator
    glm: GlmEmulator
    upstream: OpenAIEmulator
    trio_token: trio.lowlevel.TrioToken
    #: every record of level ERROR or above logged while the relay runs (a traceback...)
    errors: list[logging.LogRecord] = field(default_factory=list)
    #: requests that sent a ``conversation_id``: ChatGLM keeps their conversations
    may_keep: int = 0

    def post(self, path: str, body: bytes) -> httpcore.Response:
        """POST ``body`` (as JSON, with the API key) and read the whole answer."""
        return self.client.request(
            "POST",
            self.base_url + path,
            headers=[
                (b"content-type", b"application/json"),
                (b"authorization", f"Bearer {API_KEY}".encode()),
            ],
            content=body,
            extensions={"timeout": {"connect": REQUEST_TIMEOUT_S, "read": REQUEST_TIMEOUT_S,
                                    "write": REQUEST_TIMEOUT_S, "pool": REQUEST_TIMEOUT_S}},
        )

    def ping(self) -> bytes:
        """``GET /ping``'s body."""
        return self.client.request("GET", self.base_url + "/ping").content

    def settle(self) -> None:
        """Wait until the relay answers nothing and its cleanups (deletes) are done."""

        async def settled() -> None:
            with trio.fail_after(THREAD_TIMEOUT_S):
                await self.app.server.wait_no_requests()
                await self.app.janitor.wait_idle()

        trio.from_thread.run(settled, trio_token=self.trio_token)

    def undeleted(self) -> set[str]:
        """The upstream conversations created and not deleted, of both emulators (settle first)."""
        step, glm = self.step.record, self.glm.record
        return (set(step.chats_created) - set(step.chats_deleted)) | (
            set(glm.conversations_created) - set(glm.conversations_deleted)
        )


class ErrorRecords(logging.Handler):
    """Keeps the records of level ERROR and above (the relay logs an unhandled error so)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveRelay]:
    """Emulators and a relay in one trio run on a thread of their own, for the module."""
    ready = threading.Event()
    found: dict[str, Any] = {}

    async def main() -> None:
        stop = trio.Event()
        found["token"] = trio.lowlevel.current_trio_token()
        found["stop"] = stop
        async with trio.open_nursery() as nursery:
            # StepChat answers "Hello!" whatever it is asked; ChatGLM's scripted agent calls
            # tools when asked to and writes JSON when told to, else gives its demo answer
            step = StepEmulator(tokens=[STEP_TOKEN], behavior=StepBehavior(answer="Hello!"))
            glm = GlmEmulator(tokens=[GLM_TOKEN], behavior=GlmBehavior(video_polls=1))
            # an OpenAI-compatible upstream: its listed model takes the byte passthrough on
            # chat completions, its prefix serves any name; both dialects' neutral path too
            upstream = OpenAIEmulator(keys=[UPSTREAM_KEY])
            await nursery.start(step.serve)
            await nursery.start(glm.serve)
            await nursery.start(upstream.serve)
            settings = config.load(
                {
                    "host": "127.0.0.1",
                    "port": 0,
                    "api_keys": API_KEY,
                    "step_tokens": STEP_CREDENTIAL,
                    "glm_tokens": GLM_TOKEN,
                    "step_base_url": step.base_url,
                    "glm_base_url": glm.base_url,
                    "step_file_settle": 0.0,
                    "video_poll_interval": 0.001,
                    "openai_upstreams": [{
                        "name": "up", "base_url": upstream.base_url, "api_keys": [UPSTREAM_KEY],
                        "models": [UPSTREAM_MODELS[0]], "prefix": "up/"}],
                },
                environ={},
            )
            # b64_json downloads the images the ChatGLM emulator drew, on loopback: trust its
            # origin, as the demo does; every other loopback or private URL is refused.
            async with App(settings, trusted_file_origins={origin_of(glm.base_url)}) as app:
                addresses = await nursery.start(app.serve)
                found.update(address=addresses[0], app=app, step=step, glm=glm,
                             upstream=upstream)
                ready.set()
                await stop.wait()
                app.shutdown()
                await app.stopped.wait()
            nursery.cancel_scope.cancel()

    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    thread = threading.Thread(target=trio.run, args=(main,), name="fuzzed relay")
    thread.start()
    try:
        assert ready.wait(THREAD_TIMEOUT_S), "the relay did not start"
        with httpcore.ConnectionPool() as client:
            yield LiveRelay(f"http://{found['address']}", client, found["app"], found["step"],
                            found["glm"], found["upstream"], found["token"], errors.records)
    finally:
        logging.getLogger().removeHandler(errors)
        if "stop" in found:
            trio.from_thread.run_sync(found["stop"].set, trio_token=found["token"])
        thread.join(THREAD_TIMEOUT_S)
        assert not thread.is_alive(), "the relay did not stop"


# --- the generated bodies ---------------------------------------------------------------------

#: Leaves of JSON junk: wrong types, huge and negative numbers, odd strings.
junk_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([-1, 0, 2**31, 2**63, -(2**63) - 1, 10**30, -(10**30)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),  # NaN/Infinity: not JSON
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "\r\n", "\ud800", "😀" * 50, "a" * 5000]),
)
#: JSON junk of any shape, nested a few levels deep.
junk = st.recursive(
    junk_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
#: Media types for data URLs: usual, odd, malformed, with parameters or control characters.
USUAL_TYPES = ("image/png", "image/jpeg", "application/pdf", "text/plain;charset=utf-8")
#: Characters that must never reach an upstream header (RFC 9110 5.5), and some that may.
header_breakers = st.sampled_from(["\r\n", "\r\nX: 1", "\n", "\r", "\x00", "\t", "\x7f", " "])
media_types = st.one_of(
    st.sampled_from(USUAL_TYPES),
    st.sampled_from([
        "", "image", "/", "image/", "/png", "a/b/c", "IMAGE/PNG", "image/png;name=x.png",
        "image/svg+xml", "application/octet-stream", "x" * 300 + "/y", "image/png;;", "a b/c",
        "é/ü", "image/png;name=\"a\"",
    ]),
    st.builds(  # a usual type with a header breaker put in somewhere
        lambda mime, at, junk: mime[:at] + junk + mime[at:],
        st.sampled_from(USUAL_TYPES), st.integers(0, 24), header_breakers,
    ),
    st.builds("{}/{}".format, st.text(max_size=6), st.text(max_size=6)),
)
small_payloads = st.binary(max_size=64).map(lambda data: base64.b64encode(data).decode())


@st.composite
def data_urls(draw: st.DrawFn) -> str:
    """A data URL: any media type, base64 or not, payload valid or not."""
    mime = draw(media_types)
    flag = draw(st.sampled_from([";base64", "", ";BASE64", ";base64;x=y"]))
    payload = draw(st.one_of(small_payloads, st.text(max_size=16), st.just("@@@=")))
    return f"data:{mime}{flag},{payload}"


@st.composite
def http_urls(draw: st.DrawFn) -> str:
    """An http(s) URL on loopback (not an emulator's port) or on a name that does not resolve."""
    port_number = draw(st.sampled_from(["80", "1", "65535", "99999", ""]))
    host = draw(st.sampled_from([
        "127.0.0.1", "127.9.9.9", "[::1]", "localhost", "0.0.0.0", "0", "2130706433",  # noqa: S104
        "files.example.invalid", "x.invalid", "[::ffff:127.0.0.1]", "user@127.0.0.1",
    ]))
    scheme = draw(st.sampled_from(["http", "https", "HTTP"]))
    path = draw(st.sampled_from(["/a.png", "/", "", "/%0d%0aX:%201", "/x%00.pdf", "/../etc"]))
    port = f":{port_number}" if port_number else ""
    return f"{scheme}://{host}{port}{path}"


file_urls = st.one_of(
    data_urls(),
    http_urls(),
    st.sampled_from([
        "", "data:", "data:,", "http://", "file:///etc/passwd", "ftp://127.0.0.1/a",
        "javascript:alert(1)", "//127.0.0.1/a.png", "gopher://x.invalid/", " data:image/png,x",
    ]),
    st.text(max_size=20),
)


# Valid requests first; :func:`mutated` then breaks a few of their parts.

png_urls = st.just("data:image/png;base64," + base64.b64encode(TINY_PNG).decode())
content_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"),
         "image_url": st.one_of(st.fixed_dictionaries({"url": png_urls | file_urls}), png_urls)}
    ),
    st.fixed_dictionaries({"type": st.just("file"), "file_url": file_urls}),
    st.fixed_dictionaries(
        {"type": st.just("file"),
         "file": st.fixed_dictionaries(
             {"file_data": data_urls() | png_urls},
             optional={"filename": st.sampled_from(["a.png", "notes.txt", "", "..", "ä b.pdf"])},
         )}
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["input_audio", "refusal"])}),
)
any_content = st.one_of(st.text(max_size=40), st.lists(content_parts, min_size=1, max_size=3))

# The agents' fields (issue 14): tools, their schemas, calls and results, structured output.

#: Offered tools are named from these, so a named choice or a call often names an offered tool.
TOOL_NAMES = ("get_weather", "lookup", "send-mail")
#: Names OpenAI's rule refuses, or that would break a prompt line or a header.
ODD_TOOL_NAMES = ("", "a" * 65, "bad name", "x\r\ny", "\x00", "é", "a.b", "\u2028", "<tool_call>")
tool_names = st.sampled_from(TOOL_NAMES * 8 + ODD_TOOL_NAMES)  # one in four is odd
call_ids = st.sampled_from(["call_1", "call_2", "toolu_1", "", "x\r\ny", "call_" + "9" * 300])


def deep_schema(depth: int, via: str = "properties") -> dict[str, Any]:
    """A JSON Schema nested ``depth`` levels (``via``: properties, items or anyOf)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        if via == "properties":
            schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
        elif via == "items":
            schema = {"type": "array", "items": schema, "minItems": 1}
        else:
            schema = {"anyOf": [schema]}
    return schema


def deep_json(depth: int) -> Any:
    """A JSON document nested ``depth`` levels, objects and arrays in turn."""
    value: Any = 1
    for level in range(depth):
        value = {"a": value} if level % 2 else [value]
    return value


#: Schemas of one property: usual ones, and some a validator cannot use.
leaf_schemas = st.sampled_from([
    {"type": "string"}, {"type": "integer", "minimum": 0}, {"type": "number", "maximum": 1.5},
    {"type": "boolean"}, {"type": "string", "enum": ["a", "b"]}, {"type": "null"},
    {"type": "array", "items": {"type": "string"}}, {}, {"type": "string", "pattern": "["},
    {"$ref": "#/$defs/missing"}, {"$ref": "#"}, {"type": "nonsense"}, {"minimum": "x"},
    {"type": "integer", "multipleOf": 0.1, "exclusiveMaximum": 0},
])


@st.composite
def object_schemas(draw: st.DrawFn) -> dict[str, Any]:
    """An object schema of a few properties, some required, maybe closed."""
    properties = draw(st.dictionaries(st.sampled_from(["city", "n", "q", "unit", "x y", ""]),
                                      leaf_schemas, max_size=3))
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if properties:
        schema["required"] = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


schemas = st.one_of(
    object_schemas(),
    leaf_schemas,
    st.sampled_from([  # the last one deeper than the relay takes: a 400
        deep_schema(3), deep_schema(3, "anyOf"), deep_schema(40, "items"),
        deep_schema(40, "anyOf"), deep_schema(MAX_JSON_DEPTH + 30, "items"),
    ]),
)
#: What a call's ``arguments`` hold: JSON text of an object, or something else.
arguments_texts = st.one_of(
    st.builds(json.dumps, st.dictionaries(st.sampled_from(["city", "n"]),
                                          st.text(max_size=8) | st.integers(), max_size=2)),
    st.sampled_from(["", "{", "not json", "[]", "null", "{\"a\": NaN}", "</tool_call>",
                     json.dumps(deep_json(300))]),
)
call_inputs = st.one_of(  # a call's input as a JSON value (Anthropic's tool_use)
    st.dictionaries(st.sampled_from(["city", "n"]), st.text(max_size=8) | st.integers(),
                    max_size=2),
    st.builds(lambda depth: {"a": deep_json(depth)}, st.sampled_from([3, MAX_JSON_DEPTH + 30])),
)
#: A user text that asks the ChatGLM emulator's scripted agent for a call (its rule a).
call_asks = st.builds(
    lambda name, args: f"call {name} with {json.dumps(args)}",
    tool_names,
    st.dictionaries(st.sampled_from(["city", "n"]), st.text(max_size=6), max_size=2),
)
user_texts = st.one_of(st.text(max_size=40), call_asks)
#: Stop sequences: some cut the emulators' answers ("Hello!", the call blocks), some do not.
stop_sequences = st.one_of(
    st.sampled_from(["l", "!", "Hel", "你", "\n", "<tool_call>", "</tool_call>", "```", "{"]),
    st.text(max_size=4),
)
#: Token limits: small ones cut the answer; huge ones must not overflow anything.
token_limits = st.one_of(
    st.integers(1, 10**6),
    st.sampled_from([1, 2, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]),
)
json_formats = st.one_of(  # response_format of chat completions
    st.just({"type": "text"}),
    st.just({"type": "json_object"}),
    st.fixed_dictionaries(
        {"type": st.just("json_schema"),
         "json_schema": st.fixed_dictionaries(
             {"name": st.sampled_from(["answer", "x", "bad name", ""])},
             optional={"schema": schemas, "strict": st.booleans(),
                       "description": st.text(max_size=8)},
         )}
    ),
)

chat_functions = st.fixed_dictionaries(
    {"name": tool_names},
    optional={"description": st.text(max_size=20), "parameters": schemas,
              "strict": st.booleans()},
)
chat_tool_calls = st.lists(
    st.fixed_dictionaries(
        {"id": call_ids, "type": st.just("function"),
         "function": st.fixed_dictionaries({"name": tool_names, "arguments": arguments_texts})},
    ),
    min_size=1, max_size=2,
)
chat_history = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from([*sorted(ROLES) * 3, "bot", "USER", ""]),
         "content": any_content},
    ),
    st.fixed_dictionaries(  # an assistant turn that called tools
        {"role": st.just("assistant"), "tool_calls": chat_tool_calls},
        optional={"content": st.none() | st.text(max_size=20)},
    ),
    st.fixed_dictionaries(  # the legacy form of one call
        {"role": st.just("assistant"), "content": st.none(),
         "function_call": st.fixed_dictionaries({"name": tool_names,
                                                 "arguments": arguments_texts})},
    ),
    st.fixed_dictionaries(  # a tool's result
        {"role": st.just("tool"), "tool_call_id": call_ids, "content": any_content},
        optional={"name": tool_names},
    ),
    st.fixed_dictionaries(  # a legacy function's result
        {"role": st.just("function"), "name": tool_names, "content": st.text(max_size=20)},
    ),
)
#: A history, then a user message: the last message's files are the ones sent upstream.
valid_messages = st.builds(
    lambda history, last: [*history, last],
    st.lists(chat_history, max_size=3),
    st.fixed_dictionaries({"role": st.just("user"), "content": user_texts | any_content}),
)
chat_requests = st.fixed_dictionaries(
    {"messages": valid_messages, "stream": st.booleans()},
    optional={
        "model": st.sampled_from([*STEP_MODELS, *GLM_MODELS, *UPSTREAM_MODELS, "gpt-4o", ""]),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_tokens": token_limits,
        "max_completion_tokens": token_limits,
        "n": st.just(1),
        "stop": st.one_of(stop_sequences, st.lists(stop_sequences, max_size=5)),
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"),
                                                 "function": chat_functions}), max_size=3),
        "tool_choice": st.one_of(
            st.sampled_from(["none", "auto", "required"]),
            st.builds(lambda name: {"type": "function", "function": {"name": name}}, tool_names),
        ),
        "functions": st.lists(chat_functions, max_size=2),
        "function_call": st.one_of(st.sampled_from(["none", "auto"]),
                                   st.builds(lambda name: {"name": name}, tool_names)),
        "response_format": json_formats,
        "parallel_tool_calls": st.booleans(),
        "user": st.text(max_size=8),
        "conversation_id": st.sampled_from(["", None, UNKNOWN_CONVERSATION]),
        "use_search": st.booleans(),
    },
)

# Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens).

ANTHROPIC_IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"]
anthropic_sources = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("base64"),
         "media_type": st.sampled_from(ANTHROPIC_IMAGE_TYPES) | media_types,
         "data": st.just(base64.b64encode(TINY_PNG).decode()) | small_payloads},
    ),
    st.fixed_dictionaries({"type": st.just("url"), "url": png_urls | file_urls}),
)
anthropic_text = st.fixed_dictionaries({"type": st.just("text"), "text": user_texts})
anthropic_image = st.fixed_dictionaries({"type": st.just("image"), "source": anthropic_sources})
anthropic_document = st.fixed_dictionaries(
    {"type": st.just("document"),
     "source": st.one_of(
         anthropic_sources,
         st.fixed_dictionaries({"type": st.just("text"), "media_type": st.just("text/plain"),
                                "data": st.text(max_size=20)}),
     )},
)
anthropic_tool_result = st.fixed_dictionaries(
    {"type": st.just("tool_result"), "tool_use_id": call_ids},
    optional={"content": st.one_of(st.text(max_size=20),
                                   st.lists(anthropic_text | anthropic_image, max_size=2)),
              "is_error": st.booleans()},
)
anthropic_tool_use = st.fixed_dictionaries(
    {"type": st.just("tool_use"), "id": call_ids, "name": tool_names, "input": call_inputs},
)
anthropic_user = st.fixed_dictionaries(
    {"role": st.just("user"),
     "content": st.one_of(
         user_texts,
         st.lists(st.one_of(anthropic_text, anthropic_image, anthropic_document,
                            anthropic_tool_result), min_size=1, max_size=3),
     )},
)
anthropic_assistant = st.fixed_dictionaries(
    {"role": st.just("assistant"),
     "content": st.one_of(
         st.text(max_size=20),
         st.lists(st.one_of(anthropic_text, anthropic_tool_use,
                            st.just({"type": "thinking", "thinking": "hm", "signature": ""})),
                  min_size=1, max_size=3),
     )},
)
anthropic_tools = st.lists(
    st.fixed_dictionaries(
        {"name": tool_names, "input_schema": schemas},
        optional={"description": st.text(max_size=20),
                  "type": st.sampled_from(["custom", "web_search_20250305"])},
    ),
    max_size=3,
)
anthropic_requests = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["claude-sonnet-4-5", "step", GLM_MODELS[0], *UPSTREAM_MODELS,
                                  ""]),
        "max_tokens": token_limits,
        "messages": st.builds(
            lambda history, last: [*history, last],
            st.lists(anthropic_user | anthropic_assistant, max_size=3),
            anthropic_user,
        ),
        "stream": st.booleans(),
    },
    optional={
        "system": st.one_of(st.text(max_size=20), st.lists(anthropic_text, max_size=2)),
        "tools": anthropic_tools,
        "tool_choice": st.one_of(
            st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "none"])},
                                  optional={"disable_parallel_tool_use": st.booleans()}),
            st.fixed_dictionaries({"type": st.just("tool"), "name": tool_names}),
        ),
        "stop_sequences": st.lists(stop_sequences, max_size=5),
        "temperature": st.floats(0, 1),
        "top_k": st.integers(0, 500),
        "metadata": st.fixed_dictionaries({}, optional={"user_id": st.text(max_size=8)}),
        "thinking": st.just({"type": "enabled", "budget_tokens": 1024}),
    },
)

# OpenAI's Responses API (/v1/responses).

response_parts = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]),
                           "text": user_texts}),
    st.fixed_dictionaries({"type": st.just("input_image"), "image_url": png_urls | file_urls},
                          optional={"detail": st.just("auto")}),
    st.fixed_dictionaries(
        {"type": st.just("input_file"), "file_data": data_urls() | png_urls},
        optional={"filename": st.sampled_from(["a.png", "", "a\r\nb.txt", "x\x00.pdf"])},
    ),
    st.fixed_dictionaries({"type": st.just("input_file"), "file_url": file_urls}),
    st.fixed_dictionaries({"type": st.just("input_file"), "file_id": st.just("file-1")}),
)
response_message_items = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer"]),
     "content": st.one_of(user_texts, st.lists(response_parts, min_size=1, max_size=3))},
    optional={"type": st.just("message")},
)
response_items = st.one_of(
    response_message_items,
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": call_ids,
                           "name": tool_names, "arguments": arguments_texts}),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": call_ids,
         "output": st.one_of(st.text(max_size=20), st.lists(response_parts, max_size=2))},
    ),
    st.just({"type": "reasoning", "id": "rs_1", "summary": []}),
)
response_formats = st.one_of(  # text.format
    st.just({"type": "text"}),
    st.just({"type": "json_object"}),
    st.fixed_dictionaries(
        {"type": st.just("json_schema"), "name": st.sampled_from(["answer", "bad name"]),
         "schema": schemas},
        optional={"strict": st.booleans(), "description": st.text(max_size=8)},
    ),
)
responses_requests = st.fixed_dictionaries(
    {
        "input": st.one_of(
            user_texts,
            st.builds(
                lambda items, last: [*items, last],
                st.lists(response_items, max_size=3),
                st.fixed_dictionaries({"role": st.just("user"), "content": user_texts}),
            ),
        ),
        "stream": st.booleans(),
    },
    optional={
        "model": st.sampled_from([*STEP_MODELS, *GLM_MODELS, *UPSTREAM_MODELS, "gpt-4.1", ""]),
        "instructions": st.text(max_size=20),
        "tools": st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["function", "function", "web_search"]),
                 "name": tool_names},
                optional={"description": st.text(max_size=20), "parameters": schemas,
                          "strict": st.booleans()},
            ),
            max_size=3,
        ),
        "tool_choice": st.one_of(
            st.sampled_from(["none", "auto", "required"]),
            st.builds(lambda name: {"type": "function", "name": name}, tool_names),
        ),
        "text": st.fixed_dictionaries({}, optional={"format": response_formats}),
        "max_output_tokens": token_limits,
        "store": st.booleans(),
        "parallel_tool_calls": st.booleans(),
        "temperature": st.floats(0, 2),
        "metadata": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
        "user": st.text(max_size=8),
        "truncation": st.sampled_from(["auto", "disabled"]),
        "reasoning": st.just({"effort": "low"}),
        "include": st.just(["reasoning.encrypted_content"]),
    },
)

# The other POST routes.

token_requests = st.fixed_dictionaries(
    {"token": st.sampled_from([
        STEP_CREDENTIAL, GLM_TOKEN, "nobody@nothing", "bad-token", " ", "@", "a@", "@b",
        "x" * 5000, "dev\r\nX: 1@tok", "dévice@tök", "a,b", "dev@tok,glm",
    ])},
    optional={"provider": st.sampled_from(["step", "glm", "openai", "", "STEP"])},
)
image_requests = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=30)},
    optional={
        "model": st.sampled_from(["cogview-3", "", "65a232c082ff90a2ad2f15e2", "dall-e-3"]),
        "n": st.integers(1, 10),
        "response_format": st.sampled_from(RESPONSE_FORMATS),
        "size": st.just("1024x1024"),
        "quality": st.just("hd"),
    },
)
video_requests = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=30)},
    optional={
        "model": st.sampled_from(VIDEO_MODELS),
        "conversation_id": st.sampled_from(["", "none", UNKNOWN_CONVERSATION]),
        "image_url": png_urls | file_urls,
        "video_style": st.sampled_from(VIDEO_STYLES),
        "emotional_atmosphere": st.sampled_from(EMOTIONAL_ATMOSPHERES),
        "mirror_mode": st.sampled_from(MIRROR_MODES),
        "audio_id": st.sampled_from(["k-1", "nodash", "-"]),
    },
)


def _containers(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The paths of every object and array in ``value``, ``()`` for itself."""
    if isinstance(value, dict):
        yield path
        for key, item in value.items():
            yield from _containers(item, (*path, key))
    elif isinstance(value, list):
        yield path
        for index, item in enumerate(value):
            yield from _containers(item, (*path, index))


@st.composite
def mutated(draw: st.DrawFn, requests: st.SearchStrategy[Any]) -> Any:
    """A valid request from ``requests`` with up to three of its parts broken (none in a third
    of the bodies): a member or item replaced by junk, removed, doubled into an array, or
    joined by an unknown key."""
    request = copy.deepcopy(draw(requests))  # strategies may share their examples' objects
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        paths = list(_containers(request))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        if not path and draw(st.sampled_from([True, False, False, False])):
            request = draw(junk)  # the whole body: an array, a number, a string...
            continue
        parent: Any = request
        for step in path:
            parent = parent[step]
        keys: list[Any] = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        action = draw(st.sampled_from(["junk", "drop", "wrap", "add"] if keys else ["add"]))
        if action == "add":
            if isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(junk)
            else:
                parent.append(draw(junk))
            continue
        key = draw(st.sampled_from(keys))
        if action == "junk":
            parent[key] = draw(junk)
        elif action == "drop":
            del parent[key]
        else:
            parent[key] = [parent[key]]
    return request


def encode(value: Any) -> bytes:
    """``value`` as JSON text; NaN and Infinity come out as their non-JSON tokens."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def bodies(draw: st.DrawFn, requests: st.SearchStrategy[Any]) -> bytes:
    """A request body: mostly a generated request as JSON, sometimes broken on the wire."""
    body = encode(draw(mutated(requests)))
    damage = draw(st.sampled_from(["none"] * 12 + ["cut", "latin1", "bytes", "other-json"]))
    if damage == "cut":
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    if damage == "latin1":  # a byte that is not UTF-8, inside a string or outside
        at = draw(st.integers(0, len(body)))
        return body[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + body[at:]
    if damage == "bytes":
        return draw(st.binary(max_size=64))
    if damage == "other-json":
        return encode(draw(junk))
    return body


# --- what comes back --------------------------------------------------------------------------

RESPONSES_ROUTES = ("/v1/responses", "/step/v1/responses")
MESSAGES_ROUTES = ("/v1/messages", "/glm/v1/messages")
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"
ANTHROPIC_ROUTES = (*MESSAGES_ROUTES, COUNT_TOKENS_ROUTE)
#: The one 5xx a healthy upstream may cause: a whole structured answer that is not the JSON
#: asked for (the StepChat emulator answers "Hello!").
INVALID_JSON_OUTPUT = "invalid_json_output"


def check_error(response: httpcore.Response) -> None:
    """A 4xx with an OpenAI error object."""
    assert 400 <= response.status < 500, (response.status, response.content[:800])
    check_openai_error_shape(response)


def check_openai_error_shape(response: httpcore.Response) -> None:
    """An OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    error = orjson.loads(response.content)["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert {"param", "code"} <= error.keys()


def check_anthropic_error(response: httpcore.Response) -> None:
    """A 4xx with Anthropic's error object: ``{"type": "error", "error": {"type", "message"}}``."""
    assert 400 <= response.status < 500, (response.status, response.content[:800])
    answer = orjson.loads(response.content)
    assert answer["type"] == "error", answer
    assert isinstance(answer["error"]["type"], str)
    assert answer["error"]["type"]
    assert isinstance(answer["error"]["message"], str)
    assert answer["error"]["message"]


def asks_for_json(path: str, body: bytes) -> bool:
    """Whether ``body`` asks ``path`` for a whole (not streamed) structured answer."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(request, dict) or request.get("stream") is True:
        return False
    if path in RESPONSES_ROUTES:
        text = request.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    else:
        fmt = request.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def named_events(body: bytes) -> list[tuple[str, Any]]:
    """The ``(event, data)`` pairs of an SSE body whose events are named (comments skipped)."""
    events = []
    for block in body.split(b"\n\n"):
        name = None
        data = []
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data.append(line[6:])
            else:
                assert not line or line.startswith(b":"), block
        if name is None and not data:
            continue
        assert name is not None, block
        assert data, block
        payload = orjson.loads(b"\n".join(data))
        assert payload["type"] == name, (name, payload)
        events.append((name, payload))
    return events


def check_chat_answer(response: httpcore.Response, streamed: bool) -> None:
    """A chat completion, or a stream of chunks ending in ``[DONE]`` with no error."""
    if streamed:
        events = sse_events(response.content)
        assert events[-1] == b"[DONE]", events[-3:]
        for event in events[:-1]:
            chunk = orjson.loads(event)
            assert "error" not in chunk, chunk
            assert chunk["object"] == "chat.completion.chunk"
        return
    answer = orjson.loads(response.content)
    assert answer["object"] == "chat.completion"
    message = answer["choices"][0]["message"]
    assert isinstance(message["content"], str | None)
    for call in message.get("tool_calls") or ():
        assert isinstance(call["function"]["name"], str)
        assert isinstance(call["function"]["arguments"], str)


def check_responses_answer(response: httpcore.Response, streamed: bool) -> None:
    """A response object, or its event stream ending completed or incomplete, with no error."""
    if streamed:
        events = named_events(response.content)
        names = [name for name, _ in events]
        assert names[-1] in ("response.completed", "response.incomplete"), names[-3:]
        assert "error" not in names, events
        assert "response.failed" not in names, events
        numbers = [data["sequence_number"] for _, data in events]
        assert numbers == list(range(len(events))), numbers
        assert events[-1][1]["response"]["object"] == "response"
        return
    answer = orjson.loads(response.content)
    assert answer["object"] == "response", answer
    assert answer["status"] in ("completed", "incomplete"), answer
    assert isinstance(answer["output"], list)


def check_messages_answer(response: httpcore.Response, streamed: bool) -> None:
    """A ``message``, or Anthropic's event stream ending in ``message_stop`` with no error."""
    if streamed:
        events = named_events(response.content)
        names = [name for name, _ in events]
        assert names[0] == "message_start", names[:3]
        assert names[-1] == "message_stop", names[-3:]
        assert "error" not in names, events
        return
    answer = orjson.loads(response.content)
    assert answer["type"] == "message", answer
    assert isinstance(answer["content"], list)
    assert answer["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence", "tool_use")


def check_answer(path: str, response: httpcore.Response, body: bytes = b"") -> None:
    """An error in the route's dialect (a 4xx; for a whole structured answer, maybe the one
    allowed 502), or the route's success shape; never another 5xx."""
    if path in ANTHROPIC_ROUTES:
        if response.status != 200:
            check_anthropic_error(response)
            return
    elif response.status >= 500 and (path in CHAT_ROUTES or path in RESPONSES_ROUTES):
        assert response.status == 502, (path, response.status, response.content[:800])
        assert asks_for_json(path, body), (path, response.content[:800])
        check_openai_error_shape(response)
        assert orjson.loads(response.content)["error"]["code"] == INVALID_JSON_OUTPUT
        return
    elif response.status != 200:
        check_error(response)
        return
    content_type = dict(response.headers).get(b"content-type", b"")
    streamed = content_type.startswith(b"text/event-stream")
    if path in CHAT_ROUTES:
        check_chat_answer(response, streamed)
        return
    if path in RESPONSES_ROUTES:
        check_responses_answer(response, streamed)
        return
    if path in MESSAGES_ROUTES:
        check_messages_answer(response, streamed)
        return
    assert not streamed, path
    answer = orjson.loads(response.content)
    if path == COUNT_TOKENS_ROUTE:
        assert answer.keys() == {"input_tokens"}, answer
        assert type(answer["input_tokens"]) is int
        assert answer["input_tokens"] > 0
    elif path == "/token/check":
        assert isinstance(answer["live"], bool)
    else:
        assert isinstance(answer["data"], list)
        assert isinstance(answer["created"], int)


def check_no_errors_logged(live: LiveRelay) -> None:
    """Nothing the relay logged was an error (an unhandled exception, a failed cleanup)."""
    logged = [logging.Formatter().format(record)[-3000:] for record in live.errors]
    live.errors.clear()
    assert not logged, logged


def exchange(live: LiveRelay, path: str, body: bytes) -> None:
    """Send one generated body to ``path``, check what comes back and what the relay logged."""
    check_answer(path, live.post(path, body), body)
    check_no_errors_logged(live)
    if path in CHAT_ROUTES and b'"conversation_id"' in body:
        live.may_keep += 1


# --- the tests --------------------------------------------------------------------------------

BREAKING_DATA_URLS = ("data:a/b\r\nX: 1;base64,aGk=", "data:image/png\x00;base64,aGk=")
#: Nested deeper than orjson writes (254 levels), not deeper than it reads (1024).
DEEP_SCHEMA = deep_schema(300)
DEEP_ARGUMENTS = json.dumps({"a": deep_json(300)})
HUGE_NUMBERS = (2**63, 2**64, 10**30)
#: A schema nested as deep as orjson reads (1024 levels with the body around it), as JSON
#: text (the standard library's encoder would reach Python's recursion limit).
DEEPEST_SCHEMA = b'{"a":' * 1015 + b"1" + b"}" * 1015


def with_deepest(trap: dict[str, Any], *path: str | int) -> bytes:
    """``trap`` as JSON text with :data:`DEEPEST_SCHEMA` at ``path`` (which must hold 0)."""
    parent: Any = trap
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = "@DEEPEST@"
    return encode(trap).replace(b'"@DEEPEST@"', DEEPEST_SCHEMA)


CONTROL_NAMES = ("get\r\nweather", "get_weather\x00", "\x1b[31m")
USER_HI = [{"role": "user", "content": "hi"}]
#: Requests that must succeed, streamed and whole, on both providers: a call asked of the
#: ChatGLM emulator's scripted agent, structured output, a stop sequence, a one-token limit.
ASK_CALL = 'call get_weather with {"city": "Paris"}'
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"]}
WORKING = [
    {"model": model, "stream": stream, **fields}
    for model in ("step", GLM_MODELS[0])
    for stream in (False, True)
    for fields in (
        {"ask": ASK_CALL, "tools": True},
        {"ask": "Say hi.", "json": True},
        {"ask": "Say hello.", "stop": ["l"], "max_tokens": 1},
    )
]


def chat_working(case: dict[str, Any]) -> dict[str, Any]:
    """A :data:`WORKING` case as a chat completion request."""
    request: dict[str, Any] = {"model": case["model"], "stream": case["stream"],
                               "messages": [{"role": "user", "content": case["ask"]}]}
    if "tools" in case:
        request["tools"] = [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.",
            "parameters": WEATHER_SCHEMA}}]
    if "json" in case:
        request["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "weather", "schema": WEATHER_SCHEMA, "strict": True}}
    if "stop" in case:
        request.update(stop=case["stop"], max_tokens=case["max_tokens"])
    return request


def messages_working(case: dict[str, Any]) -> dict[str, Any]:
    """A :data:`WORKING` case as an Anthropic Messages request (no structured output there)."""
    request: dict[str, Any] = {"model": case["model"], "stream": case["stream"],
                               "max_tokens": case.get("max_tokens", 256),
                               "messages": [{"role": "user", "content": case["ask"]}]}
    if "tools" in case:
        request["tools"] = [{"name": "get_weather", "input_schema": WEATHER_SCHEMA}]
    if "stop" in case:
        request["stop_sequences"] = case["stop"]
    return request


def responses_working(case: dict[str, Any]) -> dict[str, Any]:
    """A :data:`WORKING` case as a Responses API request (no stop sequences there)."""
    request: dict[str, Any] = {"model": case["model"], "stream": case["stream"],
                               "input": case["ask"]}
    if "tools" in case:
        request["tools"] = [{"type": "function", "name": "get_weather",
                             "parameters": WEATHER_SCHEMA}]
    if "json" in case:
        request["text"] = {"format": {"type": "json_schema", "name": "weather",
                                      "schema": WEATHER_SCHEMA, "strict": True}}
    if "max_tokens" in case:
        request["max_output_tokens"] = case["max_tokens"]
    return request


#: Known traps, always tried first (hypothesis' @example): header breakers in a file's media
#: type, a well-formed but unknown conversation id, an unknown role; huge limits, tool names
#: with control characters, schemas and arguments nested deeper than orjson writes.
CHAT_TRAPS: list[Any] = [
    *map(chat_working, WORKING),
    *(
        {"model": model, "messages": [{"role": "user", "content": [part]}]}
        for model in ("step", GLM_MODELS[0])
        for url in BREAKING_DATA_URLS
        for part in (
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "file", "file_url": url},
            {"type": "file", "file": {"file_data": url, "filename": "a.bin"}},
        )
    ),
    *(
        {"model": model, "conversation_id": UNKNOWN_CONVERSATION, "stream": stream,
         "messages": [{"role": "user", "content": "hi"}]}
        for model in ("step", GLM_MODELS[0])
        for stream in (False, True)
    ),
    {"messages": [{"role": "bot", "content": "hi"}]},
    *({"messages": USER_HI, key: number}
      for key in ("max_tokens", "max_completion_tokens") for number in HUGE_NUMBERS),
    *({"messages": USER_HI, "tools": [{"type": "function", "function": {"name": name}}]}
      for name in CONTROL_NAMES),
    {"messages": USER_HI, "functions": [{"name": CONTROL_NAMES[0]}],
     "function_call": {"name": CONTROL_NAMES[0]}},
    *(
        {"model": model, "stream": stream, "messages": USER_HI,
         "tools": [{"type": "function",
                    "function": {"name": "get_weather", "parameters": DEEP_SCHEMA}}]}
        for model in ("step", GLM_MODELS[0])
        for stream in (False, True)
    ),
    *(
        {"model": model, "stream": stream, "messages": USER_HI,
         "response_format": {"type": "json_schema",
                             "json_schema": {"name": "deep", "schema": DEEP_SCHEMA,
                                             "strict": True}}}
        for model in ("step", GLM_MODELS[0])
        for stream in (False, True)
    ),
    {"messages": [{"role": "assistant", "content": None,
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "get_weather",
                                                "arguments": DEEP_ARGUMENTS}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                  *USER_HI]},
    {"messages": USER_HI, "stop": ["a", "b", "c", "d", "e"]},
    with_deepest({"messages": USER_HI, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": 0}}]}, "tools", 0, "function", "parameters"),
    with_deepest({"messages": USER_HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "f", "schema": 0, "strict": True}}}, "response_format", "json_schema", "schema"),
]
ANTHROPIC_HI: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": USER_HI}
MESSAGES_TRAPS: list[Any] = [
    *map(messages_working, WORKING),
    *(
        {**ANTHROPIC_HI, "messages": [{"role": "user", "content": [block]}]}
        for url in BREAKING_DATA_URLS
        for block in (
            {"type": "image", "source": {"type": "url", "url": url}},
            {"type": "document", "source": {"type": "url", "url": url}},
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "image", "source": {"type": "url", "url": url}}]},
        )
    ),
    *(
        {**ANTHROPIC_HI, "messages": [{"role": "user", "content": [
            {"type": kind, "source": {"type": "base64", "media_type": "image/png\r\nX: 1",
                                      "data": "aGk="}}]}]}
        for kind in ("image", "document")
    ),
    *({**ANTHROPIC_HI, "max_tokens": number} for number in HUGE_NUMBERS),
    *({**ANTHROPIC_HI, "tools": [{"name": name, "input_schema": {"type": "object"}}],
       "tool_choice": {"type": "tool", "name": name}} for name in CONTROL_NAMES),
    *(
        {**ANTHROPIC_HI, "model": model, "stream": stream,
         "tools": [{"name": "get_weather", "input_schema": DEEP_SCHEMA}]}
        for model in ("step", GLM_MODELS[0])
        for stream in (False, True)
    ),
    {**ANTHROPIC_HI, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                           "name": "get_weather",
                                           "input": json.loads(DEEP_ARGUMENTS)}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "sunny"}]},
    ]},
    with_deepest({**ANTHROPIC_HI, "tools": [{"name": "f", "input_schema": 0}]},
                 "tools", 0, "input_schema"),
    with_deepest({**ANTHROPIC_HI, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f",
                                           "input": 0}]},
        *USER_HI,
    ]}, "messages", 0, "content", 0, "input"),
]
RESPONSES_TRAPS: list[Any] = [
    *map(responses_working, WORKING),
    *(
        {"input": [{"role": "user", "content": [part]}]}
        for url in BREAKING_DATA_URLS
        for part in (
            {"type": "input_image", "image_url": url},
            {"type": "input_file", "file_url": url},
            {"type": "input_file", "file_data": url, "filename": "a.bin"},
        )
    ),
    {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_data": "data:text/plain;base64,aGk=",
         "filename": "a\r\nX: 1.txt"}]}]},
    *({"input": "hi", "max_output_tokens": number} for number in HUGE_NUMBERS),
    *({"input": "hi", "tools": [{"type": "function", "name": name}]} for name in CONTROL_NAMES),
    *(
        {"model": model, "input": "hi", "stream": stream,
         "tools": [{"type": "function", "name": "get_weather", "parameters": DEEP_SCHEMA}]}
        for model in ("step", GLM_MODELS[0])
        for stream in (False, True)
    ),
    *(
        {"model": model, "input": "hi", "stream": stream,
         "text": {"format": {"type": "json_schema", "name": "deep", "schema": DEEP_SCHEMA,
                             "strict": True}}}
        for model in ("step", GLM_MODELS[0])
        for stream in (False, True)
    ),
    {"input": [{"type": "function_call", "call_id": "call_1", "name": "get_weather",
                "arguments": DEEP_ARGUMENTS},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
               {"role": "user", "content": "and now?"}]},
    {"input": "hi", "previous_response_id": "resp_1"},
    with_deepest({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": 0}]},
                 "tools", 0, "parameters"),
    with_deepest({"input": "hi", "text": {"format": {"type": "json_schema", "name": "f",
                                                     "schema": 0}}}, "text", "format", "schema"),
]
OTHER_TRAPS: dict[str, list[Any]] = {
    "/token/check": [{"token": "dev\r\nX: 1@tok"}, {"token": "x" * 5000, "provider": "glm"}],
    "/v1/images/generations": [{"prompt": "\x00", "response_format": "b64_json"}],
    "/v1/videos/generations": [
        *({"prompt": "p", "image_url": url} for url in BREAKING_DATA_URLS),
        {"prompt": "p", "conversation_id": UNKNOWN_CONVERSATION},
    ],
    COUNT_TOKENS_ROUTE: [
        {"model": "claude-sonnet-4-5", "messages": USER_HI,
         "tools": [{"name": "get_weather", "input_schema": DEEP_SCHEMA}]},
        with_deepest({"model": "m", "messages": USER_HI,
                      "tools": [{"name": "f", "input_schema": 0}]}, "tools", 0, "input_schema"),
        *({**ANTHROPIC_HI, "max_tokens": number} for number in HUGE_NUMBERS),
        *({"model": "m", "messages": USER_HI,
           "tools": [{"name": name, "input_schema": {}}]} for name in CONTROL_NAMES),
    ],
}


def run_examples(
    live: LiveRelay, path: str, requests: st.SearchStrategy[Any], traps: list[Any]
) -> None:
    """Send ``traps``, then generated bodies, to ``path``; check each answer, then /ping."""

    @settings(max_examples=EXAMPLES)
    @given(body=bodies(requests))
    def examples(body: bytes) -> None:
        exchange(live, path, body)

    for trap in traps:
        examples = example(body=trap if isinstance(trap, bytes) else encode(trap))(examples)
    live.settle()
    undeleted = live.undeleted()
    live.may_keep = 0
    examples()
    assert live.ping() == b"pong"
    live.settle()
    check_no_errors_logged(live)
    left = live.undeleted() - undeleted
    assert len(left) <= live.may_keep, (left, live.may_keep)  # every other one was deleted
    assert not live.glm.record.handler_errors


@pytest.mark.parametrize("path", CHAT_ROUTES)
def test_generated_chat_requests_never_get_a_5xx(live: LiveRelay, path: str) -> None:
    """Generated chat completion bodies, near-valid or broken, with or without the agents'
    fields, on each chat route: each answer is a 4xx OpenAI error, a 502
    ``invalid_json_output`` for a whole structured answer, or a whole completion (or stream),
    and the relay answers /ping after."""
    run_examples(live, path, chat_requests, CHAT_TRAPS)


@pytest.mark.parametrize("path", MESSAGES_ROUTES)
def test_generated_messages_requests_never_get_a_5xx(live: LiveRelay, path: str) -> None:
    """Generated Anthropic Messages bodies: each answer is a 4xx in Anthropic's error shape or
    a whole message (or its event stream, ending in message_stop), and /ping answers after."""
    run_examples(live, path, anthropic_requests, MESSAGES_TRAPS)


@pytest.mark.parametrize("path", RESPONSES_ROUTES)
def test_generated_responses_requests_never_get_a_5xx(live: LiveRelay, path: str) -> None:
    """Generated Responses API bodies: each answer is a 4xx OpenAI error, a 502
    ``invalid_json_output`` for a whole structured answer, or a response object (or its event
    stream, ending completed or incomplete), and /ping answers after."""
    run_examples(live, path, responses_requests, RESPONSES_TRAPS)


@pytest.mark.parametrize(
    ("path", "requests"),
    [
        ("/token/check", token_requests),
        ("/v1/images/generations", image_requests),
        ("/v1/videos/generations", video_requests),
        (COUNT_TOKENS_ROUTE, anthropic_requests),
    ],
    ids=["token-check", "images", "videos", "count-tokens"],
)
def test_generated_requests_to_the_other_post_routes_never_get_a_5xx(
    live: LiveRelay, path: str, requests: st.SearchStrategy[Any]
) -> None:
    """Generated bodies for /token/check, the media routes and count_tokens: each answer is a
    4xx error in the route's dialect or the route's success shape, and /ping answers after."""
    run_examples(live, path, requests, OTHER_TRAPS[path])


def test_the_openai_compatible_upstream_is_reached(live: LiveRelay) -> None:
    """The generated bodies can name the OpenAI-compatible upstream: a valid one, on every
    dialect, reaches it (so its paths are among those fuzzed), listed name and prefix alike."""
    before = len(live.upstream.record.chats)
    for path, body in (
        ("/v1/chat/completions", {"model": UPSTREAM_MODELS[0], "messages": USER_HI}),
        ("/v1/chat/completions", {"model": UPSTREAM_MODELS[1], "messages": USER_HI,
                                  "stream": True}),
        ("/v1/responses", {"model": UPSTREAM_MODELS[0], "input": "hi"}),
        ("/v1/messages", {"model": UPSTREAM_MODELS[1], "max_tokens": 50,
                          "messages": USER_HI}),
    ):
        exchange(live, path, encode(body))
    assert len(live.upstream.record.chats) - before == 4
