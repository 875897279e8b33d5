"""Upstream accounts: which one serves a request, its session, its health.

This module alone owns account state (STYLE.md section 4): the cached
session (access token) of each account, its health, how many streams it is
serving, and which account owns each conversation kept upstream.

- **Sessions** are cached until ``token_refresh_margin`` seconds before the
  provider's TTL runs out. At most one login per account is in flight
  (single-flight): concurrent callers wait for that one :class:`_Flight` and
  get its session or *its* exception. The reference passed a failed refresh to
  its waiters as if it were a token and cached it (PROTOCOLS.md 5.19); here a
  failure is never cached.
- **Health**: an auth failure evicts the session and rests the account for
  ``account_cooldown`` seconds. A resting account is chosen only when no
  other candidate is left, so one revoked token does not fail every request.
- **Concurrency**: an account serves at most ``max_streams`` requests at once
  (ChatGLM serves one stream per account). When every candidate is at its
  limit, callers wait, in arrival order, up to ``account_wait_timeout``, then
  get :class:`NoAccountFree` (429).
- **Kept conversations** (a provider that is a
  :class:`~providers.contract.ConversationKeeper`, ChatGLM): the account that
  created a conversation the client keeps is its owner; a follow-up that
  continues it is served by that account alone (another account's session
  would get "conversation not found").

Where that state lives is an :class:`AccountState`, one per pool:

- :class:`LocalState` keeps it in this process (the default). Its methods
  never suspend (they are ``async`` only to share the interface), so a
  release hands its slot to a waiter atomically, as plain code would.
- :class:`relay.shared.RedisState` (``RELAY_REDIS_URL``) keeps it in Redis,
  shared by every worker and instance: leases with an expiry the holder
  renews, cool-downs, sessions as JSON, a refresh lock, conversation owners.
  Other instances release accounts without telling us, so a waiter here
  also looks again every :data:`POLL_S`.

The pool itself keeps what is this process's alone: the FIFO queue of
waiting callers, the in-process single flight of logins (so one task per
process talks to the shared state about a login), and the counters of
:meth:`AccountPool.statistics` (this process's streams and logins).

Accounts named by clients in ``Authorization`` (open mode) are kept in a
bounded LRU map keyed by the credential, so their sessions survive between
requests without letting a stream of made-up tokens grow memory without
bound. Accounts of the server-side pools are kept for the process's life.

Credentials are secrets: they are never logged or shown; :attr:`Account.id`
(a short SHA-256 prefix) stands in for them, in logs and in Redis key names.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections import OrderedDict, deque
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, cast

import trio

from protocol.errors import NoAccountFree, RelayError
from providers.contract import ConversationKeeper, SessionT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
    from contextlib import AbstractAsyncContextManager

    from protocol.openai import ChatRequest
    from providers.contract import Provider
    from relay.config import Settings

log = logging.getLogger("relay.accounts")

MAX_CLIENT_ACCOUNTS = 10_000
#: Conversation owners kept in-process (least recently used forgotten first)
MAX_CONVERSATIONS = 100_000
#: With shared state, how often a waiting caller looks for an account freed elsewhere
POLL_S = 0.1
#: The longest conversation id whose owner is remembered (ChatGLM's are 24 characters)
MAX_CONVERSATION_ID_CHARS = 128


def token_id(credential: str) -> str:
    """A short, stable, non-reversible name for a credential (for logs)."""
    return hashlib.sha256(credential.encode()).hexdigest()[:10]


class _Flight:
    """One login in progress in this process; waiters share its outcome."""

    __slots__ = ("done", "error", "session")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.session: object | None = None
        self.error: BaseException | None = None


@dataclass(eq=False)
class Account:
    """One upstream account of one provider.

    ``active``, ``served``, ``resting_until`` and ``logins`` are this
    process's view (with :class:`LocalState`, the whole truth); ``session``
    and ``session_expires`` are :class:`LocalState`'s cache.
    """

    provider: str
    credential: str = field(repr=False)
    id: str = ""
    active: int = 0
    served: int = 0
    failures: int = 0
    resting_until: float = 0.0
    session: object | None = field(default=None, repr=False)
    session_expires: float = 0.0
    logins: int = 0
    _flight: _Flight | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = token_id(self.credential)


@dataclass(eq=False, slots=True)
class Lease:
    """One of an account's stream slots, held until released."""

    account: Account
    #: names the lease in shared state ("" in-process)
    token: str = ""


