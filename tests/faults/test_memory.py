"""Memory stays bounded when a backend answers with huge garbage bodies."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import MakeClient
from tests.faults.fault_proxy import HUGE_SIZE, Fault
from tests.faults.peers import (
    BACKENDS,
    Backend,
    Peers,
    daemon_config,
    finish,
    ref,
    rss_bytes,
    start_daemon,
)

FAILURES = 20
# One failure may leave its transient copies in RSS (the body, its decoded text); 20
# failures must not keep 20 bodies. Twice the body size is that line.
BOUND = 2 * HUGE_SIZE
MiB = 1024 * 1024


@pytest.mark.parametrize("backend", BACKENDS)
async def test_huge_bodies_do_not_grow_memory(
    peers: Peers, make_client: MakeClient, tmp_path: Path, backend: Backend
) -> None:
    """20 reads of never-cached keys whose backend answers 200 with a 50 MiB body of
    unterminated JSON each fail with 502 backend_error, and the daemon's RSS grows by
    less than twice the body size over all 20 (the failures are remembered for neg_ttl,
    so what a remembered failure holds counts)."""
    config = daemon_config(peers, cache={"backend_timeout": 5, "neg_ttl": 60})
    daemon = start_daemon(tmp_path / "d", config)
    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        client = make_client(daemon)
        warm = await peers.put(backend, "rss-warm", "not a canary: a warm-up read")
        assert (await client.read(warm)).status == 200
        before = rss_bytes(pid)
        peers.proxies[backend].set(Fault.HUGE)
        seen: list[str] = []
        for i in range(FAILURES):
            reply = await client.read(ref(backend, f"rss-{i}"))
            grown = rss_bytes(pid) - before
            seen.append(f"{i + 1}: {reply.status} {reply.code} {reply.elapsed:.2f} s, "
                        f"RSS +{grown / MiB:.0f} MiB")  # fmt: skip
            assert (reply.status, reply.code) == (502, "backend_error"), "\n".join(seen)
            assert grown < BOUND, (
                f"RSS {before / MiB:.0f} MiB -> {(before + grown) / MiB:.0f} MiB after "
                f"{i + 1} failures of {HUGE_SIZE / MiB:.0f} MiB bodies:\n" + "\n".join(seen)
            )
        after = rss_bytes(pid)
        print(
            f"{backend}: RSS {before / MiB:.1f} MiB before, {after / MiB:.1f} MiB after "
            f"{FAILURES} failures of {HUGE_SIZE / MiB:.0f} MiB (bound +{BOUND / MiB:.0f} MiB)"
        )
    finally:
        peers.heal()
        finish(daemon)
