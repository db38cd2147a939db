"""Background refresh: due entries are fetched again before readers would wait.

The cache says when each entry is due (within its ttl window, with jitter, or
after a failure's backoff); this loop picks due entries up, drops idle ones and
hands the rest to the resolver, which batches them per vault and keeps each vault
within its concurrency and rate limits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from sidecar.cache import Cache
from sidecar.logging import get_logger
from sidecar.resolver import Resolver

log = get_logger("sidecar.refresh")

MAX_SLEEP = 1.0  # seconds: new entries may be due sooner than the current earliest
MIN_SLEEP = 0.01


class Refresher:
    def __init__(
        self,
        resolver: Callable[[], Resolver],  # a getter: reload swaps the resolver
        cache: Cache,
        idle_ttl: float | None,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._idle_ttl = idle_ttl
        self._running: set[asyncio.Task[object]] = set()

    async def run_due(self) -> dict[str, int]:
        """Refresh what is due now and drop what is idle; return outcome counts."""
        cache = self._cache
        now = cache.clock()
        due = cache.due(now)
        idle = {key for key in due if cache.is_idle(key, now, self._idle_ttl)}
        if idle:
            cache.drop(idle.__contains__)
            log.info("cache.idle_dropped", entries=len(idle))
        live = [key for key in due if key not in idle]
        if not live:
            return {}
        return await self._resolver().refresh(live)

    async def run(self) -> None:
        """Tick until cancelled; each round of due entries runs as its own task, so one
        slow backend does not hold up the refresh of the others."""
        try:
            while True:
                task: asyncio.Task[object] = asyncio.create_task(self.run_due())
                self._running.add(task)
                task.add_done_callback(self._finished)
                delay = self._cache.next_due() - self._cache.clock()
                await asyncio.sleep(min(max(delay, MIN_SLEEP), MAX_SLEEP))
        finally:
            for task in list(self._running):
                task.cancel()
            for task in list(self._running):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _finished(self, task: asyncio.Task[object]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("refresh.failed", error_type=type(task.exception()).__name__)
