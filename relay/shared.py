"""Account state in Redis, shared by every worker and instance (``RELAY_REDIS_URL``).

Theory of operation
-------------------
:class:`RedisState` is the shared implementation of
:class:`relay.accounts.AccountState`; the pool above it is the same as
in-process. Every key begins ``relay:<provider>:`` and names an account by
:func:`relay.accounts.token_id` (a hash), never by its credential:

=====================================  ==========================================
``relay:<p>:<account>:leases``         sorted set: one member per stream slot
                                       held, scored by its expiry (ms, Redis time)
``relay:<p>:<account>:served``         counter: leases ever taken (rotation)
``relay:<p>:<account>:rest``           present while the account rests (PX)
``relay:<p>:<account>:session``        the cached session as JSON (PX: its TTL)
``relay:<p>:<account>:login``          the refresh lock: the leader's flight id (PX)
``relay:<p>:<account>:login-failed``   a failed login's error, for its waiters (PX)
``relay:<p>:conversation:<id>``        the account that owns a kept conversation
=====================================  ==========================================

The session value *is* the access token (and what logs in again): Redis
must be private to the relay, as the token lists are.

- **Leases.** Taking one is a Lua script (:data:`TAKE_LUA`), atomic in Redis:
  drop the expired members of each candidate, pick the best candidate
  under its limit (not resting, fewest leases, fewest served, first), add a
  member that expires ``redis_lease_expiry`` seconds from now by Redis's own
  clock. Every ``redis_lease_renew`` seconds one script call renews all the
  leases this process holds. A process that dies stops renewing, and its
  leases expire: its accounts are free again within ``redis_lease_expiry``.
  Release removes the member. Take and release are shielded from
  cancellation (and bounded): a lease is never taken without being known
  here, or left behind by a cancelled request.
- **Sessions and the refresh lock.** A session is cached under its key with
  the TTL the pool gives. To log in, a process sets the lock (``SET NX PX``,
  the lock expires after a login's longest time); the one that gets it looks
  for the session once more (a login may have ended meanwhile), logs in,
  stores the session, then deletes the lock (only if still its own). The
  others poll every :data:`REFRESH_POLL_S` for the session; if the lock goes
  away without one, the leader's error is read from ``login-failed`` (keyed
  to its flight id, so an old failure is never served to a new request) and
  raised, or, if the leader died or was cancelled, they try to lead. So at
  most one login per account runs across all instances.
- **Failures.** A Redis call that fails or takes longer than
  :data:`CALL_TIMEOUT_S` is a 503 (code ``shared_state_unavailable``): the
  relay does not fall back to per-process limits, which would break the
  accounts' limits silently. Starting without Redis reachable is a
  :class:`~relay.config.ConfigError`.

Not supported: Redis Cluster (the take script reads several accounts' keys,
which a cluster may place on different nodes).

The client is coredis (>= 6.9): fully typed, and built on anyio, so it runs
under trio as it is (no trio-asyncio, no worker threads). Its connection
pool lives in a task group, which :meth:`RedisState.connected` enters around
serving; requests' tasks are its children, as coredis requires.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import urllib.parse
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.tokens import PureToken

from protocol.errors import (
    AuthError,
    NoAccountFree,
    RelayError,
    RemoteProtocolError,
    RequestError,
    UpstreamFailed,
    UpstreamTimeout,
)
from providers.contract import SessionCodec
from relay.accounts import Lease
from relay.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from providers.contract import Provider
    from relay.accounts import Account
    from relay.config import Settings

log = logging.getLogger("relay.shared")

T = TypeVar("T")

KEY_PREFIX = "relay"
#: Bound on one Redis call (a take, a release, a read)
CALL_TIMEOUT_S = 5.0
#: How often a process waiting for another's login looks for its session
REFRESH_POLL_S = 0.05
#: How long waiters can read a failed login's error (they poll far more often)
FAILED_LOGIN_TTL_S = 10.0
#: The refresh lock outlives the longest login (connect + request timeouts) by this much
LOGIN_LOCK_SLACK_S = 5.0
#: How long an untouched conversation's owner is remembered (each follow-up renews it)
CONVERSATION_TTL_S = 30 * 24 * 3600
#: An account's served counter is forgotten after a day without a lease
SERVED_TTL_S = 24 * 3600
MS = 1000

#: Take one lease on the best candidate. KEYS: per candidate its leases, rest and
#: served keys; ARGV: limit (0: none), lease expiry in ms, the new lease's member.
#: Returns the 0-based index of the chosen candidate, or -1 if all are at their limit.
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local best, best_rest, best_active, best_served
for i = 1, #KEYS, 3 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local active = redis.call('ZCARD', KEYS[i])
  if limit == 0 or active < limit then
    local rest = redis.call('EXISTS', KEYS[i + 1])
    local served = tonumber(redis.call('GET', KEYS[i + 2]) or '0')
    if best == nil or rest < best_rest or (rest == best_rest and (active < best_active
        or (active == best_active and served < best_served))) then
      best, best_rest, best_active, best_served = i, rest, active, served
    end
  end
end
if best == nil then
  return -1
end
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[best], expiry, ARGV[3])
local last = redis.call('ZRANGE', KEYS[best], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[best], last[2])
redis.call('INCR', KEYS[best + 2])
redis.call('PEXPIRE', KEYS[best + 2], ARGV[4])
return (best - 1) / 3
"""

