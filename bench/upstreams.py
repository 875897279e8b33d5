"""Upstream providers of ``bench overhead``: their emulator, relay flags and direct client.

Theory of operation
-------------------
``bench overhead`` measures the relay against *the wire*: the same emulated
upstream read once by the benchmark client itself (direct mode, the floor:
loopback plus parsing) and once through the relay. What depends on the
upstream is gathered in one :class:`Provider`:

- how to start its emulator as a process, in stamp mode
  (:meth:`Provider.emulator_command`; the emulator prints
  ``listening on <base url>`` once bound);
- the default relay command that points a relay at that emulator
  (:attr:`Provider.relay_cmd`, with ``{python}``, ``{host}``, ``{port}``,
  ``{upstream}`` and ``{token}`` placeholders) and the model name to ask for;
- a direct client (:meth:`Provider.open_direct`) that speaks the upstream's
  native protocol and fills the same :class:`~bench.readers.StreamRecord` as
  the relay half does, stamps included.

StepChat (:data:`STEP`) is complete: RegisterDevice once per scenario (the
relay, too, caches its session), then per stream CreateChat and
SendMessageStream on one keep-alive connection, the Connect envelopes read
by :class:`~bench.readers.ConnectStreamReader`, and DelChat after the stream
has ended (not timed: the relay deletes after the answer as well). Chat
creation is inside time to first token in both modes.

ChatGLM (:data:`GLM`): its emulator streams SSE *snapshots* whose text is
cumulative (PROTOCOLS.md 3.9). The direct client
(:class:`bench.glm_direct.GlmDirect`) exchanges the refresh token once per
scenario, then per stream signs and POSTs the stream request, takes the
stamps from the new suffix of each snapshot only, and deletes the
conversation after the stream (untimed). The emulator is started with
``--no-stream-limit`` and the relay with a ``--glm-max-streams`` far above
any scenario's streams: the site (and both defaults) allow one stream per
account, and a scenario runs all its streams on one account.

OpenAI-compatible (:data:`OPENAI`, ``--provider openai``): the gateway
benchmark. ``providers.openai.emulator`` streams ``chat.completion.chunk``
SSE, one content delta per stamped frame; its printed base URL ends in
``/v1``. The direct client (:class:`OpenAIDirect`) POSTs the same request a
gateway forwards and reads the answer with the relay half's own reader
(:class:`~bench.readers.OpenAIStreamReader`), so both columns parse the
same bytes the same way. The relay is pointed at the emulator through
``RELAY_OPENAI_UPSTREAMS`` (``env`` in the command, the JSON's braces doubled
for the placeholders); any other gateway (LiteLLM's proxy:
:mod:`bench.litellm`) through ``--relay-cmd``.

The emulators are started with ``--no-record``, so that their memory does
not grow with the number of requests of a long run.

Relay commands may hold ``{workers}``: ``bench overhead`` runs the
``sustained`` scenario once per worker count (:data:`SUSTAINED_WORKERS`), and
every other scenario with one worker.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from typing import Protocol

import trio

from bench.glm_direct import GlmDirect
from bench.readers import ConnectStreamReader, StreamRecord
from bench.runners import chat_body, request_headers, run_openai_stream
from bench.wire import Endpoint, HttpConnection, header
from protocol.errors import RelayError, RemoteProtocolError
from protocol.openai import ContentPart, Message
from providers.glm.client import DEFAULT_MODEL as GLM_DEFAULT_MODEL
from providers.step import prompt as step

#: The prompt both modes send (its content does not matter to the emulator).
BENCH_PROMPT = "Say something, benchmark."
#: Bound on the untimed DelChat after a direct stream.
DELETE_TIMEOUT_S = 2.0
_CONNECT_TYPE = step.CONNECT_CONTENT_TYPE
#: ``--glm-max-streams`` of the relay: more than any scenario opens (the relay refuses 0).
GLM_RELAY_MAX_STREAMS = 100_000
#: The worker counts the ``sustained`` scenario runs a relay command holding ``{workers}`` with.
SUSTAINED_WORKERS = (1, 2)


@dataclass(frozen=True, slots=True)
class EmulatorParams:
    """What the emulator streams in one scenario (its command-line knobs).

    Attributes:
        frames: stamped text frames per stream.
        frame_delay_s: pause before each frame after the first write.
        first_delay_s: pause before the first frame of a stream.
        stall_after: go silent (hold the stream open) after this many text frames.
        pack_all: the whole response in one write (a burst: every frame at once).
    """

    frames: int
    frame_delay_s: float = 0.0
    first_delay_s: float = 0.0
    stall_after: int | None = None
    pack_all: bool = False


def emulator_argv(python: str, module: str, params: EmulatorParams, *extra: str) -> list[str]:
    """argv of an emulator ``module`` in stamp mode on a free port, without a request record.

    Args:
        python: the interpreter.
        module: ``providers.step.emulator`` or ``providers.glm.emulator``.
        params: what to stream.
        extra: more flags, after the common ones.
    """
    argv = [
        python,
        "-m",
        module,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--stamp",
        "--frames",
        str(params.frames),
        "--frame-delay-s",
        repr(params.frame_delay_s),
        "--first-delay-s",
        repr(params.first_delay_s),
        "--no-record",
    ]
    if params.stall_after is not None:
        argv += ["--stall-after", str(params.stall_after)]
    if params.pack_all:
        argv.append("--pack-all")
    return [*argv, *extra]


class DirectClient(Protocol):
    """Reads the emulator's native stream itself: the floor of every figure."""

    async def run_stream(self, record: StreamRecord, *, timeout_s: float) -> None:
        """Run one stream and fill ``record``; never raises except on cancellation."""


