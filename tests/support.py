"""Helpers shared by the test suites: a manual clock, a resolver built like the daemon's,
and a TCP listener that counts who connects."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.assembly import build_resolver
from sidecar.config import CacheConfig, Config, LimitsConfig, VaultEntity
from sidecar.metrics import Metrics
from sidecar.resolver import Resolver
from sidecar.schedule import Schedule


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
    jitter: Callable[[], float] = lambda: 1.0,
    schedule: Schedule | None = None,
    limits: LimitsConfig | None = None,
    **cache: Any,
) -> Resolver:
    """A resolver wired as ``serve`` wires it; ``cache`` overrides ``CacheConfig`` fields.

    Jitter is pinned at its maximum (refresh at 90 % of ttl, full backoffs) unless given.
    """
    defaults = CacheConfig(**{"retry_backoff": 0.001, "retry_backoff_max": 0.01, **cache})
    config = Config(vaults=vaults, cache=defaults, limits=limits or LimitsConfig())
    return build_resolver(
        config,
        metrics or Metrics(),
        clock=clock or ManualClock(),
        jitter=jitter,
        environ={} if environ is None else environ,
        schedule=schedule or Schedule(),
    )


class Listener:
    """A TCP port that counts who connects: the place a hostile query would aim at."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Listener:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
