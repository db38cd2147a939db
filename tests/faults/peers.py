"""Real peers behind fault proxies, the real daemon in front of them, and a timed client.

Vault is ``tests/backends/vault_server.FakeVault`` and AWS is moto's server, each
reached by the daemon only through a ``FaultProxy`` switched at runtime. Daemons are
subprocesses (``tests.integration.harness.Daemon``: its ``stop`` checks the log for
canaries); ``start_daemon`` is synchronous so a module can share one daemon.
Used by the fault tests and by ``bench.loop_lag``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from tests.backends.aws_peer import REGION, aws_client, isolate_environment, moto_server
from tests.backends.vault_server import FakeVault
from tests.faults.fault_proxy import Fault, FaultProxy
from tests.integration.harness import START_TIMEOUT, Daemon

Backend = Literal["hcv", "aws"]
BACKENDS: tuple[Backend, ...] = ("hcv", "aws")
PREFIX: dict[Backend, str] = {"hcv": "hv", "aws": "aw"}  # the daemon's vault prefixes
MOUNT = "secret"


@dataclass
class Peers:
    """Both backends, their proxies, and what a daemon needs to reach them."""

    vault: FakeVault
    token: str
    moto: str
    proxies: dict[Backend, FaultProxy]

    def vaults(self, **backend_config: dict[str, Any]) -> list[dict[str, Any]]:
        """The daemon's vault entities ``hv`` (hcv) and ``aw`` (aws), both via the proxies;
        ``backend_config`` adds fields per backend (``hcv={"timeout": 2}``)."""
        return [
            {"prefix": PREFIX["hcv"], "name": "hcv",
             "config": {"host": "127.0.0.1", "port": self.proxies["hcv"].port,
                        "token": self.token, "mount": MOUNT, "kv": "v1",
                        **backend_config.get("hcv", {})}},
            {"prefix": PREFIX["aws"], "name": "aws",
             "config": {"region": REGION, "endpoint_url": self.proxies["aws"].url,
                        **backend_config.get("aws", {})}},
        ]  # fmt: skip

    async def put(self, backend: Backend, name: str, value: str) -> str:
        """Store ``{"value": value}`` as secret ``name`` straight in the peer (not through
        the proxy); return the reference that reads it."""
        if backend == "hcv":
            self.vault.put(MOUNT, name, {"value": value})
        else:
            async with aws_client(self.moto, "secretsmanager") as sm:
                await sm.create_secret(Name=name, SecretString=json.dumps({"value": value}))
        return ref(backend, name)

    def heal(self) -> None:
        for proxy in self.proxies.values():
            proxy.set(Fault.PASS)


def ref(backend: Backend, name: str) -> str:
    return f"{{vault://{PREFIX[backend]}/{name}/value}}"


@contextlib.contextmanager
def running_peers() -> Iterator[Peers]:
    """FakeVault and moto, each behind its own fault proxy."""
    vault = FakeVault()
    vault.enable_kv(MOUNT, "v1")
    vault.start()
    token = vault.create_token()  # never expires: no renewal traffic through the proxy
    try:
        with moto_server() as moto:
            proxies: dict[Backend, FaultProxy] = {
                "hcv": FaultProxy(vault.url, "vault").start(),
                "aws": FaultProxy(moto, "aws").start(),
            }
            try:
                yield Peers(vault, token, moto, proxies)
            finally:
                for proxy in proxies.values():
                    proxy.stop()
    finally:
        vault.stop()


def daemon_config(peers: Peers, **sections: dict[str, Any]) -> dict[str, Any]:
    """ttl 1 s, resurrect_ttl 60 s, backend_timeout 1 s, refresh on at 50-60 % of ttl with
    backoff capped at 1 s, drain_timeout 5 s, both vaults; ``sections`` override per key
    (``cache={"ttl": 300}``), ``vaults=`` per backend (``vaults={"hcv": {"timeout": 2}}``)."""
    config: dict[str, Any] = {
        "log": {"level": "info"},
        "cache": {"ttl": 1, "neg_ttl": 1, "resurrect_ttl": 60, "backend_timeout": 1,
                  "backend_retries": 2},
        "refresh": {"enabled": True, "window": [0.5, 0.6], "max_backoff": 1},
        "listen": {"drain_timeout": 5},
    }  # fmt: skip
    config["vaults"] = peers.vaults(**sections.pop("vaults", {}))
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def lag_config(peers: Peers) -> dict[str, Any]:
    """For the hung-backend latency scenario: values stay fresh (ttl 300 s), stuck reads
    stay stuck (backend_timeout and per-request timeouts 30 s), and the limits let every
    read reach the backend's own queue (hvac's thread pool, aiobotocore's connections)."""
    return daemon_config(
        peers,
        cache={"ttl": 300, "backend_timeout": 30},
        limits={"concurrency": 64, "rate": 1000, "burst": 1000},
        vaults={"hcv": {"timeout": 30}, "aws": {"read_timeout": 30}},
    )


