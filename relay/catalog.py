"""The models an upstream lists, cached: what ``/v1/models`` adds to the configured names.

Theory of operation
-------------------
An OpenAI-compatible upstream configured with a prefix (``deepseek/``)
serves whatever it has under that prefix, and only the upstream knows what
that is. A :class:`ModelCatalog` asks it (a provider's
:meth:`~providers.contract.ModelLister.upstream_models`, one
``GET {base_url}/models`` with one of its keys) and keeps the answer:

- **Cached**: a good list is used for :data:`TTL_S` seconds; the first
  request after that asks again (on demand: nothing runs in the
  background) and waits for the answer.
- **Single-flight**: one call at a time. Callers that come while it runs
  wait for it and take its list, so a hundred ``/v1/models`` at once make
  one upstream call. If the caller that made the call is cancelled (its
  client left), the call is abandoned and the next waiter makes a new one,
  as :meth:`relay.accounts.AccountPool.session` does for logins.
- **Bounded**: a call gets :data:`CALL_LIMIT_S` seconds.
- **Failure**: a call that fails or runs out of time leaves the last good
  list in place (a stale one, or none: :meth:`ModelCatalog.models` then
  says None), and the catalog does not ask again for :data:`RETRY_S`
  seconds, so a dead upstream costs ``/v1/models`` one time limit per
  :data:`RETRY_S`, not one per request. The first failure of a run of them
  is a warning, later ones are debug lines, and the first success after
  them says so; a key appears as its short hash
  (:func:`relay.accounts.token_id`), never itself.
- **Keys**: the first key of the upstream's list, and the next one after
  each failure (a refused or rate-limited key does not keep the list
  empty).

``/v1/models/{id}`` and the metrics' model label read the same list
(:meth:`ModelCatalog.known`, without a call for the label).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from protocol.errors import RelayError
from relay.accounts import token_id

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("relay.catalog")

#: How long a good list is used before the upstream is asked again.
TTL_S = 60.0
#: How long after a failed call the catalog waits before it asks again.
RETRY_S = 15.0
#: The time limit of one call.
CALL_LIMIT_S = 5.0


class _Flight:
    """One call in progress; waiters share its outcome."""

    __slots__ = ("done", "finished")

    def __init__(self) -> None:
        self.done = trio.Event()
        #: False when the caller that made the call was cancelled before it ended
        self.finished = False


class ModelCatalog:
    """What one upstream lists, cached, one call at a time, bounded (module docstring).

    Attributes:
        name: the upstream's name (logs).
        calls: upstream calls made so far (failed ones included).
    """

    def __init__(
        self,
        name: str,
        fetch: Callable[[str], Awaitable[list[str]]],
        credentials: Sequence[str],
        *,
        ttl_s: float = TTL_S,
        retry_s: float = RETRY_S,
        limit_s: float = CALL_LIMIT_S,
    ) -> None:
        """
        Args:
            name: the upstream's name, for the logs.
            fetch: one call to the upstream with a key
                (:meth:`~providers.contract.ModelLister.upstream_models`).
            credentials: its keys (at least one), tried in turn.
            ttl_s, retry_s, limit_s: see :data:`TTL_S`, :data:`RETRY_S`,
                :data:`CALL_LIMIT_S`.

        Raises:
            ValueError: no credentials.
        """
        if not credentials:
            raise ValueError("a model catalog needs a key to ask with")
        self.name = name
        self._fetch = fetch
        self._credentials = tuple(credentials)
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._limit_s = limit_s
        self._models: tuple[str, ...] | None = None  # the last good list
        self._set: frozenset[str] = frozenset()
        self._ask_after = -float("inf")  # trio time from which the next request asks
        self._turn = 0  # which key asks next
        self._failing = False
        self._flight: _Flight | None = None
        self.calls = 0

    def known(self) -> frozenset[str]:
        """The last good list, as it is now (no call, however old; empty if none)."""
        return self._set

    async def models(self) -> tuple[str, ...] | None:
        """The upstream's list: the cached one while it is fresh, else a new call's.

        Returns:
            The served model names; the last good (stale) list when the call
            failed; None when no call has succeeded yet.

        Never raises a :class:`~protocol.errors.RelayError`: a failure is
        logged and the last good list stands.
        """
        while True:
            if trio.current_time() < self._ask_after:
                return self._models
            flight = self._flight
            if flight is None:
                return await self._ask()
            await flight.done.wait()
            if flight.finished:
                return self._models
            # the caller that asked was cancelled: loop and ask ourselves

    async def _ask(self) -> tuple[str, ...] | None:
        flight = self._flight = _Flight()
        try:
            key = self._credentials[self._turn % len(self._credentials)]
            self.calls += 1
            failure = f"no answer within {self._limit_s:g} s"
            listed: list[str] | None = None
            with trio.move_on_after(self._limit_s):
                try:
                    listed = await self._fetch(key)
                except RelayError as exc:
                    failure = exc.message
            now = trio.current_time()
            if listed is not None:
                self._succeeded(listed, now)
            else:
                self._failed(failure, key, now)
            flight.finished = True
        finally:
            self._flight = None
            flight.done.set()
        return self._models

    def _succeeded(self, listed: list[str], now: float) -> None:
        self._models = tuple(dict.fromkeys(listed))
        self._set = frozenset(self._models)
        self._ask_after = now + self._ttl_s
        if self._failing:
            log.info("%s lists its models again (%d)", self.name, len(self._models))
        self._failing = False

    def _failed(self, failure: str, key: str, now: float) -> None:
        self._ask_after = now + self._retry_s
        self._turn += 1  # the next call asks with the next key
        if self._models is None:
            shown = "no model of it"
        else:
            shown = f"the {len(self._models)} models it listed before"
        if self._failing:
            log.debug("%s: its model list still fails (key %s): %s", self.name,
                      token_id(key), failure)
            return
        self._failing = True
        log.warning("%s: asking for its model list failed (key %s): %s; /v1/models shows "
                    "%s, and asks again in %g s", self.name, token_id(key), failure, shown,
                    self._retry_s)
