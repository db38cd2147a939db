"""Resolver over the env backend: keys, versions, base64, errors, shared fetches, prefetch."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime

import pytest

from sidecar.backends import Fetched
from sidecar.cache import Lookup, LookupResult
from sidecar.config import VaultEntity, parse_config
from sidecar.errors import InvalidReference, SecretNotFound, UnknownVault
from sidecar.metrics import Metrics
from sidecar.resolver import Answer, extract_key
from sidecar.schedule import NEVER
from tests.support import ManualClock, make_resolver


@pytest.mark.parametrize(
    ("value", "key", "error", "message"),
    [
        ('{"a": "x"}', "b", SecretNotFound, "subfield b not found in JSON secret"),
        ('{"a": 1}', "a", InvalidReference, "unexpected number value in JSON secret for"),
        ('{"a": true}', "a", InvalidReference, "unexpected boolean value in JSON secret"),
        ('{"a": {"b": "c"}}', "a", InvalidReference, "unexpected table value in JSON secret"),
        ('{"a": null}', "a", InvalidReference, "unexpected userdata value in JSON secret"),
        ("[1, 2]", "a", InvalidReference, "unable to json decode value: not a JSON object"),
        ("plain-secret-text", "a", InvalidReference, "unable to json decode value: Expecting"),
    ],
)
def test_key_extraction_errors_use_kong_wording(
    value: str, key: str, error: type[Exception], message: str
) -> None:
    """Kong's messages, and never the secret value in them."""
    with pytest.raises(error) as caught:
        extract_key(value, key)
    assert message in str(caught.value)
    assert value not in str(caught.value)


def test_key_extraction_returns_string_field() -> None:
    """A flat object's string field is the answer."""
    assert extract_key('{"username": "u", "password": "p"}', "password") == "p"


async def test_env_reference_resolves_with_kong_naming(monkeypatch: pytest.MonkeyPatch) -> None:
    """{vault://env/my-secret} reads MY_SECRET; #2 reads MY_SECRET_PREVIOUS."""
    monkeypatch.setenv("MY_SECRET", "now")
    monkeypatch.setenv("MY_SECRET_PREVIOUS", "before")
    resolver = make_resolver()
    current = await resolver.resolve("{vault://env/my-secret}")
    previous = await resolver.resolve("{vault://env/my-secret#2}")
    assert (current.value, previous.value) == ("now", "before")
    assert (current.version, previous.version) == (None, "2")


async def test_env_vault_prefix_and_keys_share_one_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """username and password of one JSON secret come from one backend call."""
    monkeypatch.setenv("APP_DB", '{"username": "u", "password": "p"}')
    resolver = make_resolver((VaultEntity(prefix="app", name="env", config={"prefix": "app_"}),))
    user = await resolver.resolve("{vault://app/db/username}")
    password = await resolver.resolve("{vault://app/db/password}")
    assert (user.value, password.value) == ("u", "p")
    assert (user.lookup.cached, password.lookup.cached) == (False, True)
    assert len(resolver.cache) == 1


async def test_base64_decode_applies_before_key_extraction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """base64_decode decodes the fetched value; a bad encoding is a backend_error."""
    monkeypatch.setenv("B64", base64.b64encode(b'{"k": "v"}').decode())
    monkeypatch.setenv("NOT_B64", "%%%")
    resolver = make_resolver()
    answer = await resolver.resolve("{vault://env/b64/k?base64_decode}")
    assert answer.value == "v"
    with pytest.raises(Exception, match="not base64") as caught:
        await resolver.resolve("{vault://env/not-b64?base64_decode=true}")
    assert "%%%" not in str(caught.value)


async def test_missing_variable_is_not_found_and_negative_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing variable is not_found until neg_ttl passes, then it is read again."""
    clock = ManualClock()
    resolver = make_resolver(clock=clock, neg_ttl=30)
    with pytest.raises(SecretNotFound, match="environment variable LATER is not set"):
        await resolver.resolve("{vault://env/later}")
    monkeypatch.setenv("LATER", "here")
    with pytest.raises(SecretNotFound):
        await resolver.resolve("{vault://env/later}")
    clock.advance(30)
    assert (await resolver.resolve("{vault://env/later}")).value == "here"


async def test_query_ttl_overrides_for_that_reference_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """?ttl=5 makes its own cache entry, expiring after 5 s while the plain one lasts."""
    monkeypatch.setenv("ROT", "a")
    clock = ManualClock()
    resolver = make_resolver(clock=clock, ttl=300)
    await resolver.resolve("{vault://env/rot}")
    short = await resolver.resolve("{vault://env/rot?ttl=5}")
    assert short.lookup.expires_in == 5
    monkeypatch.setenv("ROT", "b")
    clock.advance(5)
    assert (await resolver.resolve("{vault://env/rot?ttl=5}")).value == "b"
    assert (await resolver.resolve("{vault://env/rot}")).value == "a"


async def test_unknown_vault_and_bad_reference() -> None:
    """Errors of the reference itself come before any backend call."""
    resolver = make_resolver()
    with pytest.raises(UnknownVault):
        await resolver.resolve("{vault://nowhere/x}")
    with pytest.raises(InvalidReference, match=r"not a reference \[nope\]"):
        await resolver.resolve("nope")


async def test_prefetch_reports_failures_per_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefetch warms what it can and names what failed, with the error."""
    monkeypatch.setenv("PRESENT", "x")
    resolver = make_resolver()
    failures = await resolver.prefetch(["{vault://env/present}", "{vault://env/absent}", "bad"])
    assert set(failures) == {"{vault://env/absent}", "bad"}
    assert failures["{vault://env/absent}"].code == "not_found"
    assert failures["bad"].code == "invalid_reference"
    assert (await resolver.resolve("{vault://env/present}")).lookup.cached


