"""Secret cache with Kong's ``ttl``/``neg_ttl``/``resurrect_ttl``, single-flight loads
and a refresh schedule per entry.

Keys are what the backend is asked (vault, secret id, version, effective
settings), never the JSON key: several keys of one secret share one entry, so a
username/password pair always comes from the same fetch. Time comes from an
injected clock, and jitter from an injected random source, so tests can drive both.

The cache decides *when* an entry is due (before its ttl ends, with jitter; after
a failure, with exponential backoff and full jitter); the refresher decides what
to do with due entries. The timetable holds at most one slot per entry (none while
refresh is off), so memory is bounded by ``max_entries`` in every mode. State
changes (rotated, stale, failed, recovered) are reported once each, so watchers and
logs see transitions, not attempts.

Keys carry their vault's generation: a vault replaced by a reload is *retired*, its
entries dropped, and whatever its loads still in flight return is never stored, so a
closing client's error can never be cached for its successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field

from sidecar.backends.base import Fetched, VaultSettings
from sidecar.errors import BackendFailure, FailureClass
from sidecar.schedule import DEFAULT_SCHEDULE, NEVER, Schedule, Timetable

Clock = Callable[[], float]
Loader = Callable[[], Awaitable[Fetched]]
BACKOFF_BASE = 1.0  # seconds before the first retry of a failed entry (before jitter)
# A reader of an entry with nothing to serve may retry a transient failure this often,
# whatever the backoff says: recovery after an outage takes a second, not max_backoff.
EARLY_RETRY = 1.0


class LookupResult(enum.StrEnum):  # a str: counted by metrics without a lookup
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
    generation: int = 0  # of the vault instance: a reload's replacement gets a new one
    # Hashed once: every read looks the key up, and pydantic settings hash field by field.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = (self.vault, self.secret_id, self.version, self.settings, self.generation)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class Policy:
    """Kong's fields: ``ttl`` 0 is "no rotation" (kept until a forced refresh),
    ``neg_ttl`` 0 is "no negative caching" (every read after a failure asks again)."""

    ttl: float
    neg_ttl: float
    resurrect_ttl: float


@dataclass(slots=True)
class Entry:
    policy: Policy
    fetched: Fetched | None = None  # last good value
    fetched_at: float = 0.0
    attempted_at: float = -NEVER  # when the last load started
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


@dataclass(slots=True)  # not frozen: one is made per read, and frozen init costs 3x
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
        schedule: Schedule = DEFAULT_SCHEDULE,
        jitter: Callable[[], float] = random.random,
        observe: Callable[[LookupResult], None] = lambda result: None,
        on_change: Callable[[SecretKey, Change, Entry], None] = lambda key, change, entry: None,
    ) -> None:
        self.clock = clock
        self._schedule = schedule
        self.jitter = jitter
        self.max_entries = max_entries
        self.observe = observe
        self.on_change = on_change
        self._entries: OrderedDict[SecretKey, Entry] = OrderedDict()
        self._loads: dict[SecretKey, asyncio.Task[Lookup]] = {}
        self.timetable: Timetable[SecretKey] = Timetable()
        self._pins: dict[SecretKey, int] = {}
        self._retired: set[int] = set()  # generations of vaults a reload replaced

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule) -> None:
        """Turning refresh off empties the timetable; turning it on schedules every entry."""
        self._schedule = schedule
        if not schedule.refresh:
            self.timetable.clear()
            return
        if len(self.timetable) < len(self._entries):
            now = self.clock()
            for key, entry in self._entries.items():
                if entry.refresh_at == NEVER and entry.policy.ttl > 0:
                    at = entry.fetched_at + entry.policy.ttl * schedule.window[1]
                    self._plan(key, entry, max(at, now))

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
            hit = self.hit(key)
            if hit is not None:
                return hit
            now = self.clock()
            entry.last_used = now
            self._entries.move_to_end(key)
            if entry.failure is not None and entry.can_resurrect(now):
                # failing but servable: answer stale now; a retry past its backoff runs
                # in the background (one per key), so no reader waits on a sick backend
                if not entry.is_held(now):
                    self._start_load(key, policy, load)
                self.observe(LookupResult.STALE)
                return self._lookup(entry, LookupResult.STALE, now)
            if entry.is_held(now) and not self._may_retry_early(key, entry, now):
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

    def hit(self, key: SecretKey) -> Lookup | None:
        """The fresh value, if there is one (even if its early refresh failed: it is still
        within ttl); a read that needs no waiting, so callers may take it without awaiting."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self.clock()
        if not entry.is_fresh(now):
            return None
        entry.last_used = now
        self._entries.move_to_end(key)
        self.observe(LookupResult.HIT)
        return self._lookup(entry, LookupResult.HIT, now)

    def _may_retry_early(self, key: SecretKey, entry: Entry, now: float) -> bool:
        """A transient failure with nothing to serve: one reader a second may ask again
        (and wait for it) rather than everyone waiting out the backoff. Denials, gone and
        misconfigured failures keep Kong's ``neg_ttl``."""
        assert entry.failure is not None
        return (
            entry.failure.transient
            and key not in self._loads
            and now - entry.attempted_at >= EARLY_RETRY
        )

    def loading(self, key: SecretKey) -> asyncio.Task[Lookup] | None:
        """The load under way for ``key`` (a background retry included), if any."""
        return self._loads.get(key)

    def _start_load(self, key: SecretKey, policy: Policy, load: Loader) -> asyncio.Task[Lookup]:
        """The load under way for ``key``, or a new one: one backend call per key at a time."""
        task = self._loads.get(key)
        if task is None:
            entry = self._entries.get(key)
            if entry is not None:
                entry.attempted_at = self.clock()
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
            entry = Entry(policy, last_used=now, attempted_at=now)
        before, previous = entry.health, entry.fetched
        entry.policy, entry.fetched, entry.fetched_at = policy, fetched, now
        entry.failure, entry.failures, entry.health = None, 0, Health.FRESH
        if policy.ttl == 0:  # Kong's "no rotation": kept until a forced refresh
            entry.expires_at = refresh_at = NEVER
        else:
            entry.expires_at = now + policy.ttl
            steady = previous is not None and before is Health.FRESH
            draw = self.schedule.fraction if steady else self.schedule.first_fraction
            refresh_at = max(
                now, Schedule.aligned(now + policy.ttl * draw(self.jitter()), policy.ttl)
            )
        if key.generation in self._retired:  # its vault was replaced while this ran
            return self._lookup(entry, LookupResult.MISS, now)
        self._store(key, entry, refresh_at)
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
        if key.generation in self._retired:
            raise failure
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            entry = Entry(policy, last_used=now, attempted_at=now)
        entry.policy, entry.failure = policy, _detached(failure)
        entry.failures += 1
        if failure.failure_class is FailureClass.GONE:
            entry.fetched = None
        backoff = self._backoff(entry.failures)
        if entry.can_resurrect(now):
            entry.failed_until = now + backoff
            health = Health.STALE
        else:
            entry.failed_until = now + (backoff if failure.transient else policy.neg_ttl)
            health = Health.FAILED
        before, entry.health = entry.health, health
        # neg_ttl 0 holds no reader back, but the refresher still waits out a backoff
        self._store(key, entry, max(entry.failed_until, now + backoff))
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
        self._plan(key, entry, refresh_at)
        self._evict(self.max_entries)

    def _plan(self, key: SecretKey, entry: Entry, refresh_at: float) -> None:
        entry.refresh_at = refresh_at if self._schedule.refresh else NEVER
        self.timetable.set(key, entry.refresh_at)

    def _evict(self, max_entries: int) -> None:
        """Least recently used first, pinned ones included: the bound is the bound."""
        while len(self._entries) > max_entries:
            key, _ = self._entries.popitem(last=False)
            self.timetable.discard(key)

    @staticmethod
    def _lookup(entry: Entry, result: LookupResult, now: float) -> Lookup:
        assert entry.fetched is not None
        return Lookup(entry.fetched, result, now - entry.fetched_at, entry.expires_at - now)

    def due(self, now: float) -> list[SecretKey]:
        """Take the keys whose refresh time has come (each at most once)."""
        keys = self.timetable.pop_due(now)
        for key in keys:
            self._entries[key].refresh_at = NEVER  # until the refresh stores a new time
        return keys

    def next_due(self) -> float:
        """When the next entry is due (``NEVER`` if none)."""
        return self.timetable.next_due()

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
        if idle_ttl is not None:
            limit = idle_ttl
        else:  # "no rotation" entries are kept: their reader reads them at start only
            limit = 3 * entry.policy.ttl if entry.policy.ttl > 0 else NEVER
        return now - entry.last_used >= limit

    def drop(self, predicate: Callable[[SecretKey], bool]) -> int:
        """Remove matching entries (idle ones, a vault that changed); return how many."""
        doomed = [key for key in self._entries if predicate(key)]
        for key in doomed:
            del self._entries[key]
            self.timetable.discard(key)
        return len(doomed)

    def retire(self, generations: Collection[int]) -> int:
        """Forget the vault instances a reload replaced: their entries now, and whatever
        their loads still in flight bring back. Returns the entries dropped."""
        self._retired.update(generations)
        return self.drop(lambda key: key.generation in self._retired)

    async def settle(self, generations: Collection[int], within: float) -> int:
        """Wait (up to ``within`` seconds) for the loads of these generations; return how
        many are still running, so their vault is closed only once nobody uses it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while pending := self._loads_of(generations):
                    await asyncio.wait(pending)
        return len(self._loads_of(generations))

    def _loads_of(self, generations: Collection[int]) -> list[asyncio.Task[Lookup]]:
        return [task for key, task in self._loads.items() if key.generation in generations]

    def resize(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._evict(max_entries)


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
