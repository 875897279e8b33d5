"""Account state shared by instances (relay/shared.py) and kept in-process (relay/accounts.py).

One suite runs against both implementations of ``AccountState`` (the ``cluster``
fixture's two parameters): "instances" are two account pools over the same
state. In-process, both are one pool (a process is one instance); with Redis,
each has its own ``RedisState`` and client on one real ``redis-server``
(tests/redis_server.py; skipped with a message where the binary is missing).
Time is real (Redis keeps its own), so the settings here are short.

Then two real relay processes share one Redis in front of one ChatGLM emulator
(run in the test, so its record can be read): one stream per account across
them, one login for both, a killed relay's lease expiring, a kept conversation
continued through the other relay.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import httpcore
import orjson
import pytest
import trio

from protocol.errors import AuthError, NoAccountFree, RelayError
from protocol.openai import ChatRequest
from providers.glm.client import GlmProvider, GlmSession
from providers.glm.emulator import GlmBehavior, GlmEmulator
from providers.openai.emulator import OpenAIBehavior, OpenAIEmulator
from providers.step.client import StepProvider, StepSession
from relay import accounts
from relay.accounts import AccountPool, LocalState, token_id
from relay.config import ConfigError, Settings
from tests.redis_server import MISSING, REDIS_SERVER, RedisServer, free_port, redis_server
from tests.relay.conftest import STEP_CREDENTIAL

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path

    from providers.contract import Provider
    from tests.relay.conftest import RelayFactory

WAIT_LIMIT_S = 10.0  # generous bounds on what takes milliseconds
PROCESS_TIMEOUT_S = 20  # a child Python process: its imports take most of it
#: long enough that the few leases taken while an account rests all fall inside it, on a
#: loaded machine too (the test then waits for the rest to end)
COOLDOWN_S = 1.5


# --- a provider the tests control ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeSession:
    credential: str
    number: int


@dataclass
class FakeProvider:
    """A SessionCodec and ConversationKeeper whose logins the test holds and fails."""

    name: str = "fake"
    session_ttl: float = 3600.0
    calls: list[str] = field(default_factory=list)
    #: set: logins wait for it
    gate: trio.Event | None = None
    #: raised by the next logins, in order
    errors: list[RelayError] = field(default_factory=list)

    async def login(self, credential: str) -> FakeSession:
        self.calls.append(credential)
        number = len(self.calls)
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        return FakeSession(credential, number)

    def dump_session(self, session: FakeSession) -> str:
        return json.dumps({"credential": session.credential, "number": session.number})

    def load_session(self, data: str) -> FakeSession:
        fields = json.loads(data)
        return FakeSession(fields["credential"], fields["number"])

    def keeps_conversation(self, request: ChatRequest) -> bool:
        return request.conversation_id is not None

    def continued_conversation(self, request: ChatRequest) -> str | None:
        return request.conversation_id or None


def chat_request(conversation_id: str | None) -> ChatRequest:
    return ChatRequest(model="", messages=(), stream=False, include_usage=False,
                       conversation_id=conversation_id, use_search=None)


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll ``predicate`` (bounded): what it waits for happens in Redis or in other
    instances' tasks, which set no event of ours."""
    with trio.fail_after(WAIT_LIMIT_S):
        while True:
            done = predicate()
            if done if isinstance(done, bool) else await done:
                return
            await trio.sleep(0.01)


