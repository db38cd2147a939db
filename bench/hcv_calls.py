"""How many Vault calls (reads plus auth) a steady state of 100 secrets with ttl 60 makes.

Run: ``.venv/bin/python -m bench.hcv_calls``. The real resolver,
cache and hcv backend talk to the test Vault server over HTTP; one manual timeline
drives the cache, the server's token TTLs and the backend's renewal task, so ten
simulated minutes take well under a second. Each minute resolves the 100
references, then moves time on by 60 s; the server counts what it received.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from sidecar.backends.hcv import HcvBackend
from sidecar.config import LimitsConfig, VaultEntity
from sidecar.logging import configure
from tests.backends.vault_server import FakeVault, Timeline
from tests.support import make_resolver

SECRETS = 100
MINUTES = 10


async def _until(check: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("renewal task did not settle")
        await asyncio.sleep(0.001)


async def measure(name: str, auth: dict[str, Any], token_ttl: float, max_ttl: float) -> None:
    timeline = Timeline()
    vault = FakeVault(clock=timeline)
    vault.enable_kv("secret", "v2")
    for i in range(SECRETS):
        vault.put("secret", f"app/s{i}", {"password": f"p{i}"})
    vault.start()
    try:
        config: dict[str, Any] = {"port": vault.port, "mount": "secret", "kv": "v2", "ttl": 60}
        if auth.get("auth_method") == "approle":
            vault.add_approle("role-1", "sid-1", ttl=token_ttl, max_ttl=max_ttl)
        else:
            auth = {"token": vault.create_token(ttl=token_ttl, max_ttl=max_ttl)}
        entity = VaultEntity(prefix="hv", name="hcv", config={**config, **auth})
        # The default rate limit (50/s, real time) would only make the run slower.
        limits = LimitsConfig(rate=10_000, burst=1_000)
        resolver = make_resolver((entity,), clock=timeline, limits=limits)
        # The daemon's backend runs on real time; this one on the simulated minutes.
        resolver.vaults.get("hv").backend = HcvBackend("hv", clock=timeline, sleep=timeline.sleep)
        refs = [f"{{vault://hv/app/s{i}/password}}" for i in range(SECRETS)]
        per_minute: list[int] = []
        for _ in range(MINUTES):
            before = len(vault.seen)
            for result in await resolver.resolve_many(refs):
                assert not isinstance(result, Exception), result
            await _until(lambda: timeline.sleeping == 1)
            timeline.advance(60)
            await _until(lambda: timeline.sleeping == 1)
            per_minute.append(len(vault.seen) - before)
        await resolver.vaults.close()
    finally:
        vault.stop()
    kinds = Counter("read" if s.path.startswith("secret/") else s.path for s in vault.seen)
    steady = per_minute[1:]
    print(f"{name}: calls per minute {per_minute}")
    print(f"  steady state (minutes 2-{MINUTES}): {sum(steady) / len(steady):.2f} calls/min")
    print(f"  over {MINUTES} min: {dict(kinds)}")


async def main() -> None:
    configure(level="warning")  # one line per backend call would drown the numbers
    await measure("token auth, token ttl 768h (Vault default)", {}, 768 * 3600, 0)
    await measure(
        "approle, token ttl 300s, max ttl 600s",
        {"auth_method": "approle", "approle_role_id": "role-1", "approle_secret_id": "sid-1"},
        300,
        600,
    )


if __name__ == "__main__":
    asyncio.run(main())
