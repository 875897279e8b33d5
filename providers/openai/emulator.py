"""A fake OpenAI-compatible server (chat completions) for tests, benchmarks and demo mode.

Theory of operation
-------------------
:class:`OpenAIEmulator` is a real HTTP/1.1 server on trio + h11
(:mod:`providers.emulator_http`) that answers the two calls an
OpenAI-compatible platform (DeepSeek, a local vLLM or Ollama, StepFun's or
Zhipu's open platforms) offers the relay:

- ``POST /v1/chat/completions``, streamed (``"stream": true``: HTTP 200
  ``text/event-stream``, one ``data: {chunk}`` event per delta, then
  ``data: [DONE]``) or whole (one ``chat.completion`` JSON object);
- ``GET /v1/models``: ``{"object": "list", "data": [{"id", "object": "model", ...}]}``
  listing :attr:`OpenAIEmulator.models`; ``behavior.models_error`` answers it
  with that status and error body instead, and ``behavior.models_hold``
  makes it wait for that event first (a hung upstream).

Its base URL (:attr:`OpenAIEmulator.base_url`) ends in ``/v1``, as an
OpenAI SDK's ``base_url`` does. Every call must carry ``Authorization:
Bearer <key>``, one of ``keys`` (any non-empty key when ``keys`` is None);
anything else is HTTP 401 with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``. A key in
``behavior.busy_keys`` is answered 429 (``rate_limit_exceeded``), and
``behavior.http_error`` answers every chat with that status and error body,
before any byte of an answer.

What the answer says, first match wins (:func:`plan_answer`):

1. tools are offered and the last user message asks ``call NAME with
   {JSON}`` (the scripted agent's phrase, :mod:`providers.emulator_agent`):
   native ``tool_calls`` (the first delta names the call, the arguments
   follow in ``chunk_chars`` pieces), finish reason ``tool_calls``; a
   ``tool_choice`` naming a function, or ``"required"`` without a request,
   calls that function (the first tool) with ``{}``;
2. the conversation ends in tool results (``role: "tool"`` messages):
   ``The tool NAME returned: CONTENT`` per result, NAME found through the
   assistant message's ``tool_calls`` by ``tool_call_id``;
3. ``response_format`` asks for JSON: a document (an instance of the
   ``json_schema``'s schema, else ``{"answer": <last user text>}``);
4. ``behavior.answer`` when a test set one, else a demo answer quoting the
   last user message.

``behavior.text_frames`` replaces the cutting of (3-4) by ``chunk_chars``;
``behavior.reasoning`` is sent first as ``reasoning_content`` deltas (as
DeepSeek's reasoner does), cut the same way; ``stamp=True`` replaces the
answer by ``stamp_frames`` content deltas of ``[ts:<monotonic_ns>]`` each,
the monotonic time at which the frame is written (built after its pause,
exactly as the StepChat emulator does), which ``bench overhead`` reads.

The stream is a lazy *script* of ready-to-write bytes (the SSE event, in its
HTTP/1.1 chunk when the client speaks HTTP/1.1; the constant part of every
content chunk is formatted once per answer) and the actions pause, stall and
drop. A pause (``frame_delay_s``) comes before each delta frame, never after
the last: the finish chunk follows at once. Knobs
``stall_after`` and ``drop_after`` count delta frames already written
(reasoning, content, tool-call deltas; not the opening role chunk).
``end_error`` replaces the finish chunk with an in-band error event
``data: {"error": {...}}`` (then ``[DONE]``), as some platforms do when a
stream fails after it started; ``first_error`` (an error object, sent as
it is) makes such an event the stream's first and only one, before any
role or content chunk (then ``[DONE]``), for the keys in
``first_error_keys`` (every key when None), as a platform does that fails
the request after its 200 head; ``lead_comments`` SSE comments go before a
stream's first event, as a platform keeps a slow stream open. With
``stream_options.include_usage`` every chunk carries ``"usage": null`` and
a last chunk with ``"choices": []`` carries the usage, as OpenAI does; a
whole completion always carries it.
Token counts are rough: a token per four characters (at least one).

Record: :class:`OpenAIRecord` lists the key every chat request presented
(refused ones too) and every accepted one's key and decoded body unless
``keep_record=False`` (``--no-record``: a long benchmark run keeps counters
only), counts answer streams started, finished
and aborted (the client left first), and wakes :meth:`OpenAIEmulator.wait_until`
on every change.

Traps: a connection handler never raises (bad HTTP is answered 400, a body
over :data:`MAX_BODY_BYTES` 413, a bug 500, all with OpenAI's error body);
the watcher of :meth:`ClientConnection.watched` cancels a stream the moment
the client leaves, even in a delay or a stall.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import h11
import orjson
import trio

from protocol.errors import PayloadTooLarge
from providers.emulator_agent import requested_calls, results_sentence, schema_instance
from providers.emulator_http import (
    ClientConnection,
    Listener,
    Reply,
    Request,
    http_chunk,
    serve_connection,
)
from providers.emulator_main import run_emulator
from providers.emulator_script import (
    Action,
    Outcome,
    StreamTally,
    add_answer_flags,
    add_pacing_flags,
    add_record_flag,
    behavior_options,
    stamp_text,
    text_pieces,
    write_script,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger(__name__)

# --- wire constants (OpenAI's chat completions API) ---------------------------
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
SSE_TYPE = b"text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"

#: Largest request body accepted.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: The models ``/v1/models`` lists by default.
DEFAULT_MODELS = ("emu-chat", "emu-reasoner")
#: Characters per token of the rough usage count.
CHARS_PER_TOKEN = 4
#: The ``created`` time of every answer (a fixed second keeps chunks reproducible).
CREATED_S = 1_700_000_000
_MAX_QUOTE_CHARS = 120


@dataclass
class OpenAIBehavior:
    """What the emulator answers; mutable, tests change it between requests.

    The names are those of ``providers.step.emulator.StepBehavior`` where
    both have the knob. Counts ``*_after`` are delta frames already written;
    a count at or beyond their number fires after the last one, before the
    finish chunk. Stall wins over drop.
    """

    answer: str | None = None
    chunk_chars: int = 6
    text_frames: list[str] | None = None
    #: thinking text sent first, as ``reasoning_content`` deltas
    reasoning: str | None = None
    first_delay_s: float = 0.0
    frame_delay_s: float = 0.0
    write_size: int | None = None
    pack_all: bool = False
    stamp: bool = False
    stamp_frames: int = 100
    stall_after: int | None = None
    drop_after: int | None = None
    #: (status, type, message): every chat is answered so, before any byte
    http_error: tuple[int, str, str] | None = None
    #: (type, message): an in-band error event instead of the finish chunk
    end_error: tuple[str, str] | None = None
    #: keys answered 429 ``rate_limit_exceeded``
    busy_keys: set[str] = field(default_factory=set)
    #: an error object sent in-band as a stream's first event (then ``[DONE]``)
    first_error: dict[str, Any] | None = None
    #: the keys whose streams get ``first_error`` (None: every key)
    first_error_keys: set[str] | None = None
    #: SSE comments sent before a stream's first event, one read each
    #: (``: PROCESSING``, as OpenRouter keeps a slow stream open)
    lead_comments: int = 0
    #: (status, type, message): ``GET /v1/models`` is answered so
    models_error: tuple[int, str, str] | None = None
    #: when set, ``GET /v1/models`` waits for it before it answers
    models_hold: trio.Event | None = None
    #: the finish reason of a text answer
    finish_reason: str = "stop"
    #: when set, each answer stream waits for it after its response head
    hold: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class ChatCall:
    """One ``POST /v1/chat/completions`` as received: the bearer key and the body."""

    key: str
    body: dict[str, Any]


@dataclass
class OpenAIRecord:
    """What the emulator was asked, in order.

    ``streams_finished`` counts answer streams whose script ran to its end (a
    scripted ``drop_after`` included); ``streams_aborted`` those the client
    left first. ``completions`` counts whole (non-streamed) answers.
    ``keys`` has the key of every chat request, refused ones included;
    ``chats`` the accepted ones (their key and body); ``model_keys`` the key
    of every ``GET /v1/models``, refused ones included.
    """

    chats: list[ChatCall] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    model_keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    completions: int = 0
    streams_started: int = 0
    streams_finished: int = 0
    streams_aborted: int = 0
    active_streams: int = 0
    auth_failures: int = 0
    refused: int = 0


Script = Iterator[bytes | Action]


class _Refusal(Exception):
    """An OpenAI error answer: HTTP ``status`` with ``{"error": {...}}``."""

    def __init__(self, status: int, kind: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.code = code

    def reply(self) -> Reply:
        return error_reply(self.status, self.kind, self.message, self.code)


def error_body(kind: str, message: str, code: str | None = None) -> bytes:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    error = {"message": message, "type": kind, "param": None, "code": code}
    return orjson.dumps({"error": error})


def error_reply(status: int, kind: str, message: str, code: str | None = None) -> Reply:
    """A whole error answer with OpenAI's error body."""
    return Reply(status, error_body(kind, message, code))