# --- the two implementations -------------------------------------------------------------


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (each test flushes it)."""
    if REDIS_SERVER is None:
        pytest.skip(MISSING)
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def flush(url: str) -> None:
    import coredis

    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        await client.flushall()


@dataclass
class Cluster:
    """Opens "instances" (account pools) that share one state."""

    kind: str
    url: str | None
    provider: FakeProvider = field(default_factory=FakeProvider)

    def settings(self, **values: Any) -> Settings:
        defaults: dict[str, Any] = {
            "account_wait_timeout": 0.2, "account_cooldown": COOLDOWN_S,
            "token_refresh_margin": 60.0, "redis_url": self.url,
        }
        return Settings().with_changes(**{**defaults, **values})

    @asynccontextmanager
    async def instances(
        self, count: int = 2, *, max_streams: int = 1, **values: Any
    ) -> AsyncIterator[list[AccountPool[FakeSession]]]:
        settings = self.settings(**values)
        provider = cast("Provider[FakeSession]", self.provider)
        if self.url is None:
            yield [AccountPool(provider, settings, max_streams, LocalState())] * count
            return
        from relay.shared import RedisState

        async with AsyncExitStack() as stack:
            pools = []
            for _ in range(count):
                pool = AccountPool(provider, settings, max_streams,
                                   RedisState(provider, settings))
                await stack.enter_async_context(pool.connected())
                pools.append(pool)
            yield pools


@pytest.fixture(params=["local", "redis"])
async def cluster(request: pytest.FixtureRequest) -> Cluster:
    if request.param == "local":
        return Cluster("local", None)
    server = cast("RedisServer", request.getfixturevalue("redis"))
    await flush(server.url)
    return Cluster("redis", server.url)


def follows(*pools: AccountPool[FakeSession]) -> int:
    """Logins these instances waited for instead of running (RedisState.follows)."""
    from relay.shared import RedisState

    return sum(p.state.follows for p in set(pools) if isinstance(p.state, RedisState))


# --- leases ------------------------------------------------------------------------------


async def test_one_stream_per_account_holds_across_instances(cluster: Cluster) -> None:
    """While one instance holds an account's only slot, another instance's lease waits
    and times out with NoAccountFree; a lease that waits gets the account as soon as
    the holder releases it."""
    async with cluster.instances(2) as (a, b):
        (acc_a,), (acc_b,) = a.server_accounts(["cred"]), b.server_accounts(["cred"])
        async with a.lease([acc_a]):
            with pytest.raises(NoAccountFree) as info:
                async with b.lease([acc_b]):
                    pytest.fail("two instances leased the one slot")
        assert info.value.code == "accounts_busy"
        async with b.lease([acc_b]) as got:
            assert got is acc_b

    got_it: list[bool] = []
    async with cluster.instances(2, account_wait_timeout=WAIT_LIMIT_S) as (a, b):
        (acc_a,), (acc_b,) = a.server_accounts(["cred"]), b.server_accounts(["cred"])

        async def wait_for_it() -> None:
            async with b.lease([acc_b]):
                got_it.append(True)

        with trio.fail_after(WAIT_LIMIT_S):
            async with trio.open_nursery() as nursery, a.lease([acc_a]):
                nursery.start_soon(wait_for_it)
                await wait_until(lambda: b.statistics().waiting == 1)
                assert got_it == []
    assert got_it == [True]


async def test_the_limit_counts_the_streams_of_every_instance(cluster: Cluster) -> None:
    """With two streams per account, one held by each instance, a third lease on either
    waits and fails; once one is released it succeeds."""
    async with cluster.instances(2, max_streams=2) as (a, b):
        (acc_a,), (acc_b,) = a.server_accounts(["cred"]), b.server_accounts(["cred"])
        async with a.lease([acc_a]):
            async with b.lease([acc_b]):
                with pytest.raises(NoAccountFree):
                    async with a.lease([acc_a]):
                        pytest.fail("a third stream on a two-stream account")
            async with a.lease([acc_a]) as again:  # b's was released
                assert again is acc_a


async def test_leases_spread_over_the_accounts_of_every_instance(cluster: Cluster) -> None:
    """An account leased by one instance is not the one the other instance picks."""
    async with cluster.instances(2) as (a, b):
        accs_a, accs_b = a.server_accounts(["x", "y"]), b.server_accounts(["x", "y"])
        async with a.lease(accs_a) as first, b.lease(accs_b) as second:
            assert first.id != second.id


async def test_a_dead_instances_lease_expires(cluster: Cluster) -> None:
    """An instance that dies holding a lease (stops renewing, never releases) frees the
    account within redis_lease_expiry; while it lives, renewals keep the lease."""
    if cluster.url is None:
        pytest.skip("in-process leases live and die with their process")
    expiry, renew = 0.5, 0.05
    async with cluster.instances(1, redis_lease_expiry=expiry, redis_lease_renew=renew,
                                 account_wait_timeout=WAIT_LIMIT_S) as (b,):
        (acc_b,) = b.server_accounts(["cred"])
        async with cluster.instances(1, redis_lease_expiry=expiry,
                                     redis_lease_renew=renew) as (a,):
            (acc_a,) = a.server_accounts(["cred"])
            lease = await a.state.take([acc_a], 1)
            assert lease is not None
            await trio.sleep(expiry * 2)  # renewed many times meanwhile
            assert await b.state.take([acc_b], 1) is None
        # `a` is gone without releasing: its lease runs out
        start = trio.current_time()
        async with b.lease([acc_b]) as got:
            assert got is acc_b
        assert trio.current_time() - start <= expiry + WAIT_LIMIT_S


# --- sessions ----------------------------------------------------------------------------


async def test_one_login_serves_every_instance(cluster: Cluster) -> None:
    """Callers on two instances asking at once for a session cause one login: the other
    instance waits for it and gets the same session, then finds it cached."""
    provider = cluster.provider
    provider.gate = gate = trio.Event()
    sessions: list[FakeSession] = []
    async with cluster.instances(2) as (a, b):
        (acc_a,), (acc_b,) = a.server_accounts(["cred"]), b.server_accounts(["cred"])

        async def ask(pool: AccountPool[FakeSession], acc: accounts.Account) -> None:
            sessions.append(await pool.session(acc))

        with trio.fail_after(WAIT_LIMIT_S):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(ask, a, acc_a)
                    nursery.start_soon(ask, b, acc_b)
                # one leads (held by the gate); with Redis, the other instance follows it
                await wait_until(lambda: len(provider.calls) == 1 and (
                    cluster.url is None or follows(a, b) == 1))
                gate.set()
        assert provider.calls == ["cred"]
        assert sessions == [FakeSession("cred", 1)] * 6
        assert await a.session(acc_a) == await b.session(acc_b) == FakeSession("cred", 1)
        assert provider.calls == ["cred"]


async def test_a_refused_login_reaches_the_other_instance_and_is_not_cached(
    cluster: Cluster,
) -> None:
    """When the one login is refused, the instance waiting for it gets the same error,
    the account rests for both, and the next call logs in again."""
    provider = cluster.provider
    provider.gate = gate = trio.Event()
    provider.errors.append(AuthError("token revoked", code="revoked"))
    outcomes: list[object] = []
    async with cluster.instances(2) as (a, b):
        (acc_a,), (acc_b,) = a.server_accounts(["cred"]), b.server_accounts(["cred"])

        async def ask(pool: AccountPool[FakeSession], acc: accounts.Account) -> None:
            try:
                outcomes.append(await pool.session(acc))
            except AuthError as exc:
                outcomes.append(exc.code)

        with trio.fail_after(WAIT_LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, a, acc_a)
                nursery.start_soon(ask, b, acc_b)
                await wait_until(lambda: len(provider.calls) == 1 and (
                    cluster.url is None or follows(a, b) == 1))
                gate.set()
        assert outcomes == ["revoked", "revoked"]
        assert provider.calls == ["cred"]
        assert (await a.state.resting([acc_a]))[0] > 0
        assert (await b.state.resting([acc_b]))[0] > 0
        assert await b.session(acc_b) == FakeSession("cred", 2)


async def test_evict_forgets_only_the_named_session_everywhere(cluster: Cluster) -> None:
    """Evicting a session that is no longer the cached one changes nothing; evicting
    the cached one (on either instance) makes the next call log in again."""
    cluster.provider.gate = None
    async with cluster.instances(2) as (a, b):
        (acc_a,), (acc_b,) = a.server_accounts(["cred"]), b.server_accounts(["cred"])
        current = await a.session(acc_a)
        await b.evict(acc_b, FakeSession("cred", 99))
        assert await a.session(acc_a) == current
        await b.evict(acc_b, current)
        assert await a.session(acc_a) == FakeSession("cred", 2)
        assert cluster.provider.calls == ["cred", "cred"]


# --- health ------------------------------------------------------------------------------


async def test_a_cooldown_is_seen_by_every_instance_and_ends(cluster: Cluster) -> None:
    """An account rested on one instance is avoided by the other while it rests, and
    competes again once account_cooldown has passed."""
    async with cluster.instances(2, max_streams=0) as (a, b):
        x_a, _ = a.server_accounts(["x", "y"])
        x_b, y_b = b.server_accounts(["x", "y"])
        await a.rest(x_a, "test")
        assert (await b.state.resting([x_b, y_b]))[1] == 0.0
        assert 0 < (await b.state.resting([x_b]))[0] <= COOLDOWN_S
        for _ in range(3):
            async with b.lease([x_b, y_b]) as got:
                assert got is y_b
        async def healthy() -> bool:
            return (await b.state.resting([x_b]))[0] == 0

        await wait_until(healthy)
        async with b.lease([x_b, y_b]) as got:
            assert got is x_b  # healthy again, and served less


# --- kept conversations --------------------------------------------------------------------


async def test_a_kept_conversations_owner_is_known_to_every_instance(cluster: Cluster) -> None:
    """A conversation kept on one instance's account is continued on that account alone
    through the other instance; unknown conversations and answers that were not kept
    leave every candidate."""
    async with cluster.instances(2) as (a, b):
        x_a, _ = a.server_accounts(["x", "y"])
        x_b, y_b = b.server_accounts(["x", "y"])
        await a.remember_conversation(chat_request(""), "conv-kept", x_a.id)
        await a.remember_conversation(chat_request(None), "conv-deleted", x_a.id)
        assert await b.for_conversation([y_b, x_b], chat_request("conv-kept")) == [x_b]
        assert await b.for_conversation([y_b, x_b], chat_request("conv-deleted")) == [y_b, x_b]
        assert await b.for_conversation([y_b, x_b], chat_request("unknown")) == [y_b, x_b]
        assert await b.for_conversation([y_b, x_b], chat_request(None)) == [y_b, x_b]
        # the owner is not among this request's accounts: the upstream decides
        assert await b.for_conversation([y_b], chat_request("conv-kept")) == [y_b]


async def test_in_process_conversation_owners_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The in-process owner map keeps MAX_CONVERSATIONS entries, the least recently
    used forgotten first."""
    monkeypatch.setattr(accounts, "MAX_CONVERSATIONS", 3)
    state = LocalState()
    for number in range(3):
        await state.set_owner(f"c{number}", "acc")
    assert await state.owner("c0") == "acc"  # now the most recently used
    await state.set_owner("c3", "acc")
    assert [await state.owner(f"c{n}") for n in range(4)] == ["acc", None, "acc", "acc"]


