"""Tests of relay/accounts.py: sessions (single-flight, failure, TTL) and leases.

The provider is a fake whose ``login`` the test controls: how long it takes,
what it returns, what it raises. Time is trio's ``autojump_clock``, so a
login that "takes 10 s" or a 30 s wait for an account costs nothing real.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import pytest
import trio
import trio.testing

from protocol.errors import AuthError, NoAccountFree, RelayError, UpstreamFailed
from relay import accounts
from relay.accounts import Account, AccountPool, token_id
from relay.config import Settings

if TYPE_CHECKING:
    from providers.contract import Provider

LOGIN_S = 10.0
TTL_S = 3600.0
MARGIN_S = 60.0
COOLDOWN_S = 60.0
WAIT_S = 30.0


class FakeProvider:
    """Just what AccountPool uses of a provider: a name, a TTL and login()."""

    name = "fake"
    session_ttl = TTL_S

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.login_s = LOGIN_S
        self.errors: list[RelayError] = []  # raised by the next logins, in order

    async def login(self, credential: str) -> object:
        """Take ``login_s`` (trio time), then fail with the next queued error or succeed."""
        self.calls.append(credential)
        number = len(self.calls)
        await trio.sleep(self.login_s)
        if self.errors:
            raise self.errors.pop(0)
        return f"session-{credential}-{number}"


def make_pool(
    provider: FakeProvider | None = None, max_streams: int = 0, **settings: float
) -> AccountPool:
    """An AccountPool over ``provider`` with test-friendly settings."""
    values: dict[str, float] = {
        "account_wait_timeout": WAIT_S,
        "account_cooldown": COOLDOWN_S,
        "token_refresh_margin": MARGIN_S,
    }
    values.update(settings)
    fake = provider or FakeProvider()
    return AccountPool(cast("Provider", fake), Settings().with_changes(**values), max_streams)


def fake_of(pool: AccountPool) -> FakeProvider:
    """The fake provider behind ``pool``."""
    return cast("FakeProvider", pool.provider)


# --- sessions: single flight ----------------------------------------------------------


async def test_concurrent_callers_share_one_login(autojump_clock: trio.testing.MockClock) -> None:
    """Twenty tasks asking for the same account's session at once cause exactly one
    login, and every one of them gets that login's session."""
    pool = make_pool()
    (acc,) = pool.server_accounts(["cred-a"])
    results: list[object] = []

    async def ask() -> None:
        results.append(await pool.session(acc))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(ask)
    assert fake_of(pool).calls == ["cred-a"]
    assert len(results) == 20
    assert all(r is results[0] for r in results)
    assert results[0] == "session-cred-a-1"
    assert acc.logins == 1
    assert pool.statistics().logins == 1