class _Waiter:
    """One caller queued for an account; whoever serves the queue hands it a lease."""

    __slots__ = ("candidates", "lease", "wake")

    def __init__(self, candidates: Sequence[Account]) -> None:
        self.candidates = candidates
        self.wake = trio.Event()
        self.lease: Lease | None = None


class AccountState(Protocol):
    """Where the state of one provider's accounts lives.

    Two implementations: :class:`LocalState` (this process) and
    :class:`relay.shared.RedisState` (every worker and instance). Both keep
    ``Account.active``, ``served`` and ``resting_until`` up to date for this
    process's own leases and rests (the statistics read them).
    """

    #: True when accounts may be freed where this process cannot see it (other
    #: instances, expired leases): waiting callers then look again every POLL_S
    shared: bool

    def connected(self) -> AbstractAsyncContextManager[None]:
        """Connect for the block (and renew leases meanwhile); nothing to do in-process.

        Raises:
            ConfigError: the shared state cannot be reached.
        """
        ...

    async def ping(self) -> None:
        """Check that the state can be reached now (``/ready``); nothing to do in-process.

        Raises:
            RelayError: (503) it cannot.
        """
        ...

    async def take(self, candidates: Sequence[Account], limit: int) -> Lease | None:
        """Lease the best account of ``candidates`` that is under ``limit`` streams.

        Best: not resting, then fewest active streams, then fewest served
        (rotation), then first. ``limit`` 0 means no limit.

        Returns:
            The lease, or None when every candidate is at its limit.

        Raises:
            RelayError: (503) the shared state is unreachable.
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give a lease back. Never raises; shielded from cancellation and bounded."""
        ...

    async def rest(self, acc: Account, seconds: float) -> None:
        """Mark the account resting for ``seconds`` (an auth failure)."""
        ...

    async def resting(self, accounts: Sequence[Account]) -> list[float]:
        """Seconds each account still rests (0.0: healthy)."""
        ...

    async def get_session(self, acc: Account) -> object | None:
        """The account's cached session, None when there is none or it expired."""
        ...

    async def evict_session(self, acc: Account, session: object | None) -> None:
        """Forget the cached session (only if it is still ``session``, when given)."""
        ...

    async def refresh(
        self, acc: Account, login: Callable[[], Awaitable[object]], ttl: float
    ) -> object:
        """Log in once (``login``) for every process sharing this state, or wait for
        the login another one is running; cache the session for ``ttl`` seconds.

        Returns:
            The new session (``login``'s, or the other process's).

        Raises:
            RelayError: ``login``'s failure, or the other process's (as it was raised).
        """
        ...

    async def owner(self, conversation_id: str) -> str | None:
        """The id of the account that owns a kept conversation, if known."""
        ...

    async def set_owner(self, conversation_id: str, account_id: str) -> None:
        """Remember the owner of a kept conversation. Shielded and bounded."""
        ...


