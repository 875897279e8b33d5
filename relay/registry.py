"""The providers this relay serves: the one module of ``relay/`` that names them.

Everything else in ``relay/`` reaches a provider through
``providers/contract.py`` and the :class:`Providers` built here, never
through ``providers.step`` or ``providers.glm`` directly.

An :class:`Entry` says how to build one provider from the settings and the
pieces the app shares (:class:`Parts`: the upstream pool, the file fetcher,
the janitor), where its server-side credentials and per-account stream
limit are, and, for ``relay serve --demo``, how to start its emulator.
Adding a provider is one package under ``providers/`` and one entry in
:data:`ENTRIES` (with its settings in ``relay/config.py``). A provider that
the settings may name several times (the OpenAI-compatible upstreams of
``RELAY_OPENAI_UPSTREAMS``, one provider each) is one :class:`Entries` line:
it gives one :class:`Entry` per configured item (:func:`entries_for`).

Order matters twice, so the order of :data:`ENTRIES` is part of the
behaviour: a model name goes to the first provider that owns it (else to
``default_provider``), and ``/token/check`` without a provider guesses the
first whose credential form fits. The OpenAI-compatible upstreams come
first: a model the operator configured explicitly wins over the web chats'
name patterns.

A provider whose upstream lists its models (:class:`~providers.contract.ModelLister`:
an OpenAI-compatible upstream with a prefix) gets a
:class:`~relay.catalog.ModelCatalog` on its runtime, asking with its
server-side keys; :meth:`ProviderRuntime.every_model` and
:meth:`ProviderRuntime.knows` answer ``/v1/models`` and ``/v1/models/{id}``
from the configured names and that list.

Providers differ in their session type (``Provider[SessionT]``), so the
mixed collection here is the one place where it is ``Any``: each
:class:`ProviderRuntime` pairs a provider with an account pool of the same
session type, and :func:`relay.chat.with_account` keeps the two together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

from protocol.errors import RelayError
from protocol.urls import origin_of
from providers.contract import ModelLister, SessionT
from providers.glm.client import GlmProvider
from providers.openai.client import OpenAIProvider
from providers.openai.prompt import ModelNames
from providers.step.client import StepProvider
from relay.accounts import AccountPool
from relay.catalog import ModelCatalog
from relay.config import ConfigError, OpenAIUpstream
from relay.upstream import HttpTransport

if TYPE_CHECKING:
    import trio

    from protocol.urls import Origin
    from providers.contract import Background, Fetcher, Provider
    from providers.glm.client import GlmSession
    from providers.step.client import StepSession
    from relay.config import Settings
    from relay.upstream import Pool

# accounts of the built-in emulators: not secrets
DEMO_STEP_TOKEN = "demo-device@demo-oasis-token"  # noqa: S105
DEMO_GLM_TOKEN = "demo-glm-refresh-token"  # noqa: S105
#: demo mode's OpenAI-compatible upstream: its name, key and models
DEMO_UPSTREAM = "demo"
DEMO_OPENAI_KEY = "demo-openai-key"
DEMO_OPENAI_MODELS = ("emu-chat", "emu-reasoner")


@dataclass(frozen=True, slots=True)
class Parts:
    """What the app shares with every provider it builds."""

    settings: Settings
    pool: Pool
    fetcher: Fetcher
    #: where conversations are deleted after the answer (the janitor)
    background: Background

    def transport(self, label: str, settings: Settings | None = None) -> HttpTransport:
        """Calls to one upstream over the shared pool (``settings``: other timeouts)."""
        return HttpTransport(self.pool, settings or self.settings, label)


@dataclass(frozen=True, slots=True)
class Emulated:
    """An emulator started for demo mode."""

    base_url: str
    #: the Settings fields that point its provider at it (base URL, an account)
    changes: dict[str, Any]
    #: its answers carry file URLs of its own the relay downloads (``b64_json``):
    #: demo mode trusts its origin, a loopback one, which the fetcher refuses else
    serves_files: bool = True


@dataclass(frozen=True, slots=True)
class Entry:
    """One provider, as the relay builds it."""

    build: Callable[[Parts], Provider[Any]]
    #: its server-side credentials (``RELAY_<NAME>_TOKENS``)
    credentials: Callable[[Settings], Sequence[str]]
    #: concurrent streams per account, 0 for no limit
    max_streams: Callable[[Settings], int]
    #: demo mode: start its emulator in the nursery
    demo: Callable[[trio.Nursery], Awaitable[Emulated]] | None = None
    #: its accounts are the operator's alone: a client's bearer is never one
    server_only: bool = False


@dataclass(frozen=True, slots=True)
class Entries:
    """Providers the settings name, one :class:`Entry` each (in the settings' order)."""

    expand: Callable[[Settings], Sequence[Entry]]
    #: demo mode: start an emulator and name it in the settings (None: nothing to add)
    demo: Callable[[trio.Nursery, Settings], Awaitable[Emulated | None]] | None = None


def entries_for(settings: Settings, entries: Sequence[Entry | Entries]) -> list[Entry]:
    """``entries`` with every :class:`Entries` expanded for ``settings``, in order."""
    out: list[Entry] = []
    for entry in entries:
        if isinstance(entry, Entries):
            out += entry.expand(settings)
        else:
            out.append(entry)
    return out


@dataclass(eq=False)
class ProviderRuntime(Generic[SessionT]):
    """A provider with its account pool and server-side credentials."""

    provider: Provider[SessionT]
    pool: AccountPool[SessionT]
    server_credentials: tuple[str, ...]
    #: only the server-side credentials are ever used (:attr:`Entry.server_only`)
    server_only: bool = False
    #: what the upstream lists besides the provider's own names (a ModelLister's)
    catalog: ModelCatalog | None = None

    async def every_model(self) -> list[str]:
        """The ids ``/v1/models`` lists: the provider's own, then the upstream's, each once.

        The upstream's come from the catalog (cached; a stale list, or none,
        when asking fails): this never raises for the upstream's sake.
        """
        models = self.provider.models()
        if self.catalog is None:
            return models
        listed = await self.catalog.models()
        return list(dict.fromkeys([*models, *(listed or ())]))

    async def knows(self, model: str) -> bool:
        """Whether ``/v1/models/{model}`` answers the model (not 404) for this provider.

        A name the provider lists is known. Another name it owns is known
        too, unless the upstream's list (the catalog's) is known and does not
        have it: then the upstream has no such model, though a chat naming
        it still goes there.
        """
        if model in self.provider.models():
            return True
        if not self.provider.owns_model(model):
            return False
        if self.catalog is None:
            return True
        listed = await self.catalog.models()
        return listed is None or model in listed

    def lists(self, model: str) -> bool:
        """Whether ``model`` is listed now (the metrics' label: no upstream call)."""
        return model in self.provider.models() or (
            self.catalog is not None and model in self.catalog.known())


class Providers(Mapping[str, "ProviderRuntime[Any]"]):
    """Every provider of one app, by name, in registry order."""

    def __init__(self, runtimes: Iterable[ProviderRuntime[Any]], default: str) -> None:
        """
        Args:
            runtimes: in the order of their entries.
            default: the provider of model names no provider owns.
        """
        self._by_name = {runtime.provider.name: runtime for runtime in runtimes}
        self._default = default

    def __getitem__(self, name: str) -> ProviderRuntime[Any]:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def for_model(self, model: str) -> ProviderRuntime[Any]:
        """The first provider that owns ``model``; else the default one; else the first."""
        for runtime in self._by_name.values():
            if runtime.provider.owns_model(model):
                return runtime
        return self._by_name.get(self._default) or next(iter(self._by_name.values()))

    def guess(self, credential: str) -> str | None:
        """The name of the first provider whose credentials look like ``credential``."""
        for name, runtime in self._by_name.items():
            if runtime.provider.looks_like(credential):
                return name
        return None

    def with_media(self) -> ProviderRuntime[Any] | None:
        """The first provider that makes images and videos, if any does."""
        for runtime in self._by_name.values():
            if runtime.provider.media is not None:
                return runtime
        return None

    def check_server_credentials(self) -> None:
        """Refuse to start with a malformed entry in a server-side token list.

        Found here, at start, rather than by the first request that leases
        that account. The message names the setting and the entry's position,
        never the entry (it is a secret).

        Raises:
            ConfigError: ``RELAY_<PROVIDER>_TOKENS: entry N of M ...``.
        """
        for name, runtime in self._by_name.items():
            count = len(runtime.server_credentials)
            for position, credential in enumerate(runtime.server_credentials, 1):
                try:
                    runtime.provider.validate_credential(credential)
                except RelayError as exc:
                    raise ConfigError(
                        f"RELAY_{name.upper()}_TOKENS: entry {position} of {count} is "
                        f"malformed: {exc.message}"
                    ) from None


def _runtime(provider: Provider[SessionT], entry: Entry, settings: Settings
             ) -> ProviderRuntime[SessionT]:
    state = None
    if settings.redis_url:
        from relay.shared import RedisState  # imports coredis: only when it is used

        state = RedisState(provider, settings)
    pool = AccountPool(provider, settings, entry.max_streams(settings), state)
    credentials = tuple(entry.credentials(settings))
    catalog = None
    if isinstance(provider, ModelLister) and credentials:
        catalog = ModelCatalog(provider.name, provider.upstream_models, credentials)
    return ProviderRuntime(provider, pool, credentials, entry.server_only, catalog)


def build(parts: Parts, entries: Sequence[Entry | Entries]) -> Providers:
    """Every provider of ``entries``, with its account pool.

    Raises:
        ConfigError: a server-side token list has a malformed entry.
    """
    settings = parts.settings
    runtimes = [_runtime(entry.build(parts), entry, settings)
                for entry in entries_for(settings, entries)]
    providers = Providers(runtimes, settings.default_provider)
    providers.check_server_credentials()
    return providers


def has_server_credentials(settings: Settings, entries: Sequence[Entry | Entries]) -> bool:
    """Whether any provider has server-side accounts configured (API keys included)."""
    return any(entry.credentials(settings) for entry in entries_for(settings, entries))


async def start_emulators(
    settings: Settings, nursery: trio.Nursery, entries: Sequence[Entry | Entries]
) -> tuple[Settings, frozenset[Origin]]:
    """Start every provider's emulator in ``nursery`` (``relay serve --demo``).

    The web chats' emulators always; an emulated OpenAI-compatible upstream
    (``demo``) when the settings configure none.

    Returns:
        The settings pointed at the emulators, and the origins of those that
        serve files (:attr:`Emulated.serves_files`): their file URLs (the
        images the ChatGLM emulator draws, which ``b64_json`` downloads) are
        on loopback, which the fetcher's guard refuses; the demo trusts these
        origins, and no other private address.
    """
    changes: dict[str, Any] = {}
    origins: set[Origin] = set()
    for entry in entries:
        if isinstance(entry, Entries):
            emulated = await entry.demo(nursery, settings) if entry.demo is not None else None
        else:
            emulated = await entry.demo(nursery) if entry.demo is not None else None
        if emulated is not None:
            changes.update(emulated.changes)
            if emulated.serves_files:
                origins.add(origin_of(emulated.base_url))
    return dataclasses.replace(settings, **changes), frozenset(origins)


# --- StepChat ------------------------------------------------------------------------------


def _step(parts: Parts) -> Provider[StepSession]:
    s = parts.settings
    return StepProvider(
        parts.transport("StepChat"),
        parts.fetcher,
        base_url=s.step_base_url,
        cleanup_timeout=s.cleanup_timeout,
        upload_timeout=s.upload_timeout,
        file_settle=s.step_file_settle,
        background=parts.background,
    )


async def _step_demo(nursery: trio.Nursery) -> Emulated:
    from providers.step.emulator import StepEmulator

    emulator = StepEmulator(tokens=[DEMO_STEP_TOKEN.split("@", 1)[1]])
    await nursery.start(emulator.serve)
    return Emulated(emulator.base_url, {
        "step_base_url": emulator.base_url,
        "step_tokens": (DEMO_STEP_TOKEN,),
        "step_file_settle": 0.0,
    })


# --- ChatGLM -------------------------------------------------------------------------------


def _glm(parts: Parts) -> Provider[GlmSession]:
    s = parts.settings
    # ChatGLM keeps the first-byte timeout itself: past it, it reads on for up
    # to cleanup_timeout to learn the conversation it must delete, so its
    # transport must not give up before that.
    transport_settings = dataclasses.replace(
        s, first_byte_timeout=s.first_byte_timeout + s.cleanup_timeout
    )
    return GlmProvider(
        parts.transport("ChatGLM", transport_settings),
        parts.fetcher,
        base_url=s.glm_base_url,
        secret=s.glm_sign_secret,
        system_tag=s.glm_system_tag,
        cleanup_timeout=s.cleanup_timeout,
        first_byte_timeout=s.first_byte_timeout,
        upload_timeout=s.upload_timeout,
        video_timeout=s.video_timeout,
        video_poll_interval=max(s.video_poll_interval, 0.001),
        background=parts.background,
    )


async def _glm_demo(nursery: trio.Nursery) -> Emulated:
    from providers.glm.emulator import GlmEmulator

    emulator = GlmEmulator(tokens=[DEMO_GLM_TOKEN])
    await nursery.start(emulator.serve)
    return Emulated(emulator.base_url, {
        "glm_base_url": emulator.base_url,
        "glm_tokens": (DEMO_GLM_TOKEN,),
    })


# --- OpenAI-compatible upstreams ----------------------------------------------------------


def _openai_entry(upstream: OpenAIUpstream) -> Entry:
    """One configured upstream: its keys are its accounts, with no stream limit."""

    def build(parts: Parts) -> Provider[str]:
        return OpenAIProvider(
            parts.transport(upstream.name),
            name=upstream.name,
            base_url=upstream.base_url,
            names=ModelNames(upstream.models, upstream.prefix),
        )

    return Entry(build, lambda s: upstream.api_keys, lambda s: 0, server_only=True)


def _openai_entries(settings: Settings) -> list[Entry]:
    return [_openai_entry(upstream) for upstream in settings.openai_upstreams]


async def _openai_demo(nursery: trio.Nursery, settings: Settings) -> Emulated | None:
    """Demo mode without configured upstreams: one emulated upstream, ``demo``.

    It serves ``emu-chat`` and ``emu-reasoner`` by name (the passthrough path
    on chat completions) and any ``demo/<name>`` under its prefix; configured
    upstreams are left as they are.
    """
    if settings.openai_upstreams:
        return None
    from providers.openai.emulator import OpenAIEmulator

    emulator = OpenAIEmulator(keys=[DEMO_OPENAI_KEY])
    await nursery.start(emulator.serve)
    upstream = OpenAIUpstream(DEMO_UPSTREAM, emulator.base_url, (DEMO_OPENAI_KEY,),
                              models=DEMO_OPENAI_MODELS, prefix=f"{DEMO_UPSTREAM}/")
    return Emulated(emulator.base_url, {"openai_upstreams": (upstream,)}, serves_files=False)


#: Every provider, in routing order (see the module docstring).
ENTRIES: tuple[Entry | Entries, ...] = (
    Entries(_openai_entries, _openai_demo),
    Entry(_step, lambda s: s.step_tokens, lambda s: s.step_max_streams, _step_demo),
    Entry(_glm, lambda s: s.glm_tokens, lambda s: s.glm_max_streams, _glm_demo),
)
