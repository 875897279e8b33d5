"""The files of one chat request, end to end: count, byte budget, memory, proxy, demo trust.

A relay (``relay_factory``) runs against the emulators on loopback; files
come from a :class:`tests.relay.test_upstream.TinyServer`, so these tests set
``allow_private_urls`` unless they test the guard itself.
"""

from __future__ import annotations

import base64
import functools
import re
import tracemalloc
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import trio

from providers.step.emulator import StepBehavior, StepEmulator
from relay import config, registry
from relay.app import App
from tests.relay.conftest import AUTH, GLM_AUTH, STEP_TOKEN, post
from tests.relay.test_cli import relay_process
from tests.relay.test_fetcher import RecordingProxy
from tests.relay.test_upstream import HANG, Reply, TinyServer, refused_port

if TYPE_CHECKING:
    from tests.relay.conftest import RelayFactory

IO_LIMIT_S = 10.0
MIB = 1024 * 1024


@pytest.fixture
async def files(nursery: trio.Nursery) -> TinyServer:
    """A file server on loopback (tests add routes)."""
    server = TinyServer()
    await nursery.start(server.serve)
    return server


def with_files(urls: list[str], model: str = "step") -> bytes:
    """A chat request whose (only) message carries ``urls`` as file parts."""
    content: list[dict[str, Any]] = [{"type": "text", "text": "read these"}]
    content += [{"type": "file", "file_url": {"url": url}} for url in urls]
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": content}]})


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(body)["error"]
    return error


# === how many ================================================================================


@pytest.mark.parametrize(("model", "auth"), [("step", AUTH), ("glm-4", GLM_AUTH)])
async def test_too_many_files_is_refused_before_anything_is_fetched(
    relay_factory: RelayFactory, files: TinyServer, model: str, auth: list[tuple[bytes, bytes]]
) -> None:
    """A request with more file and image parts than max_files is a 400 too_many_files
    naming the message's content, for either provider, and no file is fetched."""
    relay = await relay_factory(max_files=2, allow_private_urls=True)
    files.routes["/a.txt"] = Reply(200, [], [b"a"])
    body = with_files([files.url("/a.txt")] * 3, model)
    with trio.fail_after(IO_LIMIT_S):
        response = await post(relay.base_url, "/v1/chat/completions", body, auth)
    assert response.status == 400
    error = error_of(response.content)
    assert (error["code"], error["param"]) == ("too_many_files", "messages[0].content")
    assert files.requests == []


async def test_as_many_files_as_allowed_are_fetched(
    relay_factory: RelayFactory, files: TinyServer, step: StepEmulator
) -> None:
    """max_files parts exactly are fetched and uploaded."""
    relay = await relay_factory(max_files=2, allow_private_urls=True)
    files.routes["/a.txt"] = Reply(200, [], [b"a"])
    step.behavior.file_status_polls = 0
    with trio.fail_after(IO_LIMIT_S):
        response = await post(relay.base_url, "/v1/chat/completions",
                              with_files([files.url("/a.txt")] * 2))
    assert response.status == 200, response.content
    assert len(files.requests) == 2


# === how large, together =====================================================================


async def test_files_over_the_request_budget_are_refused_while_streaming(
    relay_factory: RelayFactory, files: TinyServer, step: StepEmulator
) -> None:
    """Two files each under file_max_bytes but together over files_max_bytes: a 400
    files_too_large as soon as the bytes cross it (the second body never ends, so
    waiting for it would time out)."""
    relay = await relay_factory(files_max_bytes=100, allow_private_urls=True)
    files.routes["/first.bin"] = Reply(200, [], [b"1" * 60])
    files.routes["/second.bin"] = Reply(200, [], [b"2" * 50, HANG])
    step.behavior.file_status_polls = 0
    body = with_files([files.url("/first.bin"), files.url("/second.bin")])
    with trio.fail_after(IO_LIMIT_S):
        response = await post(relay.base_url, "/v1/chat/completions", body)
    assert response.status == 400
    assert error_of(response.content)["code"] == "files_too_large"


async def test_data_urls_count_against_the_request_budget(relay_factory: RelayFactory) -> None:
    """Decoded data URLs draw on the same budget: two of 60 bytes under a 100-byte
    budget are a 400 files_too_large."""
    relay = await relay_factory(files_max_bytes=100)
    data_url = "data:text/plain;base64," + base64.b64encode(b"d" * 60).decode()
    with trio.fail_after(IO_LIMIT_S):
        response = await post(relay.base_url, "/v1/chat/completions",
                              with_files([data_url, data_url]))
    assert response.status == 400
    assert error_of(response.content)["code"] == "files_too_large"