class Provider(Protocol):
    """Everything ``bench overhead`` needs to know about one upstream."""

    @property
    def name(self) -> str:
        """The ``--provider`` name."""

    @property
    def model(self) -> str:
        """The ``model`` to ask the relay for."""

    @property
    def credential(self) -> str:
        """The upstream credential the relay and the direct client use."""

    @property
    def relay_cmd(self) -> str:
        """The default relay command template (see the module docstring)."""

    def emulator_command(self, python: str, params: EmulatorParams) -> list[str]:
        """argv of the emulator process for ``params``, binding a free port."""

    async def open_direct(self, base_url: str) -> DirectClient:
        """A direct client of the emulator at ``base_url`` (sessions set up).

        Raises:
            RelayError: the emulator refused the setup.
        """


# --- StepChat -------------------------------------------------------------


class StepDirect:
    """A direct StepChat client for one registered device (PROTOCOLS.md 2.3-2.6)."""

    def __init__(self, endpoint: Endpoint, device_id: str, access: str, refresh: str) -> None:
        self._endpoint = endpoint
        self._base = endpoint.base_url
        self._device = device_id
        self._cookie = step.session_cookie(access, refresh, device_id)
        self._prompt = step.build_prompt(
            [Message("user", (ContentPart("text", BENCH_PROMPT),), False)]
        )
        self._create_headers = self._headers(step.new_chat_referer(self._base), b"application/json")

    @classmethod
    async def register(cls, base_url: str, credential: str) -> StepDirect:
        """RegisterDevice with ``deviceId@Oasis-Token`` ``credential``; a client for its session.

        Raises:
            RelayError: the call failed (``AuthError`` when refused).
        """
        endpoint = Endpoint.parse(base_url)
        device_id, token = step.parse_credential(credential)
        headers = step.session_headers(
            endpoint.base_url,
            step.register_cookie(token),
            device_id,
            step.new_chat_referer(endpoint.base_url),
            step.JSON_CONTENT_TYPE,
        )
        connection = await HttpConnection.open(endpoint)
        try:
            await connection.send_request(
                b"POST", step.REGISTER_DEVICE_PATH, headers, step.register_body()
            )
            response = await connection.read_response()
            body = await connection.read_body()
        finally:
            await connection.aclose()
        error = step.parse_unary_error(response.status_code, body)
        if error is not None:
            raise error
        access, refresh = step.parse_register(body)
        return cls(endpoint, device_id, access, refresh)

    def _headers(self, referer: str, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return step.session_headers(self._base, self._cookie, self._device, referer, content_type)

    async def _unary(
        self, connection: HttpConnection, path: str, body: bytes, referer: str
    ) -> bytes:
        headers = (
            self._create_headers
            if path == step.CREATE_CHAT_PATH
            else self._headers(referer, step.JSON_CONTENT_TYPE)
        )
        await connection.send_request(b"POST", path, headers, body)
        response = await connection.read_response()
        answer = await connection.read_body()
        error = step.parse_unary_error(response.status_code, answer)
        if error is not None:
            status = response.status_code
            raise RelayError(error.message, code=f"http_{status}" if status != 200 else "bad_http")
        return answer

    async def run_stream(self, record: StreamRecord, *, timeout_s: float) -> None:
        """CreateChat, SendMessageStream (timed and checked), then DelChat (untimed)."""
        record.start_ns = time.monotonic_ns()
        connection: HttpConnection | None = None
        try:
            with trio.move_on_after(timeout_s) as scope:
                connection = await HttpConnection.open(self._endpoint)
                answer = await self._unary(
                    connection, step.CREATE_CHAT_PATH, step.create_chat_body(), ""
                )
                chat_id = step.parse_create_chat(answer)
                if not connection.next_cycle():
                    await connection.aclose()
                    connection = await HttpConnection.open(self._endpoint)
                referer = step.chat_referer(self._base, chat_id)
                headers = self._headers(referer, _CONNECT_TYPE)
                body = step.send_message_body(chat_id, self._prompt)
                await connection.send_request(b"POST", step.SEND_MESSAGE_PATH, headers, body)
                response = await connection.read_response()
                kind = header(response, b"content-type").split(b";")[0].strip().lower()
                if response.status_code != 200 or kind != _CONNECT_TYPE:
                    detail = await connection.read_body(4096)
                    record.fail(
                        f"http_{response.status_code}",
                        detail.decode("utf-8", "replace"),
                        time.monotonic_ns(),
                    )
                    return
                await connection.stream_body(ConnectStreamReader(record, stamps=True))
            if scope.cancelled_caught:
                record.timed_out(timeout_s)
                return
            assert connection is not None  # the scope was not cancelled
            if record.done and connection.next_cycle():
                with trio.move_on_after(DELETE_TIMEOUT_S):
                    await self._unary(
                        connection, step.DEL_CHAT_PATH, step.delete_chat_body(chat_id), referer
                    )
        except RemoteProtocolError as exc:  # a cut-off, or an answer that does not parse
            record.fail(exc.code or "bad_frame", exc.message, time.monotonic_ns())
        except RelayError as exc:
            record.fail(exc.code or "bad_http", exc.message, time.monotonic_ns())
        finally:
            if connection is not None:
                await connection.aclose()


@dataclass(frozen=True, slots=True)
class StepProvider:
    """StepChat: ``providers.step.emulator`` and a direct Connect client."""

    name: str = "step"
    model: str = "step"
    #: ``deviceId@Oasis-Token``; the emulator (started without ``--token``) accepts any.
    credential: str = "benchdevice@bench-oasis-token"
    relay_cmd: str = (
        "{python} -m relay serve --host {host} --port {port} --step-base-url {upstream}"
        " --step-tokens {token} --workers {workers} --log-level warning"
    )

    def emulator_command(self, python: str, params: EmulatorParams) -> list[str]:
        """argv of ``python -m providers.step.emulator`` in stamp mode on a free port."""
        return emulator_argv(python, "providers.step.emulator", params)

    async def open_direct(self, base_url: str) -> DirectClient:
        """RegisterDevice once; the client then creates a chat per stream."""
        return await StepDirect.register(base_url, self.credential)


STEP = StepProvider()


# --- ChatGLM --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GlmProvider:
    """ChatGLM: ``providers.glm.emulator`` and a direct snapshot client."""

    name: str = "glm"
    #: A name the relay routes to ChatGLM (``glm`` prefix), on the default assistant.
    model: str = GLM_DEFAULT_MODEL
    #: A refresh token; the emulator (started without ``--token``) accepts any.
    credential: str = "bench-glm-refresh-token"
    relay_cmd: str = (
        "{python} -m relay serve --host {host} --port {port} --glm-base-url {upstream}"
        f" --glm-tokens {{token}} --glm-max-streams {GLM_RELAY_MAX_STREAMS}"
        " --workers {workers} --log-level warning"
    )

    def emulator_command(self, python: str, params: EmulatorParams) -> list[str]:
        """argv of ``python -m providers.glm.emulator`` in stamp mode, any number of streams."""
        return emulator_argv(python, "providers.glm.emulator", params, "--no-stream-limit")

    async def open_direct(self, base_url: str) -> DirectClient:
        """Exchange the refresh token once; the client then POSTs a stream per stream."""
        return await GlmDirect.login(
            base_url, self.credential, BENCH_PROMPT, delete_timeout_s=DELETE_TIMEOUT_S
        )


GLM = GlmProvider()


# --- OpenAI-compatible ----------------------------------------------------

#: The model the openai scenarios ask for (one the emulator lists by default).
OPENAI_MODEL = "emu-chat"
#: The upstream key of the openai scenarios; the emulator accepts only it (``--key``).
OPENAI_KEY = "sk-bench-upstream-key"


class OpenAIDirect:
    """A direct client of an OpenAI-compatible emulator: one streamed POST per stream.

    Args:
        endpoint: the emulator's base (``http://host:port/v1``).
        api_key: sent as ``Authorization: Bearer``.
        model: the ``model`` of every request.
    """

    def __init__(self, endpoint: Endpoint, api_key: str, model: str) -> None:
        self._endpoint = endpoint
        self._body = chat_body(model, BENCH_PROMPT)
        self._headers = request_headers(api_key)

    async def run_stream(self, record: StreamRecord, *, timeout_s: float) -> None:
        """POST ``/chat/completions`` with ``"stream": true`` and read it, stamps included."""
        await run_openai_stream(
            self._endpoint, self._body, self._headers, record, timeout_s=timeout_s, stamps=True
        )


def openai_upstreams_json(upstream: str, key: str, model: str) -> str:
    """``RELAY_OPENAI_UPSTREAMS`` naming one upstream at ``upstream`` that serves ``model``."""
    return json.dumps(
        [{"name": "bench", "base_url": upstream, "api_keys": [key], "models": [model]}],
        separators=(",", ":"),
    )


def _template_literal(text: str) -> str:
    """``text`` inside a relay command template: braces doubled, quoted for the shell."""
    return shlex.quote(text.replace("{", "{{").replace("}", "}}"))


@dataclass(frozen=True, slots=True)
class OpenAIProvider:
    """Any OpenAI-compatible platform: ``providers.openai.emulator`` read directly."""

    name: str = "openai"
    model: str = OPENAI_MODEL
    credential: str = OPENAI_KEY
    relay_cmd: str = (
        "env RELAY_OPENAI_UPSTREAMS="
        + _template_literal(openai_upstreams_json("<upstream>", "<token>", OPENAI_MODEL))
        .replace("<upstream>", "{upstream}")
        .replace("<token>", "{token}")
        + " {python} -m relay serve --host {host} --port {port} --workers {workers}"
        " --log-level warning"
    )

    def emulator_command(self, python: str, params: EmulatorParams) -> list[str]:
        """argv of ``python -m providers.openai.emulator`` in stamp mode, one key accepted."""
        return emulator_argv(
            python, "providers.openai.emulator", params, "--key", self.credential
        )

    async def open_direct(self, base_url: str) -> DirectClient:
        """No session to set up: a client that POSTs each stream with the key."""
        return OpenAIDirect(Endpoint.parse(base_url), self.credential, self.model)


OPENAI = OpenAIProvider()

#: Providers by ``--provider`` name.
PROVIDERS: dict[str, Provider] = {"step": STEP, "glm": GLM, "openai": OPENAI}
