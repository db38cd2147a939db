"""The ``hcv`` backend's clients and token lifecycle: login, renewal, re-login.

Split from the read path (``backend``) so it stays small; imports point one way:
backend -> auth -> settings. One ``Session`` per effective
(address, namespace, auth, TLS) config holds one authenticated hvac client. Its
token is renewed at about two thirds of its TTL by a task the session owns; a
failed renewal, a token near its max TTL or a 403 on a read with a dead token
lead to a new login. hvac is synchronous: every call goes through ``run``, the
backend's own thread pool.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import hvac
import requests
from hvac import exceptions as hvac_exc
from requests.adapters import HTTPAdapter

from sidecar.backends.hcv.settings import HcvSettings
from sidecar.errors import (
    AccessDenied,
    BackendError,
    BackendFailure,
    BackendTimeout,
    BackendUnavailable,
    SecretNotFound,
    Unrecognised,
)
from sidecar.logging import get_logger

log = get_logger("sidecar.backends.hcv")
T = TypeVar("T")
RENEW_AT = 2 / 3  # of the token's TTL, as Vault Agent does
MAX_NAP = 300.0  # wake up at least this often, so a changed token is looked at in time
MAX_BACKOFF = 60.0  # between failed renewal/login attempts
LOGIN_METHODS = frozenset({"approle", "kubernetes"})


class Run(Protocol):
    """Runs a blocking call in the backend's thread pool."""

    def __call__(self, call: Callable[[], T]) -> Awaitable[T]: ...


Observe = Callable[[str, str], None]  # (operation, outcome), for logs and counters


def map_error(exc: Exception, what: str, *, login: bool = False) -> BackendFailure:
    """The one place hvac/requests errors become ours. Vault's own text is left out."""
    if isinstance(exc, hvac_exc.InvalidPath):
        return SecretNotFound(f"{what}: not found")
    if isinstance(exc, hvac_exc.Forbidden | hvac_exc.Unauthorized):
        return AccessDenied(f"{what}: permission denied")
    if isinstance(exc, hvac_exc.InvalidRequest):
        if login:  # Vault answers 400 to a wrong role id or secret id
            return AccessDenied(f"{what}: credentials rejected")
        return BackendError(f"{what}: request refused (400)")
    if isinstance(exc, hvac_exc.RateLimitExceeded):
        return BackendUnavailable(f"{what}: rate limited by Vault (429)")
    if isinstance(exc, hvac_exc.VaultDown):
        return BackendUnavailable(f"{what}: Vault is sealed or unavailable (503)")
    if isinstance(
        exc, hvac_exc.InternalServerError | hvac_exc.BadGateway | hvac_exc.VaultNotInitialized
    ):
        return BackendUnavailable(f"{what}: Vault server error ({type(exc).__name__})")
    if isinstance(exc, hvac_exc.VaultError):
        return Unrecognised.of(exc, what)
    if isinstance(exc, ResponseTooLarge):
        return BackendError(f"{what}: answer larger than {MAX_RESPONSE} bytes")
    if isinstance(exc, requests.exceptions.Timeout):
        return BackendTimeout(f"{what}: no answer within the request timeout")
    if isinstance(exc, requests.exceptions.SSLError):
        return BackendError(f"{what}: TLS handshake failed (check ca_cert/client_cert)")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return BackendUnavailable(f"{what}: cannot connect to Vault")
    if isinstance(exc, requests.exceptions.RequestException):  # an OSError too: test it first
        return BackendUnavailable(f"{what}: broken answer ({type(exc).__name__})")
    if isinstance(exc, OSError):
        return BackendError(f"{what}: cannot read {exc.filename or 'a file'} ({exc.strerror})")
    return Unrecognised.of(exc, what)


SDK_ERRORS = (hvac_exc.VaultError, requests.exceptions.RequestException, OSError, KeyError)
MAX_RESPONSE = 4 * 1024 * 1024  # bytes of one Vault answer; KV secrets are far smaller


class ResponseTooLarge(requests.exceptions.RequestException):
    """Vault (or whatever answers in its place) sent more than ``MAX_RESPONSE`` bytes."""


