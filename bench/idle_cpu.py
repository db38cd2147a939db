"""CPU and memory of an idle daemon holding N cached secrets.

Starts the real daemon (``python -m sidecar run``) with N env secrets prefetched,
waits for /readyz, then reads its CPU time and RSS from /proc over a window with no
requests. With the default ttl (300 s) no refresh falls in a 60 s window, so this
is the cost of holding entries plus the refresher's idle ticks.

    .venv/bin/python -m bench.idle_cpu --entries 10000 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from bench.daemon import rss_mib

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def ready(socket: Path) -> bool:
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as s,
            s.get("http://s/readyz") as r,
        ):
            return r.status == 200
    except (aiohttp.ClientError, FileNotFoundError):
        return False


async def main(entries: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        socket = Path(tmp) / "s.sock"
        config = Path(tmp) / "c.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"socket": str(socket)}, "metrics": {"address": ""},
            "log": {"level": "warning"},
            "prefetch": [f"{{vault://env/idle-{i}}}" for i in range(entries)],
        }))  # fmt: skip
        env = {**os.environ, **{f"IDLE_{i}": f"value-{i}" for i in range(entries)}}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(config)], env=env
        )
        try:
            started = time.monotonic()
            while not await ready(socket):
                await asyncio.sleep(0.05)
            to_ready = time.monotonic() - started
            await asyncio.sleep(2)  # let start-up work settle
            cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            await asyncio.sleep(seconds)
            cpu1, t1 = cpu_seconds(daemon.pid), time.monotonic()
            print(
                f"{entries} entries: ready in {to_ready:.2f} s; idle CPU "
                f"{100 * (cpu1 - cpu0) / (t1 - t0):.2f} % of one core over {t1 - t0:.0f} s; "
                f"RSS {rss_mib(daemon.pid):.1f} MiB"
            )
        finally:
            daemon.terminate()
            daemon.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    asyncio.run(main(args.entries, args.seconds))
