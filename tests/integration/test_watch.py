"""Refresh and the change stream, with the daemon served in-process on a real socket.

In-process (``serve`` with a shutdown trigger) so the test can change the env
backend's environment while the daemon runs, and read the daemon's own metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from sidecar.config import parse_config
from sidecar.lifecycle import serve
from sidecar.metrics import Metrics
from tests.backends.gcp_server import FakeSecretManager
from tests.integration.harness import events, wait_until


class Sidecar:
    def __init__(self, socket: Path, metrics: Metrics) -> None:
        self.socket = socket
        self.metrics = metrics

    def session(self, limit: int = 100) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket), limit=limit),
            timeout=aiohttp.ClientTimeout(total=20),
        )

    async def request(self, method: str, path: str, **params: Any) -> tuple[int, Any]:
        async with self.session() as s, s.request(method, f"http://s{path}", params=params) as r:
            return r.status, await r.json()

    def backend_calls(self, outcome: str = "ok") -> float:
        labels = {"vault": "env", "backend": "env", "outcome": outcome}
        return (
            self.metrics.registry.get_sample_value("secret_sidecar_backend_calls_total", labels)
            or 0.0
        )


@contextlib.asynccontextmanager
async def running(tmp_path: Path, extra: dict[str, Any]) -> AsyncIterator[Sidecar]:
    """``serve`` in this loop on a socket in ``tmp_path``; ttl and neg_ttl 1 s by default."""
    socket = tmp_path / "s.sock"
    config = parse_config(
        {
            "listen": {"socket": str(socket)},
            "metrics": {"address": ""},
            "cache": {"ttl": 1, "neg_ttl": 1},
            **extra,
        }
    )
    stop, ready, metrics = asyncio.Event(), asyncio.Event(), Metrics()
    task = asyncio.create_task(
        serve(config, shutdown_trigger=stop.wait, ready=ready, metrics=metrics)
    )
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield Sidecar(socket, metrics)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@pytest.fixture
async def sidecar(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Sidecar]:
    """A daemon with ttl 1 s and neg_ttl 1 s, so refreshes happen within the test."""
    async with running(tmp_path, getattr(request, "param", {})) as daemon:
        yield daemon


async def next_event(stream: AsyncIterator[tuple[str, Any]], *wanted: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        async for kind, data in stream:
            if kind in wanted:
                return dict(data)
    raise AssertionError(f"stream ended before {wanted}")


async def test_rotation_reaches_watcher_and_readers_without_restart(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value changed in the backend is refreshed in the background, pushed to a watcher
    (with the value, since it asked) and served to readers from the cache."""
    monkeypatch.setenv("ROT", "v1")
    params = {"ref": "{vault://env/rot}", "include_values": "true"}
    async with sidecar.session() as session, session.get("http://s/v1/watch", params=params) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        monkeypatch.setenv("ROT", "v2")
        event = await next_event(events(r), "rotated")
    assert (event["ref"], event["event"], event["value"]) == ("{vault://env/rot}", "rotated", "v2")
    status, answer = await sidecar.request("GET", "/v1/secrets", ref="{vault://env/rot}")
    assert (status, answer["value"], answer["cached"]) == (200, "v2", True)


