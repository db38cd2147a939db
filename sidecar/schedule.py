"""When cache entries are refreshed: the refresh window and backoff (``Schedule``), and
the ordered timetable of due times, one slot per entry (``Timetable``)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sortedcontainers import SortedList

K = TypeVar("K", bound=Hashable)  # the cache's key type

NEVER = float("inf")
ALIGN_MAX = 5.0  # seconds: the refresh grid's step (see Schedule.aligned)
ALIGN_FRACTION = 0.05  # of an entry's ttl, for shorter ttls


@dataclass(frozen=True, slots=True)
class Schedule:
    """When entries are refreshed: a window of their ttl, and the retry backoff cap."""

    window: tuple[float, float] = (0.75, 0.9)
    max_backoff: float = 60.0
    refresh: bool = True  # off: nothing is scheduled, entries reload when read after ttl

    def first_fraction(self, jitter: float) -> float:
        """Where in its ttl a new (or recovered) entry is first refreshed.

        Entries loaded together (prefetch, recovery after an outage) would otherwise
        stay together: each refresh adds only the window's spread. The first refresh is
        drawn over a span as long as the mean refresh interval, ending where the window
        ends, so later refreshes arrive evenly from the first cycle on.
        """
        low, high = self.window
        return high - (low + high) / 2 * (1.0 - jitter)

    def fraction(self, jitter: float) -> float:
        low, high = self.window
        return low + (high - low) * jitter

    @staticmethod
    def aligned(at: float, ttl: float) -> float:
        """``at`` moved earlier onto a grid of ``min(5 s, ttl / 20)``.

        Refreshes drawn anywhere in the window would each come due alone, so a batching
        backend (AWS: 20 secrets a call) would still make a call per secret. On a shared
        grid, the entries due in one step come due together and go out in one batch:
        1000 secrets at ttl 300 come due in about 50 rounds of 20, not 1000 of one.
        Earlier, never later, and by at most 5 % of the ttl: still before it expires.
        """
        step = min(ALIGN_MAX, ttl * ALIGN_FRACTION)
        return math.floor(at / step) * step if step > 0 else at


DEFAULT_SCHEDULE = Schedule()


class Timetable(Generic[K]):
    """When each entry is next due, ordered: one slot per entry, removed with it."""

    def __init__(self) -> None:
        self._slots = SortedList()  # (at, sequence, key); the sequence breaks ties
        self._at: dict[K, tuple[float, int]] = {}
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._at)

    def set(self, key: K, at: float) -> None:
        self.discard(key)
        if at != NEVER:
            slot = (at, next(self._sequence))
            self._at[key] = slot
            self._slots.add((*slot, key))

    def discard(self, key: K) -> None:
        slot = self._at.pop(key, None)
        if slot is not None:
            self._slots.remove((*slot, key))

    def pop_due(self, now: float) -> list[K]:
        keys = []
        while self._slots and self._slots[0][0] <= now:
            _, _, key = self._slots.pop(0)
            del self._at[key]
            keys.append(key)
        return keys

    def next_due(self) -> float:
        return self._slots[0][0] if self._slots else NEVER

    def clear(self) -> None:
        self._slots.clear()
        self._at.clear()
