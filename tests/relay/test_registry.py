"""Tests of the provider seam: relay/registry.py and providers/contract.py.

A provider the relay has never heard of (:class:`EchoProvider`, written
here against the contract alone) is served by adding one registry entry:
chat is routed to it by its model names and by ``/echo/v1/...``, it is
listed in ``/v1/models``, and ``/token/check`` reaches it. Nothing in
``relay/`` changes for it. Then the layering that makes this possible:
``relay/`` names no provider package outside the registry, and no module of
ours imports itself in a circle. Last, the account lease of
:func:`relay.chat.with_account` sees the exception that ended its work.
"""

from __future__ import annotations

import ast
import functools
import pathlib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpcore
import orjson
import pytest
import trio

from protocol.deltas import Delta, Finish, TextDelta
from protocol.errors import AuthError, UpstreamFailed
from relay import config, registry
from relay.accounts import Account, AccountPool
from relay.app import App
from relay.chat import Outcome, with_account
from relay.registry import Entry, ProviderRuntime
from tests.relay.conftest import chat_body, post

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Sequence
    from types import TracebackType

    from protocol.openai import ChatRequest
    from providers.contract import Provider

ROOT = pathlib.Path(__file__).resolve().parents[2]
ECHO_AUTH = [(b"authorization", b"Bearer echo:alice")]


# === a third provider, from the contract alone ====================================================


@dataclass(frozen=True)
class EchoSession:
    """What EchoProvider's login gives its chat."""

    credential: str


class EchoAnswer:
    """An answer that repeats the model name it was asked for."""

    def __init__(self, model: str) -> None:
        self._model = model

    @property
    def conversation_id(self) -> str:
        return ""

    async def __aiter__(self) -> AsyncGenerator[list[Delta], None]:
        yield [TextDelta(f"echo of {self._model}")]
        yield [Finish("stop")]


class EchoProvider:
    """A provider written against providers/contract.py only."""

    name = "echo"
    session_ttl = 60.0
    citation_line = "{title} {url}\n"
    default_model = "echo-1"
    native_agents = False
    renews_sessions = True
    media = None

    def __init__(self) -> None:
        self.chats: list[str] = []  # the credential of each chat's session

    def models(self) -> list[str]:
        return ["echo-1", "echo-2"]

    def owns_model(self, model: str) -> bool:
        return model.startswith("echo")

    def looks_like(self, credential: str) -> bool:
        return credential.startswith("echo:")

    def validate_credential(self, credential: str) -> None:
        if not credential.startswith("echo:"):
            raise AuthError("an echo credential begins with 'echo:'")

    async def login(self, credential: str) -> EchoSession:
        return EchoSession(credential)

    async def check(self, credential: str) -> bool:
        return credential == "echo:alice"

    @asynccontextmanager
    async def chat(self, session: EchoSession, request: ChatRequest) -> AsyncIterator[EchoAnswer]:
        self.chats.append(session.credential)
        yield EchoAnswer(request.model)


def echo_entry(provider: Provider[EchoSession]) -> Entry:
    """The one registry line a new provider takes."""
    return Entry(build=lambda parts: provider, credentials=lambda s: (), max_streams=lambda s: 0)


@asynccontextmanager
async def serving(nursery: trio.Nursery, entries: Sequence[Entry]) -> AsyncIterator[str]:
    """An App with these providers on loopback; yields its base URL."""
    settings = config.load({"host": "127.0.0.1", "port": 0}, environ={})
    async with App(settings, providers=entries) as app:
        addresses = await nursery.start(functools.partial(app.serve))
        try:
            yield f"http://{addresses[0]}"
        finally:
            app.shutdown()
            with trio.move_on_after(5):
                await app.stopped.wait()


async def get(url: str) -> httpcore.Response:
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request("GET", url)


async def test_a_registered_provider_is_routed_to_by_its_model_names(
    nursery: trio.Nursery,
) -> None:
    """Registered after StepChat and ChatGLM, the echo provider answers a chat for
    its model, is forced by /echo/v1/chat/completions whatever the model, and
    /v1/models lists its models as owned by "echo", beside the others'."""
    echo = EchoProvider()
    async with serving(nursery, (*registry.ENTRIES, echo_entry(echo))) as base_url:
        by_model = await post(base_url, "/v1/chat/completions", chat_body(model="echo-2"),
                              ECHO_AUTH)
        forced = await post(base_url, "/echo/v1/chat/completions", chat_body(model="step"),
                            ECHO_AUTH)
        listed = await get(base_url + "/v1/models")
    assert by_model.status == 200, by_model.content
    assert orjson.loads(by_model.content)["choices"][0]["message"]["content"] == "echo of echo-2"
    assert forced.status == 200, forced.content
    assert orjson.loads(forced.content)["choices"][0]["message"]["content"] == "echo of step"
    assert echo.chats == ["echo:alice", "echo:alice"]
    owners = {entry["id"]: entry["owned_by"] for entry in orjson.loads(listed.content)["data"]}
    assert owners["echo-1"] == owners["echo-2"] == "echo"
    assert owners["step"] == "step"
    assert owners["glm-4-plus"] == "glm"


