"""The refresher on a manual clock, over the env backend: schedule, spread, idle, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter

import pytest

from sidecar.backends import env
from sidecar.config import LimitsConfig
from sidecar.refresh import Refresher
from sidecar.resolver import Resolver
from sidecar.vaults import Vault
from tests.support import ManualClock, make_resolver


def calls(resolver: Resolver, outcome: str = "ok") -> int:
    """Backend calls made so far, read from the daemon's own metric."""
    value = resolver.metrics.registry.get_sample_value(
        "secret_sidecar_backend_calls_total",
        {"vault": "env", "backend": "env", "outcome": outcome},
    )
    return int(value or 0)


async def test_rotated_value_is_served_from_cache_after_background_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value changed in the backend is fetched before its ttl ends, so readers get it
    from the cache without waiting on the backend."""
    monkeypatch.setenv("ROTATING", "v1")
    clock = ManualClock()
    resolver = make_resolver(clock=clock, ttl=100)
    refresher = Refresher(lambda: resolver, resolver.cache, idle_ttl=None)
    assert (await resolver.resolve("{vault://env/rotating}")).value == "v1"
    monkeypatch.setenv("ROTATING", "v2")
    clock.advance(89)
    assert await refresher.run_due() == {}
    clock.advance(1)  # 90 % of ttl (jitter pinned at its maximum)
    assert await refresher.run_due() == {"ok": 1}
    answer = await resolver.resolve("{vault://env/rotating}")
    assert (answer.value, answer.lookup.cached) == ("v2", True)
    assert calls(resolver) == 2


async def test_not_found_is_retried_only_after_neg_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing secret is asked again when neg_ttl ends, not before, and then recovers."""
    clock = ManualClock()
    resolver = make_resolver(clock=clock, neg_ttl=30)
    refresher = Refresher(lambda: resolver, resolver.cache, idle_ttl=None)
    with pytest.raises(Exception, match="not set"):
        await resolver.resolve("{vault://env/later}")
    monkeypatch.setenv("LATER", "now")
    clock.advance(29)
    assert await refresher.run_due() == {}
    assert calls(resolver, "not_found") == 1
    clock.advance(1)
    assert await refresher.run_due() == {"ok": 1}
    assert (await resolver.resolve("{vault://env/later}")).lookup.cached


async def test_idle_entries_stop_being_refreshed_and_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An entry nobody read within idle_ttl is dropped when it comes due; a pinned one is not."""
    monkeypatch.setenv("READ_ONCE", "x")
    monkeypatch.setenv("PINNED", "y")
    clock = ManualClock()
    resolver = make_resolver(clock=clock, ttl=10)
    refresher = Refresher(lambda: resolver, resolver.cache, idle_ttl=25)
    await resolver.resolve("{vault://env/read-once}")
    await resolver.resolve("{vault://env/pinned}")
    resolver.cache.pin(resolver.target("{vault://env/pinned}").key)
    refreshed = []
    for _ in range(3):  # refreshes at 9, 18, 27 s
        clock.advance(9)
        refreshed.append(sum((await refresher.run_due()).values()))
    assert [key.secret_id for key, _ in resolver.cache.items()] == ["pinned"]
    assert refreshed == [2, 2, 1]  # both refreshed twice, then the pinned one only


async def test_ten_thousand_equal_ttls_spread_over_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """10k secrets loaded at once with ttl 300 are first refreshed across a span as long as
    the mean refresh interval (7.5-90 % of ttl), at most about 1.5x the mean rate in any
    step of the 5 s refresh grid, instead of all at once."""
    for i in range(10_000):
        monkeypatch.setenv(f"S{i}", "v")
    clock = ManualClock()
    resolver = make_resolver(clock=clock, ttl=300, jitter=random.Random(7).random)
    refresher = Refresher(lambda: resolver, resolver.cache, idle_ttl=None)
    assert await resolver.prefetch([f"{{vault://env/s{i}}}" for i in range(10_000)]) == {}
    per_step: Counter[int] = Counter()
    for second in range(5, 275, 5):
        clock.advance(5)
        per_step[second] = sum((await refresher.run_due()).values())
    busy = {s: n for s, n in per_step.items() if n}
    assert min(busy) >= 20  # 22.5 s, on the grid
    assert all(entry.fetched_at > 0 for _, entry in resolver.cache.items())  # all refreshed
    first_round_only = [n for s, n in busy.items() if s < 245]  # 22.5 s + 75 % of ttl
    assert max(first_round_only) <= 1.5 * 5 * 10_000 / 247.5


async def test_refreshes_stay_smooth_after_the_first_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Secrets loaded together do not stay together: over 30 minutes, every minute after
    the first cycle makes at most twice the mean number of calls (they made up to 3.4x
    when each refresh only added the window's jitter)."""
    for i in range(1000):
        monkeypatch.setenv(f"S{i}", "v")
    clock = ManualClock()
    resolver = make_resolver(clock=clock, ttl=300, jitter=random.Random(1).random)
    refresher = Refresher(lambda: resolver, resolver.cache, idle_ttl=None)
    refs = [f"{{vault://env/s{i}}}" for i in range(1000)]
    assert await resolver.prefetch(refs) == {}
    for ref in refs:  # as the daemon does for prefetch: never idle
        resolver.cache.pin(resolver.target(ref).key)
    per_minute = []
    for _ in range(30):
        count = 0
        for _ in range(60):
            clock.advance(1)
            count += sum((await refresher.run_due()).values())
        per_minute.append(count)
    steady = per_minute[5:]  # the first cycle ends at 90 % of 300 s
    mean = sum(steady) / len(steady)
    assert 200 < mean < 260  # one refresh per 82.5 % of ttl on average: 242/min
    assert max(steady) <= 2 * mean, per_minute


