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
emulators stay healthy, so a 5xx is always the relay's fault. Known traps
are pinned with ``@example`` and always tried first. The other bodies are
mostly valid requests with a few parts swapped for junk: wrong types,
unknown roles, odd content parts, data URLs with strange media types, file
URLs naming loopback or names under ``.invalid`` (RFC 6761: they never
resolve, so no fetch leaves the machine), huge and negative numbers, deep
nesting; and some are not JSON, or not UTF-8, at all.

Every answer must be a 4xx OpenAI error object or the route's success
shape (a completion, an SSE stream ending in ``[DONE]`` without an error
event, ``{"live": bool}``, a list of images or videos), and the relay must
still answer ``/ping`` after each test.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpcore
import orjson
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.openai import ROLES
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
#: Examples per test and route: the whole module takes about 10 s with the CI profile.
EXAMPLES = 60


@dataclass
class LiveRelay:
    """The relay in its thread, and a client pool to it."""

    base_url: str
    client: httpcore.ConnectionPool

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
            step = StepEmulator(tokens=[STEP_TOKEN], behavior=StepBehavior(answer="Hello!"))
            glm = GlmEmulator(
                tokens=[GLM_TOKEN], behavior=GlmBehavior(answer="你好", video_polls=1)
            )
            await nursery.start(step.serve)
            await nursery.start(glm.serve)
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
                },
                environ={},
            )
            # b64_json downloads the images the ChatGLM emulator drew, on loopback: trust its
            # origin, as the demo does; every other loopback or private URL is refused.
            async with App(settings, trusted_file_origins={origin_of(glm.base_url)}) as app:
                addresses = await nursery.start(app.serve)
                found["address"] = addresses[0]
                ready.set()
                await stop.wait()
                app.shutdown()
                await app.stopped.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), name="fuzzed relay")
    thread.start()
    try:
        assert ready.wait(THREAD_TIMEOUT_S), "the relay did not start"
        with httpcore.ConnectionPool() as client:
            yield LiveRelay(f"http://{found['address']}", client)
    finally:
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
#: A history, then a user message: the last message's files are the ones sent upstream.
valid_messages = st.builds(
    lambda history, last: [*history, last],
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from([*sorted(ROLES) * 3, "bot", "USER", ""]),
             "content": any_content},
        ),
        max_size=2,
    ),
    st.fixed_dictionaries({"role": st.just("user"), "content": any_content}),
)
chat_requests = st.fixed_dictionaries(
    {"messages": valid_messages, "stream": st.booleans()},
    optional={
        "model": st.sampled_from([*STEP_MODELS, *GLM_MODELS, "gpt-4o", ""]),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_tokens": st.integers(1, 10**6),
        "n": st.just(1),
        "stop": st.lists(st.text(max_size=4), max_size=2),
        "tools": st.builds(list),
        "user": st.text(max_size=8),
        "conversation_id": st.sampled_from(["", None, UNKNOWN_CONVERSATION]),
        "use_search": st.booleans(),
    },
)
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
    """A valid request from ``requests`` with up to three of its parts broken: a member or
    item replaced by junk, removed, doubled into an array, or joined by an unknown key."""
    request = draw(requests)
    for _ in range(draw(st.integers(0, 3))):
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


def check_error(response: httpcore.Response) -> None:
    """A 4xx with an OpenAI error object."""
    assert 400 <= response.status < 500, (response.status, response.content[:800])
    error = orjson.loads(response.content)["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert {"param", "code"} <= error.keys()


def check_answer(path: str, response: httpcore.Response) -> None:
    """A 4xx OpenAI error, or the route's success shape; never a 5xx."""
    assert response.status < 500, (path, response.status, response.content[:800])
    if response.status != 200:
        check_error(response)
        return
    content_type = dict(response.headers).get(b"content-type", b"")
    if path in CHAT_ROUTES and content_type.startswith(b"text/event-stream"):
        events = sse_events(response.content)
        assert events[-1] == b"[DONE]", events[-3:]
        for event in events[:-1]:
            chunk = orjson.loads(event)
            assert "error" not in chunk, chunk
            assert chunk["object"] == "chat.completion.chunk"
        return
    answer = orjson.loads(response.content)
    if path in CHAT_ROUTES:
        assert answer["object"] == "chat.completion"
        assert isinstance(answer["choices"][0]["message"]["content"], str | None)
    elif path == "/token/check":
        assert isinstance(answer["live"], bool)
    else:
        assert isinstance(answer["data"], list)
        assert isinstance(answer["created"], int)


def exchange(live: LiveRelay, path: str, body: bytes) -> None:
    """Send one generated body to ``path`` and check what comes back."""
    check_answer(path, live.post(path, body))


# --- the tests --------------------------------------------------------------------------------

BREAKING_DATA_URLS = ("data:a/b\r\nX: 1;base64,aGk=", "data:image/png\x00;base64,aGk=")
#: Known traps, always tried first (hypothesis' @example): header breakers in a file's media
#: type, a well-formed but unknown conversation id, an unknown role.
CHAT_TRAPS = [
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
]
OTHER_TRAPS = {
    "/token/check": [{"token": "dev\r\nX: 1@tok"}, {"token": "x" * 5000, "provider": "glm"}],
    "/v1/images/generations": [{"prompt": "\x00", "response_format": "b64_json"}],
    "/v1/videos/generations": [
        *({"prompt": "p", "image_url": url} for url in BREAKING_DATA_URLS),
        {"prompt": "p", "conversation_id": UNKNOWN_CONVERSATION},
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
        examples = example(body=encode(trap))(examples)
    examples()
    assert live.ping() == b"pong"


@pytest.mark.parametrize("path", CHAT_ROUTES)
def test_generated_chat_requests_never_get_a_5xx(live: LiveRelay, path: str) -> None:
    """Generated chat completion bodies, near-valid or broken, on each chat route: each answer
    is a 4xx OpenAI error or a whole completion (or stream), and the relay answers /ping after."""
    run_examples(live, path, chat_requests, CHAT_TRAPS)


@pytest.mark.parametrize(
    ("path", "requests"),
    [
        ("/token/check", token_requests),
        ("/v1/images/generations", image_requests),
        ("/v1/videos/generations", video_requests),
    ],
    ids=["token-check", "images", "videos"],
)
def test_generated_requests_to_the_other_post_routes_never_get_a_5xx(
    live: LiveRelay, path: str, requests: st.SearchStrategy[Any]
) -> None:
    """Generated bodies for /token/check and the media routes: each answer is a 4xx OpenAI
    error or the route's success shape, and the relay answers /ping after."""
    run_examples(live, path, requests, OTHER_TRAPS[path])
