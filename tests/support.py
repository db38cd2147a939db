"""Helpers shared by the test suites: a manual clock and a resolver built like the daemon's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.cache import Cache
from sidecar.config import CacheConfig, VaultEntity
from sidecar.metrics import Metrics
from sidecar.resolver import Resolver
from sidecar.vaults import VaultRegistry


class ManualClock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_resolver(
    vaults: tuple[VaultEntity, ...] = (),
    *,
    environ: Mapping[str, str] | None = None,
    clock: ManualClock | None = None,
    metrics: Metrics | None = None,
    **cache: Any,
) -> Resolver:
    """A resolver wired as ``serve`` wires it; ``cache`` overrides ``CacheConfig`` fields."""
    defaults = CacheConfig(**{"retry_backoff": 0.001, "retry_backoff_max": 0.01, **cache})
    metrics = metrics or Metrics()
    store = Cache(
        max_entries=defaults.max_entries,
        clock=clock or ManualClock(),
        observe=lambda result: metrics.cache_lookups.labels(result.value).inc(),
    )
    return Resolver(VaultRegistry(vaults, environ={} if environ is None else environ),
                    store, defaults, metrics)  # fmt: skip
