"""The daemon's parts wired one way: vaults, cache and resolver from one configuration.

``lifecycle`` (the daemon), the CLI's one-shot commands and the test support all build
them here, so what a test exercises is what the daemon runs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

from sidecar.cache import Cache, Change, Entry, SecretKey
from sidecar.config import Config
from sidecar.metrics import Metrics
from sidecar.resolver import Resolver
from sidecar.schedule import Schedule
from sidecar.vaults import VaultRegistry

OnChange = Callable[[SecretKey, Change, Entry], None]


def schedule_of(config: Config) -> Schedule:
    refresh = config.refresh
    return Schedule(window=refresh.window, max_backoff=refresh.max_backoff, refresh=refresh.enabled)


def build_resolver(
    config: Config,
    metrics: Metrics,
    *,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = random.random,
    environ: Mapping[str, str] | None = None,
    schedule: Schedule | None = None,
    on_change: OnChange | None = None,
) -> Resolver:
    """A resolver over a new cache and the configuration's vaults (not started yet)."""
    cache = Cache(
        max_entries=config.cache.max_entries,
        clock=clock,
        schedule=schedule or schedule_of(config),
        jitter=jitter,
        observe=metrics.count_lookup,
        on_change=on_change or (lambda key, change, entry: None),
    )
    vaults = VaultRegistry(config.vaults, environ=environ, limits=config.limits)
    return Resolver(vaults, cache, config.cache, metrics)
