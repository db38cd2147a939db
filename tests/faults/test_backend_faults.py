"""Each fault class, for hcv and aws: cached values survive, uncached keys fail fast and
with the documented code, and everything is fresh again once the fault ends.

One daemon serves the whole module (ttl 1 s, resurrect_ttl 60 s, backend_timeout 1 s,
refresh at 50-60 % of ttl, retry backoff capped at 1 s); each test uses secrets of its
own, so tests cannot see each other's cache entries.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import pytest

from tests.canary import value
from tests.faults.conftest import MakeClient
from tests.faults.fault_proxy import Fault, MiB
from tests.faults.peers import BACKENDS, Backend, Peers, Reply, daemon_config, finish, start_daemon
from tests.integration.harness import Daemon

TTL = 1.0
BACKEND_TIMEOUT = 1.0
MAX_BACKOFF = 1.0
MARGIN = 1.0  # scheduling, retries' backoff and reading a 50 MB body, on 2 shared cores
FAULT_FOR = 2.0  # seconds each fault lasts at least: past ttl, through failed refreshes
# A "huge" body here is 8 MiB: read and refused in well under backend_timeout, so the
# answer is backend_error, not a timeout on a busy machine. 50 MiB: test_memory.py.
HUGE = 8 * MiB
RECOVERY = MAX_BACKOFF + BACKEND_TIMEOUT + 3.0  # next retry due, its call, slack

EXPECTED: dict[Fault, tuple[int, str]] = {
    Fault.HANG: (504, "backend_timeout"),
    Fault.RESET: (503, "backend_unavailable"),
    Fault.THROTTLE: (503, "backend_unavailable"),
    Fault.INVALID_JSON: (502, "backend_error"),
    Fault.WRONG_TYPES: (502, "backend_error"),
    Fault.HUGE: (502, "backend_error"),
    Fault.TRUNCATED: (503, "backend_unavailable"),  # unrecognised errors are transient
}
_names = itertools.count()


@pytest.fixture(scope="module")
def daemon(peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = daemon_config(
        peers,
        cache={"ttl": TTL, "backend_timeout": BACKEND_TIMEOUT},
        refresh={"max_backoff": MAX_BACKOFF},
    )
    started = start_daemon(tmp_path_factory.mktemp("faults"), config)
    yield started
    finish(started)


def _serves(reply: Reply, expected: str) -> bool:
    """200 with this value (compared here, so a failing assert does not print values)."""
    return reply.status == 200 and reply.body.get("value") == expected


@pytest.mark.parametrize("fault", list(EXPECTED), ids=lambda f: f.value)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_cached_value_survives_and_uncached_fails_fast(
    daemon: Daemon, peers: Peers, make_client: MakeClient, backend: Backend, fault: Fault
) -> None:
    """While the backend has this fault, a value read while it was healthy keeps being
    answered 200 with the same value (``stale: true`` once past ttl), each answer within
    backend_timeout + margin; a never-cached key gets the documented 5xx JSON error
    (never a 500) within that bound; after the fault ends both are fresh within
    max_backoff + backend_timeout + slack."""
    client = make_client(daemon)
    name = f"{fault.value}-{next(_names)}"
    cached_value, new_value = value(name), value(f"{name}-new")
    cached = await peers.put(backend, name, cached_value)
    uncached = await peers.put(backend, f"{name}-new", new_value)
    first = await client.read(cached)
    assert first.status == 200, first
    assert _serves(first, cached_value), first
    assert first.stale is False, first

    peers.proxies[backend].set(fault, huge_size=HUGE)
    fault_on = time.monotonic()
    uncached_read = asyncio.ensure_future(client.read(uncached))
    bound = BACKEND_TIMEOUT + MARGIN
    answers: list[tuple[float, Reply]] = []
    while True:
        reply = await client.read(cached)
        at = time.monotonic() - fault_on
        answers.append((at, reply))
        shown = f"cached read at +{at:.2f} s into {fault.value} ({len(answers)} read): {reply}"
        assert reply.status == 200, shown
        assert _serves(reply, cached_value), shown
        assert reply.elapsed <= bound, shown
        if reply.body["age_seconds"] > TTL + 0.05:  # past ttl (a little slack for rounding)
            assert reply.stale is True, shown
        if at >= FAULT_FOR and any(r.stale for _, r in answers):
            break
        assert at < FAULT_FOR + 10, f"never answered stale: {[str(r) for _, r in answers]}"
        await asyncio.sleep(0.05)

    failed = await uncached_read
    assert (failed.status, failed.code) == EXPECTED[fault], f"never-cached key: {failed}"
    assert failed.elapsed <= bound, f"never-cached key: {failed}"

    peers.proxies[backend].set(Fault.PASS)
    healed = time.monotonic()
    for reference, expected in ((cached, cached_value), (uncached, new_value)):
        while True:
            reply = await client.read(reference)
            at = time.monotonic() - healed
            if _serves(reply, expected) and reply.stale is False:
                break
            if reference == cached:  # the cached value is served all along, stale or not
                assert _serves(reply, expected), reply
            assert at < RECOVERY, f"{reference} not fresh {at:.1f} s after the fault: {reply}"
            await asyncio.sleep(0.05)
