"""The backend contract: every backend, over its real protocol, through the real cache.

Each test runs once per backend (env, aws, hcv, gcp) with the peers of
``tests.backends.contract``; time is a manual clock and the background refresh is
``Refresher.run_due`` called when the cache says an entry is due. Every stored value
holds the canary (``tests.canary.value``), and every expected error is checked for it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.cache import EARLY_RETRY
from sidecar.errors import (
    AccessDenied,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CredentialsExpired,
    SecretNotFound,
    SidecarError,
)
from sidecar.refresh import Refresher
from sidecar.resolver import Answer, Resolver
from tests.backends.aws_peer import moto_server
from tests.backends.contract import BACKENDS, REFUSALS, Peer, raises_clean, start_peer
from tests.canary import value
from tests.support import ManualClock, make_resolver

PREFIX = "contract"
TTL = 60.0
NEG_TTL = 30.0
RESURRECT_TTL = 120.0
REFRESH_AT = 0.9  # of ttl: the top of the refresh window, where make_resolver pins jitter
CALLS = "secret_sidecar_backend_calls_total"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(params=BACKENDS)
async def peer(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[Peer]:
    name: str = request.param
    async with start_peer(
        name, monkeypatch, tmp_path, lambda: str(request.getfixturevalue("moto_url"))
    ) as started:
        yield started


@dataclass
class Contract:
    """A resolver on one peer's vault, its manual clock and its refresher."""

    peer: Peer
    clock: ManualClock
    resolver: Resolver
    refresher: Refresher

    def ref(self, secret_id: str, key: str | None = None) -> str:
        key = key or self.peer.plain_key
        return f"{{vault://{PREFIX}/{secret_id}" + (f"/{key}}}" if key else "}")

    async def resolve(self, secret_id: str, key: str | None = None) -> Answer:
        return await self.resolver.resolve(self.ref(secret_id, key))

    async def run_due(self) -> dict[str, int]:
        return await self.refresher.run_due()

    def calls(self, outcome: str = "ok") -> float:
        """Backend calls the resolver made with this outcome (its metric)."""
        labels = {"vault": PREFIX, "backend": self.peer.name, "outcome": outcome}
        return self.resolver.metrics.registry.get_sample_value(CALLS, labels) or 0.0

    def advance_to(self, when: float) -> None:
        assert when >= self.clock.now
        self.clock.advance(when - self.clock.now)

    def next_due(self) -> float:
        return self.resolver.cache.next_due()

    async def settled(self, secret_id: str) -> None:
        """Wait for the background load of this secret, if one is running."""
        task = self.resolver.cache.loading(self.resolver.target(self.ref(secret_id)).key)
        if task is not None:
            await asyncio.wait([task])


@pytest.fixture
async def contract(peer: Peer) -> AsyncIterator[Contract]:
    """A resolver built as the daemon builds it, on the peer's vault; closed after the test."""
    clock = ManualClock()
    resolver = make_resolver(
        (peer.entity(PREFIX),),
        clock=clock,
        ttl=TTL,
        neg_ttl=NEG_TTL,
        resurrect_ttl=RESURRECT_TTL,
        backend_timeout=5.0,
        backend_retries=0,  # one call per fetch: counts are exact, outages fail at once
    )
    try:
        refresher = Refresher(lambda: resolver, resolver.cache, idle_ttl=None)
        yield Contract(peer, clock, resolver, refresher)
    finally:
        await resolver.vaults.close()


async def test_plain_value_and_json_keys_from_one_call(contract: Contract) -> None:
    """A plain value resolves; both keys of a JSON secret come from one backend call."""
    peer = contract.peer
    await peer.create("db-password", value("s3cr3t ✓"))
    await peer.create("db-creds", json.dumps({"username": "app", "password": value("p4ss")}))
    plain = await contract.resolve("db-password")
    assert (plain.value, plain.lookup.cached) == (value("s3cr3t ✓"), False)
    assert contract.calls() == 1
    user = await contract.resolve("db-creds", "username")
    password = await contract.resolve("db-creds", "password")
    assert (user.value, password.value) == ("app", value("p4ss"))
    assert (user.lookup.cached, password.lookup.cached) == (False, True)
    assert contract.calls() == 2