def _refusal(exc: Exception) -> Reply:
    """The answer to a request that broke (``providers.emulator_http.Refuse``)."""
    if isinstance(exc, h11.RemoteProtocolError):
        return error_reply(exc.error_status_hint, "invalid_request_error", str(exc))
    if isinstance(exc, PayloadTooLarge):
        return error_reply(413, "invalid_request_error", "request body too large")
    return error_reply(500, "server_error", "emulator error")  # a bug, logged by the helper


def tokens_of(text: str) -> int:
    """The rough token count of ``text`` (a token per four characters, at least one)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN)) if text else 0


# --- what to answer (sans-IO) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One native tool call the answer makes."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class AnswerPlan:
    """What one chat is answered: text or tool calls, and how the text is cut."""

    texts: list[str]
    calls: list[ToolCall]
    finish_reason: str


def _text_of(content: object) -> str:
    """A message's text: a string, or the ``text`` parts of a list joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def _tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    names: list[str] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            names.append(name)
    return tuple(names)


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _trailing_results(messages: list[Any]) -> list[tuple[str, str]]:
    """The ``(name, content)`` of the tool messages that end the conversation."""
    names: dict[str, str] = {}
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in calls if isinstance(calls, list) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(call.get("id"), str):
                names[call["id"]] = str(function.get("name", ""))
    results: list[tuple[str, str]] = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        name = names.get(str(message.get("tool_call_id", "")), "")
        results.append((name, _text_of(message.get("content")).strip()))
    results.reverse()
    return results