async def test_cached_session_is_returned_without_login(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A second call after a login returns the cached session immediately (no trio time
    passes, no second login)."""
    pool = make_pool()
    (acc,) = pool.server_accounts(["cred-a"])
    first = await pool.session(acc)
    before = trio.current_time()
    second = await pool.session(acc)
    assert second is first
    assert trio.current_time() == before
    assert len(fake_of(pool).calls) == 1


async def test_accounts_log_in_independently(autojump_clock: trio.testing.MockClock) -> None:
    """Two accounts logging in at once do not share a flight: each gets its own session."""
    pool = make_pool()
    a, b = pool.server_accounts(["cred-a", "cred-b"])
    got: dict[str, object] = {}

    async def ask(acc: Account) -> None:
        got[acc.credential] = await pool.session(acc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, a)
        nursery.start_soon(ask, b)
    assert got == {"cred-a": "session-cred-a-1", "cred-b": "session-cred-b-2"} or got == {
        "cred-a": "session-cred-a-2",
        "cred-b": "session-cred-b-1",
    }
    assert sorted(fake_of(pool).calls) == ["cred-a", "cred-b"]


# --- sessions: failure ---------------------------------------------------------------


async def test_refused_login_reaches_every_waiter_and_is_not_cached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the one login is refused (AuthError), the leader and every waiter get an
    AuthError, nothing is cached, the account rests, and the next call logs in again."""
    pool = make_pool()
    fake = fake_of(pool)
    fake.errors.append(AuthError("token revoked", code="revoked"))
    (acc,) = pool.server_accounts(["cred-a"])
    outcomes: list[object] = []

    async def ask() -> None:
        try:
            outcomes.append(await pool.session(acc))
        except AuthError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(ask)
    assert len(fake.calls) == 1
    assert len(outcomes) == 8
    assert all(isinstance(o, AuthError) for o in outcomes)
    assert all(cast("AuthError", o).code == "revoked" for o in outcomes)
    assert acc.session is None
    assert acc.failures == 1
    assert pool.statistics().resting == 1
    assert pool.statistics().logins == 0

    session = await pool.session(acc)
    assert session == "session-cred-a-2"
    assert len(fake.calls) == 2


async def test_upstream_failure_of_login_does_not_rest_the_account(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A login that fails upstream (502, not 401) reaches every waiter as UpstreamFailed
    but does not rest the account: it is not the credential's fault."""
    pool = make_pool()
    fake = fake_of(pool)
    fake.errors.append(UpstreamFailed("bad gateway"))
    (acc,) = pool.server_accounts(["cred-a"])
    errors: list[BaseException] = []

    async def ask() -> None:
        try:
            await pool.session(acc)
        except UpstreamFailed as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
    assert len(errors) == 3
    assert len(fake.calls) == 1
    assert acc.failures == 0
    assert pool.statistics().resting == 0
    assert acc.session is None


async def test_resting_ends_after_the_cooldown(autojump_clock: trio.testing.MockClock) -> None:
    """An account rested by a refused login counts as resting for account_cooldown
    seconds and no longer afterwards."""
    pool = make_pool()
    (acc,) = pool.server_accounts(["cred-a"])
    await pool.rest(acc, "test")
    assert pool.statistics().resting == 1
    await trio.sleep(COOLDOWN_S - 1)
    assert pool.statistics().resting == 1
    await trio.sleep(2)
    assert pool.statistics().resting == 0


# --- sessions: cancellation -------------------------------------------------------------


async def test_cancelled_leader_hands_the_login_to_a_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """If the task leading a login is cancelled mid-login, a waiter logs in instead:
    the waiters get a session, nothing hangs, and later calls reuse that session."""
    pool = make_pool()
    fake = fake_of(pool)
    (acc,) = pool.server_accounts(["cred-a"])
    results: list[object] = []
    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await pool.session(acc)
        results.append("leader cancelled")

    async def waiter() -> None:
        results.append(await pool.session(acc))

    with trio.fail_after(LOGIN_S * 5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                nursery.start_soon(waiter)
            await trio.sleep(LOGIN_S / 2)
            leader_scope.cancel()
    assert results.count("leader cancelled") == 1
    sessions = [r for r in results if r != "leader cancelled"]
    assert sessions == ["session-cred-a-2"] * 3
    assert len(fake.calls) == 2
    assert acc._flight is None
    assert await pool.session(acc) == "session-cred-a-2"
    assert len(fake.calls) == 2


async def test_cancelled_lone_leader_leaves_no_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A login cancelled with no waiters leaves no flight behind; the next call logs in."""
    pool = make_pool()
    (acc,) = pool.server_accounts(["cred-a"])
    with trio.move_on_after(LOGIN_S / 2):
        await pool.session(acc)
    assert acc._flight is None
    assert acc.session is None
    with trio.fail_after(LOGIN_S * 2):
        assert await pool.session(acc) == "session-cred-a-2"


# --- sessions: TTL and eviction ----------------------------------------------------------


async def test_session_is_reused_until_ttl_minus_margin_then_refreshed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A session is reused until token_refresh_margin seconds before the provider's TTL
    runs out; after that the next call logs in again."""
    pool = make_pool()
    fake = fake_of(pool)
    fake.login_s = 0.0
    (acc,) = pool.server_accounts(["cred-a"])
    first = await pool.session(acc)
    await trio.sleep(TTL_S - MARGIN_S - 1)
    assert await pool.session(acc) is first
    assert len(fake.calls) == 1
    await trio.sleep(2)
    second = await pool.session(acc)
    assert second != first
    assert len(fake.calls) == 2


async def test_margin_larger_than_ttl_still_caches_for_half_the_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With a refresh margin larger than the TTL, the session is still cached for half the
    TTL instead of never (which would log in on every request)."""
    pool = make_pool(token_refresh_margin=TTL_S * 2)
    fake = fake_of(pool)
    fake.login_s = 0.0
    (acc,) = pool.server_accounts(["cred-a"])
    first = await pool.session(acc)
    await trio.sleep(TTL_S / 2 - 1)
    assert await pool.session(acc) is first
    await trio.sleep(2)
    assert await pool.session(acc) != first


async def test_evict_only_removes_the_named_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """evict(acc, session) forgets the session only while it is still that one (a late
    auth failure of an old session must not evict a fresh one); evict(acc) always does."""
    pool = make_pool()
    fake = fake_of(pool)
    fake.login_s = 0.0
    (acc,) = pool.server_accounts(["cred-a"])
    current = await pool.session(acc)
    await pool.evict(acc, "an older session")
    assert acc.session is current
    assert await pool.session(acc) is current
    assert len(fake.calls) == 1

    await pool.evict(acc, current)
    assert acc.session is None
    refreshed = await pool.session(acc)
    assert refreshed != current
    assert len(fake.calls) == 2

    await pool.evict(acc)
    assert acc.session is None


# --- leases ---------------------------------------------------------------------


async def test_lease_picks_the_least_busy_account(autojump_clock: trio.testing.MockClock) -> None:
    """Leases held at once spread over the accounts: each new lease takes the account with
    the fewest active streams."""
    pool = make_pool()
    accs = pool.server_accounts(["a", "b", "c"])
    held: list[Account] = []
    async with (
        pool.lease(accs) as first,
        pool.lease(accs) as second,
        pool.lease(accs) as third,
    ):
        held = [first, second, third]
        assert {acc.active for acc in accs} == {1}
        async with pool.lease(accs) as fourth:
            assert fourth.active == 2
            assert pool.statistics().active_streams == 4
    assert set(held) == set(accs)
    assert pool.statistics().active_streams == 0


async def test_lease_prefers_the_less_served_account_when_all_are_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Among idle accounts, sequential leases rotate (fewest served first)."""
    pool = make_pool()
    accs = pool.server_accounts(["a", "b"])
    order = []
    for _ in range(4):
        async with pool.lease(accs) as acc:
            order.append(acc.credential)
    assert order in (["a", "b", "a", "b"], ["b", "a", "b", "a"])
    assert [acc.served for acc in accs] == [2, 2]


async def test_second_lease_waits_for_the_first_with_one_stream_per_account(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With max_streams=1 and one account, a second lease waits until the first one is
    released, then gets the account."""
    pool = make_pool(max_streams=1)
    (acc,) = pool.server_accounts(["a"])
    got_at: list[float] = []

    async def second() -> None:
        async with pool.lease([acc]) as leased:
            got_at.append(trio.current_time())
            assert leased is acc

    start = trio.current_time()
    async with trio.open_nursery() as nursery, pool.lease([acc]):
        nursery.start_soon(second)
        await trio.sleep(5)
        assert got_at == []
        assert pool.statistics().waiting == 1
    assert got_at == [start + 5]
    assert pool.statistics().waiting == 0
    assert acc.active == 0


async def test_waiting_too_long_for_an_account_is_no_account_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lease that finds every account at its limit for account_wait_timeout seconds
    raises NoAccountFree (429, code accounts_busy) and stops counting as waiting."""
    pool = make_pool(max_streams=1)
    (acc,) = pool.server_accounts(["a"])
    async with pool.lease([acc]):
        start = trio.current_time()
        with pytest.raises(NoAccountFree) as info:
            async with pool.lease([acc]):
                pytest.fail("leased an account that was at its limit")
        assert trio.current_time() - start == pytest.approx(WAIT_S)
    assert info.value.status == 429
    assert info.value.code == "accounts_busy"
    assert pool.statistics().waiting == 0
    assert acc.active == 0


async def test_waiters_are_served_in_arrival_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Callers waiting for the one busy account get it in the order they started waiting,
    one after another as each releases it."""
    pool = make_pool(max_streams=1)
    (acc,) = pool.server_accounts(["a"])
    served: list[int] = []

    async def waiter(number: int) -> None:
        async with pool.lease([acc]):
            served.append(number)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery, pool.lease([acc]):
        for number in range(8):
            nursery.start_soon(waiter, number)
            await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().waiting == 8
    assert served == list(range(8))
    assert acc.active == 0


async def test_new_arrival_does_not_overtake_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A caller arriving just as the busy account is released does not jump the queue:
    the caller that was already waiting gets the account first."""
    pool = make_pool(max_streams=1)
    (acc,) = pool.server_accounts(["a"])
    served: list[str] = []

    async def take(name: str) -> None:
        async with pool.lease([acc]):
            served.append(name)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        async with pool.lease([acc]):
            nursery.start_soon(take, "waiting")
            await trio.testing.wait_all_tasks_blocked()
        # released; the newcomer starts before the waiter has run again
        nursery.start_soon(take, "newcomer")
    assert served == ["waiting", "newcomer"]


async def test_cancelled_waiter_does_not_block_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter cancelled while queued leaves the queue: the next waiter still gets the
    account when it is released, and nothing stays counted as active or waiting."""
    pool = make_pool(max_streams=1)
    (acc,) = pool.server_accounts(["a"])
    served: list[str] = []
    scope = trio.CancelScope()

    async def cancelled() -> None:
        with scope:
            async with pool.lease([acc]):
                served.append("cancelled")

    async def patient() -> None:
        async with pool.lease([acc]):
            served.append("patient")

    async with trio.open_nursery() as nursery, pool.lease([acc]):
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(patient)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().waiting == 1
    assert served == ["patient"]
    assert acc.active == 0
    assert pool.statistics().waiting == 0


async def test_waiter_cancelled_as_it_is_handed_the_account_passes_it_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter whose cancellation is already on its way when a release hands it the
    account gives the account back: the next waiter gets it instead of it leaking."""
    pool = make_pool(max_streams=1)
    (acc,) = pool.server_accounts(["a"])
    served: list[str] = []
    scope = trio.CancelScope()

    async def cancelled() -> None:
        with scope:
            async with pool.lease([acc]):
                served.append("cancelled")

    async def patient() -> None:
        async with pool.lease([acc]):
            served.append("patient")

    async with trio.open_nursery() as nursery, pool.lease([acc]):
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(patient)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # no checkpoint between this and the release below
    assert served == ["patient"]
    assert acc.active == 0
    assert pool.statistics().waiting == 0


async def test_waiter_takes_any_account_of_its_candidates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter whose candidates are all busy gets whichever of them is released first."""
    pool = make_pool(max_streams=1)
    a, b = pool.server_accounts(["a", "b"])
    got: list[Account] = []

    async def waiter() -> None:
        async with pool.lease([a, b]) as acc:
            got.append(acc)

    async with trio.open_nursery() as nursery, pool.lease([a]):
        async with pool.lease([b]):
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b]


async def test_release_of_an_unrelated_account_does_not_serve_a_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter for account a is not handed account b when b is released."""
    pool = make_pool(max_streams=1)
    a, b = pool.server_accounts(["a", "b"])
    got: list[Account] = []

    async def waiter() -> None:
        async with pool.lease([a]) as acc:
            got.append(acc)

    async with trio.open_nursery() as nursery, pool.lease([a]):
        async with pool.lease([b]):
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        assert pool.statistics().waiting == 1
    assert got == [a]


async def test_lease_respects_exclude(autojump_clock: trio.testing.MockClock) -> None:
    """Accounts in ``exclude`` (already tried by this request) are never leased."""
    pool = make_pool()
    a, b, c = pool.server_accounts(["a", "b", "c"])
    for _ in range(5):
        async with pool.lease([a, b, c], exclude={a, c}) as acc:
            assert acc is b


async def test_all_candidates_excluded_is_no_account_free_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When every candidate is excluded, lease raises NoAccountFree without waiting."""
    pool = make_pool(max_streams=1)
    a, b = pool.server_accounts(["a", "b"])
    start = trio.current_time()
    with pytest.raises(NoAccountFree) as info:
        async with pool.lease([a, b], exclude={a, b}):
            pytest.fail("leased an excluded account")
    assert trio.current_time() == start
    assert info.value.status == 429
    with pytest.raises(NoAccountFree):
        async with pool.lease([]):
            pytest.fail("leased from no candidates")


async def test_excluded_account_freed_does_not_serve_the_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter whose only non-excluded candidate is busy keeps waiting when an excluded
    account is released, and times out with NoAccountFree."""
    pool = make_pool(max_streams=1)
    a, b = pool.server_accounts(["a", "b"])
    async with pool.lease([b]):
        async with pool.lease([a]):
            pass  # a released at once; it is excluded below
        with pytest.raises(NoAccountFree):
            async with pool.lease([a, b], exclude={a}):
                pytest.fail("leased an excluded account")


async def test_resting_account_is_used_only_when_no_healthy_one_is_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A resting account loses to any free healthy one, even a busier one; it is leased
    only when every healthy account is at its limit."""
    pool = make_pool(max_streams=0)
    rested, healthy = pool.server_accounts(["rested", "healthy"])
    await pool.rest(rested, "test")
    async with pool.lease([rested, healthy]) as one, pool.lease([rested, healthy]) as two:
        assert one is healthy
        assert two is healthy

    limited = make_pool(max_streams=1)
    rested, healthy = limited.server_accounts(["rested", "healthy"])
    await limited.rest(rested, "test")
    async with limited.lease([rested, healthy]) as first:
        assert first is healthy
        async with limited.lease([rested, healthy]) as second:
            assert second is rested


async def test_rested_account_is_healthy_again_after_the_cooldown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After account_cooldown a rested account competes normally again."""
    pool = make_pool()
    rested, other = pool.server_accounts(["rested", "other"])
    await pool.rest(rested, "test")
    other.served = 5  # would lose on "served" to a healthy rested account
    async with pool.lease([rested, other]) as acc:
        assert acc is other
    await trio.sleep(COOLDOWN_S + 1)
    async with pool.lease([rested, other]) as acc:
        assert acc is rested


# --- accounts: server pool and client LRU ----------------------------------------------------


async def test_server_accounts_are_created_once(autojump_clock: trio.testing.MockClock) -> None:
    """server_accounts returns the same Account objects on every call."""
    pool = make_pool()
    first = pool.server_accounts(["a", "b"])
    second = pool.server_accounts(["b", "a"])
    assert second == [first[1], first[0]]
    assert pool.statistics().accounts == 2


async def test_client_accounts_are_bounded_lru(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client-named accounts are kept in an LRU map of MAX_CLIENT_ACCOUNTS entries: many
    made-up credentials do not grow memory, the recently used survive, and the
    server pool's accounts are never evicted."""
    monkeypatch.setattr(accounts, "MAX_CLIENT_ACCOUNTS", 3)
    pool = make_pool()
    servers = pool.server_accounts(["s1", "s2"])
    (kept,) = pool.client_accounts(["c0"])
    for number in range(1, 50):
        pool.client_accounts([f"c{number}"])
        pool.client_accounts(["c0"])  # keep c0 the most recently used
        assert pool.statistics().accounts <= 2 + 3
    assert pool.statistics().accounts == 2 + 3
    assert pool.client_accounts(["c0"]) == [kept]
    assert pool.server_accounts(["s1", "s2"]) == servers
    # a client naming a server credential gets the server's account, not a copy
    assert pool.client_accounts(["s1"]) == [servers[0]]
    # an evicted credential comes back as a fresh account
    (again,) = pool.client_accounts(["c1"])
    assert again.logins == 0
    assert again.served == 0


async def test_client_account_in_use_is_not_evicted(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client account serving a stream survives the LRU bound (its state, such as its
    active count, must not be lost), and the map shrinks back once it is released."""
    monkeypatch.setattr(accounts, "MAX_CLIENT_ACCOUNTS", 2)
    pool = make_pool()
    (busy,) = pool.client_accounts(["busy"])
    async with pool.lease([busy]):
        for number in range(10):
            pool.client_accounts([f"c{number}"])
        assert pool.client_accounts(["busy"]) == [busy]
        assert pool.statistics().accounts <= 3
    for number in range(10, 20):
        pool.client_accounts([f"c{number}"])
    assert pool.statistics().accounts == 2


async def test_client_session_survives_between_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two requests naming the same client credential share its account and session."""
    pool = make_pool()
    (first,) = pool.client_accounts(["client-cred"])
    session = await pool.session(first)
    (second,) = pool.client_accounts(["client-cred"])
    assert second is first
    assert await pool.session(second) is session
    assert len(fake_of(pool).calls) == 1


def test_token_id_is_stable_short_and_hides_the_credential() -> None:
    """token_id gives the same short hex name for the same credential, different names
    for different ones, and never contains the credential; Account uses it as id and
    keeps the credential out of its repr."""
    credential = "device1@very-secret-oasis-token"
    name = token_id(credential)
    assert name == token_id(credential)
    assert name != token_id(credential + "x")
    assert len(name) <= 16
    assert all(ch in "0123456789abcdef" for ch in name)
    assert credential not in name
    acc = Account("fake", credential)
    assert acc.id == name
    assert "very-secret" not in repr(acc)