async def test_errors_about_a_value_never_quote_it(contract: Contract) -> None:
    """A key asked of a plain value or missing from a JSON secret is an error that does not
    quote the value; where values are strings (not Vault's maps), so are base64_decode of
    a value that is not base64 and a key asked of a decoded value, which quote neither the
    value nor its stored base64, while the decoded value itself reads."""
    peer = contract.peer
    await peer.create("plain", value("plain"))
    await peer.create("doc", json.dumps({"username": value("user")}))
    failing = [contract.ref("plain", "nokey"), contract.ref("doc", "nokey")]
    if peer.plain_key is None:  # base64_decode applies to the whole stored string
        await peer.create("encoded", base64.b64encode(value("decoded").encode()).decode())
        decoded = await contract.resolver.resolve("{vault://contract/encoded?base64_decode}")
        assert decoded.value == value("decoded")
        failing += ["{vault://contract/plain?base64_decode}",
                    "{vault://contract/encoded/nokey?base64_decode}"]  # fmt: skip
    for ref in failing:
        with raises_clean(SidecarError):
            await contract.resolver.resolve(ref)


async def test_rotation_is_picked_up_by_the_refresh(contract: Contract) -> None:
    """A new version is fetched at 90 % of ttl (moved earlier onto the refresh grid, by
    at most ttl/20) and then served from cache, newly versioned."""
    peer, start = contract.peer, contract.clock.now
    await peer.create("api-key", value("one"))
    first = await contract.resolve("api-key")
    await peer.update("api-key", value("two"))
    cached = await contract.resolve("api-key")
    assert (cached.value, cached.lookup.cached) == (value("one"), True)
    assert start + (REFRESH_AT - 0.05) * TTL <= contract.next_due() <= start + REFRESH_AT * TTL
    contract.advance_to(contract.next_due())
    assert await contract.run_due() == {"ok": 1}
    rotated = await contract.resolve("api-key")
    assert (rotated.value, rotated.lookup.cached, rotated.lookup.stale) == (
        value("two"),
        True,
        False,
    )
    if peer.versioned:
        assert None not in (first.version, rotated.version)
        assert rotated.version != first.version
    else:
        assert (first.version, rotated.version) == (None, None)
    assert contract.calls() == 2


async def test_not_found_is_negative_cached_for_neg_ttl(contract: Contract) -> None:
    """A missing secret is not_found and remembered for neg_ttl, then found once created."""
    for _ in range(2):
        with raises_clean(SecretNotFound) as caught:
            await contract.resolve("late-comer")
        assert caught.value.code == "not_found"
    await contract.peer.create("late-comer", value("here"))
    contract.clock.advance(NEG_TTL - 1)
    with raises_clean(SecretNotFound):
        await contract.resolve("late-comer")
    assert (contract.calls("not_found"), contract.calls()) == (1, 0)
    contract.clock.advance(1)
    assert (await contract.resolve("late-comer")).value == value("here")
    assert contract.calls() == 1


# env reads process memory: it cannot fail transiently, so it has no outage to test.
@pytest.mark.parametrize("peer", [b for b in BACKENDS if b != "env"], indirect=True)
async def test_outage_serves_stale_until_resurrect_ttl_then_recovers(contract: Contract) -> None:
    """In an outage the last value is served stale until resurrect_ttl, then the error; resumed,
    the next retry after the backoff makes it fresh again."""
    peer, start = contract.peer, contract.clock.now
    await peer.create("db-password", value("good"))
    assert (await contract.resolve("db-password")).value == value("good")
    await peer.pause()
    contract.clock.advance(TTL + 1)
    stale = await contract.resolve("db-password")
    assert (stale.value, stale.lookup.stale) == (value("good"), True)
    resurrect_end = start + TTL + RESURRECT_TTL
    retries = 0
    while contract.next_due() < resurrect_end:  # the refresher retries with backoff
        contract.advance_to(contract.next_due())
        assert await contract.run_due() == {"stale": 1}
        answer = await contract.resolve("db-password")
        assert (answer.value, answer.lookup.stale) == (value("good"), True)
        retries += 1
    assert retries > 0
    contract.advance_to(resurrect_end)
    with raises_clean((BackendUnavailable, BackendTimeout)) as caught:
        await contract.resolve("db-password")
    failed = contract.calls(caught.value.code)
    assert failed >= 1 + retries  # a reader with nothing to serve may have retried early
    await peer.resume()
    with raises_clean((BackendUnavailable, BackendTimeout)):  # a retry within the second
        await contract.resolve("db-password")
    assert contract.calls(caught.value.code) == failed
    assert contract.next_due() > contract.clock.now + EARLY_RETRY  # the backoff is longer
    contract.clock.advance(EARLY_RETRY)  # recovery: one reader a second retries early
    recovered = await contract.resolve("db-password")
    assert (recovered.value, recovered.lookup.stale) == (value("good"), False)
    fresh = await contract.resolve("db-password")
    assert (fresh.value, fresh.lookup.cached, fresh.lookup.stale) == (value("good"), True, False)
    assert contract.calls() == 2