# --- sessions as JSON, settings, failures ----------------------------------------------------

#: coredis (6.9) leaves two anyio memory streams unclosed for each connection that fails
#: to open; they are collected (with a ResourceWarning) when this test ends
COREDIS_FAILED_CONNECT = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function MemoryObject:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture
def collect_garbage() -> Iterator[None]:
    """Collect garbage after the test, so that what it leaked warns under its own filters."""
    yield
    gc.collect()


def test_provider_sessions_survive_json() -> None:
    """ChatGLM's and StepChat's sessions come back equal from their JSON; text that is not
    a session is a ValueError (the relay then logs in again)."""
    glm = GlmProvider(cast("Any", None), cast("Any", None), base_url="https://chatglm.test")
    step = StepProvider(cast("Any", None), cast("Any", None), base_url="https://step.test")
    glm_session = GlmSession("access", "device", "refresh")
    step_session = StepSession("device", b"Oasis-Token=a\xe9; Oasis-Webid=d", "token")
    assert glm.load_session(glm.dump_session(glm_session)) == glm_session
    assert step.load_session(step.dump_session(step_session)) == step_session
    for provider in (glm, step):
        for garbage in ("[]", "{}", "not json", '{"access_token": 1}'):
            with pytest.raises(ValueError, match=r".+"):
                provider.load_session(garbage)


