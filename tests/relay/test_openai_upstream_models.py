"""``/v1/models`` lists what an upstream with a prefix lists itself (issue 16).

An upstream configured with ``prefix = "deepseek/"`` serves whatever it has
under that prefix; the relay asks its ``GET /models`` and lists each id with
the prefix in front, owned by the upstream's name. The list is cached
(:class:`relay.catalog.ModelCatalog`): one call at a time, a time limit, the
last good list when asking fails. The end-to-end tests use the
:class:`~providers.openai.emulator.OpenAIEmulator` (its ``models``,
``models_error`` and ``models_hold``); the catalog's own rules are tested
with a fake fetch under trio's autojump clock. Fixtures and helpers are
:mod:`tests.relay.test_openai_upstream`'s.
"""

# The imported fixtures are parameters of the tests below, which ruff sees as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import httpcore
import openai
import orjson
import pytest
import trio
import trio.testing

from protocol.errors import AuthError, UpstreamFailed
from providers.openai.emulator import DEFAULT_MODELS, OpenAIEmulator
from relay import catalog
from relay.accounts import token_id
from relay.catalog import ModelCatalog
from tests.relay.conftest import RelayFactory, Running, post
from tests.relay.test_openai_upstream import (  # noqa: F401  (upstream: a fixture)
    ANSWER,
    KEYS,
    chat,
    in_thread,
    sdk,
    upstream,
    upstreams,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

PREFIXED = [f"deepseek/{model}" for model in DEFAULT_MODELS]


def prefix_only(emulator: OpenAIEmulator, keys: Sequence[str] = KEYS) -> list[dict[str, Any]]:
    """The upstream ``deepseek`` with a prefix and no listed models."""
    return [{"name": "deepseek", "base_url": emulator.base_url, "api_keys": list(keys),
             "prefix": "deepseek/"}]


async def get(relay: Running, path: str) -> httpcore.Response:
    """One GET over a fresh httpcore pool."""
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request("GET", relay.base_url + path)


def listed(response: httpcore.Response) -> dict[str, str]:
    """A /v1/models body as id -> owned_by."""
    assert response.status == 200, response.content
    return {m["id"]: m["owned_by"] for m in orjson.loads(response.content)["data"]}


# --- end to end ------------------------------------------------------------------------------


async def test_a_prefix_upstream_lists_its_models(
    relay_factory: RelayFactory, upstream: OpenAIEmulator
) -> None:
    """Prefix only: the SDK's models.list shows each id the upstream lists, with the prefix,
    owned by the upstream's name; asked with the upstream's first key, as a Bearer."""
    relay = await relay_factory(openai_upstreams=prefix_only(upstream))

    def run() -> dict[str, str]:
        with sdk(relay) as client:
            return {m.id: m.owned_by for m in client.models.list()}

    models = await in_thread(run)
    assert {model: models.get(model) for model in PREFIXED} == dict.fromkeys(PREFIXED, "deepseek")
    assert "step" in models  # the web chats' beside them
    assert upstream.record.model_keys == [KEYS[0]]


async def test_retrieve_answers_what_the_upstream_lists(
    relay_factory: RelayFactory, upstream: OpenAIEmulator
) -> None:
    """models.retrieve("deepseek/emu-chat") answers the model (owned by the upstream); a name
    under the prefix the upstream does not list is a 404, yet a chat naming it still goes
    upstream (prefix routing is unchanged)."""
    relay = await relay_factory(openai_upstreams=prefix_only(upstream))

    def run() -> tuple[Any, Any]:
        with sdk(relay) as client:
            model = client.models.retrieve("deepseek/emu-chat")
            with pytest.raises(openai.NotFoundError) as missing:
                client.models.retrieve("deepseek/unlisted")
            return model, missing.value

    model, missing = await in_thread(run)
    assert (model.id, model.owned_by) == ("deepseek/emu-chat", "deepseek")
    assert missing.code == "model_not_found"
    reply = await post(relay.base_url, "/v1/chat/completions", chat("deepseek/unlisted"))
    assert reply.status == 200, reply.content
    assert orjson.loads(reply.content)["choices"][0]["message"]["content"] == ANSWER
    assert upstream.record.chats[0].body["model"] == "unlisted"


async def test_listed_models_and_a_prefix_list_both(
    relay_factory: RelayFactory, upstream: OpenAIEmulator
) -> None:
    """An upstream with models and a prefix: its configured names, then what it lists
    under the prefix; an upstream with names only is never asked."""
    upstream.models = ["deepseek-chat", "v3"]
    names_only = {"name": "local", "base_url": upstream.base_url, "api_keys": ["sk-local"],
                  "models": ["local-model"]}
    relay = await relay_factory(openai_upstreams=[*upstreams(upstream), names_only])
    body = await get(relay, "/v1/models")
    models = listed(body)
    ids = [m["id"] for m in orjson.loads(body.content)["data"]]
    assert ids[:5] == ["deepseek-chat", "deepseek-reasoner", "deepseek/deepseek-chat",
                       "deepseek/v3", "local-model"]
    assert models["deepseek/v3"] == "deepseek"
    assert models["local-model"] == "local"
    assert upstream.record.model_keys == [KEYS[0]]  # "local" has no prefix: not asked


async def test_concurrent_lists_make_one_upstream_call(
    relay_factory: RelayFactory, upstream: OpenAIEmulator
) -> None:
    """100 /v1/models at once while the upstream has not answered: one upstream call, and
    every answer lists its models; later ones come from the cache."""
    relay = await relay_factory(openai_upstreams=prefix_only(upstream))
    hold = upstream.behavior.models_hold = trio.Event()
    answers: list[httpcore.Response] = []
    async with httpcore.AsyncConnectionPool(max_connections=100) as pool:

        async def one() -> None:
            answers.append(await pool.request("GET", relay.base_url + "/v1/models"))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    nursery.start_soon(one)
                await upstream.wait_until(lambda record: len(record.model_keys) == 1)
                await trio.testing.wait_all_tasks_blocked()
                assert relay.app.server.statistics()["in_flight"] == 100
                hold.set()
    again = await get(relay, "/v1/models")
    assert len(answers) == 100
    assert all(set(PREFIXED) <= set(listed(answer)) for answer in [*answers, again])
    assert upstream.record.model_keys == [KEYS[0]]


@pytest.mark.parametrize("status", [500, 401])
async def test_a_failing_upstream_list_leaves_its_models_out(
    relay_factory: RelayFactory, upstream: OpenAIEmulator, caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    """The upstream's /models answers 500 (or refuses the key): /v1/models is still a 200,
    with everything else and none of the upstream's; one warning names the key by its hash;
    the next /v1/models does not ask again at once; /v1/models/deepseek/x cannot tell, so
    it answers the model the prefix owns."""
    upstream.behavior.models_error = (status, "server_error", "the list is broken")
    relay = await relay_factory(openai_upstreams=upstreams(upstream))
    with caplog.at_level(logging.DEBUG, logger="relay.catalog"):
        first = listed(await get(relay, "/v1/models"))
        second = listed(await get(relay, "/v1/models"))
        one = await get(relay, "/v1/models/deepseek/emu-chat")
    assert first == second
    assert {"deepseek-chat", "deepseek-reasoner", "step"} <= set(first)
    assert not any(model.startswith("deepseek/") for model in first)
    assert one.status == 200
    assert upstream.record.model_keys == [KEYS[0]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "the list is broken" in warnings[0]
    assert token_id(KEYS[0]) in warnings[0]
    assert KEYS[0] not in caplog.text


async def test_a_hung_upstream_list_is_cut_at_the_limit(
    relay_factory: RelayFactory, upstream: OpenAIEmulator, autojump_clock: trio.testing.MockClock
) -> None:
    """The upstream's /models never answers: after the catalog's limit /v1/models is a 200
    without the upstream's models (the clock jumps: no real waiting)."""
    upstream.behavior.models_hold = trio.Event()  # never set
    relay = await relay_factory(openai_upstreams=prefix_only(upstream))
    started = trio.current_time()
    models = listed(await get(relay, "/v1/models"))
    assert trio.current_time() - started == pytest.approx(catalog.CALL_LIMIT_S)
    assert "step" in models
    assert not any(model.startswith("deepseek/") for model in models)


# --- the catalog -----------------------------------------------------------------------------


class FakeUpstream:
    """upstream_models as a function: records the keys, answers what it is told."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.keys: list[str] = []
        self.gate: trio.Event | None = None  # when set, each call waits for it
        self.failure: Exception | None = None
        self.hang = False

    async def fetch(self, key: str) -> list[str]:
        self.keys.append(key)
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await trio.sleep_forever()
        if self.failure is not None:
            raise self.failure
        return list(self.models)


async def test_catalog_single_flight() -> None:
    """100 callers while a call runs: they all wait for that one call and get its list."""
    fake = FakeUpstream(["m1", "m2"])
    fake.gate = trio.Event()
    models = ModelCatalog("up", fake.fetch, ["k1"])
    results: list[tuple[str, ...] | None] = []

    async def one() -> None:
        results.append(await models.models())

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.keys == ["k1"]
        fake.gate.set()
    assert results == [("m1", "m2")] * 100
    assert models.calls == 1
    assert models.known() == {"m1", "m2"}


async def test_catalog_caller_cancelled_hands_over() -> None:
    """The caller that made the call is cancelled (its client left): a waiter makes a new
    call and gets its list."""
    fake = FakeUpstream(["m1"])
    fake.gate = trio.Event()
    models = ModelCatalog("up", fake.fetch, ["k1"])
    got: list[tuple[str, ...] | None] = []
    leader = trio.CancelScope()

    async def waiter() -> None:
        got.append(await models.models())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_in_scope, leader, models)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.keys == ["k1"]
        leader.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert fake.keys == ["k1", "k1"]  # the waiter asked again
        fake.gate.set()
    assert got == [("m1",)]
    assert leader.cancelled_caught


async def _in_scope(scope: trio.CancelScope, models: ModelCatalog) -> None:
    with scope:
        await models.models()


async def test_catalog_cache_lives_for_its_ttl(autojump_clock: trio.testing.MockClock) -> None:
    """Within TTL_S the cached list is used; after it, the upstream is asked again."""
    fake = FakeUpstream(["m1"])
    models = ModelCatalog("up", fake.fetch, ["k1"])
    assert await models.models() == ("m1",)
    fake.models = ["m1", "m2"]
    await trio.sleep(catalog.TTL_S - 1)
    assert await models.models() == ("m1",)
    await trio.sleep(1)
    assert await models.models() == ("m1", "m2")
    assert models.calls == 2


async def test_catalog_failure_keeps_the_stale_list(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed call after a good one: the stale list stands; the next call waits RETRY_S
    and asks with the next key; one warning for the run of failures, then one line when
    listing works again; keys never appear, their hashes do."""
    fake = FakeUpstream(["m1"])
    models = ModelCatalog("up", fake.fetch, ["key-one", "key-two"])
    assert await models.models() == ("m1",)
    await trio.sleep(catalog.TTL_S)
    fake.failure = UpstreamFailed("upstream down")
    with caplog.at_level(logging.DEBUG, logger="relay.catalog"):
        assert await models.models() == ("m1",)
        await trio.sleep(catalog.RETRY_S - 1)
        assert await models.models() == ("m1",)  # not asked again yet
        await trio.sleep(1)
        fake.failure = AuthError("bad key")
        assert await models.models() == ("m1",)
        await trio.sleep(catalog.RETRY_S)
        fake.failure = None
        fake.models = ["m3"]
        assert await models.models() == ("m3",)
    assert fake.keys == ["key-one", "key-one", "key-two", "key-one"]
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in levels] == [logging.WARNING, logging.DEBUG, logging.INFO]
    assert "upstream down" in levels[0][1]
    assert "the 1 models it listed before" in levels[0][1]
    assert token_id("key-one") in levels[0][1]
    assert "key-one" not in caplog.text
    assert "key-two" not in caplog.text


async def test_catalog_call_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    """A call that never ends is given up after CALL_LIMIT_S: nothing known yet, None."""
    fake = FakeUpstream(["m1"])
    fake.hang = True
    models = ModelCatalog("up", fake.fetch, ["k1"])
    started = trio.current_time()
    assert await models.models() is None
    assert trio.current_time() - started == pytest.approx(catalog.CALL_LIMIT_S)
    assert models.known() == frozenset()
