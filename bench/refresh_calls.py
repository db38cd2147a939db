"""Secrets refreshed per minute by the refresher, for N secrets at one ttl.

Simulated time (a manual clock) over the real resolver, cache and refresher with the
env backend, so minutes of refreshing take a second. Counts are the refresher's own
outcomes per secret (a batching backend makes fewer calls: one per due batch).

    .venv/bin/python -m bench.refresh_calls --secrets 1000 --ttl 300 --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random

from sidecar import logging as sidecar_logging
from sidecar.refresh import Refresher
from tests.support import ManualClock, make_resolver


async def main(secrets: int, ttl: float, minutes: int) -> None:
    sidecar_logging.configure("warning")
    for i in range(secrets):
        os.environ[f"BENCH_{i}"] = "v"
    clock = ManualClock()
    resolver = make_resolver(clock=clock, ttl=ttl, jitter=random.Random(1).random)
    refresher = Refresher(lambda: resolver, resolver.cache, idle_ttl=None)
    refs = [f"{{vault://env/bench-{i}}}" for i in range(secrets)]
    assert await resolver.prefetch(refs) == {}
    for ref in refs:  # as prefetch does in the daemon: never idle
        resolver.cache.pin(resolver.target(ref).key)
    per_minute = []
    for _ in range(minutes):
        refreshed = 0
        for _ in range(60):
            clock.advance(1)
            refreshed += sum((await refresher.run_due()).values())
        per_minute.append(refreshed)
    total = sum(per_minute)
    first_cycle = int(ttl * 0.9 // 60) + 1  # minutes until every entry was refreshed once
    steady = per_minute[first_cycle:]
    mean = sum(steady) / len(steady)
    print(
        f"{secrets} secrets, ttl {ttl:g} s, {minutes} simulated minutes: "
        f"{total:.0f} secrets refreshed, {total / minutes:.1f}/min on average; "
        f"after the first cycle min/mean/max per minute {min(steady):.0f}/{mean:.0f}/"
        f"{max(steady):.0f} (max/mean {max(steady) / mean:.2f}); "
        f"Kong's fixed 60 s pass would make {secrets}/min"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=1000)
    parser.add_argument("--ttl", type=float, default=300)
    parser.add_argument("--minutes", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.secrets, args.ttl, args.minutes))
