"""One harness over every backend's test peer, so a contract test runs against all of them.

Kong drives each vault backend through the same steps (create, update, pause) so its
TTL and resurrect tests cover all of them; ``Peer`` is that harness here. Each peer
speaks its backend's real protocol: the process environment (env), moto behind the
fault-injecting proxy (aws), the Vault-API server on its own thread (hcv) and the
in-process gRPC Secret Manager (gcp). Peers differ in what they can do, and say so
with capability flags rather than by failing: env has no versions and cannot fail
transiently, and Vault stores maps, not strings.

The canaries (``tests.canary``) are planted in each peer's credentials (moto's keys,
the Vault tokens), and contract tests store canary values; ``raises_clean`` is
``pytest.raises`` that also checks the error's text, repr and chain for them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import grpc
import pytest

from sidecar.backends.env import variable_name
from sidecar.config import VaultEntity
from tests.backends.aws_peer import (
    REGION,
    MotoProxy,
    aws_client,
    isolate_process_environment,
    moto_reset,
)
from tests.backends.gcp_server import FakeSecretManager
from tests.backends.vault_server import FakeVault, Token
from tests.canary import assert_exception_clean

E = TypeVar("E", bound=BaseException)

REQUEST_TIMEOUT = 2.0  # seconds, per backend request: a hung peer fails fast
VAULT_VARIABLES = ("VAULT_TOKEN", "VAULT_ADDR", "VAULT_NAMESPACE", "VAULT_CACERT",
                   "VAULT_CAPATH", "VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY")  # fmt: skip
GOOGLE_VARIABLES = ("GCP_PROJECT_ID", "SECRET_MANAGER_EMULATOR_HOST",
                    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")  # fmt: skip


@contextmanager
def raises_clean(
    expected: type[E] | tuple[type[E], ...], *, match: str | None = None
) -> Iterator[pytest.ExceptionInfo[E]]:
    """``pytest.raises``, and then no canary value or credential in the exception's
    ``str``, ``repr`` or chained causes (what a caller or a traceback would show)."""
    __tracebackhide__ = True
    with pytest.raises(expected, match=match) as caught:
        yield caught
    assert_exception_clean(caught.value)


class Peer(Protocol):
    """A backend's test peer: what a contract test may do to the secrets it serves."""

    name: str  # the backend name (Kong's vault ``name``)
    can_pause: bool  # pause()/resume() make the backend fail transiently
    versioned: bool  # answers carry the backend's version label
    plain_key: str | None  # the key a plain value is stored under (a map-only store)

    def entity(self, prefix: str) -> VaultEntity:
        """The vault entity whose config points at this peer."""

    async def create(self, secret_id: str, value: str) -> None:
        """A new secret; a value that is a JSON object is stored as such."""

    async def update(self, secret_id: str, value: str) -> None:
        """A new version, which becomes the current one."""

    async def delete(self, secret_id: str) -> None:
        """The secret (its current version) is gone: reads are not found."""

    async def pause(self) -> None:
        """Every request fails transiently until ``resume``."""

    async def refuse(self, how: str) -> None:
        """Every read fails as one of ``REFUSALS`` until ``resume``: our identity denied,
        a request the backend calls malformed, our own credentials expired."""

    async def resume(self) -> None: ...


# How a peer can refuse reads (``Peer.refuse``); env can do none of them.
REFUSALS = ("denied", "misconfigured", "expired")