def test_redis_settings_are_checked() -> None:
    """RELAY_REDIS_URL must be a redis://, rediss:// or unix:// URL (the message does not
    echo it: it may hold a password), and renewals must come before the expiry."""
    with pytest.raises(ConfigError) as info:
        Settings().with_changes(redis_url="http://:secret@cache:6379")
    assert "secret" not in str(info.value)
    with pytest.raises(ConfigError, match="redis_lease_renew"):
        Settings().with_changes(redis_lease_renew=30.0, redis_lease_expiry=30.0)
    assert Settings().with_changes(redis_url="rediss://cache:6380/2").redis_url


def test_a_provider_without_a_session_codec_cannot_use_redis() -> None:
    """Redis stores sessions as JSON: a provider that cannot write them is a ConfigError."""
    from relay.shared import RedisState

    class Opaque:
        name = "opaque"

    settings = Settings().with_changes(redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="opaque"):
        RedisState(cast("Provider[Any]", Opaque()), settings)


@COREDIS_FAILED_CONNECT
async def test_redis_unreachable_at_start_is_a_config_error(collect_garbage: None) -> None:
    """Starting with nothing listening at RELAY_REDIS_URL fails at once, naming where (and
    no password)."""
    from relay.shared import RedisState

    port = free_port()  # nothing listens there
    settings = Settings().with_changes(redis_url=f"redis://:hunter2@127.0.0.1:{port}/0",
                                       connect_timeout=1.0)
    state = RedisState(cast("Provider[Any]", FakeProvider()), settings)
    with trio.fail_after(WAIT_LIMIT_S), pytest.raises(ConfigError) as info:
        async with state.connected():
            pytest.fail("connected to nothing")
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "hunter2" not in message


