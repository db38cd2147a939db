"""Secret cache with Kong's ``ttl``/``neg_ttl``/``resurrect_ttl`` and single-flight loads.

Keys are what the backend is asked (vault, secret id, version, effective
settings), never the JSON key: several keys of one secret share one entry, so a
username/password pair always comes from the same fetch. Time comes from an
injected clock so tests can move it by hand.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from sidecar.backends.base import Fetched, VaultSettings
from sidecar.errors import BackendFailure

Clock = Callable[[], float]
Loader = Callable[[], Awaitable[Fetched]]


class LookupResult(enum.Enum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    NEGATIVE = "negative"


@dataclass(frozen=True, slots=True)
class SecretKey:
    vault: str
    secret_id: str
    version: int | None
    settings: VaultSettings


@dataclass(frozen=True, slots=True)
class Policy:
    ttl: float
    neg_ttl: float
    resurrect_ttl: float


@dataclass(slots=True)
class Entry:
    """Last good value (if any) and, for a permanent failure, until when to repeat it."""

    fetched: Fetched | None = None
    fetched_at: float = 0.0
    expires_at: float = 0.0
    failure: BackendFailure | None = None
    failed_until: float = 0.0

    def is_fresh(self, now: float) -> bool:
        return self.fetched is not None and now < self.expires_at

    def is_negative(self, now: float) -> bool:
        return self.failure is not None and now < self.failed_until


@dataclass(frozen=True, slots=True)
class Lookup:
    fetched: Fetched
    result: LookupResult
    age: float
    expires_in: float  # negative once expired (a stale answer)

    @property
    def cached(self) -> bool:
        return self.result in (LookupResult.HIT, LookupResult.STALE)

    @property
    def stale(self) -> bool:
        return self.result is LookupResult.STALE


class Cache:
    """Bounded LRU of ``SecretKey -> Entry``; the least recently used entry goes first."""

    def __init__(
        self,
        *,
        max_entries: int,
        clock: Clock = time.monotonic,
        observe: Callable[[LookupResult], None] = lambda result: None,
        on_change: Callable[[SecretKey], None] = lambda key: None,
    ) -> None:
        self.clock = clock
        self.observe = observe
        self.on_change = on_change
        self.max_entries = max_entries
        self._entries: OrderedDict[SecretKey, Entry] = OrderedDict()
        self._loads: dict[SecretKey, asyncio.Task[Lookup]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[SecretKey, Entry]]:
        return iter(list(self._entries.items()))

    async def get(
        self, key: SecretKey, policy: Policy, load: Loader, *, force: bool = False
    ) -> Lookup:
        """A fresh cached value, else the result of one shared load.

        ``force`` skips the cached value (a manual refresh) but still joins a
        load already under way rather than starting a second one.
        """
        entry = self._entries.get(key)
        if entry is not None and not force:
            now = self.clock()
            if entry.is_negative(now):
                self._entries.move_to_end(key)
                self.observe(LookupResult.NEGATIVE)
                assert entry.failure is not None
                # a fresh traceback each time: re-raising would grow the stored one
                raise entry.failure.with_traceback(None)
            if entry.is_fresh(now):
                self._entries.move_to_end(key)
                self.observe(LookupResult.HIT)
                return self._lookup(entry, LookupResult.HIT, now)
        task = self._loads.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key, policy, load))
            self._loads[key] = task
            task.add_done_callback(lambda t: self._loads.pop(key, None))
            task.add_done_callback(_retrieve)
        try:
            # shield: a caller that goes away must not cancel the load others wait on
            lookup = await asyncio.shield(task)
        except BackendFailure:
            self.observe(LookupResult.MISS)
            raise
        self.observe(lookup.result)
        return lookup

    async def _load(self, key: SecretKey, policy: Policy, load: Loader) -> Lookup:
        try:
            fetched = await load()
        except BackendFailure as failure:
            now = self.clock()
            entry = self._entries.get(key)
            if failure.transient:
                last_good = entry if entry is not None and entry.fetched is not None else None
                if last_good and now < last_good.expires_at + policy.resurrect_ttl:
                    return self._lookup(last_good, LookupResult.STALE, now)
                raise
            stored = entry or Entry()
            stored.fetched, stored.failure = None, failure
            stored.failed_until = now + policy.neg_ttl
            self._store(key, stored)
            raise
        now = self.clock()
        previous = self._entries.get(key)
        entry = Entry(fetched=fetched, fetched_at=now, expires_at=now + policy.ttl)
        self._store(key, entry)
        if previous is not None and previous.fetched is not None and previous.fetched != fetched:
            self.on_change(key)
        return self._lookup(entry, LookupResult.MISS, now)

    def _store(self, key: SecretKey, entry: Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    @staticmethod
    def _lookup(entry: Entry, result: LookupResult, now: float) -> Lookup:
        assert entry.fetched is not None
        return Lookup(entry.fetched, result, now - entry.fetched_at, entry.expires_at - now)

    def drop(self, predicate: Callable[[SecretKey], bool]) -> int:
        """Remove matching entries (a vault that changed on reload); return how many."""
        doomed = [key for key in self._entries if predicate(key)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def resize(self, max_entries: int) -> None:
        self.max_entries = max_entries
        while len(self._entries) > max_entries:
            self._entries.popitem(last=False)


def _retrieve(task: asyncio.Task[Lookup]) -> None:
    """Mark a load's exception as seen: callers that went away must not cause warnings."""
    if not task.cancelled():
        task.exception()