class EnvPeer:
    """Variables of this process (the env backend reads ``os.environ``), via monkeypatch."""

    name = "env"
    can_pause = False  # an environment cannot be unavailable
    versioned = False
    plain_key: str | None = None
    VARIABLE_PREFIX = "SIDECAR_CONTRACT_"

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch

    def entity(self, prefix: str) -> VaultEntity:
        return VaultEntity(prefix=prefix, name="env", config={"prefix": self.VARIABLE_PREFIX})

    def variable(self, secret_id: str) -> str:
        return variable_name(secret_id, None, self.VARIABLE_PREFIX)

    async def create(self, secret_id: str, value: str) -> None:
        self._monkeypatch.setenv(self.variable(secret_id), value)

    async def update(self, secret_id: str, value: str) -> None:
        self._monkeypatch.setenv(self.variable(secret_id), value)

    async def delete(self, secret_id: str) -> None:
        self._monkeypatch.delenv(self.variable(secret_id))

    async def pause(self) -> None:
        raise NotImplementedError("the env backend cannot fail transiently")

    async def refuse(self, how: str) -> None:
        raise NotImplementedError("the environment refuses nobody")

    async def resume(self) -> None:
        raise NotImplementedError("the env backend cannot fail transiently")


class AwsPeer:
    """Secrets Manager (moto); the backend goes through ``MotoProxy``, seeding does not."""

    name = "aws"
    can_pause = True
    versioned = True  # VersionId
    plain_key: str | None = None

    def __init__(self, proxy: MotoProxy, sm: Any) -> None:
        self.proxy = proxy
        self._sm = sm

    def entity(self, prefix: str) -> VaultEntity:
        config = {"endpoint_url": self.proxy.url, "region": REGION,
                  "connect_timeout": REQUEST_TIMEOUT, "read_timeout": REQUEST_TIMEOUT}  # fmt: skip
        return VaultEntity(prefix=prefix, name="aws", config=config)

    async def create(self, secret_id: str, value: str) -> None:
        await self._sm.create_secret(Name=secret_id, SecretString=value)

    async def update(self, secret_id: str, value: str) -> None:
        await self._sm.put_secret_value(SecretId=secret_id, SecretString=value)

    async def delete(self, secret_id: str) -> None:
        await self._sm.delete_secret(SecretId=secret_id, ForceDeleteWithoutRecovery=True)

    REFUSED: ClassVar[dict[str, str]] = {
        "denied": "AccessDeniedException",
        "misconfigured": "ValidationException",
        "expired": "ExpiredTokenException",
    }

    async def pause(self) -> None:
        self.proxy.fail("ThrottlingException")  # every call, until healed

    async def refuse(self, how: str) -> None:
        self.proxy.fail(self.REFUSED[how])

    async def resume(self) -> None:
        self.proxy.heal()


class HcvPeer:
    """A KV v2 mount of the Vault-API server; a secret is a map, as in Vault."""

    name = "hcv"
    can_pause = True  # sealed: 503 on every request
    versioned = True  # KV v2 version numbers
    MOUNT = "kv"
    PLAIN_KEY = "value"  # Kong reads a key out of the map: a plain value gets this one
    plain_key: str | None = PLAIN_KEY

    def __init__(self, server: FakeVault, token: str) -> None:
        self.server = server
        self._token = token
        self._saved: Token | None = None

    def entity(self, prefix: str) -> VaultEntity:
        config = {"port": self.server.port, "token": self._token, "mount": self.MOUNT,
                  "kv": "v2", "timeout": REQUEST_TIMEOUT}  # fmt: skip
        return VaultEntity(prefix=prefix, name="hcv", config=config)

    def _data(self, value: str) -> dict[str, Any]:
        try:
            document = json.loads(value)
        except ValueError:
            document = None
        return document if isinstance(document, dict) else {self.PLAIN_KEY: value}

    async def create(self, secret_id: str, value: str) -> None:
        self.server.put(self.MOUNT, secret_id, self._data(value))

    async def update(self, secret_id: str, value: str) -> None:
        self.server.put(self.MOUNT, secret_id, self._data(value))

    async def delete(self, secret_id: str) -> None:
        """``vault kv delete``: the latest version is soft-deleted, reads get 404."""
        latest = len(self.server.mounts[("", self.MOUNT)].v2[secret_id])
        self.server.delete_version(self.MOUNT, secret_id, latest)

    async def pause(self) -> None:
        self.server.sealed = True

    async def refuse(self, how: str) -> None:
        """denied: the token's policy no longer covers the path (the token still works);
        misconfigured: 400 to every request; expired: the token is revoked."""
        token = self.server.tokens[self._token]
        self._saved = replace(token)
        if how == "denied":
            token.policies = ()
        elif how == "misconfigured":
            self.server.failing = 400
        else:
            self.server.revoke(self._token)

    async def resume(self) -> None:
        self.server.sealed = False
        self.server.failing = None
        if self._saved is not None:
            self.server.tokens[self._token] = self._saved