def start_daemon(workdir: Path, config: dict[str, Any]) -> Daemon:
    """Start the daemon with moto's fake AWS credentials; wait until /readyz says ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(workdir, config, {})
    env = dict(os.environ)
    isolate_environment(env, str(workdir))  # never real AWS
    daemon.env = env
    process = daemon.start()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"daemon exited {process.returncode}:\n{daemon.logs()}")
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            if sync_request(daemon.socket, "GET", "/readyz")[0] == 200:
                return daemon
        time.sleep(0.02)
    finish(daemon)
    raise AssertionError(f"daemon not ready within {START_TIMEOUT} s:\n{daemon.logs()}")


def finish(daemon: Daemon) -> None:
    """``Daemon.stop`` (SIGTERM, then the canary check of its log); kill it if it hangs."""
    with contextlib.suppress(subprocess.TimeoutExpired):  # stop() killed it; a test failed
        daemon.stop()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("sidecar", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def sync_request(path: Path, method: str, target: str, timeout: float = 5.0) -> tuple[int, Any]:
    """One blocking request over the Unix socket (for synchronous fixtures)."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request(method, target)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def connect_error(path: Path) -> str | None:
    """None if a new connection to the socket is accepted, else its errno name."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        probe.close()
    return None


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    elapsed: float  # seconds, request sent to answer read

    @property
    def code(self) -> str | None:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return error.get("code") if isinstance(error, dict) else None

    @property
    def stale(self) -> bool | None:
        return self.body.get("stale") if isinstance(self.body, dict) else None

    def __str__(self) -> str:
        """The answer without its value (values are canaries: they stay out of reports)."""
        shown = (
            {k: v for k, v in self.body.items() if k != "value"}
            if isinstance(self.body, dict)
            else self.body
        )
        return f"{self.status} in {self.elapsed:.3f} s: {shown}"


class Client:
    """Reads through one keep-alive session (``Daemon.session``: answers canary-checked),
    timing each."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.session = daemon.session()

    async def read(self, reference: str) -> Reply:
        started = time.perf_counter()
        async with self.session.get(
            "http://sidecar/v1/secrets", params={"ref": reference}
        ) as response:
            body = await response.json(content_type=None)
            return Reply(response.status, body, time.perf_counter() - started)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(f"http://sidecar{path}") as response:
            return response.status, await response.json(content_type=None)

    async def in_flight(self) -> int:
        status, body = await self.get("/v1/status")
        assert status == 200, body
        count: int = body["requests_in_flight"]
        return count

    async def close(self) -> None:
        await self.session.close()


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` 0.99 for p99)."""
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


async def stuck_reads(
    client: Client, peers: Peers, backend: Backend, count: int, label: str
) -> list[asyncio.Task[Reply | BaseException]]:
    """Hang ``backend`` and send ``count`` reads of never-cached keys; return their tasks
    once the daemon reports them all in flight (each task ends with its reply, or the
    exception the client got instead of one)."""

    async def one(reference: str) -> Reply | BaseException:
        try:
            return await client.read(reference)
        except (aiohttp.ClientError, OSError) as exc:
            return exc

    peers.proxies[backend].set(Fault.HANG)
    tasks = [asyncio.ensure_future(one(ref(backend, f"{label}-{i}"))) for i in range(count)]
    deadline = time.monotonic() + 10
    while (in_flight := await client.in_flight()) < count:
        assert time.monotonic() < deadline, f"only {in_flight} of {count} reads in flight"
        await asyncio.sleep(0.02)
    return tasks