@COREDIS_FAILED_CONNECT
async def test_redis_lost_while_serving_is_a_503(tmp_path: Path, collect_garbage: None) -> None:
    """When Redis goes away, a lease is a 503 (code shared_state_unavailable), not a
    silent fall back to per-process limits."""
    if REDIS_SERVER is None:
        pytest.skip(MISSING)
    with redis_server(tmp_path) as server:
        cluster = Cluster("redis", server.url)
        async with cluster.instances(1) as (a,):
            (acc,) = a.server_accounts(["cred"])
            async with a.lease([acc]):
                pass
            server.process.kill()
            server.process.wait()
            with trio.fail_after(WAIT_LIMIT_S), pytest.raises(RelayError) as info:
                async with a.lease([acc]):
                    pytest.fail("leased without Redis")
    assert (info.value.status, info.value.code) == (503, "shared_state_unavailable")


async def test_workers_without_redis_warn_that_limits_are_per_worker() -> None:
    """``relay serve --workers 2`` without RELAY_REDIS_URL logs, once its port is bound,
    that account limits are per worker."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "--port", str(port), "--workers", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**env, "RELAY_GRACE_PERIOD": "1"},
    )
    assert process.stderr is not None
    stderr = bytearray()
    listening = re.compile(rb"(listening on http://127\.0\.0\.1:%d\n[^\n]*){2}" % port, re.S)
    try:
        with trio.fail_after(PROCESS_TIMEOUT_S):
            while not listening.search(stderr):
                chunk = await process.stderr.receive_some(65536)
                assert chunk, stderr.decode(errors="replace")
                stderr += chunk
            process.terminate()
            assert await process.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stderr.aclose()
    assert b"2 workers without RELAY_REDIS_URL: account limits are per worker" in stderr


# === two relay processes, one Redis, one ChatGLM emulator ========================================

API_KEY = "shared-state-test-key"
TOKEN_X, TOKEN_Y = "glm-refresh-x", "glm-refresh-y"
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)\n")


@dataclass
class RelayChild:
    process: trio.Process
    port: int
    stderr: bytearray

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def relay_child(
    redis_url: str, glm: GlmEmulator, tokens: tuple[str, ...], **settings: object
) -> AsyncIterator[RelayChild]:
    """``python -m relay serve`` on a free port, sharing ``redis_url``; killed at the end."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    env.update(RELAY_REDIS_URL=redis_url, RELAY_LOG_LEVEL="info", RELAY_GRACE_PERIOD="1")
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "--host", "127.0.0.1", "--port", "0",
         "--glm-base-url", glm.base_url, "--glm-tokens", ",".join(tokens),
         "--api-keys", API_KEY, "--default-provider", "glm", *flags],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    assert process.stderr is not None
    child = RelayChild(process, 0, bytearray())
    try:
        with trio.fail_after(PROCESS_TIMEOUT_S):
            while (found := LISTENING.search(child.stderr)) is None:
                chunk = await process.stderr.receive_some(65536)
                assert chunk, f"relay exited early:\n{child.stderr.decode(errors='replace')}"
                child.stderr += chunk
        child.port = int(found[1])
        yield child
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stderr.aclose()


