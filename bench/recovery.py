"""How long after an outage ends readers get the value back, in real time.

A reference that was never cached (nothing to serve stale) against the Vault-API test
server, sealed (503) for ``--outage`` seconds so the retry backoff grows towards
``max_backoff``; readers poll every 50 ms. Reports the seconds from unsealing to the
first 200, and the backoff that would otherwise have had to run out.

    .venv/bin/python -m bench.recovery --outage 40 --max-backoff 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from sidecar import logging as sidecar_logging
from sidecar.config import VaultEntity
from sidecar.errors import BackendFailure
from sidecar.schedule import Schedule
from tests.backends.vault_server import FakeVault
from tests.support import make_resolver

POLL = 0.05


async def main(outage: float, max_backoff: float) -> None:
    sidecar_logging.configure("error")
    server = FakeVault()
    server.enable_kv("kv", "v2")
    server.put("kv", "db", {"password": "p"})
    server.start()
    try:
        config = {"port": server.port, "token": server.create_token(), "mount": "kv", "kv": "v2"}
        entity = VaultEntity(prefix="kv", name="hcv", config=config)
        resolver = make_resolver(
            (entity,),
            schedule=Schedule(max_backoff=max_backoff),
            jitter=lambda: 1.0,  # the longest backoffs: the worst case
            backend_retries=0,
        )
        resolver.cache.clock = time.monotonic
        server.sealed = True
        sealed_until = time.monotonic() + outage
        while time.monotonic() < sealed_until:
            with contextlib.suppress(BackendFailure):
                await resolver.resolve("{vault://kv/db/password}")
            await asyncio.sleep(POLL)
        entry = next(entry for _, entry in resolver.cache.items())
        held_for = max(entry.failed_until - time.monotonic(), 0.0)
        failures = entry.failures
        server.sealed = False
        unsealed = time.monotonic()
        while True:
            try:
                await resolver.resolve("{vault://kv/db/password}")
                break
            except BackendFailure:
                await asyncio.sleep(POLL)
        recovered = time.monotonic() - unsealed
        await resolver.vaults.close()
    finally:
        server.stop()
    print(
        f"outage {outage:g} s, max_backoff {max_backoff:g} s: value back {recovered:.2f} s after"
        f" the backend (the backoff had {held_for:.1f} s left; {failures} failed fetches)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=40.0)
    parser.add_argument("--max-backoff", type=float, default=60.0)
    args = parser.parse_args()
    asyncio.run(main(args.outage, args.max_backoff))
