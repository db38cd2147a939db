"""Reference -> vault -> cached backend fetch -> JSON key -> answer.

The only place that calls backends: it bounds each call in time, turns
unexpected SDK exceptions into transient ``Unrecognised`` failures and records one metric and one
log line per call, so every backend gets that for free.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from sidecar.backends import BatchBackend, Fetched, VaultSettings
from sidecar.cache import NEVER, Cache, Lookup, Policy, SecretKey
from sidecar.config import CacheConfig
from sidecar.errors import (
    BackendError,
    BackendFailure,
    BackendTimeout,
    InvalidReference,
    SecretNotFound,
    SidecarError,
    UnknownVault,
    Unrecognised,
)
from sidecar.logging import get_logger
from sidecar.metrics import Metrics
from sidecar.reference import Reference, parse
from sidecar.vaults import Vault, VaultRegistry

log = get_logger("sidecar.resolver")
T = TypeVar("T")

MAX_BOUND = 65_536  # remembered reference texts per resolver
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


def decoded(fetched: Fetched, settings: VaultSettings) -> Fetched:
    """Apply ``base64_decode`` once, before caching, so every key reads decoded text."""
    if not settings.base64_decode:
        return fetched
    try:
        text = base64.b64decode(fetched.value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BackendError("base64_decode is set but the value is not base64 of UTF-8") from None
    return Fetched(text, fetched.version)


@dataclass(slots=True)  # not frozen: one is made per read, and frozen init costs 3x
class Answer:
    ref: str
    value: str = field(repr=False)
    version: str | None
    lookup: Lookup

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
        self._unrecognised: set[tuple[str, str]] = set()
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
                lambda: self._fetch(target.vault, target.key),
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

    async def _fetch(self, vault: Vault, key: SecretKey) -> Fetched:
        backend = vault.backend
        fetched = await self._call(
            vault,
            {"secret_id": key.secret_id, "version": key.version},
            lambda: backend.fetch(key.secret_id, key.version, key.settings),
        )
        return decoded(fetched, key.settings)

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
        loaded = await self.load([t.key for t in targets.values()], force=False)
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

        async def one(key: SecretKey, load: Callable[[], Awaitable[Fetched]]) -> None:
            try:
                policy = self.policy(key.settings)
                results[key] = await self.cache.get(key, policy, load, force=force)
            except SidecarError as exc:
                results[key] = exc

        jobs = []
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
                jobs += [one(key, loaders[key]) for key in group]
            else:
                jobs += [one(key, partial(self._fetch, vault, key)) for key in group]
        await asyncio.gather(*jobs)
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
                about = {"secrets": len(items)}
                batch = asyncio.ensure_future(
                    self._call(vault, about, lambda: backend.fetch_many(items, settings))
                )
            result = (await asyncio.shield(batch))[index]
            if isinstance(result, BackendFailure):
                if result.transient:
                    return await self._fetch(vault, keys[index])
                raise result
            return decoded(result, settings)

        return {key: partial(load, index) for index, key in enumerate(keys)}

    def status(self) -> dict[str, Any]:
        """Per-vault counts, ages and schedule for ``/v1/status`` and the gauges; never values.

        ``last_refresh_at`` is the wall-clock time of the vault's newest successful fetch
        (``last_refresh_age_seconds`` the same as an age), so an operator sees a vault
        whose refreshes stopped landing.
        """
        now = self.cache.clock()
        vaults: dict[str, dict[str, Any]] = {
            v.prefix: {"backend": v.backend_name, "started": v.started, "entries": 0,
                       "fresh": 0, "stale": 0, "failed": 0, "oldest_age_seconds": None,
                       "last_refresh_at": None, "last_refresh_age_seconds": None,
                       "next_refresh_in_seconds": None, "last_error": None}
            for v in self.vaults
        }  # fmt: skip
        newest: dict[str, float] = {}
        for key, entry in self.cache.items():
            row = vaults.get(key.vault)
            if row is None:
                continue
            row["entries"] += 1
            row[entry.health.value] += 1
            if entry.fetched is not None:
                age = round(now - entry.fetched_at, 3)
                row["oldest_age_seconds"] = max(row["oldest_age_seconds"] or 0.0, age)
                newest[key.vault] = max(newest.get(key.vault, -NEVER), entry.fetched_at)
            if entry.refresh_at != NEVER:
                due = round(max(entry.refresh_at - now, 0.0), 3)
                row["next_refresh_in_seconds"] = min(row["next_refresh_in_seconds"] or due, due)
            if entry.failure is not None:
                row["last_error"] = {"code": entry.failure.code, "message": entry.failure.message}
        wall = datetime.now(UTC)
        for prefix, fetched_at in newest.items():
            age = max(now - fetched_at, 0.0)
            vaults[prefix]["last_refresh_age_seconds"] = round(age, 3)
            at = wall - timedelta(seconds=age)
            vaults[prefix]["last_refresh_at"] = at.isoformat(timespec="milliseconds")
        cache = {"entries": len(self.cache), "max_entries": self.cache.max_entries}
        return {"cache": cache, "vaults": vaults}

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

    async def _retried(self, call: Callable[[], Awaitable[T]]) -> T:
        """The call, and after a transient failure up to ``backend_retries`` more with
        exponential backoff and full jitter (tenacity). The first attempt runs without
        tenacity: building a retry loop costs more than a cached backend call, and most
        calls succeed at once; the first retry follows immediately, later ones back off."""
        d = self.defaults
        try:
            return await call()
        except BackendFailure as exc:
            if not exc.transient or d.backend_retries == 0:
                raise
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, BackendFailure) and exc.transient),
            stop=stop_after_attempt(d.backend_retries),
            wait=wait_random_exponential(multiplier=d.retry_backoff, max=d.retry_backoff_max),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("tenacity re-raises the last failure")  # pragma: no cover

    def _first_sighting(self, vault: Vault, failure: Unrecognised) -> None:
        """One warning per vault and kind of unrecognised failure (then only the metric)."""
        if (vault.prefix, failure.kind) not in self._unrecognised:
            self._unrecognised.add((vault.prefix, failure.kind))
            log.warning("backend.unrecognised_error", vault=vault.prefix, kind=failure.kind)

    async def _call(
        self, vault: Vault, about: dict[str, Any], call: Callable[[], Awaitable[T]]
    ) -> T:
        """One backend call, admitted by the vault's concurrency and rate limits."""
        async with vault.admission(self.metrics.rate_limited.labels(vault.prefix).inc):
            return await self._attempts(vault, about, call)

    async def _attempts(
        self, vault: Vault, about: dict[str, Any], call: Callable[[], Awaitable[T]]
    ) -> T:
        """Run one backend call: retries, a deadline, one metric and one log line.

        Transient failures are retried here, with exponential backoff and full
        jitter, so backends make single attempts and retry policy lives in one place.
        """
        timeout = self.defaults.backend_timeout
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(timeout):
                await vault.ensure_started()
                result = await self._retried(call)
        except TimeoutError:
            outcome = "backend_timeout"
            raise BackendTimeout(
                f"vault {vault.prefix!r} did not answer within {timeout:g} s"
            ) from None
        except BackendFailure as exc:
            outcome = exc.code
            if isinstance(exc, Unrecognised):
                self._first_sighting(vault, exc)
            raise
        except Exception as exc:  # a backend's own bug or an SDK error it lets through
            failure = Unrecognised.of(exc, f"vault {vault.prefix!r}")
            outcome = failure.code
            self._first_sighting(vault, failure)
            raise failure from None
        finally:
            elapsed = time.perf_counter() - started
            labels = (vault.prefix, vault.backend_name, outcome)
            self.metrics.backend_calls.labels(*labels).inc()
            self.metrics.backend_duration.labels(*labels).observe(elapsed)
            log.info(
                "backend.call",
                vault=vault.prefix,
                backend=vault.backend_name,
                outcome=outcome,
                duration_ms=round(elapsed * 1000, 3),
                **about,
            )
        return result