async def ask(relay: RelayChild, conversation_id: str | None = None,
              model: str = "glm-4-plus") -> httpcore.Response:
    """One whole (not streamed) chat completion through ``relay``."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request(
            "POST", relay.base_url + "/v1/chat/completions", content=orjson.dumps(body),
            headers=[(b"authorization", f"Bearer {API_KEY}".encode()),
                     (b"content-type", b"application/json")],
        )


@pytest.fixture
async def shared_redis(redis: RedisServer) -> str:
    await flush(redis.url)
    return redis.url


@pytest.fixture
async def glm(nursery: trio.Nursery) -> GlmEmulator:
    emulator = GlmEmulator(tokens=[TOKEN_X, TOKEN_Y], behavior=GlmBehavior(answer="hello"))
    await nursery.start(emulator.serve)
    return emulator


async def test_two_relays_keep_one_stream_per_account_and_log_in_once(
    shared_redis: str, glm: GlmEmulator, nursery: trio.Nursery
) -> None:
    """Two relay processes with one ChatGLM account: the second logs in with the first's
    token (one refresh in all); while one relay streams on the account, the other's
    request waits and gets a 429, never the site's "busy" answer; afterwards it is served."""
    async with relay_child(shared_redis, glm, (TOKEN_X,), account_wait_timeout=0.5) as a, \
            relay_child(shared_redis, glm, (TOKEN_X,), account_wait_timeout=0.5) as b:
        with trio.fail_after(WAIT_LIMIT_S):
            assert (await ask(a)).status == 200
            assert (await ask(b)).status == 200
            assert glm.record.refreshes == 1

            held: list[int] = []
            gate = trio.Event()
            glm.behavior.first_gate = gate

            async def hold() -> None:
                held.append((await ask(a)).status)

            nursery.start_soon(hold)
            await glm.wait_until(lambda record: len(record.streams) == 3)
            busy = await ask(b)
            assert busy.status == 429
            assert orjson.loads(busy.content)["error"]["code"] == "accounts_busy"
            gate.set()
            await wait_until(lambda: held == [200])
            assert (await ask(b)).status == 200
    assert glm.record.refreshes == 1
    assert glm.record.concurrent_rejections == 0
    assert set(glm.record.max_active_per_account.values()) == {1}


async def test_a_killed_relay_frees_its_account_within_the_expiry(
    shared_redis: str, glm: GlmEmulator, nursery: trio.Nursery
) -> None:
    """A relay killed (SIGKILL) while it streams on the only account leaves its lease
    in Redis, due to expire within redis_lease_expiry; the other relay then gets the
    account, with the session the dead one logged in."""
    import coredis

    expiry = 1.0
    lease_key = f"relay:glm:{token_id(TOKEN_X)}:leases"
    lease_settings = {"redis_lease_expiry": expiry, "redis_lease_renew": 0.2}
    async with relay_child(shared_redis, glm, (TOKEN_X,), **lease_settings) as a, \
            relay_child(shared_redis, glm, (TOKEN_X,), account_wait_timeout=WAIT_LIMIT_S,
                        **lease_settings) as b, \
            coredis.Redis.from_url(shared_redis, decode_responses=True) as client:
        gate = trio.Event()
        glm.behavior.first_gate = gate

        async def doomed() -> None:
            with pytest.raises(httpcore.RemoteProtocolError):
                await ask(a)

        with trio.fail_after(WAIT_LIMIT_S):
            nursery.start_soon(doomed)
            await glm.wait_until(lambda record: len(record.streams) == 1)
            [(_, score)] = await client.zrange(lease_key, 0, -1, withscores=True)
            now_ms = await client.eval(
                "local t = redis.call('TIME') return t[1] * 1000 + math.floor(t[2] / 1000)")
            assert isinstance(now_ms, int)
            assert 0 < score - now_ms <= expiry * 1000
            a.process.kill()
            await a.process.wait()
            gate.set()  # the emulator sees the dead client and ends its stream
            await glm.wait_until(lambda record: record.active_streams == 0)
            glm.behavior.first_gate = None
            assert (await ask(b)).status == 200

        async def released() -> bool:  # b releases just after its answer is out
            return await client.zcard(lease_key) == 0

        await wait_until(released)
    assert glm.record.refreshes == 1
    assert glm.record.concurrent_rejections == 0