def _forced_tool(body: dict[str, Any], tools: tuple[str, ...]) -> str | None:
    """The function ``tool_choice`` requires, or None if the model may choose."""
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return name if isinstance(name, str) else None
    if choice == "required" and tools:
        return tools[0]
    return None


def _json_document(body: dict[str, Any], last_user: str) -> str | None:
    """The JSON text ``response_format`` asks for, or None if it asks for none."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        try:
            return orjson.dumps(schema_instance(schema if schema is not None else {})).decode()
        except orjson.JSONEncodeError:
            return None
    if fmt.get("type") == "json_object":
        quote = " ".join(last_user.split())[:_MAX_QUOTE_CHARS]
        return orjson.dumps({"answer": quote}).decode()
    return None


def demo_answer(last_user: str) -> str:
    """The friendly answer of demo mode: quotes the last user message."""
    quote = " ".join(last_user.split())
    if len(quote) > _MAX_QUOTE_CHARS:
        quote = quote[: _MAX_QUOTE_CHARS - 1] + "…"
    return (
        f'Hello from the OpenAI-compatible emulator! You wrote: "{quote}". '
        "This answer is scripted: no model ran."
    )


def plan_answer(
    body: dict[str, Any], behavior: OpenAIBehavior, call_ids: Iterator[int]
) -> AnswerPlan:
    """What to answer ``body`` (see the module comment, first match wins)."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    tools = _tool_names(body)
    last_user = _last_user_text(messages)
    results = _trailing_results(messages)

    def cut(text: str) -> list[str]:
        return list(text_pieces(text, behavior.chunk_chars))

    if tools and not results and body.get("tool_choice") != "none":
        forced = _forced_tool(body, tools)
        requests = requested_calls(last_user, tools)
        if forced is not None:
            requests = [r for r in requests if r.name == forced]
        calls = [ToolCall(f"call_{next(call_ids)}", r.name, r.arguments) for r in requests]
        if not calls and forced is not None:
            calls = [ToolCall(f"call_{next(call_ids)}", forced, "{}")]
        if calls:
            return AnswerPlan([], calls, "tool_calls")
    if behavior.text_frames is not None:
        return AnswerPlan(list(behavior.text_frames), [], behavior.finish_reason)
    if results:
        return AnswerPlan(cut(results_sentence(results)), [], behavior.finish_reason)
    answer = _json_document(body, last_user)
    if answer is None:
        answer = behavior.answer if behavior.answer is not None else demo_answer(last_user)
    return AnswerPlan(cut(answer), [], behavior.finish_reason)


