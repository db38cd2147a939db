"""Cache arithmetic on a manual clock: ttl, neg_ttl, resurrect_ttl, single-flight, LRU."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import pytest

from sidecar.backends.base import Fetched, VaultSettings
from sidecar.cache import (
    EARLY_RETRY,
    Cache,
    Change,
    Entry,
    Health,
    Lookup,
    LookupResult,
    Policy,
    SecretKey,
)
from sidecar.errors import (
    AccessDenied,
    BackendError,
    BackendFailure,
    BackendUnavailable,
    SecretNotFound,
)
from sidecar.schedule import NEVER, Schedule
from tests.support import ManualClock

POLICY = Policy(ttl=60, neg_ttl=10, resurrect_ttl=100)


def key(secret_id: str = "db") -> SecretKey:
    return SecretKey("vault", secret_id, None, VaultSettings())


class Backend:
    """A loader that counts calls and answers what the test scripts."""

    def __init__(self) -> None:
        self.calls = 0
        self.value = "v1"
        self.failure: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def load(self) -> Fetched:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return Fetched(self.value)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def cache(clock: ManualClock) -> Cache:
    """Jitter pinned to its maximum: refresh at 90 % of ttl, backoff 1 s, 2 s, 4 s..."""
    return Cache(max_entries=3, clock=clock, jitter=lambda: 1.0)


async def test_fresh_value_is_served_from_cache_until_ttl(cache: Cache, clock: ManualClock) -> None:
    """Within ttl the backend is not asked again, and age/expiry follow the clock."""
    backend = Backend()
    first = await cache.get(key(), POLICY, backend.load)
    clock.advance(59)
    second = await cache.get(key(), POLICY, backend.load)
    assert (first.result, second.result) == (LookupResult.MISS, LookupResult.HIT)
    assert backend.calls == 1
    assert second.age == 59
    assert second.expires_in == 1
    clock.advance(1)
    third = await cache.get(key(), POLICY, backend.load)
    assert third.result is LookupResult.MISS
    assert backend.calls == 2


async def test_transient_failure_serves_last_value_until_resurrect_ttl(
    cache: Cache, clock: ManualClock
) -> None:
    """After expiry a failing backend yields the stale value for resurrect_ttl, then the error."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    backend.failure = BackendUnavailable("down")
    clock.advance(60 + 99)
    stale = await cache.get(key(), POLICY, backend.load)
    assert stale.result is LookupResult.STALE
    assert stale.stale
    assert stale.cached
    assert stale.fetched.value == "v1"
    assert stale.expires_in == -99
    clock.advance(1)
    with pytest.raises(BackendUnavailable):
        await cache.get(key(), POLICY, backend.load)


async def settled(cache: Cache) -> None:
    """Wait for the background retry of the test's key, if one started."""
    task = cache.loading(key())
    if task is not None:
        await asyncio.gather(task, return_exceptions=True)


async def test_recovery_after_stale_replaces_value(cache: Cache, clock: ManualClock) -> None:
    """Once the backend answers again the new value is served fresh."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    backend.failure = BackendUnavailable("down")
    clock.advance(61)
    assert (await cache.get(key(), POLICY, backend.load)).stale
    backend.failure, backend.value = None, "v2"
    clock.advance(1)  # past the first retry backoff
    assert (await cache.get(key(), POLICY, backend.load)).stale  # answered now, retried behind
    await settled(cache)
    fresh = await cache.get(key(), POLICY, backend.load)
    assert (fresh.fetched.value, fresh.stale) == ("v2", False)


async def test_failing_backend_is_not_asked_again_within_backoff(
    cache: Cache, clock: ManualClock
) -> None:
    """During an outage readers get the stale value without a backend call until the backoff
    ends, then at once while one retry runs behind them; the backoff doubles each failure."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    backend.failure = BackendUnavailable("down")
    clock.advance(60)
    for _ in range(5):
        assert (await cache.get(key(), POLICY, backend.load)).stale
    assert backend.calls == 2
    clock.advance(1)
    for _ in range(3):  # many readers past the backoff: one retry
        assert (await cache.get(key(), POLICY, backend.load)).stale
    await settled(cache)
    assert backend.calls == 3
    clock.advance(1)
    assert (await cache.get(key(), POLICY, backend.load)).stale
    await settled(cache)
    assert backend.calls == 3  # second backoff is 2 s
    clock.advance(1)
    await cache.get(key(), POLICY, backend.load)
    await settled(cache)
    assert backend.calls == 4


