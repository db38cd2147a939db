"""Change events for ``/v1/watch``: a bounded queue per watcher, fed by the cache.

A watcher that stops reading must not make the daemon buffer without bound:
when its queue is full it is dropped (``on_overflow`` closes its connection).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sidecar.backends.base import Fetched
from sidecar.cache import Change, Entry, SecretKey


@dataclass(frozen=True, slots=True)
class Event:
    change: Change
    key: SecretKey
    at: float  # wall-clock seconds, for the caller's logs
    fetched: Fetched | None  # the value after a rotation/recovery (sent only when asked)
    error: tuple[str, str] | None  # (code, message) of the failure


END = object()  # returned by ``Subscription.next`` when the stream must end


class Subscription:
    def __init__(
        self, keys: Iterable[SecretKey], size: int, on_overflow: Callable[[], None]
    ) -> None:
        self.keys = frozenset(keys)
        self.queue: asyncio.Queue[Event] = asyncio.Queue(size)
        self.ended = asyncio.Event()
        self.overflowed = False
        self._on_overflow = on_overflow

    def offer(self, event: Event) -> None:
        if self.ended.is_set():
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self.end()
            self._on_overflow()

    def end(self) -> None:
        self.ended.set()

    async def next(self, heartbeat: float) -> Event | object | None:
        """The next event, ``END``, or ``None`` when ``heartbeat`` passed with nothing."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        if self.ended.is_set():
            return END
        get = asyncio.ensure_future(self.queue.get())
        ended = asyncio.ensure_future(self.ended.wait())
        done, pending = await asyncio.wait(
            {get, ended}, timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            waiter.cancel()
        if get in done:
            return get.result()
        return END if ended in done else None


class EventBus:
    """Routes cache changes to the subscriptions watching that entry."""

    def __init__(self) -> None:
        self._watching: defaultdict[SecretKey, set[Subscription]] = defaultdict(set)
        self._all: set[Subscription] = set()

    def __len__(self) -> int:
        return len(self._all)

    def subscribe(
        self, keys: Iterable[SecretKey], size: int, on_overflow: Callable[[], None]
    ) -> Subscription:
        subscription = Subscription(keys, size, on_overflow)
        for key in subscription.keys:
            self._watching[key].add(subscription)
        self._all.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.end()
        self._all.discard(subscription)
        for key in subscription.keys:
            watchers = self._watching.get(key)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._watching[key]

    def publish(self, key: SecretKey, change: Change, entry: Entry) -> None:
        watchers = self._watching.get(key)
        if not watchers:
            return
        failure = entry.failure
        error = (failure.code, failure.message) if failure is not None else None
        event = Event(change, key, time.time(), entry.fetched, error)
        for subscription in list(watchers):
            subscription.offer(event)

    def end_all(self) -> None:
        """Shutdown: every stream ends so the drain does not wait on them."""
        for subscription in list(self._all):
            subscription.end()
