"""Reload under load: a replaced vault's loads finish on it, then it closes; settings follow.

The daemon's own ``Daemon`` object (no socket) over a real hcv backend against the
Vault-API test server, whose ``hang`` switch holds requests in flight across a reload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Config, parse_config
from sidecar.errors import BackendError
from sidecar.lifecycle import Daemon
from sidecar.metrics import Metrics
from tests.backends.contract import VAULT_VARIABLES
from tests.backends.vault_server import FakeVault
from tests.canary import value


async def wait_until(check: Callable[[], object], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeVault]:
    for variable in VAULT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    server = FakeVault()
    server.enable_kv("kv", "v2")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(vault: FakeVault, token: str, **vault_fields: Any) -> Config:
    entity = {"prefix": "kv", "name": "hcv", "config": {"port": vault.port, "token": token,
              "mount": "kv", "kv": "v2", "timeout": 5}, **vault_fields}  # fmt: skip
    return parse_config({"vaults": [entity], "metrics": {"address": ""}})


async def test_loads_in_flight_finish_on_the_replaced_vault_which_closes_after(
    vault: FakeVault,
) -> None:
    """Only the vault's limits change, so old and new cache keys would be equal. One read
    is held in the backend, a second waits for the old vault's only call slot. The reload
    waits for both, they answer with values (not the old client's errors), nothing they
    bring back is cached for the new vault, and the old vault is closed after them."""
    token = vault.create_token()
    vault.put("kv", "one", {"v": value("one")})
    vault.put("kv", "two", {"v": value("two")})
    daemon = Daemon(_config(vault, token, limits={"concurrency": 1}), Metrics(), time.monotonic)
    old = daemon.state.resolver
    old_vault = old.vaults.get("kv")
    await old_vault.ensure_started()
    vault.hang = True
    first = asyncio.ensure_future(old.resolve("{vault://kv/one/v}"))
    second = asyncio.ensure_future(old.resolve("{vault://kv/two/v}"))  # waits for the slot
    await wait_until(lambda: vault.calls("kv/data/one"), what="the first read to arrive")
    reloading = asyncio.ensure_future(
        daemon.reload(lambda: _config(vault, token, limits={"concurrency": 4}))
    )
    await asyncio.sleep(0.3)
    assert not reloading.done()  # the old vault is still in use
    new_vault = daemon.state.resolver.vaults.get("kv")
    assert new_vault is not old_vault
    vault.release()
    answers = await asyncio.gather(first, second)
    assert [a.value for a in answers] == [value("one"), value("two")]
    await asyncio.wait_for(reloading, 10)
    assert len(daemon.cache) == 0  # what the old vault fetched is not the new one's
    fresh = await daemon.state.resolver.resolve("{vault://kv/two/v}")
    assert (fresh.value, fresh.lookup.cached) == (value("two"), False)
    with pytest.raises(BackendError, match="not started"):  # closed, after its loads
        await old_vault.backend.fetch("one", None, old_vault.settings)
    await daemon.close()


async def test_reload_to_refresh_off_stops_the_refresher(monkeypatch: pytest.MonkeyPatch) -> None:
    """With refresh turned off by a reload, no refresh runs and nothing is scheduled."""
    monkeypatch.setenv("APP_DB", value("db"))
    # prefetched, so pinned: never dropped as idle
    common = {
        "cache": {"ttl": 0.5},
        "metrics": {"address": ""},
        "prefetch": ["{vault://env/app-db}"],
    }
    on = parse_config(common)
    off = parse_config({**common, "refresh": {"enabled": False}})
    metrics = Metrics()
    daemon = Daemon(on, metrics, time.monotonic)
    daemon.start()

    def calls() -> float:
        labels = {"vault": "env", "backend": "env", "outcome": "ok"}
        return metrics.registry.get_sample_value("secret_sidecar_backend_calls_total", labels) or 0

    await wait_until(lambda: calls() >= 2, what="a background refresh")
    await daemon.reload(lambda: off)
    await asyncio.sleep(0.1)  # the reload's readiness pass may read it once
    settled = calls()
    await asyncio.sleep(1.2)  # more than two ttl's
    assert calls() == settled
    assert len(daemon.cache.timetable) == 0
    await daemon.reload(lambda: on)  # and back on: refreshed again
    await wait_until(lambda: calls() > settled, what="refresh after turning it back on")
    await daemon.close()
