"""One backend call, bounded and observed: admission, deadline, retries, metric, log line.

The only place that calls a backend. Each vault's concurrency and rate limits admit
the call; a deadline bounds it, retries included; transient failures are retried
with backoff here, so backends make single attempts; an exception a backend did not
map is an ``Unrecognised`` (transient) failure, logged once per vault and kind; every
call is one metric sample and one ``backend.call`` log line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from sidecar.backends import BatchBackend, Fetched, VaultSettings
from sidecar.cache import SecretKey
from sidecar.config import CacheConfig
from sidecar.errors import BackendError, BackendFailure, BackendTimeout, Unrecognised
from sidecar.logging import get_logger
from sidecar.metrics import Metrics
from sidecar.vaults import Vault

log = get_logger("sidecar.backend_calls")
T = TypeVar("T")


def decoded(fetched: Fetched, settings: VaultSettings) -> Fetched:
    """Apply ``base64_decode`` once, before caching, so every key reads decoded text."""
    if not settings.base64_decode:
        return fetched
    try:
        text = base64.b64decode(fetched.value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BackendError("base64_decode is set but the value is not base64 of UTF-8") from None
    return Fetched(text, fetched.version)


class BackendCalls:
    def __init__(self, defaults: CacheConfig, metrics: Metrics) -> None:
        self.defaults = defaults
        self.metrics = metrics
        self._unrecognised: set[tuple[str, str]] = set()

    async def fetch(self, vault: Vault, key: SecretKey) -> Fetched:
        """One secret, decoded as its settings say."""
        backend = vault.backend
        fetched = await self.call(
            vault,
            {"secret_id": key.secret_id, "version": key.version},
            lambda: backend.fetch(key.secret_id, key.version, key.settings),
        )
        return decoded(fetched, key.settings)

    async def fetch_many(
        self,
        vault: Vault,
        backend: BatchBackend,
        settings: VaultSettings,
        items: Sequence[tuple[str, int | None]],
    ) -> list[Fetched | BackendFailure]:
        """Several secrets of one settings in one call (results not yet decoded)."""
        about = {"secrets": len(items)}
        return await self.call(vault, about, lambda: backend.fetch_many(items, settings))

    async def call(
        self, vault: Vault, about: dict[str, Any], call: Callable[[], Awaitable[T]]
    ) -> T:
        """One backend call, admitted by the vault's concurrency and rate limits."""
        async with vault.admission(self.metrics.rate_limited.labels(vault.prefix).inc):
            return await self._attempts(vault, about, call)

    async def _attempts(
        self, vault: Vault, about: dict[str, Any], call: Callable[[], Awaitable[T]]
    ) -> T:
        """Run one backend call: retries, a deadline, one metric and one log line.

        Transient failures are retried here, with exponential backoff and full
        jitter, so backends make single attempts and retry policy lives in one place.
        """
        timeout = self.defaults.backend_timeout
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(timeout):
                await vault.ensure_started()
                result = await self._retried(call)
        except TimeoutError:
            outcome = "backend_timeout"
            raise BackendTimeout(
                f"vault {vault.prefix!r} did not answer within {timeout:g} s"
            ) from None
        except BackendFailure as exc:
            outcome = exc.code
            if isinstance(exc, Unrecognised):
                self._first_sighting(vault, exc)
            raise
        except Exception as exc:  # a backend's own bug or an SDK error it lets through
            failure = Unrecognised.of(exc, f"vault {vault.prefix!r}")
            outcome = failure.code
            self._first_sighting(vault, failure)
            raise failure from None
        finally:
            elapsed = time.perf_counter() - started
            labels = (vault.prefix, vault.backend_name, outcome)
            self.metrics.backend_calls.labels(*labels).inc()
            self.metrics.backend_duration.labels(*labels).observe(elapsed)
            log.info(
                "backend.call",
                vault=vault.prefix,
                backend=vault.backend_name,
                outcome=outcome,
                duration_ms=round(elapsed * 1000, 3),
                **about,
            )
        return result

    async def _retried(self, call: Callable[[], Awaitable[T]]) -> T:
        """The call, and after a transient failure up to ``backend_retries`` more with
        exponential backoff and full jitter (tenacity). The first attempt runs without
        tenacity: building a retry loop costs more than a cached backend call, and most
        calls succeed at once; the first retry follows immediately, later ones back off."""
        d = self.defaults
        try:
            return await call()
        except BackendFailure as exc:
            if not exc.transient or d.backend_retries == 0:
                raise
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, BackendFailure) and exc.transient),
            stop=stop_after_attempt(d.backend_retries),
            wait=wait_random_exponential(multiplier=d.retry_backoff, max=d.retry_backoff_max),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("tenacity re-raises the last failure")  # pragma: no cover

    def _first_sighting(self, vault: Vault, failure: Unrecognised) -> None:
        """One warning per vault and kind of unrecognised failure (then only the metric)."""
        if (vault.prefix, failure.kind) not in self._unrecognised:
            self._unrecognised.add((vault.prefix, failure.kind))
            log.warning("backend.unrecognised_error", vault=vault.prefix, kind=failure.kind)
