"""Kong's ``hcv`` vault: HashiCorp Vault KV v1/v2 through hvac.

hvac is synchronous (requests), so every call runs in a small thread pool this
backend owns, never on the event loop and never in the default executor, which
the rest of the process shares. One attempt per fetch, no retries inside hvac:
the resolver retries transient failures within its own deadline. The token
lifecycle (login, renewal, re-login) lives in ``hcv_auth``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal, TypeVar

from hvac import exceptions as hvac_exc
from pydantic import Field, SecretStr, ValidationInfo, field_validator

from sidecar.backends.base import BackendKind, Fetched, VaultSettings
from sidecar.backends.hcv_auth import SDK_ERRORS, Session, map_error
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
KUBE_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path
# Fields that do not change which client (address, namespace, credentials) is used.
_NOT_CONNECTION = frozenset({"ttl", "neg_ttl", "resurrect_ttl", "base64_decode", "mount", "kv"})


class HcvSettings(VaultSettings):
    """Kong's hcv fields and defaults, plus ``token_file``, TLS files and a request timeout.

    ``auth_method`` is declared last so its validator sees the credential fields
    and can say which one is missing without echoing any of them.
    """

    # Credentials, how to log in, and files to read: never set by a reference's query.
    operator_only: ClassVar[frozenset[str]] = frozenset({
        "auth_method", "token", "token_file", "kube_role", "kube_auth_path",
        "kube_api_token_file", "approle_auth_path", "approle_role_id", "approle_secret_id",
        "approle_secret_id_file", "approle_response_wrapping", "ca_cert", "client_cert",
        "client_key",
    })  # fmt: skip

    # Kong refuses empty strings in every string field: so do we (Field(min_length=1)).
    protocol: Literal["http", "https"] = "http"
    host: str = "127.0.0.1"
    port: int = Field(default=8200, ge=1, le=65535)
    namespace: str | None = Field(default=None, min_length=1)
    mount: str = Field(default="secret", min_length=1)
    kv: Literal["v1", "v2"] = "v1"
    token: SecretStr | None = Field(default=None, min_length=1)
    token_file: str | None = Field(default=None, min_length=1)
    kube_role: str | None = Field(default=None, min_length=1)
    kube_auth_path: str = Field(default="kubernetes", min_length=1)
    kube_api_token_file: str = Field(default=KUBE_TOKEN_FILE, min_length=1)
    approle_auth_path: str = Field(default="approle", min_length=1)
    approle_role_id: SecretStr | None = Field(default=None, min_length=1)
    approle_secret_id: SecretStr | None = Field(default=None, min_length=1)
    approle_secret_id_file: str | None = Field(default=None, min_length=1)
    approle_response_wrapping: bool = False
    ca_cert: str | None = Field(default=None, min_length=1)
    client_cert: str | None = Field(default=None, min_length=1)
    client_key: str | None = Field(default=None, min_length=1)
    timeout: float = Field(default=5.0, gt=0)  # per request (connect, read); resolver bounds all
    auth_method: Literal["token", "approle", "kubernetes"] = Field(
        default="token", validate_default=True
    )

    @field_validator("host")
    @classmethod
    def _kong_host(cls, host: str) -> str:
        return kong_host(host)

    @field_validator("auth_method")
    @classmethod
    def _credentials_present(cls, method: str, info: ValidationInfo) -> str:
        """Kong's rules: what each auth method needs before anything is sent."""
        data = info.data
        if method == "token" and not (data.get("token") or data.get("token_file")):
            raise ValueError("token auth needs token or token_file (or KONG_VAULT_HCV_TOKEN)")
        if method == "approle" and not data.get("approle_role_id"):
            raise ValueError("approle auth needs approle_role_id")
        if method == "approle" and not (
            data.get("approle_secret_id") or data.get("approle_secret_id_file")
        ):
            raise ValueError("approle auth needs approle_secret_id or approle_secret_id_file")
        if method == "kubernetes" and not data.get("kube_role"):
            raise ValueError("kubernetes auth needs kube_role")
        if bool(data.get("client_cert")) != bool(data.get("client_key")):
            raise ValueError("client_cert and client_key go together")
        return method

    @classmethod
    def check_entity(cls, config: Mapping[str, Any]) -> None:
        """Kong's entity check: a kubernetes vault carries no token of its own."""
        if config.get("auth_method") == "kubernetes" and config.get("token") is not None:
            raise ValueError(
                "token must not be set when auth_method is kubernetes (Kong refuses it;"
                " the token comes from the Kubernetes login)"
            )


def kong_host(host: str) -> str:
    """Kong's ``typedefs.host``: a host name, an IPv4 or an IPv6 address, with no port.

    A bare IPv6 address comes back in brackets, as a URL needs it.
    """
    allowed = "must be a host name or an IP address, without scheme, port or path"
    if host.count(":") > 1:  # IPv6, bracketed or not
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise ValueError(allowed) from None
        return f"[{bare}]"
    if ":" in host:
        raise ValueError(allowed)
    if re.fullmatch(r"[\d.]+", host):  # IPv4 (leading zeros allowed, as in Kong)
        parts = host.split(".")
        if len(parts) != 4 or not all(re.fullmatch(r"\d{1,3}", p) and int(p) <= 255 for p in parts):
            raise ValueError(allowed)
        return host
    segments = host.split(".")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", host) or any(
        segment.endswith("-") or (not segment and index != len(segments) - 1)
        for index, segment in enumerate(segments)
    ):
        raise ValueError(allowed)
    return host


def check(secret_id: str, version: int | None, settings: HcvSettings) -> None:
    """KV v1 keeps one version per path: ``#n`` there is refused, not silently ignored."""
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
