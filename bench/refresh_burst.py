"""Cached-read latency and event-loop lag while 10 000 entries are refreshed at once.

The daemon prefetches 10 000 env secrets with ttl 300 s (nothing comes due by itself
during the run). A reader times sequential reads of one more cached secret over one
keep-alive connection: for ``QUIET`` seconds with nothing else going on, then while
``POST /v1/refresh`` fetches every entry again, ``BURSTS`` times in a row. That route
hands every key at once to ``Resolver.refresh``, the call the background refresher
makes for each round of due entries; the refresher itself never gets 10 000 due
together, because a new entry's first refresh is drawn over a whole refresh interval
(``Schedule.first_fraction``). So a third phase, on a second daemon, is that
refresher's own steady work at ttl 2 s: each entry refreshed every 1.5-1.8 s, about
6 000 a second. The daemon's lag histogram (``event_loop_lag_seconds``, one sample
each half second) is read before and after each phase; with few samples in a phase,
its p99 is its top bucket.

    python -m bench.refresh_burst
"""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.samples import Sample

from bench.daemon import Started, buckets, on_core, running, scrape, total
from bench.workload import path, plain_refs

ENTRIES = 10_000
QUIET = 3.0  # seconds of reads with nothing else going on
BURSTS = 3  # POST /v1/refresh of every entry, back to back
STEADY_TTL = 2.0
STEADY = 4.0  # seconds of reads while the refresher works at STEADY_TTL
READER = "{vault://env/bench-reader?ttl=3600}"  # never due: the reads are all hits
LAG = "secret_sidecar_event_loop_lag_seconds"
REFRESHES = "secret_sidecar_refreshes_total"
CALLS = "secret_sidecar_backend_calls_total"


def _config(ttl: float) -> dict[str, Any]:
    return {
        "prefetch": plain_refs(ENTRIES),
        "cache": {"ttl": ttl, "max_entries": 200_000},
        "limits": {"rate": 1e9, "burst": 10**6},
    }


def _env() -> dict[str, str]:
    return {"BENCH_READER": "r", **{f"BENCH_{i}": f"v{i}" for i in range(ENTRIES)}}


async def _read(session: aiohttp.ClientSession) -> float:
    """One read of the reader's secret; seconds from sending to the whole answer."""
    begun = time.perf_counter()
    async with session.get(f"http://bench{path(READER)}") as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"cached read answered {response.status}")
    return time.perf_counter() - begun


async def _reads(session: aiohttp.ClientSession, until: Callable[[], bool]) -> list[float]:
    """Sequential reads until ``until()``, one at a time on the session's one connection."""
    latencies = []
    while not until():
        latencies.append(await _read(session))
    return latencies


def lag_figures(before: list[Sample], after: list[Sample]) -> dict[str, Any]:
    """The lag samples between two scrapes: count, mean, p99 interpolated in its bucket
    (as Prometheus' ``histogram_quantile``), and the bounds of the top bucket a sample
    reached (the buckets are coarse past 100 ms: 0.25, 1 and 5 s)."""
    start, end = buckets(before, LAG), buckets(after, LAG)
    counts = [(le, end[le] - start.get(le, 0.0)) for le in sorted(end)]
    samples = counts[-1][1] if counts else 0.0
    if samples == 0:
        return {"samples": 0}
    lag_sum = total(after, f"{LAG}_sum") - total(before, f"{LAG}_sum")
    rank, low, below = 0.99 * samples, 0.0, 0.0
    p99 = math.nan
    for le, count in counts:
        if count >= rank:
            fraction = (rank - below) / (count - below)
            p99 = low if le == math.inf else low + (le - low) * fraction
            break
        low, below = le, count
    top = next(i for i, (_, count) in enumerate(counts) if count == samples)
    low = 0.0 if top == 0 else counts[top - 1][0]
    high = None if counts[top][0] == math.inf else 1000 * counts[top][0]  # None: past 5 s
    return {"samples": int(samples), "mean_ms": round(1000 * lag_sum / samples, 2),
            "p99_ms": round(1000 * p99, 2), "top_bucket_ms": [1000 * low, high]}  # fmt: skip