# --- the answer stream ----------------------------------------------------------


class _Chunks:
    """The SSE events of one streamed answer, with their constant parts formatted once."""

    def __init__(self, answer_id: str, model: str, usage: bool, chunked: bool) -> None:
        head = orjson.dumps({"id": answer_id, "object": "chat.completion.chunk",
                             "created": CREATED_S, "model": model})
        # ``{"id":...,"model":"m"`` then the choices; a delta is spliced in between
        self._prefix = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":'
        tail = b',"usage":null' if usage else b""
        self._suffix = b',"logprobs":null,"finish_reason":null}]' + tail + b"}\n\n"
        self._content_prefix = self._prefix + b'{"content":'
        self._content_suffix = b"}" + self._suffix
        self._head = head
        self._tail = tail
        self._chunked = chunked

    def _wrap(self, event: bytes) -> bytes:
        return http_chunk(event) if self._chunked else event

    def content(self, text: str) -> bytes:
        """A content delta (the hot path: one JSON string encoded)."""
        return self._wrap(self._content_prefix + orjson.dumps(text) + self._content_suffix)

    def delta(self, delta: dict[str, Any]) -> bytes:
        """Any other delta (role, reasoning, tool calls)."""
        return self._wrap(self._prefix + orjson.dumps(delta) + self._suffix)

    def finish(self, reason: str) -> bytes:
        choice = b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
        body = self._head[:-1] + b',"choices":' + choice + orjson.dumps(reason) + b"}]"
        return self._wrap(b"data: " + body + self._tail + b"}\n\n")

    def usage(self, usage: dict[str, Any]) -> bytes:
        body = self._head[:-1] + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}"
        return self._wrap(b"data: " + body + b"\n\n")

    def error(self, kind: str, message: str) -> bytes:
        return self._wrap(b"data: " + error_body(kind, message) + b"\n\n")

    def error_event(self, error: dict[str, Any]) -> bytes:
        """``data: {"error": error}``, the error object as it was given."""
        return self._wrap(b"data: " + orjson.dumps({"error": error}) + b"\n\n")

    def done(self) -> bytes:
        return self._wrap(DONE_EVENT)

    def comment(self) -> bytes:
        """An SSE comment line: no event, kept alive."""
        return self._wrap(b": PROCESSING\n\n")


def _usage(prompt_tokens: int, completion: str, reasoning: str) -> dict[str, Any]:
    completion_tokens = tokens_of(completion) + tokens_of(reasoning)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": tokens_of(reasoning)}
    return usage


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    texts = [
        _text_of(m.get("content")) for m in (messages if isinstance(messages, list) else [])
        if isinstance(m, dict)
    ]
    return sum(tokens_of(text) for text in texts)