async def test_a_conversation_kept_on_one_relay_continues_on_the_other(
    shared_redis: str, glm: GlmEmulator
) -> None:
    """With two accounts, a conversation a client keeps (conversation_id "") through one
    relay is continued through the other with the account that owns it (another
    account would get "conversation not found")."""
    async with relay_child(shared_redis, glm, (TOKEN_X, TOKEN_Y)) as a, \
            relay_child(shared_redis, glm, (TOKEN_X, TOKEN_Y)) as b:
        with trio.fail_after(WAIT_LIMIT_S):
            first = await ask(a, conversation_id="")
            assert first.status == 200
            conversation = orjson.loads(first.content)["id"]
            for relay in (b, a, b):
                follow_up = await ask(relay, conversation_id=conversation)
                assert follow_up.status == 200, follow_up.content
    assert [s["conversation_id"] for s in glm.record.streams] == ["", *[conversation] * 3]
    assert glm.record.conversations_deleted == []


async def test_an_openai_compatible_upstreams_rested_key_is_rested_on_every_relay(
    shared_redis: str, glm: GlmEmulator, nursery: trio.Nursery
) -> None:
    """Two relays with one OpenAI-compatible upstream and one Redis (the relay used not to
    start: the provider had no session codec). Its first key is rate-limited: the relay
    that meets it rests it and answers on the second, and the other relay, seeing the rest
    in Redis, asks the second key straight away."""
    keys = ("sk-shared-0", "sk-shared-1")
    upstream = OpenAIEmulator(keys=keys, behavior=OpenAIBehavior(answer="hello",
                                                                  busy_keys={keys[0]}))
    await nursery.start(upstream.serve)
    upstreams = json.dumps([{"name": "up", "base_url": upstream.base_url,
                             "api_keys": list(keys), "models": ["up-chat"]}])
    async with relay_child(shared_redis, glm, (TOKEN_X,), openai_upstreams=upstreams) as a, \
            relay_child(shared_redis, glm, (TOKEN_X,), openai_upstreams=upstreams) as b:
        with trio.fail_after(WAIT_LIMIT_S):
            for relay in (a, b):
                reply = await ask(relay, model="up-chat")
                assert reply.status == 200, reply.content
                assert orjson.loads(reply.content)["choices"][0]["message"]["content"] == "hello"
    assert upstream.record.keys == [keys[0], keys[1], keys[1]]


@COREDIS_FAILED_CONNECT
async def test_ready_says_when_redis_is_unreachable(
    tmp_path: Path, collect_garbage: None, relay_factory: RelayFactory
) -> None:
    """GET /ready is 200 with Redis up, and 503 naming the shared state once it is gone."""
    if REDIS_SERVER is None:
        pytest.skip(MISSING)
    with redis_server(tmp_path) as server:
        relay = await relay_factory(redis_url=server.url, api_keys="k",
                                    step_tokens=STEP_CREDENTIAL)
        async with httpcore.AsyncConnectionPool() as pool:
            with trio.fail_after(WAIT_LIMIT_S):
                up = await pool.request("GET", relay.base_url + "/ready")
                server.process.kill()
                server.process.wait()
                down = await pool.request("GET", relay.base_url + "/ready")
    assert up.status == 200
    assert down.status == 503
    assert "shared account state is unreachable" in orjson.loads(down.content)["reason"]