@pytest.mark.parametrize(
    ("failure", "kept"),
    [
        (BackendError("garbled answer"), True),
        (AccessDenied("denied"), True),
        (BackendUnavailable("down"), True),
        (SecretNotFound("deleted"), False),
    ],
)
async def test_only_a_gone_secret_drops_the_last_good_value(
    cache: Cache, clock: ManualClock, failure: BackendFailure, kept: bool
) -> None:
    """A garbled answer, a denial or an outage during a refresh keeps serving the value
    (stale past ttl, within resurrect_ttl); only not-found drops it at once."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    backend.failure = failure
    if not kept:
        with pytest.raises(SecretNotFound):
            await cache.get(key(), POLICY, backend.load, force=True)  # a refresh finds it gone
        with pytest.raises(SecretNotFound):
            await cache.get(key(), POLICY, backend.load)
        return
    await cache.get(key(), POLICY, backend.load, force=True)  # a refresh fails
    assert (await cache.get(key(), POLICY, backend.load)).result is LookupResult.HIT
    clock.advance(61)
    stale = await cache.get(key(), POLICY, backend.load)
    assert (stale.stale, stale.fetched.value) == (True, "v1")


async def test_a_remembered_failure_holds_no_traceback(cache: Cache) -> None:
    """What a failing backend answered lives in the failure's frames and causes; the entry
    keeps a copy without them, so a huge garbled body is not held for neg_ttl."""
    backend = Backend()
    try:
        raise ValueError("the SDK's own error, with the body in its frames")
    except ValueError as cause:
        failure = BackendError("garbled")
        failure.__cause__ = cause
    backend.failure = failure
    with pytest.raises(BackendError):
        await cache.get(key(), POLICY, backend.load)
    entry = cache.peek(key())
    assert entry is not None
    assert entry.failure is not None
    stored = entry.failure
    assert (stored.__traceback__, stored.__cause__, stored.__context__) == (None, None, None)
    assert (type(stored), stored.message) == (BackendError, "garbled")


async def test_permanent_failure_is_remembered_for_neg_ttl(
    cache: Cache, clock: ManualClock
) -> None:
    """A not-found answer is not asked again before neg_ttl, and is after it."""
    backend = Backend()
    backend.failure = SecretNotFound("nope")
    for _ in range(3):
        with pytest.raises(SecretNotFound):
            await cache.get(key(), POLICY, backend.load)
    assert backend.calls == 1
    clock.advance(10)
    backend.failure = None
    assert (await cache.get(key(), POLICY, backend.load)).fetched.value == "v1"
    assert backend.calls == 2


async def test_permanent_failure_after_value_drops_the_value(
    cache: Cache, clock: ManualClock
) -> None:
    """A secret deleted in the backend stops being served once its ttl is over."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    clock.advance(60)
    backend.failure = SecretNotFound("deleted")
    with pytest.raises(SecretNotFound):
        await cache.get(key(), POLICY, backend.load)


async def test_concurrent_misses_share_one_load(cache: Cache) -> None:
    """100 concurrent requests for an uncached key make exactly one backend call."""
    backend = Backend()
    backend.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.get(key(), POLICY, backend.load)) for _ in range(100)]
    await asyncio.sleep(0)
    backend.gate.set()
    results = await asyncio.gather(*waiters)
    assert backend.calls == 1
    assert {r.fetched.value for r in results} == {"v1"}