class OpenAIEmulator(Listener):
    """An OpenAI-compatible server on loopback that records requests and misbehaves on request.

    Attributes:
        behavior: what to answer; replace it or change its fields at any time
            (a request reads it when it starts).
        record: what was asked so far.
        models: what ``/v1/models`` lists.
        port: the bound port, once :meth:`serve` has started.
    """

    url_path = "/v1"  # base_url is an SDK's base URL

    def __init__(
        self,
        *,
        keys: Iterable[str] | None = None,
        behavior: OpenAIBehavior | None = None,
        models: Iterable[str] = DEFAULT_MODELS,
        keep_record: bool = True,
    ) -> None:
        """Create an emulator; it does not listen until :meth:`serve`.

        Args:
            keys: accepted API keys; ``None`` accepts any non-empty key.
            behavior: initial behaviour; default :class:`OpenAIBehavior()`.
            models: the model ids ``/v1/models`` lists (any model is answered).
            keep_record: keep the per-request lists of :attr:`record`; False
                keeps only its counters (long benchmark runs).
        """
        self._keys = frozenset(keys) if keys is not None else None
        self.behavior = behavior if behavior is not None else OpenAIBehavior()
        self.record = OpenAIRecord()
        self.models = list(models)
        self._keep = keep_record
        super().__init__()
        self._answer_ids = itertools.count(1)
        self._call_ids = itertools.count(1)
        self._lot = trio.lowlevel.ParkingLot()

    # --- public API --------------------------------------------------------


    async def wait_until(
        self,
        predicate: Callable[[OpenAIRecord], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 (the interface tests and bench rely on)
    ) -> None:
        """Wait until ``predicate(record)`` holds; checked after every recorded change.

        Raises:
            trio.TooSlowError: it did not hold within ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            while not predicate(self.record):
                await self._lot.park()

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve HTTP/1.1 on one connection until either side ends it, then close it.

        Never raises (see the module comment).
        """
        await serve_connection(stream, self._respond, _refusal, max_body_bytes=MAX_BODY_BYTES)

    # --- requests ------------------------------------------------------------

    def _changed(self) -> None:
        self._lot.unpark_all()

    def _key(self, request: Request, *, chat: bool = False, listing: bool = False) -> str:
        """The request's API key; a chat's is recorded in ``keys``, a model list's in
        ``model_keys``, refused or not.

        Raises:
            _Refusal: 401 ``invalid_api_key`` (counted in ``auth_failures``).
        """
        key = ""
        for name, value in request.headers:
            if name == b"authorization":
                scheme, _, rest = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    key = rest.strip()
                break
        if chat and self._keep:
            self.record.keys.append(key)
        if listing and self._keep:
            self.record.model_keys.append(key)
        if not key or (self._keys is not None and key not in self._keys):
            self.record.auth_failures += 1
            self._changed()
            message = "Incorrect API key provided." if key else "You didn't provide an API key."
            raise _Refusal(401, "invalid_request_error", message, "invalid_api_key")
        return key

    async def _respond(self, request: Request, conn: ClientConnection) -> bool:
        """Route one request and answer it; returns whether the connection may be reused."""
        path = request.target.decode("latin-1").partition("?")[0]
        if self._keep:
            self.record.paths.append(path)
        self._changed()
        try:
            if path == MODELS_PATH:
                if request.method != b"GET":
                    raise _Refusal(405, "invalid_request_error", "use GET")
                self._key(request, listing=True)
                self._changed()
                behavior = self.behavior
                if behavior.models_hold is not None:
                    await behavior.models_hold.wait()
                if behavior.models_error is not None:
                    raise _Refusal(*behavior.models_error)
                await conn.reply(Reply(200, self._models_body()))
                return True
            if path != CHAT_PATH:
                raise _Refusal(404, "invalid_request_error", f"Invalid URL (/{path.lstrip('/')})")
            if request.method != b"POST":
                raise _Refusal(405, "invalid_request_error", "use POST")
            key = self._key(request, chat=True)
            return await self._chat(conn, key, request.body)
        except _Refusal as refusal:
            self.record.refused += 1
            self._changed()
            await conn.reply(refusal.reply())
            return True

    def _models_body(self) -> bytes:
        data = [
            {"id": model, "object": "model", "created": CREATED_S, "owned_by": "emulator"}
            for model in self.models
        ]
        return orjson.dumps({"object": "list", "data": data})

    def _parse(self, body: bytes) -> dict[str, Any]:
        """The chat request body.

        Raises:
            _Refusal: 400 when it is not a JSON object with a model and messages.
        """
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Refusal(400, "invalid_request_error", "body is not JSON") from None
        if not isinstance(value, dict):
            raise _Refusal(400, "invalid_request_error", "body is not a JSON object")
        if not isinstance(value.get("model"), str) or not value["model"]:
            raise _Refusal(400, "invalid_request_error", "you must provide a model parameter")
        messages = value.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Refusal(400, "invalid_request_error", "messages must be a non-empty array")
        return value

    async def _chat(self, conn: ClientConnection, key: str, raw: bytes) -> bool:
        behavior = self.behavior
        body = self._parse(raw)
        if self._keep:
            self.record.chats.append(ChatCall(key, body))
        self._changed()
        if key in behavior.busy_keys:
            message = "Rate limit reached for requests"
            raise _Refusal(429, "requests", message, "rate_limit_exceeded")
        if behavior.http_error is not None:
            status, kind, message = behavior.http_error
            raise _Refusal(status, kind, message)
        plan = plan_answer(body, behavior, self._call_ids)
        answer_id = f"chatcmpl-emu{next(self._answer_ids)}"
        if body.get("stream") is True:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            chunks = _Chunks(answer_id, body["model"], usage, conn.chunked)
            tally = StreamTally(self.record, self._changed)
            outcome: Outcome | None = None
            first_error = behavior.first_error
            if behavior.first_error_keys is not None and key not in behavior.first_error_keys:
                first_error = None
            try:
                script = self._script(behavior, plan, chunks, _prompt_tokens(body), usage,
                                      first_error)
                write = partial(self._write_script, conn, behavior, tally, script)
                outcome = await conn.watched(write)
            finally:
                tally.settle(outcome or Outcome.ABORTED)
            return outcome is Outcome.COMPLETE
        await conn.reply(Reply(200, self._completion(answer_id, body, behavior, plan)))
        self.record.completions += 1
        self._changed()
        return True

    def _completion(
        self, answer_id: str, body: dict[str, Any], behavior: OpenAIBehavior, plan: AnswerPlan
    ) -> bytes:
        """A whole ``chat.completion`` object."""
        text = "".join(
            stamp_text() for _ in range(behavior.stamp_frames)
        ) if behavior.stamp else "".join(plan.texts)
        reasoning = behavior.reasoning or ""
        message: dict[str, Any] = {"role": "assistant", "content": text if not plan.calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if plan.calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in plan.calls
            ]
        completion = "".join(c.arguments for c in plan.calls) + text
        return orjson.dumps({
            "id": answer_id,
            "object": "chat.completion",
            "created": CREATED_S,
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": plan.finish_reason}],
            "usage": _usage(_prompt_tokens(body), completion, reasoning),
        })

    def _deltas(self, behavior: OpenAIBehavior, plan: AnswerPlan, chunks: _Chunks
                ) -> Iterator[Callable[[], bytes]]:
        """The delta frames, each made when called (after its pause: stamps are write times)."""
        step = max(1, behavior.chunk_chars)
        reasoning = behavior.reasoning or ""
        for start in range(0, len(reasoning), step):
            piece = reasoning[start : start + step]
            yield partial(chunks.delta, {"reasoning_content": piece})
        if behavior.stamp:
            for _ in range(max(0, behavior.stamp_frames)):
                yield lambda: chunks.content(stamp_text())
            return
        for index, call in enumerate(plan.calls):
            opening = {"index": index, "id": call.id, "type": "function",
                       "function": {"name": call.name, "arguments": ""}}
            yield partial(chunks.delta, {"tool_calls": [opening]})
            for start in range(0, len(call.arguments), step):
                piece = call.arguments[start : start + step]
                part = {"index": index, "function": {"arguments": piece}}
                yield partial(chunks.delta, {"tool_calls": [part]})
        for text in plan.texts:
            yield partial(chunks.content, text)

    def _script(self, behavior: OpenAIBehavior, plan: AnswerPlan, chunks: _Chunks,
                prompt_tokens: int, usage: bool, first_error: dict[str, Any] | None = None,
                ) -> Script:
        """The answer stream: role chunk, deltas, finish (or error), usage, ``[DONE]``;
        or ``first_error``'s event and ``[DONE]`` alone; ``lead_comments`` before either."""
        for _ in range(behavior.lead_comments):
            yield chunks.comment()
            yield Action.PAUSE
        if first_error is not None:
            yield chunks.error_event(first_error)
            yield chunks.done()
            return
        yield chunks.delta({"role": "assistant", "content": ""})
        for sent, make in enumerate(self._deltas(behavior, plan, chunks)):
            cut = _interruption(behavior, sent)
            if cut is not None:
                yield cut
                return
            yield Action.PAUSE
            yield make()  # after the pause: a stamp is the time of the write
        cut = _interruption(behavior, math.inf)
        if cut is not None:
            yield cut
            return
        if behavior.end_error is not None:
            kind, message = behavior.end_error
            yield chunks.error(kind, message)
            yield chunks.done()
            return
        yield chunks.finish(plan.finish_reason)
        if usage:
            completion = "".join(c.arguments for c in plan.calls) + "".join(plan.texts)
            if behavior.stamp:
                completion = "x" * (24 * behavior.stamp_frames)
            yield chunks.usage(_usage(prompt_tokens, completion, behavior.reasoning or ""))
        yield chunks.done()

    async def _write_script(
        self, conn: ClientConnection, behavior: OpenAIBehavior, tally: StreamTally, script: Script
    ) -> Outcome:
        """Write the head and the script (:func:`providers.emulator_script.write_script`)."""
        head = h11.Response(
            status_code=200,
            headers=[(b"content-type", SSE_TYPE), (b"cache-control", b"no-cache")],
            reason=b"OK",
        )
        return await write_script(conn, behavior, tally, head, script)


def _interruption(behavior: OpenAIBehavior, sent: float) -> Action | None:
    """STALL or DROP once ``sent`` delta frames are out, if a knob says so."""
    if behavior.stall_after is not None and behavior.stall_after <= sent:
        return Action.STALL
    if behavior.drop_after is not None and behavior.drop_after <= sent:
        return Action.DROP
    return None


# --- command line -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CliOptions:
    """What ``python -m providers.openai.emulator`` was asked to do."""

    host: str
    port: int
    keys: tuple[str, ...] | None
    behavior: OpenAIBehavior
    models: tuple[str, ...]
    keep_record: bool = True


def parse_args(argv: list[str] | None = None) -> CliOptions:
    """Parse the command line of :func:`main`.

    Raises:
        SystemExit: bad arguments or ``--help`` (argparse's behaviour).
    """
    parser = argparse.ArgumentParser(
        prog="python -m providers.openai.emulator",
        description="A fake OpenAI-compatible server for tests, benchmarks and demos.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8003, help="port to bind (0: any free)")
    add_answer_flags(parser, chunk_help="characters per content delta")
    parser.add_argument("--reasoning", help="reasoning_content sent before the answer")
    add_pacing_flags(parser, frame="delta frame")
    parser.add_argument(
        "--key", action="append", dest="keys", help="accepted API key (repeatable; default any)"
    )
    parser.add_argument(
        "--model", action="append", dest="models", help="a model /v1/models lists (repeatable)"
    )
    add_record_flag(parser)
    args = parser.parse_args(argv)
    behavior = OpenAIBehavior(reasoning=args.reasoning, **behavior_options(args))
    return CliOptions(
        host=args.host,
        port=args.port,
        keys=tuple(args.keys) if args.keys else None,
        behavior=behavior,
        models=tuple(args.models) if args.models else DEFAULT_MODELS,
        keep_record=not args.no_record,
    )


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then exit 0; prints ``listening on <base url>`` once bound.

    The base URL printed ends in ``/v1`` (an OpenAI SDK's ``base_url``).
    """
    options = parse_args(argv)
    emulator = OpenAIEmulator(
        keys=options.keys,
        behavior=options.behavior,
        models=options.models,
        keep_record=options.keep_record,
    )
    run_emulator(emulator, options.host, options.port)


if __name__ == "__main__":
    main()
