"""The ``hcv`` read path: KV v1/v2 reads through hvac, on the backend's own threads.

hvac is synchronous (requests), so every call runs in a small thread pool this
backend owns, never on the event loop and never in the default executor, which
the rest of the process shares. One attempt per fetch, no retries inside hvac:
the resolver retries transient failures within its own deadline. The token
lifecycle (login, renewal, re-login) lives in ``auth``, the settings in ``settings``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from hvac import exceptions as hvac_exc

from sidecar.backends.base import BackendKind, Fetched
from sidecar.backends.hcv.auth import SDK_ERRORS, Session, map_error
from sidecar.backends.hcv.settings import HcvSettings
from sidecar.errors import (
    AccessDenied,
    BackendError,
    CredentialsExpired,
    InvalidReference,
    SecretNotFound,
)
from sidecar.logging import get_logger

log = get_logger("sidecar.backends.hcv")
T = TypeVar("T")
WORKERS = 8
# Fields that do not change which client (address, namespace, credentials) is used.
_NOT_CONNECTION = frozenset({"ttl", "neg_ttl", "resurrect_ttl", "base64_decode", "mount", "kv"})


# Vault's secret ids are URL paths: hvac puts them in the URL as they are, the HTTP
# client removes dot segments and a ``?`` or ``#`` ends the path. Each would make the
# path read differ from the id the ACL matched (``team-a/../root`` reads ``root``).
_NOT_A_PATH = re.compile(r"(^|/)\.\.?(/|$)|[?#%\\]")


def check(secret_id: str, version: int | None, settings: HcvSettings) -> None:
    """Refuse an id whose URL path would name another secret than the id does; KV v1
    keeps one version per path: ``#n`` there is refused, not silently ignored."""
    if _NOT_A_PATH.search(secret_id):
        raise InvalidReference(
            "a Vault secret id must not have '.' or '..' segments, nor '?', '#', '%' or"
            " '\\': the URL path read would name another secret"
        )
    if version is not None and settings.kv == "v1":
        raise InvalidReference(
            f"mount {settings.mount!r} is KV v1, which has no versions: #{version} cannot"
            " be read (remove it, or set kv: v2 for a KV v2 mount)"
        )


def _read(client: Any, settings: HcvSettings, secret_id: str, version: int | None) -> Any:
    """Blocking: one GET, ``/v1/<mount>/data/<path>[?version=n]`` or ``/v1/<mount>/<path>``."""
    if settings.kv == "v2":
        return client.secrets.kv.v2.read_secret_version(
            secret_id, version=version, mount_point=settings.mount, raise_on_deleted_version=False
        )
    return client.secrets.kv.v1.read_secret(secret_id, mount_point=settings.mount)


def fetched_from(response: Any, settings: HcvSettings, what: str) -> Fetched:
    """Kong's value: the whole data map as JSON (the resolver picks a key out of it)."""
    if not isinstance(response, dict) or not isinstance(response.get("data"), dict):
        raise BackendError(f"{what}: unexpected answer from Vault")
    data: Any = response["data"]
    version = None
    if settings.kv == "v2":
        metadata = data.get("metadata") or {}
        data = data.get("data")
        if data is None or metadata.get("deletion_time") or metadata.get("destroyed"):
            raise SecretNotFound(f"{what}: version is deleted or destroyed")
        if metadata.get("version") is not None:
            version = str(metadata["version"])
    if not isinstance(data, dict):
        raise BackendError(f"{what}: secret data is not a JSON object")
    return Fetched(json.dumps(data, ensure_ascii=False, separators=(",", ":")), version)


class HcvBackend:
    """One ``Session`` per effective connection config, made on first use in the loop.

    ``clock`` and ``sleep`` drive token renewal; tests pass a manual timeline.
    """

    def __init__(
        self,
        vault: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._vault = vault
        self._clock, self._sleep = clock, sleep
        self._executor: ThreadPoolExecutor | None = None
        self._sessions: dict[tuple[tuple[str, Any], ...], Session] = {}
        self._lock = asyncio.Lock()
        # Auth outcomes by (operation, outcome): login/renew/lookup/unwrap x ok/failed/...
        self.auth_events: Counter[tuple[str, str]] = Counter()

    async def start(self, settings: HcvSettings | None = None) -> None:
        """The thread pool, and a login with the vault's own settings (so readiness means
        Vault accepted us). References that change connection settings log in on first use."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(WORKERS, thread_name_prefix=f"hcv-{self._vault}")
        if settings is not None:
            await self.session(settings)

    def _run(self, call: Callable[[], T]) -> Awaitable[T]:
        if self._executor is None:
            raise BackendError(f"vault {self._vault!r} is not started")
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _observe(self, operation: str, outcome: str) -> None:
        self.auth_events[(operation, outcome)] += 1

    def token_ttl_remaining(self) -> dict[str, float | None]:
        """Seconds left on each session's token (None: never expires), for status/metrics."""
        return {s.about: s.ttl_remaining() for s in self._sessions.values()}

    async def session(self, settings: HcvSettings) -> Session:
        key = tuple(settings.model_dump(exclude=set(_NOT_CONNECTION)).items())
        session = self._sessions.get(key)
        if session is not None:
            return session
        async with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = Session(
                    self._vault,
                    settings,
                    self._run,
                    clock=self._clock,
                    sleep=self._sleep,
                    observe=self._observe,
                )
                try:
                    await session.open()
                except BaseException:
                    session.client.adapter.close()
                    raise
                self._sessions[key] = session
            return session

    async def fetch(self, secret_id: str, version: int | None, settings: HcvSettings) -> Fetched:
        session = await self.session(settings)
        await session.check_token_file()
        what = f"secret {settings.mount}/{secret_id}"
        generation = session.generation

        def read() -> Any:
            return _read(session.client, settings, secret_id, version)

        try:
            try:
                response = await self._run(read)
            except hvac_exc.Forbidden:
                if not await self._recover(session, generation, what):
                    raise AccessDenied(f"{what}: permission denied by Vault policy") from None
                log.info("hcv.read.retry_after_login", vault=self._vault, secret_id=secret_id)
                response = await self._run(read)
        except SDK_ERRORS as exc:
            raise map_error(exc, what) from None
        return fetched_from(response, settings, what)

    @staticmethod
    async def _recover(session: Session, generation: int, what: str) -> bool:
        """A 403 with a dead token is our credentials expiring, not a denial: transient,
        so the last good values stay served while login is retried with backoff."""
        try:
            return await session.recover(generation)
        except AccessDenied as exc:
            raise CredentialsExpired(
                f"{what}: our Vault token is no longer valid and a new login failed ({exc.message})"
            ) from None

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            try:
                await session.close()
            except Exception:  # noqa: S112 - every session must get its close
                continue
        if self._executor is not None:
            # A request still running ends at its own timeout; do not block the loop on it.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


KIND = BackendKind(name="hcv", settings=HcvSettings, create=HcvBackend, check=check)