def _bounded(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    """A response hook (run before requests reads the body): read at most MAX_RESPONSE.

    requests would otherwise hold any body whole in memory, for every call in flight.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_RESPONSE:
        response.close()
        raise ResponseTooLarge(f"answer of {declared} bytes")
    body, size = [], 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE:
            response.close()
            raise ResponseTooLarge(f"answer over {MAX_RESPONSE} bytes")
        body.append(chunk)
    response._content = b"".join(body)  # what .content would have read, now bounded
    return response


def make_client(settings: HcvSettings, token: str, session: requests.Session | None) -> Any:
    """An hvac client that reads no VAULT_* environment and never retries.

    ``token=""`` and ``cert=False`` stop hvac from picking up ``VAULT_TOKEN``,
    ``~/.vault-token`` or ``VAULT_CLIENT_CERT``; the resolver owns retries.
    """
    if session is None:
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=0, pool_maxsize=16)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.hooks["response"].append(_bounded)
        # hvac lets a session's verify/cert override its own arguments: set both here.
        session.verify = settings.ca_cert or True
        if settings.client_cert:
            session.cert = (settings.client_cert, settings.client_key or "")
    cert = (settings.client_cert, settings.client_key) if settings.client_cert else False
    return hvac.Client(
        url=f"{settings.protocol}://{settings.host}:{settings.port}",
        token=token,
        cert=cert,
        verify=settings.ca_cert or True,
        timeout=(settings.timeout, settings.timeout),
        session=session,
        namespace=settings.namespace or None,
    )


def _read_file(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def _file_signature(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True, slots=True)
class TokenState:
    """What Vault told us about the current token (never the token itself)."""

    ttl: float  # seconds granted at ``obtained_at``; 0: never expires
    renewable: bool
    obtained_at: float
    full_ttl: float  # what a login grants; a renewal granting less means max TTL is near
    capped: bool = False  # renewal no longer extends it: log in again instead


class Session:
    """One authenticated client; ``generation`` counts tokens, so 403s re-login once."""

    def __init__(
        self,
        vault: str,
        settings: HcvSettings,
        run: Run,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        observe: Observe,
    ) -> None:
        self.settings = settings
        self.client = make_client(settings, "", None)
        self._anon = make_client(settings, "", self.client.session)  # logins, unwrap
        self._vault, self._run, self._clock, self._sleep = vault, run, clock, sleep
        self._observe = observe
        self._lock = asyncio.Lock()
        self._token_file = settings.token_file if settings.auth_method == "token" else None
        self._file_seen: tuple[int, int, int] | None = None
        self._unwrapped: tuple[str, str] | None = None  # (wrapping token, secret id)
        self._task: asyncio.Task[None] | None = None
        self.generation = 0
        self.token: TokenState | None = None
        self.about = f"vault {vault!r} ({settings.auth_method} auth)"

    async def open(self) -> None:
        """First login, then the renewal task; a failed login leaves nothing running."""
        async with self._lock:
            await self._login()
        self._task = asyncio.create_task(self._maintain(), name=f"hcv-renew-{self._vault}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.client.adapter.close()

    def refresh_at(self) -> float:
        """When to renew or log in again: two thirds into the token's TTL."""
        token = self.token
        if token is None:
            return -math.inf
        can_login = self.settings.auth_method in LOGIN_METHODS
        if not token.ttl or (not can_login and (not token.renewable or token.capped)):
            return math.inf  # nothing to do; a static token file is checked on each fetch
        return token.obtained_at + token.ttl * RENEW_AT

    def ttl_remaining(self) -> float | None:
        token = self.token
        if token is None or not token.ttl:
            return None
        return token.obtained_at + token.ttl - self._clock()

    async def check_token_file(self) -> None:
        """Token auth from a file: a changed file (new inode, mtime or size) is read again."""
        if self._token_file is None or _file_signature(self._token_file) == self._file_seen:
            return
        async with self._lock:
            if _file_signature(self._token_file) != self._file_seen:
                await self._login()

    async def recover(self, generation: int) -> bool:
        """After a 403 on a read: True if a new token is worth one more try.

        A token that still answers ``lookup-self`` makes the 403 a policy denial, so
        no login is spent on it; a dead one is replaced, once per generation.
        """
        async with self._lock:
            if generation != self.generation:
                return True
            started = self._clock()
            try:
                data = (await self._run(self.client.auth.token.lookup_self))["data"]
            except hvac_exc.Forbidden:
                self._observe("lookup", "rejected")
            except SDK_ERRORS as exc:
                raise map_error(exc, f"{self.about}: token lookup") from None
            else:
                self._update_from_lookup(data, started)
                return False
            await self._login()
            return True

    async def _maintain(self) -> None:
        """Renew or log in again when due; after a failure, back off and try again."""
        failures = 0
        while True:
            delay = self.refresh_at() - self._clock()
            if delay > 0:
                await self._sleep(min(delay, MAX_NAP))
                continue
            try:
                async with self._lock:
                    await self._refresh()
                failures = 0
            except BackendFailure as exc:
                failures += 1
                log.warning(
                    "hcv.auth.retry",
                    vault=self._vault,
                    error=exc.message,
                    ttl_remaining=self._ttl_log(),
                )
                await self._sleep(min(MAX_BACKOFF, 2.0**failures))

    async def _refresh(self) -> None:
        token = self.token
        assert token is not None
        if token.renewable and not token.capped:
            started = self._clock()
            try:
                auth = (await self._run(self.client.auth.token.renew_self))["auth"]
            except SDK_ERRORS as exc:
                self._observe("renew", "failed")
                log.warning(
                    "hcv.auth.renew_failed",
                    vault=self._vault,
                    error=map_error(exc, self.about).message,
                )
            else:
                ttl = float(auth["lease_duration"])
                capped = ttl + 1 < token.full_ttl
                self.token = replace(
                    token,
                    ttl=ttl,
                    obtained_at=started,
                    capped=capped,
                    renewable=bool(auth["renewable"]),
                )
                self._observe("renew", "ok")
                log.info("hcv.auth.renewed", vault=self._vault, ttl_seconds=ttl, capped=capped)
                return
        if self.settings.auth_method not in LOGIN_METHODS and self.token is not None:
            self.token = replace(self.token, renewable=False)  # only a new token file helps
        await self._login()

    def _update_from_lookup(self, data: dict[str, Any], started: float) -> None:
        ttl = float(data.get("ttl") or 0)
        full = float(data.get("period") or data.get("creation_ttl") or ttl)
        self.token = TokenState(ttl, bool(data.get("renewable")), started, full)

    async def _login(self) -> None:
        """Get a new token (token auth: read it and ``lookup-self``). Caller holds the lock."""
        method = self.settings.auth_method
        started = self._clock()
        signature = _file_signature(self._token_file)
        try:
            if method == "token":
                data = await self._run(self._token_lookup)
                self._update_from_lookup(data, started)
            else:
                auth = await self._run(self._approle if method == "approle" else self._kube)
                self.client.token = auth["client_token"]
                ttl = float(auth["lease_duration"])
                self.token = TokenState(ttl, bool(auth["renewable"]), started, ttl)
        except SDK_ERRORS as exc:
            self._observe("login", "failed")
            failure = map_error(exc, f"{self.about}: login", login=method != "token")
            log.warning("hcv.auth.login_failed", vault=self._vault, error=failure.message)
            raise failure from None
        self._file_seen = signature
        self.generation += 1
        self._observe("login", "ok")
        assert self.token is not None
        log.info(
            "hcv.auth.login",
            vault=self._vault,
            method=method,
            ttl_seconds=self.token.ttl,
            renewable=self.token.renewable,
        )

    def _token_lookup(self) -> dict[str, Any]:
        """Blocking: the configured token (a file wins over ``token``), then lookup-self."""
        s = self.settings
        token = s.token.get_secret_value() if s.token is not None else ""
        self.client.token = _read_file(s.token_file) if s.token_file else token
        data: dict[str, Any] = self.client.auth.token.lookup_self()["data"]
        return data

    def _approle(self) -> dict[str, Any]:
        """Blocking: the secret id file is read at every login, unwrapped if wrapped."""
        s = self.settings
        secret_id = _read_file(s.approle_secret_id_file) if s.approle_secret_id_file else None
        if not secret_id and s.approle_secret_id is not None:
            secret_id = s.approle_secret_id.get_secret_value()
        secret_id = secret_id or ""
        if s.approle_response_wrapping:
            secret_id = self._unwrap(secret_id)
        role_id = s.approle_role_id.get_secret_value() if s.approle_role_id is not None else ""
        response = self._anon.auth.approle.login(
            role_id, secret_id, use_token=False, mount_point=s.approle_auth_path
        )
        return dict(response["auth"])

    def _unwrap(self, wrapping_token: str) -> str:
        """Wrapping tokens are single-use: keep what one unwrapped until the file changes."""
        if self._unwrapped is not None and self._unwrapped[0] == wrapping_token:
            return self._unwrapped[1]
        response = self._anon.adapter.post(
            "/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": wrapping_token}
        )
        secret_id = str(response["data"]["secret_id"])
        self._unwrapped = (wrapping_token, secret_id)
        self._observe("unwrap", "ok")
        return secret_id

    def _kube(self) -> dict[str, Any]:
        """Blocking: the projected service-account JWT is read at every login (it rotates)."""
        s = self.settings
        jwt = _read_file(s.kube_api_token_file)
        response = self._anon.auth.kubernetes.login(
            s.kube_role, jwt, use_token=False, mount_point=s.kube_auth_path
        )
        return dict(response["auth"])

    def _ttl_log(self) -> float | None:
        remaining = self.ttl_remaining()
        return None if remaining is None else round(remaining, 1)