async def test_vault_admission_limits_rate_and_concurrency() -> None:
    """With rate 40/s, burst 10 and 4 slots, 50 calls take at least (50-10)/40 s, never run
    more than 4 at once, and the waits are reported."""
    kind = dataclasses.replace(env.KIND, remote=True)
    limits = LimitsConfig(concurrency=4, rate=40, burst=10)
    vault = Vault.build("remote", kind, None, {}, limits)
    waits: list[None] = []
    running = peak = 0

    async def call() -> None:
        nonlocal running, peak
        async with vault.admission(lambda: waits.append(None)):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001)
            running -= 1

    started = time.perf_counter()
    await asyncio.gather(*(call() for _ in range(50)))
    elapsed = time.perf_counter() - started
    assert elapsed >= (50 - 10) / 40 * 0.9  # a lower bound: only a broken limit is faster
    assert peak == 4
    assert len(waits) >= 30


async def test_local_env_backend_is_not_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env backend reads process memory: no limit applies to it."""
    for i in range(50):
        monkeypatch.setenv(f"R{i}", "v")
    resolver = make_resolver(limits=LimitsConfig(concurrency=1, rate=1, burst=1))
    await asyncio.gather(*(resolver.resolve(f"{{vault://env/r{i}}}") for i in range(50)))
    limited = resolver.metrics.registry.get_sample_value(
        "secret_sidecar_backend_rate_limited_total", {"vault": "env"}
    )
    assert not limited


async def test_refreshes_come_due_together_so_a_batching_backend_can_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1000 secrets at ttl 300, refresh times drawn at random in the window: they come
    due on a shared grid (``Schedule.aligned``), about 50 rounds an interval rather than
    one per secret, each refresh before its value expires."""
    for i in range(1000):
        monkeypatch.setenv(f"GRID_{i}", "v")
    clock = ManualClock()
    resolver = make_resolver(clock=clock, ttl=300, jitter=random.Random(7).random)
    refresher = Refresher(lambda: resolver, resolver.cache, idle_ttl=None)
    assert await resolver.prefetch([f"{{vault://env/grid-{i}}}" for i in range(1000)]) == {}
    rounds, refreshed = 0, 0
    for _ in range(300 * 10):  # one interval in 0.1 s steps
        clock.advance(0.1)
        expired = [e for _, e in resolver.cache.items() if e.expires_at <= clock.now]
        assert not expired, "a refresh came after the value expired"
        counts = await refresher.run_due()
        rounds += bool(counts)
        refreshed += counts.get("ok", 0)
    assert refreshed >= 1000
    assert rounds <= 300 / 5 + 1
