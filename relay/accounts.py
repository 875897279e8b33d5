"""Upstream accounts: which one serves a request, its session, its health.

This module alone owns account state (STYLE.md section 4): the cached
session (access token) of each account, its health, and how many streams it
is serving.

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

Accounts named by clients in ``Authorization`` (open mode) are kept in a
bounded LRU map keyed by the credential, so their sessions survive between
requests without letting a stream of made-up tokens grow memory without
bound. Accounts of the server-side pools are kept for the process's life.

Credentials are secrets: they are never logged or shown; :attr:`Account.id`
(a short SHA-256 prefix) stands in for them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, cast

import trio

from protocol.errors import NoAccountFree, RelayError
from providers.contract import SessionT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from providers.contract import Provider
    from relay.config import Settings

log = logging.getLogger("relay.accounts")

MAX_CLIENT_ACCOUNTS = 10_000


def token_id(credential: str) -> str:
    """A short, stable, non-reversible name for a credential (for logs)."""
    return hashlib.sha256(credential.encode()).hexdigest()[:10]


class _Flight:
    """One login in progress; waiters share its outcome."""

    __slots__ = ("done", "error", "session")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.session: object | None = None
        self.error: BaseException | None = None


class _Waiter:
    """One caller queued for an account; a release hands it one directly."""

    __slots__ = ("account", "candidates", "exclude", "granted")

    def __init__(self, candidates: Sequence[Account], exclude: set[Account]) -> None:
        self.candidates = candidates
        self.exclude = exclude
        self.granted = trio.Event()
        self.account: Account | None = None


@dataclass(eq=False)
class Account:
    """One upstream account of one provider."""

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


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot for /metrics."""

    provider: str
    accounts: int
    active_streams: int
    resting: int
    waiting: int
    logins: int


class AccountPool(Generic[SessionT]):
    """The accounts of one provider, whose sessions are ``SessionT``.

    An :class:`Account` keeps its session as ``object``; the pool that
    created it stored it there, so it hands it back as ``SessionT``.
    """

    def __init__(
        self, provider: Provider[SessionT], settings: Settings, max_streams: int
    ) -> None:
        """
        Args:
            provider: logs accounts in.
            settings: timeouts and cool-down.
            max_streams: concurrent requests per account, 0 for no limit.
        """
        self.provider = provider
        self._settings = settings
        self._max_streams = max_streams
        self._server: dict[str, Account] = {}
        self._clients: OrderedDict[str, Account] = OrderedDict()
        # FIFO: a release hands the freed slot to the first waiter that can use it,
        # so a newcomer never overtakes a caller that was already waiting
        self._queue: deque[_Waiter] = deque()
        self._logins = 0

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

    # --- leasing ---------------------------------------------------------------------

    def _pick(self, candidates: Sequence[Account], exclude: set[Account]) -> Account | None:
        now = trio.current_time()
        best: Account | None = None
        best_key: tuple[bool, int, int] | None = None
        for acc in candidates:
            if acc in exclude:
                continue
            if self._max_streams and acc.active >= self._max_streams:
                continue
            key = (acc.resting_until > now, acc.active, acc.served)
            if best_key is None or key < best_key:
                best, best_key = acc, key
        return best

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
        """
        exclude = exclude or set()
        if not [c for c in candidates if c not in exclude]:
            raise NoAccountFree(f"no {self.provider.name} account left to try")
        # Pickable accounts are never wanted by a queued waiter (each release is
        # handed off at once), so taking one here does not overtake anybody.
        acc = self._pick(candidates, exclude)
        if acc is None:
            acc = await self._wait_for_account(candidates, exclude)
        else:
            self._take(acc)
        try:
            yield acc
        finally:
            self._release(acc)

    async def _wait_for_account(
        self, candidates: Sequence[Account], exclude: set[Account]
    ) -> Account:
        waiter = _Waiter(candidates, exclude)
        self._queue.append(waiter)
        try:
            with trio.move_on_after(self._settings.account_wait_timeout):
                await waiter.granted.wait()
        except BaseException:
            self._withdraw(waiter)
            raise
        if waiter.account is None:
            self._withdraw(waiter)
            raise NoAccountFree(
                f"every {self.provider.name} account is busy; try again shortly",
                code="accounts_busy",
            )
        return waiter.account

    def _withdraw(self, waiter: _Waiter) -> None:
        """Take ``waiter`` off the queue, or give back what it was handed."""
        if waiter.account is None:
            self._queue.remove(waiter)
        else:
            # handed an account while its cancellation was already on the way
            acc, waiter.account = waiter.account, None
            self._release(acc)

    @staticmethod
    def _take(acc: Account) -> None:
        acc.active += 1
        acc.served += 1

    def _release(self, acc: Account) -> None:
        """Free one slot of ``acc`` and hand it to the first waiter that can use it."""
        acc.active -= 1
        # One slot was freed, so at most one waiter can be served by it.
        for waiter in self._queue:
            chosen = self._pick(waiter.candidates, waiter.exclude)
            if chosen is not None:
                self._queue.remove(waiter)
                self._take(chosen)
                waiter.account = chosen
                waiter.granted.set()
                return

    # --- sessions ------------------------------------------------------------------------

    async def session(self, acc: Account) -> SessionT:
        """The account's session, logging in (once, shared) when needed.

        Raises:
            AuthError: the credential was refused (the account then rests).
            UpstreamFailed, UpstreamTimeout: the login call failed.
        """
        while True:
            if acc.session is not None and trio.current_time() < acc.session_expires:
                return cast("SessionT", acc.session)
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
        try:
            session = await self.provider.login(acc.credential)
        except RelayError as exc:
            flight.error = exc
            if exc.status == 401:
                self.rest(acc, "login refused")
            raise
        finally:
            acc._flight = None
            flight.done.set()
        flight.session = session
        acc.session = session
        ttl = max(self.provider.session_ttl - self._settings.token_refresh_margin,
                  self.provider.session_ttl / 2)
        acc.session_expires = trio.current_time() + ttl
        acc.logins += 1
        self._logins += 1
        log.info("%s account %s logged in", self.provider.name, acc.id)
        return session

    def evict(self, acc: Account, session: SessionT | None = None) -> None:
        """Forget the account's session (only if it is still ``session``, when given)."""
        if session is None or acc.session is session:
            acc.session = None
            acc.session_expires = 0.0

    def rest(self, acc: Account, why: str) -> None:
        """An auth failure: evict the session and rest the account."""
        self.evict(acc)
        acc.failures += 1
        acc.resting_until = trio.current_time() + self._settings.account_cooldown
        log.warning("%s account %s rests for %.0f s: %s", self.provider.name, acc.id,
                    self._settings.account_cooldown, why)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot for /metrics."""
        now = trio.current_time()
        accounts = [*self._server.values(), *self._clients.values()]
        return PoolStatistics(
            provider=self.provider.name,
            accounts=len(accounts),
            active_streams=sum(a.active for a in accounts),
            resting=sum(1 for a in accounts if a.resting_until > now),
            waiting=len(self._queue),
            logins=self._logins,
        )