async def test_cancelled_caller_does_not_cancel_shared_load(cache: Cache) -> None:
    """A caller that goes away leaves the load running for the others."""
    backend = Backend()
    backend.gate = asyncio.Event()
    first = asyncio.create_task(cache.get(key(), POLICY, backend.load))
    second = asyncio.create_task(cache.get(key(), POLICY, backend.load))
    await asyncio.sleep(0)
    first.cancel()
    backend.gate.set()
    assert (await second).fetched.value == "v1"
    assert backend.calls == 1


async def test_force_reloads_a_fresh_value(cache: Cache) -> None:
    """A forced lookup asks the backend even while the value is fresh."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    backend.value = "v2"
    forced = await cache.get(key(), POLICY, backend.load, force=True)
    assert (forced.fetched.value, backend.calls) == ("v2", 2)


async def test_least_recently_used_entry_is_evicted(cache: Cache) -> None:
    """With max_entries=3, touching a, then adding d evicts b (the least recently used)."""
    backend = Backend()
    for name in "abc":
        await cache.get(key(name), POLICY, backend.load)
    await cache.get(key("a"), POLICY, backend.load)
    await cache.get(key("d"), POLICY, backend.load)
    assert {k.secret_id for k, _ in cache.items()} == {"a", "c", "d"}
    assert backend.calls == 4


async def test_observer_sees_each_lookup_result(clock: ManualClock) -> None:
    """Every lookup reports exactly one result, which the metrics count."""
    seen: list[LookupResult] = []
    cache = Cache(max_entries=10, clock=clock, observe=seen.append)
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    await cache.get(key(), POLICY, backend.load)
    backend.failure = SecretNotFound("x")
    with pytest.raises(SecretNotFound):
        await cache.get(key("other"), POLICY, backend.load)
    with pytest.raises(SecretNotFound):
        await cache.get(key("other"), POLICY, backend.load)
    assert seen == [LookupResult.MISS, LookupResult.HIT, LookupResult.MISS, LookupResult.NEGATIVE]


async def test_drop_removes_matching_entries(cache: Cache) -> None:
    """Dropping a vault's entries forces the next lookup to the backend."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    assert cache.drop(lambda k: k.vault == "vault") == 1
    await cache.get(key(), POLICY, backend.load)
    assert backend.calls == 2


async def test_changes_are_reported_once_per_transition(cache: Cache, clock: ManualClock) -> None:
    """Same value: nothing. New value: rotated. Outage: stale once, failed once; then recovered."""
    changes: list[Change] = []

    def record(k: SecretKey, change: Change, entry: Entry) -> None:
        changes.append(change)

    cache.on_change = record
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    await cache.get(key(), POLICY, backend.load, force=True)
    assert changes == []
    backend.value = "v2"
    await cache.get(key(), POLICY, backend.load, force=True)
    assert changes == [Change.ROTATED]
    backend.failure = BackendUnavailable("down")
    for _ in range(3):
        await cache.get(key(), POLICY, backend.load, force=True)
    assert changes == [Change.ROTATED, Change.STALE]
    clock.advance(60 + 100)
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            await cache.get(key(), POLICY, backend.load, force=True)
    assert changes == [Change.ROTATED, Change.STALE, Change.FAILED]
    backend.failure = None
    await cache.get(key(), POLICY, backend.load, force=True)
    assert changes[-1] is Change.RECOVERED
    entry = cache.peek(key())
    assert entry is not None
    assert entry.health is Health.FRESH


