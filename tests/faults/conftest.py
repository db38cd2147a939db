"""Session-wide peers (FakeVault and moto behind fault proxies) and per-test clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from tests.faults.peers import Client, Peers, running_peers
from tests.integration.harness import Daemon

MakeClient = Callable[[Daemon], Client]


@pytest.fixture(scope="session")
def peers() -> Iterator[Peers]:
    """FakeVault and moto, each behind its own fault proxy, for the whole session."""
    with running_peers() as started:
        yield started


@pytest.fixture(autouse=True)
def _healed(peers: Peers) -> Iterator[None]:
    """Every test starts and ends with both proxies passing traffic through (leaving
    ``HANG`` resets the connections it held, so nothing stays stuck)."""
    peers.heal()
    yield
    peers.heal()


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """``make_client(daemon)``: a keep-alive client, closed at the end of the test."""
    made: list[Client] = []

    def make(daemon: Daemon) -> Client:
        made.append(Client(daemon))
        return made[-1]

    yield make
    await asyncio.gather(*(client.close() for client in made))
