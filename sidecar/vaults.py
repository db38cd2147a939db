"""Named vaults: which backend a reference's name means, with which settings.

A reference's name is either a vault entity's prefix or a backend name used
directly. Settings are layered, highest first: the reference's query, the vault
entity's config, ``KONG_VAULT_<NAME>_<FIELD>`` environment variables (as Kong
reads them, so a Kong data plane's environment works unchanged), the defaults.

Unlike Kong, a query may set only the fields its backend allows (cache timing,
decoding, version selectors) plus those the vault entity opens in
``query_overrides``; and each vault has at most ``MAX_QUERY_VARIANTS`` distinct
effective settings, since each one may cost a client, a login and cache entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiolimiter import AsyncLimiter
from pydantic import ValidationError

from sidecar.backends import BACKEND_NAMES, Backend, BackendKind, VaultSettings, load_kind
from sidecar.config import LimitsConfig, VaultEntity, describe_errors, short
from sidecar.errors import ConfigError, InvalidReference, UnknownVault

MAX_QUERY_VARIANTS = 64
_generations = itertools.count(1)  # each Vault instance's own: cache keys carry it
_NOT_FROM_ENV = frozenset({"query_overrides"})  # widening is written in the vault entity only


def env_base_config(
    backend: str, settings: type[VaultSettings], environ: Mapping[str, str]
) -> dict[str, str]:
    """Kong's base config: ``KONG_VAULT_<BACKEND>_<FIELD>``, dashes as underscores."""
    stem = "KONG_VAULT_" + backend.upper().replace("-", "_") + "_"
    base = {}
    for name in settings.model_fields.keys() - _NOT_FROM_ENV:
        value = environ.get(stem + name.upper().replace("-", "_"))
        if value is not None:
            base[name] = value
    return base


@dataclass(eq=False)
class Vault:
    """One configured (or implicit) vault and its backend instance."""

    prefix: str
    kind: BackendKind
    # env base config overlaid with the entity's config: plain credentials, never shown
    raw: Mapping[str, Any] = field(repr=False)
    settings: VaultSettings
    backend: Backend
    limits: LimitsConfig
    entity: VaultEntity | None = None
    started: bool = False
    generation: int = field(init=False, default_factory=lambda: next(_generations))
    _start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slots: asyncio.Semaphore = field(init=False)
    limiter: AsyncLimiter = field(init=False)
    query_fields: frozenset[str] = field(init=False)
    _variants: dict[tuple[tuple[str, Any], ...], VaultSettings] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self.query_fields = self.kind.settings.query_fields | set(self.settings.query_overrides)
        self.slots = asyncio.Semaphore(self.limits.concurrency)
        burst = self.limits.burst
        self.limiter = AsyncLimiter(burst, burst / self.limits.rate)

    @contextlib.asynccontextmanager
    async def admission(self, on_wait: Callable[[], None]) -> AsyncIterator[None]:
        """Hold a call slot and a rate token for one backend call (remote backends only).

        The wait is outside the call's deadline: a queue behind the rate limit is
        the limit working, not the backend timing out.
        """
        if not self.kind.remote:
            yield
            return
        async with self.slots:
            if not self.limiter.has_capacity():
                on_wait()
            await self.limiter.acquire()
            yield

    @property
    def backend_name(self) -> str:
        return self.kind.name

    @classmethod
    def build(
        cls,
        prefix: str,
        kind: BackendKind,
        entity: VaultEntity | None,
        environ: Mapping[str, str],
        limits: LimitsConfig,
    ) -> Vault:
        raw = {**env_base_config(kind.name, kind.settings, environ)}
        if entity is not None:
            raw.update(entity.config)
        try:
            settings = kind.settings.model_validate(raw)
        except ValidationError as exc:
            where = f"vault {prefix!r} ({kind.name}) config"
            raise ConfigError(describe_errors(exc, where, kind.settings)) from None
        if entity is not None and entity.limits is not None:
            limits = entity.limits
        return cls(prefix, kind, raw, settings, kind.create(prefix), limits, entity)

    def settings_for(self, query: Mapping[str, Any] | None) -> VaultSettings:
        """The effective settings for one reference: allowed query fields override ours.

        Refused before anything else happens, so a refused field costs no client,
        no login and no cache entry; its value is never echoed.
        """
        if not query:
            return self.settings
        refused = sorted(query.keys() - self.query_fields)
        if refused:
            allowed = ", ".join(sorted(self.query_fields))
            raise InvalidReference(
                f"query field {short(refused[0])} may not be set by a reference to vault"
                f" {self.prefix!r} (allowed: {allowed}; a vault entity can open more"
                " with query_overrides)"
            )
        variant = tuple(
            sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in query.items())
        )
        settings = self._variants.get(variant)
        if settings is not None:
            return settings
        if len(self._variants) >= MAX_QUERY_VARIANTS:
            raise InvalidReference(
                f"vault {self.prefix!r} already has {MAX_QUERY_VARIANTS} distinct query"
                " settings; use fewer query variants"
            )
        try:
            settings = self.kind.settings.model_validate({**self.raw, **query})
        except ValidationError as exc:
            where = f"reference query for vault {self.prefix!r}"
            raise InvalidReference(describe_errors(exc, where, self.kind.settings)) from None
        self._variants[variant] = settings
        return settings

    async def ensure_started(self) -> None:
        """Start the backend once; concurrent first uses wait for the same start."""
        if self.started:
            return
        async with self._start_lock:
            if not self.started:
                await self.backend.start(self.settings)
                self.started = True

    def same_as(self, other: Vault) -> bool:
        """Unchanged across a reload: same backend, resolved config and limits (a new
        description or tags do not retire a vault and its cache entries)."""
        return (self.kind.name, self.raw, self.limits) == (other.kind.name, other.raw, other.limits)