class LocalState:
    """Account state in this process: the fields of :class:`Account` and a bounded map.

    No method suspends; cancellation cannot cut one in half.
    """

    shared = False

    def __init__(self) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        yield

    async def ping(self) -> None:
        return

    async def take(self, candidates: Sequence[Account], limit: int) -> Lease | None:
        now = trio.current_time()
        best: Account | None = None
        best_key: tuple[bool, int, int] | None = None
        for acc in candidates:
            if limit and acc.active >= limit:
                continue
            key = (acc.resting_until > now, acc.active, acc.served)
            if best_key is None or key < best_key:
                best, best_key = acc, key
        if best is None:
            return None
        best.active += 1
        best.served += 1
        return Lease(best)

    async def release(self, lease: Lease) -> None:
        lease.account.active -= 1

    async def rest(self, acc: Account, seconds: float) -> None:
        acc.resting_until = trio.current_time() + seconds

    async def resting(self, accounts: Sequence[Account]) -> list[float]:
        now = trio.current_time()
        return [max(acc.resting_until - now, 0.0) for acc in accounts]

    async def get_session(self, acc: Account) -> object | None:
        if acc.session is not None and trio.current_time() < acc.session_expires:
            return acc.session
        return None

    async def evict_session(self, acc: Account, session: object | None) -> None:
        if session is None or acc.session is session:
            acc.session = None
            acc.session_expires = 0.0

    async def refresh(
        self, acc: Account, login: Callable[[], Awaitable[object]], ttl: float
    ) -> object:
        # one process: the pool's single flight is the only lock needed
        session = await login()
        acc.session = session
        acc.session_expires = trio.current_time() + ttl
        return session

    async def owner(self, conversation_id: str) -> str | None:
        owner = self._owners.get(conversation_id)
        if owner is not None:
            self._owners.move_to_end(conversation_id)
        return owner

    async def set_owner(self, conversation_id: str, account_id: str) -> None:
        owners = self._owners
        owners[conversation_id] = account_id
        owners.move_to_end(conversation_id)
        while len(owners) > MAX_CONVERSATIONS:
            del owners[next(iter(owners))]


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot for /metrics (this process's view)."""

    provider: str
    accounts: int
    active_streams: int
    resting: int
    waiting: int
    logins: int
    #: logins of accounts that had logged in before (expired or refused tokens renewed)
    refreshes: int = 0


class AccountPool(Generic[SessionT]):
    """The accounts of one provider, whose sessions are ``SessionT``.

    Sessions are kept as ``object`` by the state; the pool that stored them
    hands them back as ``SessionT``.
    """

    def __init__(
        self,
        provider: Provider[SessionT],
        settings: Settings,
        max_streams: int,
        state: AccountState | None = None,
    ) -> None:
        """
        Args:
            provider: logs accounts in.
            settings: timeouts and cool-down.
            max_streams: concurrent requests per account, 0 for no limit.
            state: where account state lives; this process by default
                (``relay/registry.py`` passes a RedisState when ``redis_url`` is set).
        """
        self.provider = provider
        self._settings = settings
        self._max_streams = max_streams
        self.state: AccountState = state or LocalState()
        self._server: dict[str, Account] = {}
        self._clients: OrderedDict[str, Account] = OrderedDict()
        # FIFO: freed slots go to the first waiter that can use them, so a
        # newcomer never overtakes a caller that was already waiting
        self._queue: deque[_Waiter] = deque()
        self._serving = False  # a task is handing out leases to the queue
        self._again = False  # ... and must look once more when done
        self._logins = 0
        self._refreshes = 0

    def connected(self) -> AbstractAsyncContextManager[None]:
        """The pool's state connected for the block (Redis; nothing in-process)."""
        return self.state.connected()

    # --- which accounts ------------------------------------------------------------

    def server_accounts(self, credentials: Sequence[str]) -> list[Account]:
        """Accounts of the server-side pool (kept for good)."""
        out = []
        for cred in credentials:
            acc = self._server.get(cred)
            if acc is None:
                acc = self._server[cred] = Account(self.provider.name, cred)
            out.append(acc)
        return out

    def client_accounts(self, credentials: Sequence[str]) -> list[Account]:
        """Accounts named by a client (bounded LRU)."""
        out = []
        clients = self._clients
        for cred in credentials:
            acc = self._server.get(cred) or clients.get(cred)
            if acc is None:
                acc = clients[cred] = Account(self.provider.name, cred)
                while len(clients) > MAX_CLIENT_ACCOUNTS:
                    oldest = next(iter(clients))
                    if clients[oldest].active:
                        clients.move_to_end(oldest)
                        break
                    del clients[oldest]
            elif cred in clients:
                clients.move_to_end(cred)
            out.append(acc)
        return out

    # --- kept conversations ----------------------------------------------------------

    async def for_conversation(
        self, candidates: Sequence[Account], request: ChatRequest
    ) -> Sequence[Account]:
        """The candidates that may serve ``request``: the owner alone for a follow-up.

        When the request continues a kept conversation whose owner is known
        and among ``candidates``, only that account can serve it; otherwise
        every candidate can (an unknown conversation is the upstream's to refuse).

        Raises:
            RelayError: (503) the shared state is unreachable.
        """
        provider = self.provider
        if not isinstance(provider, ConversationKeeper):
            return candidates
        conversation_id = provider.continued_conversation(request)
        if not conversation_id or len(conversation_id) > MAX_CONVERSATION_ID_CHARS:
            return candidates
        owner = await self.state.owner(conversation_id)
        owned = [acc for acc in candidates if acc.id == owner]
        return owned[:1] or candidates

    async def remember_conversation(
        self, request: ChatRequest, conversation_id: str, account_id: str
    ) -> None:
        """Note that ``account_id`` owns ``conversation_id``, if the answer kept it.

        Shielded and bounded: it may run while the request is being cancelled
        (the client left after the conversation was named). Never raises.
        """
        provider = self.provider
        if (
            conversation_id
            and account_id
            and len(conversation_id) <= MAX_CONVERSATION_ID_CHARS
            and isinstance(provider, ConversationKeeper)
            and provider.keeps_conversation(request)
        ):
            await self.state.set_owner(conversation_id, account_id)

    # --- leasing ---------------------------------------------------------------------

    @asynccontextmanager
    async def lease(
        self, candidates: Sequence[Account], exclude: set[Account] | None = None
    ) -> AsyncIterator[Account]:
        """Hold one account of ``candidates`` for the duration of the block.

        The least busy healthy account is chosen; resting ones only when no
        other is free. Waits (bounded) while all are at their limit.

        Raises:
            NoAccountFree: none became free within ``account_wait_timeout``,
                or every candidate is in ``exclude``.
            RelayError: (503) the shared state is unreachable.
        """
        exclude = exclude or set()
        usable = [c for c in candidates if c not in exclude]
        if not usable:
            raise NoAccountFree(f"no {self.provider.name} account left to try")
        lease = None
        if not self._wanted(usable):
            lease = await self.state.take(usable, self._max_streams)
        if lease is None:
            lease = await self._wait_for_account(usable)
        try:
            yield lease.account
        finally:
            await self._release(lease)

    def _wanted(self, candidates: Iterable[Account]) -> bool:
        """Whether a queued waiter may want one of ``candidates`` (then newcomers queue)."""
        if not self._queue:
            return False
        wanted = {acc for waiter in self._queue for acc in waiter.candidates}
        return any(acc in wanted for acc in candidates)

    async def _wait_for_account(self, candidates: Sequence[Account]) -> Lease:
        waiter = _Waiter(candidates)
        self._queue.append(waiter)
        deadline = trio.current_time() + self._settings.account_wait_timeout
        poll = POLL_S if self.state.shared else math.inf  # in-process, releases wake us
        try:
            await self._serve_queue()
            while waiter.lease is None and trio.current_time() < deadline:
                with trio.move_on_at(min(deadline, trio.current_time() + poll)):
                    await waiter.wake.wait()
                waiter.wake = trio.Event()
                if waiter.lease is None:
                    await self._serve_queue()
        except BaseException:
            await self._withdraw(waiter)
            raise
        if waiter.lease is None:
            await self._withdraw(waiter)
            raise NoAccountFree(
                f"every {self.provider.name} account is busy; try again shortly",
                code="accounts_busy",
            )
        return waiter.lease

    async def _serve_queue(self) -> None:
        """Hand free accounts to queued waiters, first come first served.

        In-process this never suspends. With shared state it does (one take
        per waiter, skipping candidate sets that just found nothing free);
        one task serves the queue at a time, and looks once more if
        something changed meanwhile.
        """
        if self._serving:
            self._again = True
            return
        self._serving = True
        try:
            again = True
            while again:
                self._again = False
                full: set[frozenset[Account]] = set()
                for waiter in list(self._queue):
                    if self.state.shared:  # a cancelled task stops serving (others poll)
                        await trio.lowlevel.checkpoint_if_cancelled()
                    key = frozenset(waiter.candidates)
                    if waiter.lease is not None or key in full:
                        continue
                    lease = await self.state.take(waiter.candidates, self._max_streams)
                    if lease is None:
                        full.add(key)
                    elif waiter in self._queue:
                        self._queue.remove(waiter)
                        waiter.lease = lease
                        waiter.wake.set()
                    else:  # it left while the take was on its way
                        await self.state.release(lease)
                again = self._again
        finally:
            self._serving = False

    async def _withdraw(self, waiter: _Waiter) -> None:
        """Take ``waiter`` off the queue, or give back what it was handed."""
        if waiter.lease is None:
            if waiter in self._queue:
                self._queue.remove(waiter)
        else:
            # handed an account while its cancellation was already on the way
            lease, waiter.lease = waiter.lease, None
            await self._release(lease)

    async def _release(self, lease: Lease) -> None:
        """Give the lease back, and let the queue have the freed slot."""
        await self.state.release(lease)
        if not self._queue:
            return
        if self.state.shared:
            # each waiter's own task serves the queue (never a cancelled releaser)
            for waiter in self._queue:
                waiter.wake.set()
        else:
            await self._serve_queue()  # in-process: never suspends

    # --- sessions ------------------------------------------------------------------------

    async def session(self, acc: Account) -> SessionT:
        """The account's session, logging in (once, shared) when needed.

        Raises:
            AuthError: the credential was refused (the account then rests).
            UpstreamFailed, UpstreamTimeout: the login call failed.
            RelayError: (503) the shared state is unreachable.
        """
        while True:
            session = await self.state.get_session(acc)
            if session is not None:
                return cast("SessionT", session)
            flight = acc._flight
            if flight is None:
                return await self._login(acc)
            await flight.done.wait()
            if flight.error is not None:
                raise copy.copy(flight.error)
            if flight.session is not None:
                return cast("SessionT", flight.session)
            # the leader was cancelled: loop and lead a new login ourselves

    async def _login(self, acc: Account) -> SessionT:
        flight = acc._flight = _Flight()
        ttl = max(self.provider.session_ttl - self._settings.token_refresh_margin,
                  self.provider.session_ttl / 2)

        async def login() -> object:
            try:
                session = await self.provider.login(acc.credential)
            except RelayError as exc:
                if exc.status == 401:
                    await self.rest(acc, "login refused")
                raise
            if acc.logins:
                self._refreshes += 1
            acc.logins += 1
            self._logins += 1
            log.info("%s account %s logged in", self.provider.name, acc.id)
            return session

        try:
            session = await self.state.refresh(acc, login, ttl)
        except RelayError as exc:
            flight.error = exc
            raise
        finally:
            acc._flight = None
            flight.done.set()
        flight.session = session
        return cast("SessionT", session)

    async def evict(self, acc: Account, session: SessionT | None = None) -> None:
        """Forget the account's session (only if it is still ``session``, when given)."""
        await self.state.evict_session(acc, session)

    async def rest(self, acc: Account, why: str) -> None:
        """An auth failure: evict the session and rest the account."""
        await self.evict(acc)
        acc.failures += 1
        await self.state.rest(acc, self._settings.account_cooldown)
        log.warning("%s account %s rests for %.0f s: %s", self.provider.name, acc.id,
                    self._settings.account_cooldown, why)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot for /metrics: this process's streams, rests and logins."""
        now = trio.current_time()
        accounts = [*self._server.values(), *self._clients.values()]
        return PoolStatistics(
            provider=self.provider.name,
            accounts=len(accounts),
            active_streams=sum(a.active for a in accounts),
            resting=sum(1 for a in accounts if a.resting_until > now),
            waiting=len(self._queue),
            logins=self._logins,
            refreshes=self._refreshes,
        )

    async def all_resting(self, credentials: Sequence[str]) -> str | None:
        """Why the server-side pool of ``credentials`` cannot serve now, or None.

        It cannot when every one of its accounts rests after auth failures.

        Raises:
            RelayError: (503) the shared state is unreachable.
        """
        if not credentials:
            return None
        resting = await self.state.resting(self.server_accounts(credentials))
        if all(seconds > 0 for seconds in resting):
            return (f"every {self.provider.name} account is resting after auth failures "
                    f"(the first is back in {min(resting):.0f} s)")
        return None


@asynccontextmanager
async def connected(pools: Iterable[AccountPool[Any]]) -> AsyncIterator[None]:
    """Every pool's state connected for the block (``App.serve`` wraps serving in it).

    Raises:
        ConfigError: a shared state cannot be reached.
    """
    async with AsyncExitStack() as stack:
        for pool in pools:
            await stack.enter_async_context(pool.connected())
        yield