async def test_refresh_schedule_within_ttl_and_backoff_after_failure(
    cache: Cache, clock: ManualClock
) -> None:
    """A value is due at 75-90 % of its ttl, moved earlier onto the refresh grid (ttl/20);
    a failed refresh is due again after the backoff."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    due = clock.now + 53  # 90 % of 60 with jitter pinned at 1.0 (1054), on the 3 s grid
    assert cache.next_due() == due
    assert cache.due(due - 0.5) == []
    assert cache.due(due) == [key()]
    assert cache.due(due) == []  # popped once
    clock.advance(54)
    backend.failure = BackendUnavailable("down")
    await cache.get(key(), POLICY, backend.load, force=True)
    assert cache.next_due() == clock.now + 1


async def test_idle_entries_are_found_unless_pinned(cache: Cache, clock: ManualClock) -> None:
    """An entry unread for three ttl's is idle; a pinned one never is."""
    backend = Backend()
    await cache.get(key("a"), POLICY, backend.load)
    await cache.get(key("b"), POLICY, backend.load)
    cache.pin(key("b"))
    clock.advance(179)
    assert not cache.is_idle(key("a"), clock.now, None)
    clock.advance(1)
    assert cache.is_idle(key("a"), clock.now, None)
    assert not cache.is_idle(key("b"), clock.now, None)
    cache.unpin(key("b"))
    assert cache.is_idle(key("b"), clock.now, None)


async def test_value_within_ttl_is_fresh_even_if_its_early_refresh_failed(
    cache: Cache, clock: ManualClock
) -> None:
    """A background refresh failing at 90 % of ttl does not mark answers stale before expiry."""
    backend = Backend()
    await cache.get(key(), POLICY, backend.load)
    clock.advance(54)
    backend.failure = BackendUnavailable("down")
    refreshed = await cache.get(key(), POLICY, backend.load, force=True)
    assert refreshed.stale  # the refresh itself reports what happened
    read = await cache.get(key(), POLICY, backend.load)
    assert (read.result, read.stale) == (LookupResult.HIT, False)
    clock.advance(6)
    assert (await cache.get(key(), POLICY, backend.load)).stale


async def test_a_reader_retries_an_outage_early_once_a_second(
    cache: Cache, clock: ManualClock
) -> None:
    """With nothing to serve and a long backoff, readers are answered the failure at once;
    one reader a second asks again (one call for all), so recovery takes a second, not
    max_backoff."""
    backend = Backend()
    backend.failure = BackendUnavailable("down")
    for attempt in range(6):  # backoff 1, 2, 4, 8, 16, 32 s (jitter pinned at its maximum)
        if attempt:
            clock.advance(cache.peek(key()).failed_until - clock.now)  # type: ignore[union-attr]
        with pytest.raises(BackendUnavailable):
            await cache.get(key(), POLICY, backend.load)
    assert cache.peek(key()).failed_until - clock.now == 32  # type: ignore[union-attr]
    calls = backend.calls
    readers = [cache.get(key(), POLICY, backend.load) for _ in range(50)]
    results = await asyncio.gather(*readers, return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) for r in results)
    assert backend.calls == calls  # retried less than a second ago: held
    clock.advance(EARLY_RETRY)
    backend.failure = None
    results = await asyncio.gather(*readers_of(cache, backend, 50), return_exceptions=True)
    assert backend.calls == calls + 1  # one early retry for all fifty
    # its reader waits for it; the others are answered at once (a hung backend must not
    # hold every reader), and get the value from the next read on
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert (await cache.get(key(), POLICY, backend.load)).result is LookupResult.HIT


def readers_of(cache: Cache, backend: Backend, count: int) -> list[Awaitable[Lookup]]:
    return [cache.get(key(), POLICY, backend.load) for _ in range(count)]


async def test_permanent_failures_keep_their_neg_ttl_without_early_retries(
    cache: Cache, clock: ManualClock
) -> None:
    """Denied (and gone, misconfigured) with nothing to serve is Kong's neg_ttl: no reader
    asks again before it ends."""
    backend = Backend()
    backend.failure = AccessDenied("no")
    with pytest.raises(AccessDenied):
        await cache.get(key(), POLICY, backend.load)
    for _ in range(9):
        clock.advance(1)
        with pytest.raises(AccessDenied):
            await cache.get(key(), POLICY, backend.load)
    assert backend.calls == 1
    clock.advance(1)
    with pytest.raises(AccessDenied):
        await cache.get(key(), POLICY, backend.load)
    assert backend.calls == 2