class GcpPeer:
    """Secret Manager over gRPC, reached as an emulator (plaintext, no credentials)."""

    name = "gcp"
    can_pause = True  # UNAVAILABLE on every call
    versioned = True  # version numbers
    plain_key: str | None = None
    PROJECT = "p1"

    def __init__(self, fake: FakeSecretManager) -> None:
        self.fake = fake

    def entity(self, prefix: str) -> VaultEntity:
        config = {"emulator_host": self.fake.target, "project_id": self.PROJECT,
                  "timeout": REQUEST_TIMEOUT}  # fmt: skip
        return VaultEntity(prefix=prefix, name="gcp", config=config)

    async def create(self, secret_id: str, value: str) -> None:
        assert self.fake.parent(self.PROJECT, secret_id) not in self.fake.secrets
        self.fake.add(self.PROJECT, secret_id, value)

    async def update(self, secret_id: str, value: str) -> None:
        self.fake.add(self.PROJECT, secret_id, value)

    async def delete(self, secret_id: str) -> None:
        del self.fake.secrets[self.fake.parent(self.PROJECT, secret_id)]

    REFUSED: ClassVar[dict[str, grpc.StatusCode]] = {
               "denied": grpc.StatusCode.PERMISSION_DENIED,
               "misconfigured": grpc.StatusCode.INVALID_ARGUMENT,
               "expired": grpc.StatusCode.UNAUTHENTICATED}  # fmt: skip

    async def pause(self) -> None:
        self.fake.fail_always(grpc.StatusCode.UNAVAILABLE)

    async def refuse(self, how: str) -> None:
        self.fake.fail_always(self.REFUSED[how])

    async def resume(self) -> None:
        self.fake.fail_always(None)


@asynccontextmanager
async def _env(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Peer]:
    yield EnvPeer(monkeypatch)


@asynccontextmanager
async def _aws(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: str
) -> AsyncIterator[Peer]:
    """A clean moto behind a fresh proxy; the credential chain sees fake keys only."""
    isolate_process_environment(monkeypatch, str(tmp_path))
    await moto_reset(moto_url)
    proxy = await MotoProxy(moto_url).start()
    try:
        async with aws_client(moto_url, "secretsmanager") as sm:
            yield AwsPeer(proxy, sm)
    finally:
        await proxy.stop()


@asynccontextmanager
async def _hcv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Peer]:
    """No VAULT_* variable or ~/.vault-token leaks in; the root token never expires."""
    for variable in VAULT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    server = FakeVault()
    server.enable_kv(HcvPeer.MOUNT, "v2")
    await asyncio.to_thread(server.start)
    try:
        yield HcvPeer(server, server.create_token())
    finally:
        await asyncio.to_thread(server.stop)


@asynccontextmanager
async def _gcp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Peer]:
    """Started in the test's own loop: grpc.aio servers belong to one loop."""
    for variable in GOOGLE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    fake = FakeSecretManager()
    await fake.start()
    try:
        yield GcpPeer(fake)
    finally:
        await fake.stop()


BACKENDS = ("env", "aws", "hcv", "gcp")


def start_peer(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_url: Callable[[], str]
) -> AbstractAsyncContextManager[Peer]:
    """The peer for backend ``name``; ``moto_url`` is asked only by aws (moto starts lazily)."""
    if name == "env":
        return _env(monkeypatch)
    if name == "aws":
        return _aws(monkeypatch, tmp_path, moto_url())
    if name == "hcv":
        return _hcv(monkeypatch, tmp_path)
    if name == "gcp":
        return _gcp(monkeypatch)
    raise ValueError(f"no test peer for backend {name!r}")