class VaultRegistry:
    """The vaults of one configuration. Backend names used directly are made on first use."""

    def __init__(
        self,
        entities: tuple[VaultEntity, ...],
        environ: Mapping[str, str] | None = None,
        limits: LimitsConfig | None = None,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._limits = limits or LimitsConfig()
        self._vaults: dict[str, Vault] = {
            e.prefix: Vault.build(e.prefix, load_kind(e.name), e, self._environ, self._limits)
            for e in entities
        }

    def __iter__(self) -> Iterator[Vault]:
        return iter(list(self._vaults.values()))

    def get(self, name: str) -> Vault:
        vault = self._vaults.get(name)
        if vault is not None:
            return vault
        if name in BACKEND_NAMES:
            try:
                vault = Vault.build(name, load_kind(name), None, self._environ, self._limits)
            except ConfigError as exc:
                raise UnknownVault(f"vault {name!r} cannot be used: {exc.message}") from exc
            self._vaults[name] = vault
            return vault
        raise UnknownVault(f"no vault with prefix or backend name {name!r}")

    def adopt_unchanged(self, old: VaultRegistry) -> list[Vault]:
        """Keep the old instance of every vault that did not change; return the rest of old.

        Reusing the instance keeps its started clients and its cache entries.
        """
        retired = []
        for prefix, previous in old._vaults.items():
            current = self._vaults.get(prefix)
            if current is None and previous.entity is None:
                self._vaults[prefix] = previous  # implicit vault: still valid
            elif current is not None and current.same_as(previous):
                self._vaults[prefix] = previous
            else:
                retired.append(previous)
        return retired

    async def start(self) -> None:
        await asyncio.gather(*(vault.ensure_started() for vault in self))

    async def close(self) -> None:
        await close_vaults(list(self))


async def close_vaults(vaults: list[Vault]) -> None:
    """Close backends in reverse order of creation; one failing close does not stop the rest."""
    for vault in reversed(vaults):
        try:
            await vault.backend.close()
        except Exception:  # noqa: S112 - shutdown must reach every backend
            continue