async def test_ttl_zero_is_kongs_no_rotation(cache: Cache, clock: ManualClock) -> None:
    """ttl 0: fetched once and kept (never expires, never scheduled, never idle); only a
    forced refresh fetches again."""
    backend = Backend()
    policy = Policy(ttl=0, neg_ttl=10, resurrect_ttl=100)
    await cache.get(key(), policy, backend.load)
    clock.advance(10 * 365 * 86400)
    later = await cache.get(key(), policy, backend.load)
    assert (later.result, later.expires_in, backend.calls) == (LookupResult.HIT, NEVER, 1)
    assert (cache.next_due(), len(cache.timetable)) == (NEVER, 0)
    assert not cache.is_idle(key(), clock.now, None)
    backend.value = "v2"
    forced = await cache.get(key(), policy, backend.load, force=True)
    assert (forced.fetched.value, backend.calls) == ("v2", 2)


async def test_neg_ttl_zero_remembers_no_failure(cache: Cache, clock: ManualClock) -> None:
    """neg_ttl 0: every read after a permanent failure asks the backend again."""
    backend = Backend()
    backend.failure = SecretNotFound("gone")
    policy = Policy(ttl=60, neg_ttl=0, resurrect_ttl=100)
    for _ in range(3):
        with pytest.raises(SecretNotFound):
            await cache.get(key(), policy, backend.load)
    assert backend.calls == 3
    backend.failure = None
    assert (await cache.get(key(), policy, backend.load)).fetched.value == "v1"


@pytest.mark.parametrize("refresh", [True, False])
async def test_the_timetable_holds_at_most_one_slot_per_entry(
    clock: ManualClock, refresh: bool
) -> None:
    """100 000 loads of 1000 keys into a cache of 100: at most 100 entries, and at most one
    timetable slot per entry (none with refresh off), failures and refreshes included."""
    cache = Cache(max_entries=100, clock=clock, schedule=Schedule(refresh=refresh))
    backend = Backend()
    for i in range(100_000):
        backend.failure = BackendUnavailable("down") if i % 7 == 0 else None
        with contextlib.suppress(BackendUnavailable):
            await cache.get(key(f"s{i % 1000}"), POLICY, backend.load, force=i % 3 == 0)
        if i % 1000 == 0:
            clock.advance(30)
    assert len(cache) == 100
    assert len(cache.timetable) == (100 if refresh else 0)
    clock.advance(3600)
    assert len(cache.due(clock.now)) == len(cache.timetable) == 0 or refresh


async def test_turning_refresh_back_on_schedules_every_entry(
    cache: Cache, clock: ManualClock
) -> None:
    backend = Backend()
    cache.schedule = Schedule(refresh=False)
    await cache.get(key("a"), POLICY, backend.load)
    await cache.get(key("b"), POLICY, backend.load)
    assert cache.next_due() == NEVER
    cache.schedule = Schedule()
    assert len(cache.timetable) == 2
    assert cache.next_due() == clock.now + 54  # the end of the window


async def test_a_retired_generation_is_never_stored(cache: Cache) -> None:
    """A load that outlives its vault's reload returns to its caller, but neither its value
    nor its failure is kept; ``settle`` waits for it."""
    backend = Backend()
    backend.gate = asyncio.Event()
    old = SecretKey("vault", "db", None, VaultSettings(), generation=1)
    new = SecretKey("vault", "db", None, VaultSettings(), generation=2)
    reader = asyncio.ensure_future(cache.get(old, POLICY, backend.load))
    await asyncio.sleep(0)
    assert cache.retire({1}) == 0
    settling = asyncio.ensure_future(cache.settle({1}, within=5))
    await asyncio.sleep(0)
    assert not settling.done()  # the old vault is still in use
    backend.failure = BackendError("its client was closed")
    backend.gate.set()
    with pytest.raises(BackendError):
        await reader
    assert await settling == 0
    assert cache.peek(old) is None
    backend.failure, backend.gate = None, None
    assert (await cache.get(new, POLICY, backend.load)).fetched.value == "v1"