async def test_token_check_reaches_a_registered_provider(nursery: trio.Nursery) -> None:
    """/token/check with "provider": "echo" asks the echo provider (live or not)."""
    echo = EchoProvider()
    async with serving(nursery, (*registry.ENTRIES, echo_entry(echo))) as base_url:
        live = await post(base_url, "/token/check",
                          orjson.dumps({"token": "echo:alice", "provider": "echo"}), [])
        dead = await post(base_url, "/token/check",
                          orjson.dumps({"token": "echo:bob", "provider": "echo"}), [])
    assert orjson.loads(live.content) == {"live": True}
    assert orjson.loads(dead.content) == {"live": False}


async def test_a_relay_of_one_provider_without_media(nursery: trio.Nursery) -> None:
    """With the echo provider alone, a model no provider owns goes to it (the
    default provider is absent), the media endpoints are 501 not_implemented, and
    only echo's forced route exists."""
    echo = EchoProvider()
    async with serving(nursery, (echo_entry(echo),)) as base_url:
        chat = await post(base_url, "/v1/chat/completions", chat_body(model="gpt-4o"), ECHO_AUTH)
        images = await post(base_url, "/v1/images/generations",
                            orjson.dumps({"prompt": "a cat"}), ECHO_AUTH)
        videos = await post(base_url, "/v1/videos/generations",
                            orjson.dumps({"prompt": "a cat"}), ECHO_AUTH)
        step = await post(base_url, "/step/v1/chat/completions", chat_body(), ECHO_AUTH)
    assert chat.status == 200, chat.content
    assert orjson.loads(chat.content)["choices"][0]["message"]["content"] == "echo of gpt-4o"
    for media in (images, videos):
        assert media.status == 501
        assert orjson.loads(media.content)["error"]["code"] == "not_implemented"
    assert step.status == 404


# === the layering ==============================================================================


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, at any depth (TYPE_CHECKING and function bodies too)."""
    found: set[str] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            named = [f"{base}.{alias.name}" for alias in node.names]
            found.update(named)
            if not all(_is_module(name) for name in named):
                # a name the package itself defines: `from relay import config` is an
                # arrow to relay.config, `from relay import serve` one to relay
                found.add(base)
    return found


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of this repository."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for top in ("relay", "protocol", "providers"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def test_relay_names_no_provider_package_outside_the_registry() -> None:
    """No module of relay/ but registry.py imports providers.step or providers.glm."""
    offenders = {
        f"{name} imports {imported}"
        for name, path in _modules().items()
        if name.startswith("relay.") and name != "relay.registry"
        for imported in _imports(path)
        if imported.startswith(("providers.step", "providers.glm"))
    }
    assert offenders == set()


def test_no_provider_imports_another() -> None:
    """A provider package imports no other provider package (shared code is a module
    of providers/ itself)."""
    offenders = set()
    for name, path in _modules().items():
        parts = name.split(".")
        if parts[0] == "providers" and len(parts) > 2:
            own = f"providers.{parts[1]}"
            for imported in _imports(path):
                other = imported.split(".")
                if (other[0] == "providers" and len(other) > 1
                        and (ROOT / "providers" / other[1]).is_dir()
                        and imported.split(".")[:2] != own.split(".")):
                    offenders.add(f"{name} imports {imported}")
    assert offenders == set()


def test_no_import_circle() -> None:
    """The imports among relay/, protocol/ and providers/ (TYPE_CHECKING ones too)
    form no circle: every arrow points one way."""
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import circle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


# === the lease sees what ended the work ==========================================================


class RecordingPool(AccountPool[EchoSession]):
    """An AccountPool that records what each lease was left with."""

    def __init__(self, provider: EchoProvider) -> None:
        super().__init__(provider, config.load({}, environ={}), 0)
        self.left_with: list[type[BaseException] | None] = []

    @asynccontextmanager
    async def lease(
        self, candidates: Sequence[Account], exclude: set[Account] | None = None
    ) -> AsyncIterator[Account]:
        async with super().lease(candidates, exclude) as account, _Record(self.left_with):
            yield account


class _Record:
    def __init__(self, into: list[type[BaseException] | None]) -> None:
        self._into = into

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._into.append(kind)


async def test_the_lease_is_left_with_the_exception_that_ended_the_work() -> None:
    """with_account leaves the account lease with the work's exception (it was
    always None, None, None), and with none when the work succeeds."""
    provider = EchoProvider()
    pool = RecordingPool(provider)
    runtime: ProviderRuntime[EchoSession] = ProviderRuntime(provider, pool, ())
    accounts = pool.client_accounts(["echo:alice"])

    async def fail(session: EchoSession) -> str:
        raise UpstreamFailed("upstream broke")

    async def succeed(session: EchoSession) -> str:
        return session.credential

    with pytest.raises(UpstreamFailed):
        await with_account(runtime, accounts, fail, Outcome())
    assert await with_account(runtime, accounts, succeed, Outcome()) == "echo:alice"
    assert pool.left_with == [UpstreamFailed, None]