async def test_watch_sends_no_values_unless_asked(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without include_values an event says what changed, never the value."""
    monkeypatch.setenv("QUIET", '{"password": "first"}')
    params = {"ref": "{vault://env/quiet/password}"}
    async with sidecar.session() as session, session.get("http://s/v1/watch", params=params) as r:
        monkeypatch.setenv("QUIET", '{"password": "second"}')
        event = await next_event(events(r), "rotated")
    assert "value" not in event
    assert "second" not in json.dumps(event)


async def test_failure_and_recovery_are_events(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret removed from the backend turns 'failed'; when it is back, 'recovered'."""
    monkeypatch.setenv("FLAKY", "here")
    async with (
        sidecar.session() as session,
        session.get("http://s/v1/watch", params={"ref": "{vault://env/flaky}"}) as r,
    ):
        stream = events(r)
        monkeypatch.delenv("FLAKY")
        failed = await next_event(stream, "failed")
        monkeypatch.setenv("FLAKY", "back")
        recovered = await next_event(stream, "recovered")
    assert failed["error"]["code"] == "not_found"
    assert recovered["event"] == "recovered"


@pytest.mark.parametrize("sidecar", [{"watch": {"heartbeat": 0.05}}], indirect=True)
async def test_idle_stream_gets_heartbeats(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing to report, comments keep the connection alive."""
    monkeypatch.setenv("STILL", "same")
    async with (
        sidecar.session() as session,
        session.get("http://s/v1/watch", params={"ref": "{vault://env/still}"}) as r,
    ):
        assert (await next_event(events(r), "comment")) == {"comment": "heartbeat"}


@pytest.mark.parametrize("sidecar", [{"watch": {"queue": 2}}], indirect=True)
async def test_watcher_that_stops_reading_is_dropped(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher that never reads is disconnected once its queue is full; memory stays flat."""
    big = "x" * 512 * 1024  # big events fill the socket buffers quickly
    monkeypatch.setenv("BIG", big + "0")
    params = {"ref": "{vault://env/big}", "include_values": "true"}
    async with sidecar.session() as session:
        response = await session.get("http://s/v1/watch", params=params)

        async def dropped() -> bool:
            for i in range(4):
                monkeypatch.setenv("BIG", big + str(i + 1))
                await sidecar.request("POST", "/v1/refresh", ref="{vault://env/big}")
            return bool((await sidecar.request("GET", "/v1/status"))[1]["watchers"] == 0)

        await wait_until(dropped, within=15, what="the slow watcher to be dropped")
        response.close()


async def test_thousand_concurrent_cold_requests_make_one_backend_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1000 concurrent requests for one uncached secret share a single backend call (a ttl
    long enough that no refresh comes due while they are answered on a slow machine)."""
    monkeypatch.setenv("COLD", "v")

    async def one(session: aiohttp.ClientSession) -> str:
        async with session.get("http://s/v1/secrets", params={"ref": "{vault://env/cold}"}) as r:
            return str((await r.json())["value"])

    async with running(tmp_path, {"cache": {"ttl": 300}}) as sidecar:
        async with sidecar.session(limit=0) as session:
            values = await asyncio.gather(*(one(session) for _ in range(1000)))
        assert set(values) == {"v"}
        assert sidecar.backend_calls() == 1


async def test_outage_serves_stale_then_503_then_recovers_over_real_grpc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Secret Manager outage: the watcher hears 'stale', readers get the last value marked
    stale until resurrect_ttl ends, then 503; when the service is back, 'recovered'."""
    monkeypatch.delenv("SECRET_MANAGER_EMULATOR_HOST", raising=False)
    fake = FakeSecretManager()
    target = await fake.start()
    fake.add("p1", "db", "v1")
    vault = {
        "prefix": "sm",
        "name": "gcp",
        "config": {"project_id": "p1", "emulator_host": target, "resurrect_ttl": 2},
    }
    extra = {"vaults": [vault], "refresh": {"max_backoff": 0.2},
             "cache": {"ttl": 1, "neg_ttl": 1, "backend_retries": 0}}  # fmt: skip
    ref = "{vault://sm/db}"
    try:
        async with running(tmp_path, extra) as sidecar:
            assert (await sidecar.request("GET", "/v1/secrets", ref=ref))[0] == 200
            async with (
                sidecar.session() as session,
                session.get("http://s/v1/watch", params={"ref": ref}) as r,
            ):
                stream = events(r)
                fake.fail_always(grpc.StatusCode.UNAVAILABLE)
                stale_event = await next_event(stream, "stale")  # the early refresh failed

                async def expired() -> bool:  # within its ttl the value is still fresh
                    _, body = await sidecar.request("GET", "/v1/secrets", ref=ref)
                    return bool(body.get("stale"))

                await wait_until(expired, within=5, what="the value to expire")
                status, stale = await sidecar.request("GET", "/v1/secrets", ref=ref)
                assert (status, stale["value"], stale["stale"]) == (200, "v1", True)
                failed_event = await next_event(stream, "failed")
                status, gone = await sidecar.request("GET", "/v1/secrets", ref=ref)
                assert (status, gone["error"]["code"]) == (503, "backend_unavailable")
                fake.fail_always(None)
                await next_event(stream, "recovered")
                status, back = await sidecar.request("GET", "/v1/secrets", ref=ref)
                assert (status, back["value"], back["stale"]) == (200, "v1", False)
    finally:
        await fake.stop()
    assert stale_event["error"]["code"] == "backend_unavailable"
    assert failed_event["error"]["code"] == "backend_unavailable"
