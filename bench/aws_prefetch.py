"""Measure: backend calls and wall time to prefetch 1000 AWS secrets against moto.

Run with ``.venv/bin/python -m bench.aws_prefetch``. Not a test:
the numbers depend on the machine. Three runs on fresh resolvers: batched through
the counting proxy, batched straight to moto (no proxy hop), and with
BatchGetSecretValue refused so every secret costs one GetSecretValue.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import Counter

from sidecar.config import VaultEntity
from tests.backends.aws_peer import MotoProxy, aws_client, isolate_environment, moto_server
from tests.support import make_resolver

SECRETS = 1000


async def seed(url: str) -> None:
    """One create at a time: moto's threaded server races concurrent creates (its secret
    store is iterated while another thread adds to it: a 500)."""
    async with aws_client(url, "secretsmanager") as client:
        for n in range(SECRETS):
            await client.create_secret(Name=f"app/secret-{n:04d}", SecretString=f"value-{n}")


async def prefetch(endpoint: str, label: str, proxy: MotoProxy | None) -> None:
    entity = VaultEntity(
        prefix="sm", name="aws", config={"endpoint_url": endpoint, "region": "us-east-1"}
    )
    resolver = make_resolver((entity,), backend_timeout=120)
    refs = [f"{{vault://sm/app/secret-{n:04d}/}}" for n in range(SECRETS)]
    before = len(proxy.calls) if proxy else 0
    started = time.perf_counter()
    failures = await resolver.prefetch(refs)
    elapsed = time.perf_counter() - started
    await resolver.vaults.close()
    resolver_calls = resolver.metrics.registry.get_sample_value(
        "secret_sidecar_backend_calls_total", {"vault": "sm", "backend": "aws", "outcome": "ok"}
    )
    api = Counter(c.operation for c in proxy.calls[before:]) if proxy else "not counted"
    print(f"{label}: {SECRETS} secrets, {len(failures)} failed, {elapsed:.3f} s wall")
    print(f"  resolver backend calls (fetch_many): {resolver_calls:g}; AWS API requests: {api}")


async def main(url: str) -> None:
    await seed(url)
    proxy = await MotoProxy(url).start()
    try:
        await prefetch(proxy.url, "batched, through the counting proxy", proxy)
        await prefetch(url, "batched, straight to moto", None)
        proxy.fail("AccessDeniedException", operation="BatchGetSecretValue")
        await prefetch(proxy.url, "batch refused, single calls, through the proxy", proxy)
    finally:
        await proxy.stop()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as home:
        isolate_environment(os.environ, home)
        with moto_server() as moto_url:
            asyncio.run(main(moto_url))