async def test_peak_memory_does_not_grow_with_the_number_of_files(
    relay_factory: RelayFactory, files: TinyServer, nursery: trio.Nursery
) -> None:
    """A request's files are fetched (and uploaded) a few at a time, so the memory one
    request takes is bounded by that, not by how many files it names: the traced peak
    for 12 files of 1 MiB is about that for 4 (all at once, it was three times as much)."""
    emulator = StepEmulator(tokens=[STEP_TOKEN], keep_record=False,
                            behavior=StepBehavior(answer="ok", file_status_polls=0))
    await nursery.start(emulator.serve)
    relay = await relay_factory(step_base_url=emulator.base_url, allow_private_urls=True,
                                max_files=12)
    blob = b"x" * MIB
    files.routes["/big.bin"] = Reply(200, [], [blob])

    async def peak(count: int) -> int:
        body = with_files([files.url("/big.bin")] * count)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with trio.fail_after(IO_LIMIT_S):
            response = await post(relay.base_url, "/v1/chat/completions", body)
        assert response.status == 200, response.content
        return tracemalloc.get_traced_memory()[1] - base

    tracemalloc.start()
    try:
        await peak(1)  # warm up: connections, caches
        few, many = await peak(4), await peak(12)
    finally:
        tracemalloc.stop()
    assert len(files.requests) == 17
    assert many < few * 1.5, (few, many)


# === the guard, with a proxy =================================================================


async def test_with_a_proxy_a_loopback_file_url_is_a_400(
    relay_factory: RelayFactory, files: TinyServer, nursery: trio.Nursery, step: StepEmulator
) -> None:
    """With RELAY_UPSTREAM_PROXY set (a loopback proxy, which carries the upstream calls),
    a file URL on loopback is a 400 forbidden_file_url, and the proxy never sees it."""
    proxy = RecordingProxy()
    await nursery.start(proxy.serve)
    relay = await relay_factory(upstream_proxy=proxy.url)
    files.routes["/secret.txt"] = Reply(200, [], [b"internal"])
    with trio.fail_after(IO_LIMIT_S):
        response = await post(relay.base_url, "/v1/chat/completions",
                              with_files([files.url("/secret.txt")]))
    assert response.status == 400
    assert error_of(response.content)["code"] == "forbidden_file_url"
    assert files.requests == []
    assert proxy.seen, "the upstream calls went through the proxy"
    assert not [seen for seen in proxy.seen if b"secret" in seen.target]


# === the demo trusts its own emulators =========================================================


async def test_demo_app_downloads_its_emulators_images_and_nothing_else_private(
    nursery: trio.Nursery, files: TinyServer
) -> None:
    """Set up as ``relay serve --demo`` does, images with b64_json work (the drawn image
    is on the ChatGLM emulator, on loopback), while a file URL on another loopback port
    is still a 400 forbidden_file_url."""
    settings = config.load({"host": "127.0.0.1", "port": 0, "demo": True}, environ={})
    settings, trusted = await registry.start_emulators(settings, nursery, registry.ENTRIES)
    async with App(settings, trusted_file_origins=trusted) as app:  # as serve does
        addresses = await nursery.start(functools.partial(app.serve))
        base_url = f"http://{addresses[0]}"
        body = orjson.dumps({"prompt": "a cat", "response_format": "b64_json"})
        files.routes["/x.png"] = Reply(200, [], [b"PNG"])
        with trio.fail_after(IO_LIMIT_S):
            images = await post(base_url, "/v1/images/generations", body, GLM_AUTH)
            other = await post(base_url, "/v1/chat/completions",
                               with_files([files.url("/x.png")]))
        app.shutdown()
    assert images.status == 200, images.content
    [image] = orjson.loads(images.content)["data"]
    assert base64.b64decode(image["b64_json"]).startswith(b"\x89PNG")
    assert other.status == 400
    assert error_of(other.content)["code"] == "forbidden_file_url"
    assert files.requests == []


async def test_relay_serve_demo_answers_images_in_b64_json() -> None:
    """``relay serve --demo`` (a real process): /v1/images/generations with b64_json is
    a 200 with the image inline (it was a 502: the guard refused the emulator's URL),
    and a file URL on another loopback port is still a 400 forbidden_file_url."""
    body = orjson.dumps({"prompt": "a cat", "response_format": "b64_json"})
    elsewhere = with_files([f"http://127.0.0.1:{refused_port()}/x.png"])
    with trio.fail_after(30):
        async with relay_process("--demo") as child:
            auth = [(b"authorization", b"Bearer demo")]
            images = await post(child.base_url, "/v1/images/generations", body, auth)
            other = await post(child.base_url, "/v1/chat/completions", elsewhere, auth)
    assert images.status == 200, images.content
    [image] = orjson.loads(images.content)["data"]
    assert re.fullmatch(rb"\x89PNG.*", base64.b64decode(image["b64_json"]), re.DOTALL)
    assert other.status == 400
    assert error_of(other.content)["code"] == "forbidden_file_url"


async def test_demo_trusts_exactly_the_emulators_origins() -> None:
    """The trusted origins are the two emulators' (scheme, host, port), nothing more."""
    settings = config.load({"demo": True}, environ={})
    async with trio.open_nursery() as emulators:
        settings, trusted = await registry.start_emulators(  # as serve does
            settings, emulators, registry.ENTRIES
        )
        emulators.cancel_scope.cancel()
    step_port = int(settings.step_base_url.rsplit(":", 1)[1])
    glm_port = int(settings.glm_base_url.rsplit(":", 1)[1])
    assert trusted == {
        ("http", "127.0.0.1", step_port), ("http", "127.0.0.1", glm_port)
    }

