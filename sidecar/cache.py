"""Secret cache with Kong's ``ttl``/``neg_ttl``/``resurrect_ttl``, single-flight loads
and a refresh schedule per entry.

Keys are what the backend is asked (vault, secret id, version, effective
settings), never the JSON key: several keys of one secret share one entry, so a
username/password pair always comes from the same fetch. Time comes from an
injected clock, and jitter from an injected random source, so tests can drive both.

The cache decides *when* an entry is due (before its ttl ends, with jitter; after
a failure, with exponential backoff and full jitter); the refresher decides what
to do with due entries. State changes (rotated, stale, failed, recovered) are
reported once each, so watchers and logs see transitions, not attempts.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import heapq
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from sidecar.backends.base import Fetched, VaultSettings
from sidecar.errors import BackendFailure, SecretNotFound

Clock = Callable[[], float]
Loader = Callable[[], Awaitable[Fetched]]
NEVER = float("inf")
BACKOFF_BASE = 1.0  # seconds before the first retry of a failed entry (before jitter)


class LookupResult(enum.Enum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    NEGATIVE = "negative"


class Health(enum.Enum):
    FRESH = "fresh"  # the last fetch succeeded
    STALE = "stale"  # the last fetch failed; the previous value is still served
    FAILED = "failed"  # the last fetch failed and no value can be served


class Change(enum.Enum):
    ROTATED = "rotated"
    STALE = "stale"
    FAILED = "failed"
    RECOVERED = "recovered"


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


@dataclass(frozen=True, slots=True)
class Schedule:
    """When entries are refreshed: a window of their ttl, and the retry backoff cap."""

    window: tuple[float, float] = (0.75, 0.9)
    max_backoff: float = 60.0


@dataclass(slots=True)
class Entry:
    policy: Policy
    fetched: Fetched | None = None  # last good value
    fetched_at: float = 0.0
    expires_at: float = 0.0
    failure: BackendFailure | None = None  # the last failure, while failing
    failed_until: float = 0.0  # until then readers get the failure (or stale value) unasked
    refresh_at: float = NEVER
    last_used: float = 0.0
    failures: int = 0  # consecutive failed fetches
    health: Health = Health.FRESH

    def is_fresh(self, now: float) -> bool:
        return self.fetched is not None and now < self.expires_at

    def is_held(self, now: float) -> bool:
        """A recent failure answers for the backend: neg_ttl, or the retry backoff."""
        return self.failure is not None and now < self.failed_until

    def can_resurrect(self, now: float) -> bool:
        return self.fetched is not None and now < self.expires_at + self.policy.resurrect_ttl


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
        schedule: Schedule = Schedule(),
        jitter: Callable[[], float] = random.random,
        observe: Callable[[LookupResult], None] = lambda result: None,
        on_change: Callable[[SecretKey, Change, Entry], None] = lambda key, change, entry: None,
    ) -> None:
        self.clock = clock
        self.schedule = schedule
        self.jitter = jitter
        self.max_entries = max_entries
        self.observe = observe
        self.on_change = on_change
        self._entries: OrderedDict[SecretKey, Entry] = OrderedDict()
        self._loads: dict[SecretKey, asyncio.Task[Lookup]] = {}
        self._due: list[tuple[float, int, SecretKey]] = []  # heap; outdated items skipped
        self._order = itertools.count()
        self._pins: dict[SecretKey, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[SecretKey, Entry]]:
        return iter(list(self._entries.items()))

    def peek(self, key: SecretKey) -> Entry | None:
        return self._entries.get(key)

    async def get(
        self, key: SecretKey, policy: Policy, load: Loader, *, force: bool = False
    ) -> Lookup:
        """A fresh cached value, else the result of one shared load.

        ``force`` skips the cached value (a refresh) but still joins a load
        already under way rather than starting a second one.
        """
        entry = self._entries.get(key)
        if entry is not None and not force:  # a refresh is not a read: it must not stop idling
            now = self.clock()
            entry.last_used = now
            self._entries.move_to_end(key)
            if entry.is_fresh(now):  # even if its early refresh failed: still within ttl
                self.observe(LookupResult.HIT)
                return self._lookup(entry, LookupResult.HIT, now)
            if entry.failure is not None and entry.can_resurrect(now):
                # failing but servable: answer stale now; a retry past its backoff runs
                # in the background (one per key), so no reader waits on a sick backend
                if not entry.is_held(now):
                    self._start_load(key, policy, load)
                self.observe(LookupResult.STALE)
                return self._lookup(entry, LookupResult.STALE, now)
            if entry.is_held(now):
                self.observe(LookupResult.NEGATIVE)
                assert entry.failure is not None
                # a fresh traceback each time: re-raising would grow the stored one
                raise entry.failure.with_traceback(None)
        task = self._start_load(key, policy, load)
        try:
            # shield: a caller that goes away must not cancel the load others wait on
            lookup = await asyncio.shield(task)
        except BackendFailure:
            self.observe(LookupResult.MISS)
            raise
        self.observe(lookup.result)
        return lookup

    def loading(self, key: SecretKey) -> asyncio.Task[Lookup] | None:
        """The load under way for ``key`` (a background retry included), if any."""
        return self._loads.get(key)

    def _start_load(self, key: SecretKey, policy: Policy, load: Loader) -> asyncio.Task[Lookup]:
        """The load under way for ``key``, or a new one: one backend call per key at a time."""
        task = self._loads.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key, policy, load))
            self._loads[key] = task
            task.add_done_callback(lambda t: self._loads.pop(key, None))
            task.add_done_callback(_retrieve)
        return task

    async def _load(self, key: SecretKey, policy: Policy, load: Loader) -> Lookup:
        try:
            fetched = await load()
        except BackendFailure as failure:
            return self._failed(key, policy, failure)
        return self._succeeded(key, policy, fetched)

    def _succeeded(self, key: SecretKey, policy: Policy, fetched: Fetched) -> Lookup:
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            entry = Entry(policy, last_used=now)
        before, previous = entry.health, entry.fetched
        entry.policy, entry.fetched, entry.fetched_at = policy, fetched, now
        entry.expires_at = now + policy.ttl
        entry.failure, entry.failures, entry.health = None, 0, Health.FRESH
        low, high = self.schedule.window
        self._store(key, entry, now + policy.ttl * (low + (high - low) * self.jitter()))
        if previous is not None and previous != fetched:
            self.on_change(key, Change.ROTATED, entry)
        if before is not Health.FRESH:
            self.on_change(key, Change.RECOVERED, entry)
        return self._lookup(entry, LookupResult.MISS, now)

    def _failed(self, key: SecretKey, policy: Policy, failure: BackendFailure) -> Lookup:
        """Record a failure; return the stale value if it may still be served, else raise.

        Only *gone* (not found, deleted) drops the last good value. A denial, a garbled
        answer or an outage keeps it servable within ``resurrect_ttl`` and is retried with
        backoff; with no value to serve, a permanent failure is remembered for ``neg_ttl``.
        """
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            entry = Entry(policy, last_used=now)
        entry.policy, entry.failure = policy, _detached(failure)
        entry.failures += 1
        if isinstance(failure, SecretNotFound):
            entry.fetched = None
        if entry.can_resurrect(now):
            entry.failed_until = now + self._backoff(entry.failures)
            health = Health.STALE
        else:
            hold = self._backoff(entry.failures) if failure.transient else policy.neg_ttl
            entry.failed_until = now + hold
            health = Health.FAILED
        before, entry.health = entry.health, health
        self._store(key, entry, entry.failed_until)
        if health is not before:
            self.on_change(key, Change(health.value), entry)
        if health is Health.STALE:
            return self._lookup(entry, LookupResult.STALE, now)
        raise failure

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with full jitter (AWS architecture blog), capped."""
        ceiling = min(self.schedule.max_backoff, BACKOFF_BASE * 2.0 ** min(failures - 1, 30))
        return ceiling * self.jitter()

    def _store(self, key: SecretKey, entry: Entry, refresh_at: float) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        entry.refresh_at = refresh_at
        heapq.heappush(self._due, (refresh_at, next(self._order), key))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    @staticmethod
    def _lookup(entry: Entry, result: LookupResult, now: float) -> Lookup:
        assert entry.fetched is not None
        return Lookup(entry.fetched, result, now - entry.fetched_at, entry.expires_at - now)

    def due(self, now: float) -> list[SecretKey]:
        """Pop the keys whose refresh time has come (each at most once)."""
        keys = []
        while self._due and self._due[0][0] <= now:
            at, _, key = heapq.heappop(self._due)
            entry = self._entries.get(key)
            if entry is not None and entry.refresh_at == at:
                entry.refresh_at = NEVER  # until the refresh stores a new time
                keys.append(key)
        return keys

    def next_due(self) -> float:
        """When the next entry is due (``NEVER`` if none); drops outdated heap items."""
        while self._due:
            at, _, key = self._due[0]
            entry = self._entries.get(key)
            if entry is not None and entry.refresh_at == at:
                return at
            heapq.heappop(self._due)
        return NEVER

    def pin(self, key: SecretKey) -> None:
        """Keep ``key`` refreshed even when nobody reads it (prefetch, watchers)."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: SecretKey) -> None:
        count = self._pins.get(key, 0) - 1
        if count > 0:
            self._pins[key] = count
        else:
            self._pins.pop(key, None)

    def is_idle(self, key: SecretKey, now: float, idle_ttl: float | None) -> bool:
        """Unread for ``idle_ttl`` (default three ttl's) and not pinned."""
        entry = self._entries.get(key)
        if entry is None or key in self._pins:
            return False
        limit = idle_ttl if idle_ttl is not None else 3 * entry.policy.ttl
        return now - entry.last_used >= limit

    def drop(self, predicate: Callable[[SecretKey], bool]) -> int:
        """Remove matching entries (idle ones, a vault that changed); return how many."""
        doomed = [key for key in self._entries if predicate(key)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def resize(self, max_entries: int) -> None:
        self.max_entries = max_entries
        while len(self._entries) > max_entries:
            self._entries.popitem(last=False)


def _detached(failure: BackendFailure) -> BackendFailure:
    """A copy without traceback or causes to remember: their frames hold what the backend
    answered (a garbled body of any size) and the callers' requests."""
    kept = copy.copy(failure)
    kept.__traceback__ = kept.__cause__ = kept.__context__ = None
    return kept


def _retrieve(task: asyncio.Task[Lookup]) -> None:
    """Mark a load's exception as seen: callers that went away must not cause warnings."""
    if not task.cancelled():
        task.exception()