def _percentiles(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    at = [ordered[min(len(ordered) - 1, int(f * len(ordered)))] for f in (0.5, 0.99)]
    return {"reads": len(ordered), "p50_ms": round(1000 * at[0], 3),
            "p99_ms": round(1000 * at[1], 3), "max_ms": round(1000 * ordered[-1], 3)}  # fmt: skip


async def _phase(
    daemon: Started, reader: aiohttp.ClientSession, until: Callable[[], bool]
) -> dict[str, Any]:
    assert daemon.metrics_port is not None
    before = await scrape(daemon.metrics_port)
    begun = time.perf_counter()
    latencies = await _reads(reader, until)
    seconds = time.perf_counter() - begun
    after = await scrape(daemon.metrics_port)
    return {
        "seconds": round(seconds, 2),
        **_percentiles(latencies),
        "loop_lag": lag_figures(before, after),
        "refreshes": total(after, REFRESHES) - total(before, REFRESHES),
        "backend_calls": total(after, CALLS) - total(before, CALLS),
    }


def _session(daemon: Started, connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.UnixConnector(path=str(daemon.socket), limit=connections)
    return aiohttp.ClientSession(connector=connector)


async def _burst_daemon(work: Path) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    async with (
        running(work, _config(300.0), _env()) as daemon,
        _session(daemon, 1) as reader,
        _session(daemon, 1) as admin,
    ):
        for _ in range(200):  # warm-up: the connection, the code paths, the allocator
            await _read(reader)
        quiet_until = time.monotonic() + QUIET
        phases["quiet"] = await _phase(daemon, reader, lambda: time.monotonic() > quiet_until)
        durations: list[float] = []

        async def bursts() -> None:
            for _ in range(BURSTS):
                begun = time.perf_counter()
                async with admin.post("http://bench/v1/refresh") as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"POST /v1/refresh answered {response.status}")
                durations.append(time.perf_counter() - begun)

        task = asyncio.create_task(bursts())
        phases["burst"] = await _phase(daemon, reader, task.done)
        await task
        phases["burst"]["refresh_seconds"] = round(statistics.median(durations), 3)
    return phases


async def _steady_daemon(work: Path) -> dict[str, Any]:
    async with running(work, _config(STEADY_TTL), _env()) as daemon, _session(daemon, 1) as reader:
        settled = time.monotonic() + STEADY_TTL  # first refreshes are under way by then
        await _reads(reader, lambda: time.monotonic() > settled)
        until = time.monotonic() + STEADY
        return await _phase(daemon, reader, lambda: time.monotonic() > until)


def measure() -> dict[str, Any]:
    """The three phases' figures (printed as they come)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, on_core():
        (Path(tmp) / "burst").mkdir()
        (Path(tmp) / "steady").mkdir()
        phases = asyncio.run(_burst_daemon(Path(tmp) / "burst"))
        phases["steady"] = asyncio.run(_steady_daemon(Path(tmp) / "steady"))
    for name, phase in phases.items():
        lag = phase["loop_lag"]
        print(f"refresh {name:6}: {phase['reads']} reads p50/p99/max {phase['p50_ms']:.2f}/"
              f"{phase['p99_ms']:.2f}/{phase['max_ms']:.2f} ms; loop lag mean/p99/top"
              f" bucket {_lag(lag)} ms; {phase['refreshes']:.0f} refreshes in"
              f" {phase['seconds']} s", flush=True)  # fmt: skip
    return {"entries": ENTRIES, "bursts": BURSTS, "steady_ttl": STEADY_TTL, **phases}


def _lag(lag: dict[str, Any]) -> str:
    if not lag["samples"]:
        return "no samples"
    low, high = lag["top_bucket_ms"]
    top = f">{low:g}" if high is None else f"{low:g}-{high:g}"
    return f"{lag['mean_ms']:g} / {lag['p99_ms']:g} / {top} ({lag['samples']})"


def markdown(facts: dict[str, Any]) -> list[str]:
    """The table of the three phases."""
    lines = [
        "",
        f"| {facts['entries']:,} cached entries: phase | reads | read p50 / p99 / max ms"
        " | loop lag mean / p99 / top bucket ms (samples) | refreshes/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    labels = {
        "quiet": "quiet",
        "burst": f"`POST /v1/refresh` of all, {facts['bursts']}x back to back"
        f" ({facts['burst']['refresh_seconds']} s each)",
        "steady": f"refresher alone, ttl {facts['steady_ttl']:g} s",
    }
    for name, label in labels.items():
        p = facts[name]
        lines.append(
            f"| {label} | {p['reads']:,} | {p['p50_ms']:.2f} / {p['p99_ms']:.2f}"
            f" / {p['max_ms']:.2f} | {_lag(p['loop_lag'])}"
            f" | {p['refreshes'] / p['seconds']:,.0f} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(markdown(measure())))
