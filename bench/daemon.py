"""A benchmark's daemon (or the floor): started, timed exec -> ready, measured, scraped.

Every figure that runs the real daemon needs the same few things: a process started
from a config file with its log kept, the seconds from exec to a 200 on its probe, its
RSS, and its metrics port parsed. They live here once, so ``bench.http`` and each
measurement module stay about what they measure. ``started`` is for synchronous
callers; ``running`` keeps the caller's event loop turning while the daemon starts, for
measurements whose peers (a proxy in front of moto) live in that loop.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.integration.harness import free_port

ROOT = Path(__file__).parent.parent
SERVER_CORE, LOAD_CORE = 0, 1
START_TIMEOUT = 120.0  # 100 000 prefetched secrets take tens of seconds here
ARG_CAP = 6 << 20  # execve's limit on argv + environment: stack rlimit / 4, at most 6 MiB


@dataclass(frozen=True)
class Started:
    socket: Path
    pid: int
    ready_seconds: float  # exec -> the first 200 from the probe
    metrics_port: int | None = None


def pinned(core: int) -> list[str]:
    """``taskset -c core`` where there is more than one core to keep apart."""
    if (os.cpu_count() or 1) > 1 and shutil.which("taskset"):
        return ["taskset", "-c", str(core)]
    return []


@contextmanager
def on_core(core: int = LOAD_CORE) -> Iterator[None]:
    """This process (the load) on ``core`` while it measures, off the daemon's core; as
    ``pinned``, only where there are cores to keep apart (and taskset to pin the daemon)."""
    if not pinned(core):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def environment_bytes(env: Mapping[str, str]) -> int:
    """What execve counts against its limit: each ``NAME=value\\0`` and its pointer."""
    return sum(len(k.encode()) + len(v.encode()) + 2 + 8 for k, v in env.items())


@contextmanager
def _room_for(env: Mapping[str, str]) -> Iterator[int | None]:
    """Raise this process's soft stack limit while a child is spawned, if its environment
    needs it: execve allows argv + environment a quarter of the stack limit (2 MiB at the
    usual 8 MiB), and 100 000 variables take about 2.7 MB. The child inherits the limit;
    yields it (bytes), or None when the default was enough."""
    need = environment_bytes(env) + (64 << 10)  # argv and slack
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if need > ARG_CAP:
        raise RuntimeError(f"{need} bytes of environment exceed execve's {ARG_CAP} cap")
    if soft == resource.RLIM_INFINITY or need <= soft // 4:
        yield None
        return
    wanted = -(-4 * need // (1 << 20)) << 20  # whole MiB
    if hard != resource.RLIM_INFINITY and wanted > hard:
        raise RuntimeError(f"the environment needs a stack limit of {wanted}, hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
    try:
        yield wanted
    finally:
        resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


def _spawn(
    command: list[str],
    env: Mapping[str, str],
    log_path: Path,
    base: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``command`` with ``env`` over ``base`` (this process's environment by default)."""
    full = {**(os.environ if base is None else base), **env}
    with log_path.open("ab") as log, _room_for(full):
        return subprocess.Popen(command, env=full, stdout=log, stderr=log, cwd=ROOT)


async def _ready(socket_path: Path, probe: str, process: subprocess.Popen[bytes]) -> float:
    """``perf_counter()`` at the first 200 on ``probe``."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {socket_path} exited {process.returncode}")
        if socket_path.exists():
            try:
                connector = aiohttp.UnixConnector(path=str(socket_path))
                async with (
                    aiohttp.ClientSession(connector=connector) as session,
                    session.get(f"http://bench{probe}") as response,
                ):
                    if response.status == 200:
                        return time.perf_counter()
            except aiohttp.ClientError:
                pass
        await asyncio.sleep(0.005)
    raise RuntimeError(f"the server for {socket_path} not ready in {START_TIMEOUT:g} s")


@contextmanager
def started(
    command: list[str], socket_path: Path, probe: str, env: Mapping[str, str], log_path: Path
) -> Iterator[Started]:
    """Run ``command`` until the block ends; ready once ``probe`` answers 200."""
    begun = time.perf_counter()
    process = _spawn(command, env, log_path)
    try:
        ready = asyncio.run(_ready(socket_path, probe, process)) - begun
        yield Started(socket_path, process.pid, ready)
    finally:
        process.terminate()
        process.wait(timeout=60)


def daemon_command(config: Mapping[str, Any], work: Path) -> tuple[list[str], Path]:
    """Write ``config`` (its socket defaulting to ``work``/daemon.sock) and return the
    pinned command that runs the daemon on it, and the socket."""
    listen = {"socket": str(work / "daemon.sock"), **config.get("listen", {})}
    (work / "daemon.yaml").write_text(yaml.safe_dump({**config, "listen": listen}))
    command = [sys.executable, "-m", "sidecar", "run", "-c", str(work / "daemon.yaml")]
    return [*pinned(SERVER_CORE), *command], Path(listen["socket"])


@asynccontextmanager
async def running(
    work: Path,
    config: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    base: Mapping[str, str] | None = None,
) -> AsyncIterator[Started]:
    """The daemon on ``config`` plus a metrics port of its own, until the block ends;
    ready when /readyz says so. Stopped without blocking this loop, so peers served from
    it (a counting proxy) answer the daemon's last calls. ``env`` goes over ``base``, the
    whole environment (this process's by default)."""
    port = free_port()
    command, socket_path = daemon_command(
        {**config, "metrics": {"address": f"127.0.0.1:{port}"}}, work
    )
    begun = time.perf_counter()
    process = _spawn(command, env or {}, work / "daemon.log", base)
    try:
        ready = await _ready(socket_path, "/readyz", process) - begun
        yield Started(socket_path, process.pid, ready, port)
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 60)


async def scrape(port: int) -> list[Sample]:
    """Every sample the daemon's metrics port shows now."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def buckets(samples: list[Sample], name: str) -> dict[float, float]:
    """A histogram's cumulative counts by upper bound (``name`` without ``_bucket``)."""
    return {float(s.labels["le"]): s.value for s in samples if s.name == f"{name}_bucket"}
