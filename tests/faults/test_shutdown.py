"""SIGTERM with requests in flight on a hung backend: drain, refuse, clean up, exit."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.conftest import MakeClient
from tests.faults.peers import (
    BACKENDS,
    Backend,
    Peers,
    Reply,
    connect_error,
    daemon_config,
    finish,
    start_daemon,
    stuck_reads,
)
from tests.integration.harness import Daemon

REFUSED = ("ECONNREFUSED", "ENOENT")
WIDE_LIMITS = {"concurrency": 64, "rate": 1000, "burst": 1000}  # every read reaches the backend


def _config(
    peers: Peers, *, backend_timeout: float, drain_timeout: float, call_timeout: float
) -> dict[str, Any]:
    """``call_timeout``: each backend's own per-request timeout (hcv ``timeout``, aws
    ``read_timeout``), the time a hung call holds its worker or connection."""
    return daemon_config(
        peers,
        cache={"backend_timeout": backend_timeout},
        listen={"drain_timeout": drain_timeout},
        limits=WIDE_LIMITS,
        vaults={"hcv": {"timeout": call_timeout}, "aws": {"read_timeout": call_timeout}},
    )


async def _refused_within(daemon: Daemon, seconds: float) -> str:
    """Poll new connections until one is refused; return the errno name."""
    deadline = time.monotonic() + seconds
    while (error := connect_error(daemon.socket)) is None:
        assert time.monotonic() < deadline, f"new connections still accepted after {seconds} s"
        await asyncio.sleep(0.005)
    return error


async def _exit_code_within(daemon: Daemon, seconds: float, since: float) -> int | None:
    """The exit code once the process ends, or None if it is still running ``seconds``
    after ``since`` (a monotonic time)."""
    assert daemon.process is not None
    while (code := daemon.process.poll()) is None:
        if time.monotonic() - since >= seconds:
            return None
        await asyncio.sleep(0.01)
    return code


async def _keep_alive(daemon: Daemon) -> aiohttp.ClientSession:
    """A session holding one idle keep-alive connection, opened before the signal."""
    session = daemon.session()
    async with session.get("http://sidecar/healthz") as response:
        assert response.status == 200
        await response.read()
    return session


@pytest.mark.parametrize("backend", BACKENDS)
async def test_sigterm_drains_in_flight_requests(
    peers: Peers, make_client: MakeClient, tmp_path: Path, backend: Backend
) -> None:
    """SIGTERM with 50 reads stuck on a hung backend (backend_timeout 1.5 s, drain_timeout
    4 s): new connections are refused at once (ECONNREFUSED or ENOENT), /readyz on a
    connection opened before says 503 ``draining`` (if it still answers), every read
    already sent gets its complete 504 JSON answer, the socket file is removed and the
    process exits 0 within drain_timeout + 2 s. Per-request timeouts equal the deadline,
    so no backend call outlives it (what if one does: the next test)."""
    drain_timeout = 4.0
    config = _config(peers, backend_timeout=1.5, drain_timeout=drain_timeout, call_timeout=1.5)
    daemon = start_daemon(tmp_path / "d", config)
    keep_alive = await _keep_alive(daemon)
    try:
        stuck = await stuck_reads(make_client(daemon), peers, backend, 50, "drain")
        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await _refused_within(daemon, 1.0) in REFUSED
        try:
            async with keep_alive.get("http://sidecar/readyz") as response:
                readyz: tuple[int, Any] | None = (response.status, await response.json())
        except aiohttp.ClientError:
            readyz = None  # the idle connection was closed with the listener: fine
        if readyz is not None:
            assert readyz[0] == 503, readyz
            assert "draining" in readyz[1]["missing"], readyz
        results = await asyncio.gather(*stuck)
        broken = [r for r in results if not isinstance(r, Reply)]
        assert not broken, f"{len(broken)} of 50 reads got no answer: {broken[:3]!r}"
        codes = {(r.status, r.code) for r in results if isinstance(r, Reply)}
        assert codes == {(504, "backend_timeout")}, codes
        code = await _exit_code_within(daemon, drain_timeout + 2, sent)
        assert code == 0, f"exit code {code} {time.monotonic() - sent:.1f} s after SIGTERM"
        assert not daemon.socket.exists()
        assert connect_error(daemon.socket) == "ENOENT"
    finally:
        await keep_alive.close()
        peers.heal()
        finish(daemon)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_exit_is_not_held_by_stuck_backend_calls(
    peers: Peers, make_client: MakeClient, tmp_path: Path, backend: Backend
) -> None:
    """A backend call that outlives its deadline (the backend's own per-request timeout
    is 30 s, backend_timeout 1 s) does not hold the exit: after SIGTERM the 20 stuck
    reads get their 504s, the drain ends, and the process exits 0 within
    drain_timeout (3 s) + 2 s, though the hung calls are still open."""
    drain_timeout = 3.0
    config = _config(peers, backend_timeout=1, drain_timeout=drain_timeout, call_timeout=30)
    daemon = start_daemon(tmp_path / "d", config)
    try:
        stuck = await stuck_reads(make_client(daemon), peers, backend, 20, "held")
        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        results = await asyncio.gather(*stuck)
        codes = {(r.status, r.code) if isinstance(r, Reply) else repr(r) for r in results}
        assert codes == {(504, "backend_timeout")}, codes
        code = await _exit_code_within(daemon, drain_timeout + 2, sent)
        hung = peers.proxies[backend].hung
        assert code is not None, (
            f"still running {drain_timeout + 2:g} s after SIGTERM, with {hung} backend calls "
            f"still held by the proxy; 'stopped' logged at: {_stopped_at(daemon)}"
        )
        assert code == 0
        assert not daemon.socket.exists()
    finally:
        peers.heal()
        finish(daemon)


def _stopped_at(daemon: Daemon) -> str:
    """When the log says serving stopped (drained, closed, socket removed), if it did."""
    for event in daemon.log_events():
        if event.get("event") == "stopped":
            return str(event.get("timestamp"))
    return "never (no 'stopped' log line)"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_second_sigterm_exits_at_once(
    peers: Peers, make_client: MakeClient, tmp_path: Path, backend: Backend
) -> None:
    """During a long drain (drain_timeout 30 s, 20 reads stuck on a hung backend with
    backend_timeout 25 s) a second SIGTERM makes the process exit within 1 s, with
    code 1, its socket file removed (README: signals)."""
    config = _config(peers, backend_timeout=25, drain_timeout=30, call_timeout=30)
    daemon = start_daemon(tmp_path / "d", config)
    try:
        stuck = await stuck_reads(make_client(daemon), peers, backend, 20, "twice")
        daemon.signal(signal.SIGTERM)
        await _refused_within(daemon, 1.0)  # draining now
        await asyncio.sleep(0.2)
        assert daemon.process is not None
        assert daemon.process.poll() is None, "exited on the first SIGTERM"
        second = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = await _exit_code_within(daemon, 1.0, second)
        assert code is not None, "still running 1 s after the second SIGTERM"
        assert code == 1
        assert not daemon.socket.exists()
        await asyncio.gather(*stuck)  # cut off: no answer is owed, but none may hang
    finally:
        peers.heal()
        finish(daemon)