async def test_kong_ttl_zero_from_a_deck_file_is_kept_without_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decK vault with Kong's ``ttl: 0`` and ``neg_ttl: 0`` loads; its value never expires
    (``expires_in_seconds`` null), and a missing secret is asked for on every read."""
    monkeypatch.setenv("KEPT", "a")
    deck = parse_config({"_format_version": "3.0", "vaults": [
        {"prefix": "kept", "name": "env", "config": {"ttl": 0, "neg_ttl": 0}}]})  # fmt: skip
    clock = ManualClock()
    metrics = Metrics()
    resolver = make_resolver(deck.vaults, environ={}, clock=clock, metrics=metrics)
    first = await resolver.resolve("{vault://kept/kept}")
    monkeypatch.setenv("KEPT", "b")
    clock.advance(86_400 * 365)
    later = await resolver.resolve("{vault://kept/kept}")
    assert (first.value, later.value, later.to_json()["expires_in_seconds"]) == ("a", "a", None)
    for _ in range(3):
        with pytest.raises(SecretNotFound):
            await resolver.resolve("{vault://kept/nothing}")
    labels = {"vault": "kept", "backend": "env", "outcome": "not_found"}
    assert metrics.registry.get_sample_value("secret_sidecar_backend_calls_total", labels) == 3


async def test_status_shows_each_vaults_last_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """``last_refresh_at`` is the wall-clock time of the vault's newest fetch."""
    monkeypatch.setenv("ONE", "1")
    clock = ManualClock()
    resolver = make_resolver(clock=clock)
    await resolver.resolve("{vault://env/one}")
    assert resolver.status()["vaults"]["env"]["last_refresh_age_seconds"] == 0
    clock.advance(5)
    row = resolver.status()["vaults"]["env"]
    at = datetime.fromisoformat(row["last_refresh_at"])
    assert row["last_refresh_age_seconds"] == 5
    assert abs((datetime.now(UTC) - at).total_seconds() - 5) < 1


@pytest.mark.parametrize("result", [LookupResult.HIT, LookupResult.MISS, LookupResult.STALE])
@pytest.mark.parametrize(
    ("ref", "value", "version", "expires_in"),
    [
        ("{vault://env/db-password}", "hunter2", None, 299.9876),
        ('{vault://env/x/"k"}', 'quote " back\\slash \u00e9 \u2028', "7", -3.5),
        ("{vault://env/x?ttl=0}", "never expires", None, NEVER),
        ("{vault://env/lone-\udc80}", "v", "123456789012345678901234567890", 0.0004),
    ],
)
def test_encoded_answer_is_the_json_answer(
    result: LookupResult, ref: str, value: str, version: str | None, expires_in: float
) -> None:
    """The hot path's bytes (fields memoized per value and reference) say exactly what
    ``to_json`` says, for every state, on the first read and on later ones with new
    times; the memo never changes the times of a later read."""
    fetched = Fetched(value, version)
    for age in (0.0, 12.3456, 0.1):
        answer = Answer(ref, value, version, Lookup(fetched, result, age, expires_in - age))
        assert json.loads(answer.encode()) == answer.to_json()
    assert list(fetched.answers) == [ref]


async def test_a_refresh_burst_leaves_the_loop_to_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """10 000 keys refreshed at once run as a bounded pool (``MAX_LOADS`` in flight), so
    the loop gets back to other work (reads, the socket) between a few dozen loads; a
    task per key ran all of them in a handful of loop passes."""
    for i in range(10_000):
        monkeypatch.setenv(f"BURST_{i}", f"v{i}")
    resolver = make_resolver()
    assert await resolver.prefetch([f"{{vault://env/burst-{i}}}" for i in range(10_000)]) == {}
    burst = asyncio.create_task(resolver.refresh_all())
    passes = 0
    while not burst.done():
        await asyncio.sleep(0)
        passes += 1
    assert burst.result() == {"ok": 10_000}
    assert passes >= 100  # the pool of 64: 156 and more; a task per key: 10
