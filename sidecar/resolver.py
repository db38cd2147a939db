"""Reference -> vault -> cached backend fetch -> JSON key -> answer.

Binding (a reference's vault, settings, key and policy, remembered per text), the
cache in front of every fetch, batching for prefetch and refresh, and the answer.
Backend calls themselves go through ``backend_calls``; ``/v1/status`` is ``status``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from sidecar.backend_calls import BackendCalls, decoded
from sidecar.backends import BatchBackend, Fetched, VaultSettings
from sidecar.cache import Cache, Lookup, LookupResult, Policy, SecretKey
from sidecar.config import CacheConfig
from sidecar.errors import (
    BackendFailure,
    InvalidReference,
    SecretNotFound,
    SidecarError,
    UnknownVault,
)
from sidecar.json_codec import encode_json
from sidecar.metrics import Metrics
from sidecar.reference import Reference, parse
from sidecar.schedule import NEVER
from sidecar.status import vault_status
from sidecar.vaults import Vault, VaultRegistry

T = TypeVar("T")
Loader = Callable[[], Awaitable[Fetched]]

MAX_BOUND = 65_536  # remembered reference texts per resolver
MAX_LOADS = 64  # loads in flight per load() call (the backends' own limits apply too)
# Prefetch loads this many at once: 50 000 concurrent loads left 5 KiB of RSS per entry
# behind (their tasks' peak), and batching backends batch far fewer anyway.
PREFETCH_CHUNK = 1000
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")  # no backend names a secret with these
_LUA_TYPES = {bool: "boolean", int: "number", float: "number", dict: "table", list: "table"}


def extract_key(value: str, key: str) -> str:
    """Kong's rule: the value is a flat JSON object and the key's value a string.

    Kong's messages, minus the value Kong prints in the decode error.
    """
    try:
        document = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidReference(f"unable to json decode value: {exc.msg}") from None
    if not isinstance(document, dict):
        raise InvalidReference("unable to json decode value: not a JSON object")
    if key not in document:
        raise SecretNotFound(f"subfield {key} not found in JSON secret")
    found = document[key]
    if not isinstance(found, str):
        kind = _LUA_TYPES.get(type(found), "userdata")
        raise InvalidReference(f"unexpected {kind} value in JSON secret for subfield {key}")
    return found


# What ``Answer.encode`` writes after the memoized fields, per kind of lookup.
_STATE = {
    LookupResult.HIT: b'"cached":true,"stale":false,"age_seconds":',
    LookupResult.STALE: b'"cached":true,"stale":true,"age_seconds":',
    LookupResult.MISS: b'"cached":false,"stale":false,"age_seconds":',
}
MAX_ENCODED = 16  # reference texts memoized per value (more: encoded per read)


@dataclass(slots=True)  # not frozen: one is made per read, and frozen init costs 3x
class Answer:
    ref: str
    value: str = field(repr=False)
    version: str | None
    lookup: Lookup

    def encode(self) -> bytes:
        """``to_json`` as bytes, built for the hot path: ref, value and version are encoded
        once per stored value and reference text; only the state and times per read."""
        lookup = self.lookup
        memo = lookup.fetched.answers
        fixed = memo.get(self.ref)
        if fixed is None:
            document = {"ref": self.ref, "value": self.value, "version": self.version}
            fixed = encode_json(document)[:-1] + b","
            if len(memo) < MAX_ENCODED:
                memo[self.ref] = fixed
        state = _STATE.get(lookup.result)
        if state is None:  # not a state an answer is made in; the general path says it
            return encode_json(self.to_json())
        # %.3f is round(x, 3) as JSON, correctly rounded both, at a sixth of the cost
        if lookup.expires_in == NEVER:
            return b'%s%s%.3f,"expires_in_seconds":null}' % (fixed, state, lookup.age)
        return b'%s%s%.3f,"expires_in_seconds":%.3f}' % (
            fixed,
            state,
            lookup.age,
            lookup.expires_in,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "value": self.value,
            "version": self.version,
            "cached": self.lookup.cached,
            "stale": self.lookup.stale,
            "age_seconds": round(self.lookup.age, 3),
            # ttl 0 ("no rotation") never expires
            "expires_in_seconds": (
                round(self.lookup.expires_in, 3) if self.lookup.expires_in != NEVER else None
            ),
        }


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed reference bound to its vault and effective settings."""

    reference: Reference
    vault: Vault
    key: SecretKey
    policy: Policy