#: Renew leases. KEYS: leases keys; ARGV[1]: expiry in ms, ARGV[i + 1]: the member
#: in KEYS[i]. Returns the 1-based indexes of the leases that were gone.
RENEW_LUA = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, ARGV[i + 1]) then
    redis.call('ZADD', key, 'XX', expiry, ARGV[i + 1])
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', key, last[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

#: Delete KEYS[1] if its value is ARGV[1] (a lock or a session that is still ours).
DELETE_IF_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: The PTTL of every key (ms; negative: no such key).
PTTLS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('PTTL', key)
end
return out
"""

_ERRORS: dict[str, type[RelayError]] = {
    cls.__name__: cls
    for cls in (RelayError, RequestError, AuthError, NoAccountFree, UpstreamFailed,
                UpstreamTimeout, RemoteProtocolError)
}


def _unreachable(why: str) -> RelayError:
    return RelayError(f"the shared account state (Redis) is unreachable: {why}",
                      code="shared_state_unavailable", status=503)


def redis_location(url: str) -> str:
    """Where ``url`` points, without its password (for messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def _error_record(flight: str, exc: RelayError) -> str:
    kind = type(exc).__name__ if type(exc).__name__ in _ERRORS else "RelayError"
    return json.dumps({"flight": flight, "class": kind, "message": exc.message,
                       "code": exc.code, "param": exc.param, "status": exc.status})


def _error_from(record: str, flight: str) -> RelayError | None:
    """The error a failed login of ``flight`` left, if ``record`` is that."""
    try:
        fields = json.loads(record)
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get("flight") != flight:
        return None
    cls = _ERRORS.get(str(fields.get("class")), RelayError)
    code, param, status = fields.get("code"), fields.get("param"), fields.get("status")
    return cls(str(fields.get("message", "login failed")),
               code=code if isinstance(code, str) else None,
               param=param if isinstance(param, str) else None,
               status=status if isinstance(status, int) else None)


class RedisState:
    """The state of one provider's accounts, in Redis (module docstring).

    ``Account.active``, ``served`` and ``resting_until`` are kept as this
    process's view, for its statistics; the limits are Redis's.
    """

    shared = True

    def __init__(
        self,
        provider: Provider[Any],
        settings: Settings,
        *,
        client: coredis.Redis[str] | None = None,
    ) -> None:
        """
        Args:
            provider: must be a :class:`~providers.contract.SessionCodec`.
            settings: ``redis_url``, the lease expiry and renewal, and the
                timeouts that bound a login (the refresh lock's expiry).
            client: a coredis client to use instead of one for ``redis_url``.

        Raises:
            ConfigError: the provider cannot store its sessions as JSON.
        """
        if not isinstance(provider, SessionCodec):
            raise ConfigError(f"redis_url: the {provider.name} provider cannot keep its "
                              "sessions in Redis (it has no dump_session/load_session)")
        url = settings.redis_url or "redis://localhost:6379/0"
        self._codec: SessionCodec[Any] = provider
        self._prefix = f"{KEY_PREFIX}:{provider.name}"
        self._where = redis_location(url)
        self._client: coredis.Redis[str] = client or coredis.Redis.from_url(
            url, decode_responses=True, connect_timeout=settings.connect_timeout,
            stream_timeout=CALL_TIMEOUT_S,
        )
        self._expiry_ms = round(settings.redis_lease_expiry * MS)
        self._renew_s = settings.redis_lease_renew
        self._lock_ms = round(
            (settings.connect_timeout + settings.request_timeout + LOGIN_LOCK_SLACK_S) * MS)
        #: names this process's leases: <instance>:<number>
        self._instance = secrets.token_hex(8)
        self._numbers = itertools.count()
        self._held: dict[str, str] = {}  # lease member -> its leases key
        #: logins of another process this one waited for instead of running its own
        self.follows = 0
        self._take = self._client.register_script(TAKE_LUA)
        self._renew = self._client.register_script(RENEW_LUA)
        self._delete_if = self._client.register_script(DELETE_IF_LUA)
        self._pttls = self._client.register_script(PTTLS_LUA)

    def _key(self, acc: Account, what: str) -> str:
        return f"{self._prefix}:{acc.id}:{what}"

    async def _do(self, call: Awaitable[T], *, shield: bool = False) -> T:
        """Await one Redis call, bounded; failures become a 503 RelayError."""
        with trio.move_on_after(CALL_TIMEOUT_S, shield=shield):
            try:
                return await call
            except (RedisError, OSError) as exc:
                raise _unreachable(str(exc) or type(exc).__name__) from exc
        raise _unreachable(f"no answer within {CALL_TIMEOUT_S:g} s")

    # --- lifetime ----------------------------------------------------------------------

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Connect (checked with a PING) and renew this process's leases until the end.

        Raises:
            ConfigError: Redis does not answer.
        """
        failure: RelayError | None = None
        async with self._client, trio.open_nursery() as nursery:
            try:
                await self._do(self._client.ping())
            except RelayError as exc:
                failure = exc  # raised below, outside the task groups (not in a group)
            if failure is None:
                nursery.start_soon(self._renew_forever)
                try:
                    yield
                finally:
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise ConfigError(f"redis_url: cannot reach Redis at {self._where}: {failure.message}")

    async def ping(self) -> None:
        await self._do(self._client.ping())

    async def _renew_forever(self) -> None:
        while True:
            await trio.sleep(self._renew_s)
            held = list(self._held.items())
            if not held:
                continue
            keys = [key for _, key in held]
            args = [str(self._expiry_ms), *(member for member, _ in held)]
            try:
                lost: object = await self._do(self._renew(keys=keys, args=args))
            except RelayError as exc:
                log.warning("renewing %d account leases failed: %s", len(held), exc)
                continue
            if isinstance(lost, list) and lost:
                # Redis lost them (restarted, or this process stalled past the expiry):
                # another instance may now use those accounts too
                log.warning("%d account leases had expired before their renewal", len(lost))

    # --- leases ------------------------------------------------------------------------

    async def take(self, candidates: Sequence[Account], limit: int) -> Lease | None:
        member = f"{self._instance}:{next(self._numbers)}"
        keys = [key for acc in candidates
                for key in (self._key(acc, "leases"), self._key(acc, "rest"),
                            self._key(acc, "served"))]
        args = [str(limit), str(self._expiry_ms), member, str(SERVED_TTL_S * MS)]
        index: object = await self._do(self._take(keys=keys, args=args), shield=True)
        if not isinstance(index, int) or not 0 <= index < len(candidates):
            return None
        acc = candidates[index]
        self._held[member] = self._key(acc, "leases")
        acc.active += 1
        acc.served += 1
        return Lease(acc, member)

    async def release(self, lease: Lease) -> None:
        acc = lease.account
        key = self._held.pop(lease.token, None)
        acc.active -= 1
        if key is None:
            return
        try:
            await self._do(self._client.zrem(key, [lease.token]), shield=True)
        except RelayError as exc:
            log.warning("releasing a lease of %s account %s failed (it expires within "
                        "%g s): %s", acc.provider, acc.id, self._expiry_ms / MS, exc)

    # --- health ------------------------------------------------------------------------

    async def rest(self, acc: Account, seconds: float) -> None:
        acc.resting_until = trio.current_time() + seconds
        milliseconds = round(seconds * MS)
        if milliseconds > 0:
            await self._do(self._client.set(self._key(acc, "rest"), "1", px=milliseconds))

    async def resting(self, accounts: Sequence[Account]) -> list[float]:
        keys = [self._key(acc, "rest") for acc in accounts]
        pttls: object = await self._do(self._pttls(keys=keys, args=[])) if keys else []
        if not isinstance(pttls, list):
            return [0.0] * len(accounts)
        # PTTL is -2 once the key is gone; 0 means it still exists for under a millisecond,
        # and the take script (EXISTS) still sees it resting: say so, not 0
        return [(max(ms, 1) / MS if ms >= 0 else 0.0) if isinstance(ms, int) else 0.0
                for ms in pttls]

    # --- sessions ----------------------------------------------------------------------

    async def get_session(self, acc: Account) -> object | None:
        data = await self._do(self._client.get(self._key(acc, "session")))
        if data is None:
            return None
        try:
            session: object = self._codec.load_session(data)
        except ValueError as exc:
            log.warning("%s account %s: the session in Redis is unreadable (%s); "
                        "logging in again", acc.provider, acc.id, exc)
            return None
        return session

    async def evict_session(self, acc: Account, session: object | None) -> None:
        key = self._key(acc, "session")
        if session is None:
            await self._do(self._client.delete([key]))
        else:
            data = self._codec.dump_session(session)
            await self._do(self._delete_if(keys=[key], args=[data]))

    async def refresh(
        self, acc: Account, login: Callable[[], Awaitable[object]], ttl: float
    ) -> object:
        lock = self._key(acc, "login")
        while True:
            flight = secrets.token_hex(8)
            if await self._do(self._client.set(lock, flight, condition=PureToken.NX,
                                               px=self._lock_ms)):
                return await self._lead(acc, login, ttl, flight)
            held = await self._do(self._client.get(lock))
            if held is None:
                continue  # the leader just finished or gave up: look again
            session = await self._follow(acc, held)
            if session is not None:
                return session

    async def _lead(
        self, acc: Account, login: Callable[[], Awaitable[object]], ttl: float, flight: str
    ) -> object:
        """Log in holding the lock; store the session (or the error) before unlocking."""
        lock = self._key(acc, "login")
        try:
            # the session may have come while we took the lock (a login that just ended)
            cached = await self.get_session(acc)
            if cached is not None:
                return cached
            session = await login()
            data = self._codec.dump_session(session)
            await self._do(self._client.set(self._key(acc, "session"), data,
                                            px=max(round(ttl * MS), 1)))
        except RelayError as exc:
            record = _error_record(flight, exc)
            try:
                await self._do(self._client.set(self._key(acc, "login-failed"), record,
                                                px=round(FAILED_LOGIN_TTL_S * MS)),
                               shield=True)
            except RelayError as unstored:
                log.warning("%s account %s: the login's failure could not be shared: %s",
                            acc.provider, acc.id, unstored)
            raise
        finally:
            try:
                await self._do(self._delete_if(keys=[lock], args=[flight]), shield=True)
            except RelayError as exc:  # it expires on its own
                log.warning("%s account %s: the refresh lock was not released: %s",
                            acc.provider, acc.id, exc)
        return session

    async def _follow(self, acc: Account, flight: str) -> object | None:
        """Wait for another process's login ``flight``.

        Returns:
            Its session, or None when it ended without one (cancelled, or
            its process died): the caller may lead the next login.

        Raises:
            RelayError: the error that login failed with.
        """
        keys = [self._key(acc, "session"), self._key(acc, "login")]
        self.follows += 1
        while True:
            await trio.sleep(REFRESH_POLL_S)
            data, held = await self._do(self._client.mget(keys))
            if data is not None:
                try:
                    session: object = self._codec.load_session(data)
                except ValueError:
                    return None
                return session
            if held != flight:
                record = await self._do(self._client.get(self._key(acc, "login-failed")))
                error = _error_from(record, flight) if record is not None else None
                if error is not None:
                    raise error
                return None

    # --- kept conversations ------------------------------------------------------------

    def _conversation_key(self, conversation_id: str) -> str:
        return f"{self._prefix}:conversation:{conversation_id}"

    async def owner(self, conversation_id: str) -> str | None:
        return await self._do(self._client.getex(self._conversation_key(conversation_id),
                                                 ex=CONVERSATION_TTL_S))

    async def set_owner(self, conversation_id: str, account_id: str) -> None:
        try:
            await self._do(self._client.set(self._conversation_key(conversation_id), account_id,
                                            ex=CONVERSATION_TTL_S), shield=True)
        except RelayError as exc:
            log.warning("the owner of conversation %s was not stored: %s", conversation_id, exc)