FAILURES = {  # Peer.refuse(how): the error a reader gets once nothing is servable
    "denied": AccessDenied,
    "misconfigured": BackendError,
    "expired": CredentialsExpired,  # ours: transient, re-authenticated on the next try
}


@pytest.mark.parametrize("how", REFUSALS)
@pytest.mark.parametrize("peer", [b for b in BACKENDS if b != "env"], indirect=True)
async def test_refusals_serve_the_last_value_stale_within_resurrect_ttl(
    contract: Contract, how: str
) -> None:
    """Denied, misconfigured and expired-credential failures never drop a good value: it is
    served stale (in the answer and /v1/status) within resurrect_ttl. Past it, a transient
    failure is retried early by a reader, the others are remembered for neg_ttl."""
    peer, start, error = contract.peer, contract.clock.now, FAILURES[how]
    await peer.create("db-password", value("good"))
    await contract.resolve("db-password")
    await peer.refuse(how)
    contract.clock.advance(TTL + 1)
    stale = await contract.resolve("db-password")
    assert (stale.value, stale.lookup.stale, stale.lookup.age) == (value("good"), True, TTL + 1)
    await contract.settled("db-password")  # the retry a stale read starts in the background
    status = contract.resolver.status()["vaults"][PREFIX]
    assert (status["stale"], status["last_error"]["code"]) == (1, error.code)
    assert contract.calls(error.code) == 1
    contract.advance_to(start + TTL + RESURRECT_TTL)
    with raises_clean(error):
        await contract.resolve("db-password")
    failed = contract.calls(error.code)
    contract.clock.advance(EARLY_RETRY)
    with raises_clean(error):
        await contract.resolve("db-password")
    assert contract.calls(error.code) == failed + (1 if error(".").transient else 0)
    await peer.resume()
    contract.clock.advance(EARLY_RETRY if error(".").transient else NEG_TTL)
    fresh = await contract.resolve("db-password")
    assert (fresh.value, fresh.lookup.stale) == (value("good"), False)
    assert contract.calls() == 2


async def test_deleted_secret_is_not_served_past_its_ttl(contract: Contract) -> None:
    """A deleted secret is served from cache within its ttl, and not_found after it."""
    await contract.peer.create("old-token", value("t0k3n"))
    await contract.resolve("old-token")
    await contract.peer.delete("old-token")
    cached = await contract.resolve("old-token")
    assert (cached.value, cached.lookup.cached) == (value("t0k3n"), True)
    contract.clock.advance(TTL)
    with raises_clean(SecretNotFound) as caught:
        await contract.resolve("old-token")
    assert caught.value.code == "not_found"
    assert (contract.calls(), contract.calls("not_found")) == (1, 1)


async def test_refresh_that_finds_it_deleted_stops_serving_it(contract: Contract) -> None:
    """A refresh that finds the secret deleted drops the value at once, before its ttl ends."""
    await contract.peer.create("old-token", value("t0k3n"))
    await contract.resolve("old-token")
    await contract.peer.delete("old-token")
    contract.advance_to(contract.next_due())
    assert await contract.run_due() == {"not_found": 1}
    with raises_clean(SecretNotFound):
        await contract.resolve("old-token")
    assert (contract.calls(), contract.calls("not_found")) == (1, 1)
