"""Cached keys keep being answered while many reads are stuck on a hung backend.

A behaviour check with a generous bound; the latency figures (p50/p99/p99.9, hung vs
healthy) come from ``python -m bench.loop_lag``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.canary import value
from tests.faults.conftest import MakeClient
from tests.faults.peers import (
    BACKENDS,
    Backend,
    Peers,
    Reply,
    finish,
    lag_config,
    percentile,
    start_daemon,
    stuck_reads,
)

STUCK = 50
READS = 500
BOUND = 1.0  # seconds: "answered", not a benchmark
ENDINGS = {(404, "not_found"), (502, "backend_error"), (503, "backend_unavailable"),
           (504, "backend_timeout")}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
async def test_cached_reads_answer_while_backend_hangs(
    peers: Peers, make_client: MakeClient, tmp_path: Path, backend: Backend
) -> None:
    """With 50 never-cached reads stuck on a hung backend, 500 sequential reads of a
    cached key of the same vault are each answered 200 with its value within 1 s; the
    stuck reads stay stuck throughout, and each gets a JSON answer once the fault ends
    (the keys do not exist: 404, or the failure of the reset call)."""
    daemon = start_daemon(tmp_path / "d", lag_config(peers))
    try:
        reader, stuck_client = make_client(daemon), make_client(daemon)
        expected = value("lag-cached")
        cached = await peers.put(backend, "lag-cached", expected)
        assert (await reader.read(cached)).status == 200
        stuck = await stuck_reads(stuck_client, peers, backend, STUCK, "lag")
        started = time.monotonic()
        latencies: list[float] = []
        for i in range(READS):
            reply = await reader.read(cached)
            same = reply.status == 200 and reply.body.get("value") == expected
            assert same, f"cached read {i + 1}: {reply}"
            assert reply.elapsed < BOUND, f"cached read {i + 1}: {reply}"
            latencies.append(reply.elapsed)
        took = time.monotonic() - started
        assert not any(task.done() for task in stuck), "a stuck read ended early"
        assert await stuck_client.in_flight() >= STUCK
        print(
            f"{backend}: {READS} cached reads in {took:.2f} s with {STUCK} stuck; "
            f"p50 {percentile(latencies, 0.5) * 1000:.2f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms, "
            f"max {max(latencies) * 1000:.2f} ms"
        )
        peers.heal()  # the proxy resets the held connections: the backend calls fail now
        for task in stuck:
            result = await task
            assert isinstance(result, Reply), f"a stuck read got no answer: {result!r}"
            # retried after the reset, it reaches the healed backend: no such secret
            assert (result.status, result.code) in ENDINGS, f"a stuck read: {result}"
    finally:
        peers.heal()
        finish(daemon)