class Resolver:
    def __init__(
        self, vaults: VaultRegistry, cache: Cache, defaults: CacheConfig, metrics: Metrics
    ) -> None:
        self.vaults = vaults
        self.cache = cache
        self.defaults = defaults
        self.metrics = metrics
        self.calls = BackendCalls(defaults, metrics)
        self._bound: dict[str, Target] = {}  # reference text -> its target (this config's)
        self._policies: dict[VaultSettings, Policy] = {}  # bounded by the vaults' variants

    def target(self, text: str) -> Target:
        """Parse and bind a reference; raises ``InvalidReference`` or ``UnknownVault``."""
        return self.bound(text) or self.bind(parse(text), text)

    def bound(self, text: str) -> Target | None:
        """The target this exact text was bound to before, if any (no parsing, no settings
        validation, no new key: a repeat read's whole binding is this lookup)."""
        return self._bound.get(text)

    def bind(self, reference: Reference, text: str | None = None) -> Target:
        """Find the vault and effective settings; what no backend must be asked is refused.

        The server checks the caller's access on the parsed reference first, so a
        caller who may not read a name learns nothing about its vault or settings.
        """
        for part in (reference.resource, reference.key or ""):
            if CONTROL_CHARACTERS.search(part):
                raise InvalidReference("secret id or key contains a control character")
        vault = self.vaults.get(reference.name)
        settings = vault.settings_for(reference.config)
        vault.kind.check(reference.resource, reference.version, settings)
        key = SecretKey(
            vault.prefix, reference.resource, reference.version, settings, vault.generation
        )
        target = Target(reference, vault, key, self.policy(settings))
        if text is not None:
            if len(self._bound) >= MAX_BOUND:
                self._bound.clear()  # rare: more distinct references than any gateway has
            self._bound[text] = target
        return target

    def policy(self, settings: VaultSettings) -> Policy:
        """The vault's (or query's) timing over the ``cache:`` defaults; one per settings."""
        policy = self._policies.get(settings)
        if policy is None:
            d = self.defaults
            policy = self._policies[settings] = Policy(
                ttl=settings.ttl if settings.ttl is not None else d.ttl,
                neg_ttl=settings.neg_ttl if settings.neg_ttl is not None else d.neg_ttl,
                resurrect_ttl=(
                    settings.resurrect_ttl
                    if settings.resurrect_ttl is not None
                    else d.resurrect_ttl
                ),
            )
        return policy

    def cached(self, text: str, target: Target) -> Answer | None:
        """The answer from a fresh cached value, without awaiting; None if it needs a load."""
        lookup = self.cache.hit(target.key)
        return None if lookup is None else self._answer(text, target.reference, lookup)

    async def resolve(self, text: str, *, force: bool = False) -> Answer:
        return await self.resolve_target(text, self.target(text), force=force)

    async def resolve_target(self, text: str, target: Target, *, force: bool = False) -> Answer:
        """Resolve an already bound reference (the server checks access in between).

        ``force`` fetches again even if fresh (a manual refresh) and counts the outcome.
        """
        try:
            lookup = await self.cache.get(
                target.key,
                target.policy,
                lambda: self.calls.fetch(target.vault, target.key),
                force=force,
            )
        except SidecarError as exc:
            if force:
                self._count_refresh(exc)
            raise
        if force:
            self._count_refresh(lookup)
        return self._answer(text, target.reference, lookup)

    def _count_refresh(self, result: Lookup | SidecarError) -> str:
        """Name a refresh's outcome (``ok``, ``stale`` or the error code) and count it."""
        if isinstance(result, SidecarError):
            outcome = result.code
        else:
            outcome = "stale" if result.stale else "ok"
        self.metrics.refreshes.labels(outcome).inc()
        return outcome

    async def resolve_many(self, texts: Sequence[str]) -> list[Answer | SidecarError]:
        """Resolve concurrently, each result or its error, in the order asked."""
        results = await asyncio.gather(*(self.resolve(t) for t in texts), return_exceptions=True)
        out: list[Answer | SidecarError] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, SidecarError):
                raise result
            out.append(result)
        return out

    async def prefetch(self, texts: Sequence[str]) -> dict[str, SidecarError]:
        """Warm the cache (batched where the backend can); return what failed and why."""
        failures: dict[str, SidecarError] = {}
        targets: dict[str, Target] = {}
        for text in texts:
            try:
                targets[text] = self.target(text)
            except SidecarError as exc:
                failures[text] = exc
        keys = [t.key for t in targets.values()]
        loaded: dict[SecretKey, Lookup | SidecarError] = {}
        for start in range(0, len(keys), PREFETCH_CHUNK):
            loaded |= await self.load(keys[start : start + PREFETCH_CHUNK], force=False)
        for text, target in targets.items():
            try:
                result = loaded[target.key]
                if isinstance(result, SidecarError):
                    raise result
                self._answer(text, target.reference, result)  # a missing JSON key fails here
            except SidecarError as exc:
                failures[text] = exc
        return failures

    async def refresh(self, keys: Sequence[SecretKey]) -> dict[str, int]:
        """Fetch these entries again now; count outcomes (``ok``, ``stale`` or an error code)."""
        counts: dict[str, int] = {}
        for result in (await self.load(keys, force=True)).values():
            outcome = self._count_refresh(result)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    async def refresh_all(self) -> dict[str, int]:
        return await self.refresh([key for key, _ in self.cache.items()])

    async def load(
        self, keys: Sequence[SecretKey], *, force: bool
    ) -> dict[SecretKey, Lookup | SidecarError]:
        """Load entries through the cache, several per call where the backend batches.

        Keys of a batch-capable backend sharing vault and settings go in one
        ``fetch_many``; the others are fetched one call each, concurrently.
        """
        groups: defaultdict[tuple[str, int, VaultSettings], list[SecretKey]] = defaultdict(list)
        for key in dict.fromkeys(keys):
            groups[(key.vault, key.generation, key.settings)].append(key)
        results: dict[SecretKey, Lookup | SidecarError] = {}

        queues: list[list[tuple[SecretKey, Loader]]] = []
        for (prefix, generation, settings), group in groups.items():
            try:
                vault = self.vaults.get(prefix)
                if vault.generation != generation:
                    raise UnknownVault(f"vault {prefix!r} was replaced by a reload")
            except SidecarError as exc:  # a vault removed or replaced by a reload
                results.update(dict.fromkeys(group, exc))
                continue
            backend = vault.backend
            if isinstance(backend, BatchBackend) and len(group) > 1:
                loaders = self._batch_loaders(vault, backend, settings, group)
                queues.append([(key, loaders[key]) for key in group])
            else:
                queues.append([(key, partial(self.calls.fetch, vault, key)) for key in group])

        # Per group a bounded pool of workers over its queue, not a task per key: 10 000
        # keys due at once (a refresh burst) ran as one loop pass of over a second, and
        # every read waited that long. Pools per group, so a hung vault holds up only its
        # own keys; a batch is one call whichever worker starts it.
        async def worker(queue: Iterator[tuple[SecretKey, Loader]]) -> None:
            for key, load in queue:
                try:
                    policy = self.policy(key.settings)
                    results[key] = await self.cache.get(key, policy, load, force=force)
                except SidecarError as exc:
                    results[key] = exc

        workers = []
        for jobs in queues:
            queue = iter(jobs)
            workers += [worker(queue) for _ in range(min(MAX_LOADS, len(jobs)))]
        await asyncio.gather(*workers)
        return results

    def _batch_loaders(
        self, vault: Vault, backend: BatchBackend, settings: VaultSettings, keys: list[SecretKey]
    ) -> dict[SecretKey, Callable[[], Awaitable[Fetched]]]:
        """One loader per key, all served by one lazily started ``fetch_many`` call.

        A key the batch failed transiently (throttled part of a batch) gets a single,
        retried fetch of its own rather than waiting for the next refresh.
        """
        items = [(key.secret_id, key.version) for key in keys]
        batch: asyncio.Future[list[Fetched | BackendFailure]] | None = None

        async def load(index: int) -> Fetched:
            nonlocal batch
            if batch is None:
                batch = asyncio.ensure_future(
                    self.calls.fetch_many(vault, backend, settings, items)
                )
            result = (await asyncio.shield(batch))[index]
            if isinstance(result, BackendFailure):
                if result.transient:
                    return await self.calls.fetch(vault, keys[index])
                raise result
            return decoded(result, settings)

        return {key: partial(load, index) for index, key in enumerate(keys)}

    def status(self) -> dict[str, Any]:
        return vault_status(self.vaults, self.cache)

    def _answer(self, text: str, reference: Reference, lookup: Lookup) -> Answer:
        fetched = lookup.fetched
        value = fetched.value
        if reference.key is not None:
            value = fetched.keys.get(reference.key) or extract_key(value, reference.key)
            fetched.keys[reference.key] = value
        version = lookup.fetched.version
        if version is None and reference.version is not None:
            version = str(reference.version)
        return Answer(text, value, version, lookup)
