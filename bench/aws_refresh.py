"""Backend calls per refresh interval: the daemon keeping 1000 AWS secrets fresh, on moto.

moto's server (a thread of this process) holds the 1000 secrets of ``bench.aws_prefetch``;
the daemon's aws vault reaches it only through ``tests.backends.aws_peer.MotoProxy``,
which counts the API requests moto gets, by operation. The daemon prefetches the 1000
(one ``fetch_many``: BatchGetSecretValue calls of 20) with the default refresh window
(0.75-0.9 of ttl) and limits; then only its background refresher runs. First
refreshes start 0.075 ttl after a fetch and arrive evenly from then on; over
``WINDOW`` seconds from there, the daemon's ``backend_calls_total`` and
``refreshes_total`` and the proxy's counts are taken. "Per refresh interval" is per
1000 refreshes: every secret refreshed once. Two ttls: a short one, where due entries
are close enough to share a round of the refresher (it wakes at the next due time, at
least 10 ms apart) and so a batch, and a longer one, where they seldom are.

    python -m bench.aws_refresh
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.aws_prefetch import SECRETS, seed
from bench.daemon import on_core, running, scrape, total
from tests.backends.aws_peer import REGION, MotoProxy, isolate_environment, moto_server

TTLS = (4.0, 60.0)
WINDOW = 10.0  # seconds of steady refreshing counted per ttl
FIRST = 0.075  # of ttl: when the first refreshes start (Schedule.first_fraction, defaults)
MEAN_INTERVAL = 0.825  # of ttl: the mean of the default window, 0.75-0.9
CALLS = "secret_sidecar_backend_calls_total"
REFRESHES = "secret_sidecar_refreshes_total"
RATE_LIMITED = "secret_sidecar_backend_rate_limited_total"


def _config(proxy: MotoProxy, ttl: float) -> dict[str, Any]:
    return {
        "vaults": [{"prefix": "sm", "name": "aws",
                    "config": {"endpoint_url": proxy.url, "region": REGION}}],
        "prefetch": [f"{{vault://sm/app/secret-{n:04d}/}}" for n in range(SECRETS)],
        "cache": {"ttl": ttl},
    }  # fmt: skip


async def _one_ttl(proxy: MotoProxy, ttl: float, work: Path) -> dict[str, Any]:
    environ = dict(os.environ)
    isolate_environment(environ, str(work))  # moto's fake keys; never real AWS
    seen = len(proxy.calls)
    async with running(work, _config(proxy, ttl), base=environ) as daemon:
        assert daemon.metrics_port is not None
        ready = time.monotonic()
        at_ready = await scrape(daemon.metrics_port)
        prefetch = Counter(c.operation for c in proxy.calls[seen:])
        await asyncio.sleep(max(0.0, ready + FIRST * ttl - time.monotonic()))
        before, seen = await scrape(daemon.metrics_port), len(proxy.calls)
        begun = time.monotonic()
        await asyncio.sleep(WINDOW)
        after, requests = await scrape(daemon.metrics_port), proxy.calls[seen:]
        seconds = time.monotonic() - begun
    refreshes = total(after, REFRESHES) - total(before, REFRESHES)
    ok = total(after, REFRESHES, outcome="ok") - total(before, REFRESHES, outcome="ok")
    calls = total(after, CALLS) - total(before, CALLS)
    api = Counter(c.operation for c in requests)
    per_interval = SECRETS / refreshes if refreshes else float("nan")
    return {
        "ttl": ttl,
        "prefetch_backend_calls": total(at_ready, CALLS),
        "prefetch_api_requests": dict(prefetch),
        "seconds": round(seconds, 2),
        "refreshes": refreshes,
        "refreshes_due": round(SECRETS * seconds / (MEAN_INTERVAL * ttl)),  # if kept up
        "refresh_failures": refreshes - ok,
        "backend_calls": calls,
        "api_requests": dict(api),
        "rate_limited": total(after, RATE_LIMITED) - total(before, RATE_LIMITED),
        "backend_calls_per_interval": round(calls * per_interval, 1),
        "api_requests_per_interval": round(len(requests) * per_interval, 1),
    }


async def _measure(moto: str, work: Path) -> list[dict[str, Any]]:
    await seed(moto)
    proxy = await MotoProxy(moto).start()
    try:
        rows = []
        for ttl in TTLS:
            (work / f"ttl-{ttl:g}").mkdir()
            rows.append(await _one_ttl(proxy, ttl, work / f"ttl-{ttl:g}"))
            row = rows[-1]
            print(f"aws refresh ttl {ttl:g} s: {row['refreshes']:.0f} refreshes in"
                  f" {row['seconds']} s by {row['backend_calls']:.0f} backend calls"
                  f" ({row['api_requests']}); per interval (1000 refreshes):"
                  f" {row['backend_calls_per_interval']:g} calls,"
                  f" {row['api_requests_per_interval']:g} API requests", flush=True)  # fmt: skip
        return rows
    finally:
        await proxy.stop()


def measure() -> dict[str, Any]:
    """Per ttl: prefetch and steady-state backend calls and API requests."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, on_core(), moto_server() as moto:
        rows = asyncio.run(_measure(moto, Path(tmp)))
    return {"secrets": SECRETS, "window_seconds": WINDOW, "ttls": rows}


def markdown(facts: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"| {facts['secrets']} AWS secrets on moto: ttl | prefetch: backend calls / API"
        " requests | refreshes counted (due) | per refresh interval: backend calls / API"
        " requests | calls rate-limited |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in facts["ttls"]:
        prefetch = sum(row["prefetch_api_requests"].values())
        api = ", ".join(f"{n} {op}" for op, n in sorted(row["api_requests"].items()))
        lines.append(
            f"| {row['ttl']:g} s | {row['prefetch_backend_calls']:.0f} / {prefetch}"
            f" | {row['refreshes']:.0f} ({row['refreshes_due']}) in {row['seconds']:g} s: {api}"
            f" | {row['backend_calls_per_interval']:.0f} / {row['api_requests_per_interval']:.0f}"
            f" | {row['rate_limited']:.0f} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(markdown(measure())))
