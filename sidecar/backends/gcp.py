"""Kong's ``gcp`` vault: GCP Secret Manager through the library's async gRPC client.

One attempt per fetch (``retry=None``): the library's default retry would wait up
to 60 s on UNAVAILABLE, while the resolver already retries transient failures
with backoff inside its own deadline.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import google.auth
import google_crc32c
import grpc
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exc
from google.auth.credentials import Credentials
from google.cloud.secretmanager_v1 import SecretManagerServiceAsyncClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcAsyncIOTransport,
)
from google.cloud.secretmanager_v1.types import AccessSecretVersionResponse
from pydantic import Field

from sidecar.backends.base import BackendKind, Fetched, VaultSettings
from sidecar.errors import (
    AccessDenied,
    BackendError,
    BackendFailure,
    BackendTimeout,
    BackendUnavailable,
    CredentialsExpired,
    InvalidReference,
    SecretNotFound,
    Unrecognised,
)

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
DEFAULT_ENDPOINT = "secretmanager.googleapis.com"
EMULATOR_ENV = "SECRET_MANAGER_EMULATOR_HOST"
PROJECT_ENV = "GCP_PROJECT_ID"
_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")

# Worth another attempt: the service (or the path to it) is down, busy or flaky.
_TRANSIENT = frozenset(
    {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "ABORTED", "UNKNOWN", "CANCELLED"}
)
# What we asked is malformed (a bad name, an unsupported call): asking again will not help.
_REFUSED = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "UNIMPLEMENTED", "ALREADY_EXISTS"})


class GcpSettings(VaultSettings):
    """Kong's ``project_id`` plus what a sidecar outside Kong needs to reach the API."""

    # A file the sidecar reads: never named by a reference.
    operator_only: ClassVar[frozenset[str]] = frozenset({"credentials_file"})

    project_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.:_-]*$")
    location: str | None = Field(default=None, pattern=r"^[a-z0-9-]+$")
    endpoint: str | None = None
    emulator_host: str | None = None
    credentials_file: str | None = None
    timeout: float = Field(default=5.0, gt=0)  # per attempt; the resolver bounds the total

    @classmethod
    def check_entity(cls, config: Mapping[str, Any]) -> None:
        """Kong's gcp schema requires ``project_id`` on a vault entity.

        ``GCP_PROJECT_ID`` and the credentials' project still serve the backend used
        directly (``{vault://gcp/...}``), as Kong's ``GCP_PROJECT_ID`` does.
        """
        if config.get("project_id") is None:
            raise ValueError(
                "project_id is required for a gcp vault (Kong's schema requires it; GCP_PROJECT_ID"
                " and the credentials' project apply only to {vault://gcp/...} used directly)"
            )


def check(secret_id: str, version: int | None, settings: GcpSettings) -> None:
    """GCP's rules on secret ids and version numbers, before any cache entry or call."""
    if not _SECRET_ID.fullmatch(secret_id):
        raise InvalidReference(
            "not a GCP secret id: letters, digits, '-' and '_' only, 1 to 255 of them"
            " (a '/' in the path makes all but the last segment the secret id)"
        )
    if version is not None and version < 1:
        raise InvalidReference("GCP secret versions are numbered from 1 (#1, #2, ...)")


@dataclass(frozen=True, slots=True)
class _Connection:
    client: SecretManagerServiceAsyncClient
    project: str | None  # the credentials' own project (ADC or key file), if any


ConnectionKey = tuple[str, bool, str | None]  # (endpoint, plaintext emulator?, credentials_file)


def version_name(project: str, location: str | None, secret_id: str, version: int | None) -> str:
    """No version is ``latest``; ``#n`` is version ``n``, as Kong maps it."""
    parent = f"projects/{project}" + (f"/locations/{location}" if location else "")
    return f"{parent}/secrets/{secret_id}/versions/{'latest' if version is None else version}"


def payload_text(data: bytes) -> str:
    """UTF-8 text as is; other bytes as base64 so a binary secret survives a text API."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii")


def map_error(exc: Exception, what: str) -> BackendFailure:
    """The one place gRPC/auth errors become ours. Server text is left out on purpose."""
    if isinstance(exc, auth_exc.RefreshError) and exc.retryable:
        return BackendUnavailable(f"{what}: Google access token refresh failed, retryable")
    if isinstance(exc, auth_exc.RefreshError):
        return AccessDenied(f"{what}: could not obtain a Google access token")
    if isinstance(exc, auth_exc.TransportError):
        return BackendUnavailable(f"{what}: Google auth endpoint unreachable")
    if isinstance(exc, gexc.GoogleAPICallError):
        status = exc.grpc_status_code
        code = status.name if status is not None else str(exc.code)
    elif isinstance(exc, grpc.RpcError):
        code = exc.code().name
    else:
        return Unrecognised.of(exc, what)
    if code == "NOT_FOUND":
        return SecretNotFound(f"{what}: not found")
    if code == "UNAUTHENTICATED":
        return CredentialsExpired(f"{what}: our Google credentials were rejected ({code})")
    if code == "PERMISSION_DENIED":
        return AccessDenied(f"{what}: permission denied ({code})")
    if code == "FAILED_PRECONDITION":
        return SecretNotFound(f"{what}: version is disabled or destroyed")
    if code == "DEADLINE_EXCEEDED":
        return BackendTimeout(f"{what}: no answer within the request timeout")
    if code in _TRANSIENT or isinstance(exc, gexc.ServerError):
        return BackendUnavailable(f"{what}: Secret Manager unavailable ({code})")
    if code in _REFUSED:
        return BackendError(f"{what}: request refused ({code})")
    return Unrecognised(f"{what}: unrecognised error ({code})", f"grpc:{code}")


def _load_credentials(credentials_file: str | None) -> tuple[Credentials, str | None]:
    """Blocking (file read, metadata-server probe): run in a thread."""
    if credentials_file:
        creds, project = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call]
            credentials_file, scopes=SCOPES
        )
    else:
        creds, project = google.auth.default(scopes=SCOPES)
    return creds, project


class GcpBackend:
    """One client per (endpoint, credentials), made on first use inside the running loop."""

    def __init__(self, vault: str, environ: Mapping[str, str] | None = None) -> None:
        self._vault = vault
        self._environ = os.environ if environ is None else environ
        self._connections: dict[ConnectionKey, _Connection] = {}
        self._replaced: list[_Connection] = []  # after expired credentials; closed at close
        self._lock = asyncio.Lock()

    async def start(self, settings: GcpSettings) -> None:
        """Nothing to open yet: endpoint and credentials may differ per reference."""

    def connection_key(self, settings: GcpSettings) -> ConnectionKey:
        """Emulator (config, then env) beats ``endpoint``, which beats the regional default."""
        emulator = settings.emulator_host or self._environ.get(EMULATOR_ENV)
        if emulator:
            return (emulator.removeprefix("http://"), True, None)
        if settings.endpoint:
            return (settings.endpoint, False, settings.credentials_file)
        if settings.location:
            return (f"secretmanager.{settings.location}.rep.googleapis.com", False,
                    settings.credentials_file)  # fmt: skip
        return (DEFAULT_ENDPOINT, False, settings.credentials_file)

    async def _connection(self, settings: GcpSettings) -> _Connection:
        key = self.connection_key(settings)
        async with self._lock:
            connection = self._connections.get(key)
            if connection is None:
                connection = await self._connect(*key)
                self._connections[key] = connection
            return connection

    async def _connect(
        self, endpoint: str, plaintext: bool, credentials_file: str | None
    ) -> _Connection:
        if plaintext:  # an emulator: no TLS, no credentials, no ADC project
            channel = grpc.aio.insecure_channel(endpoint)
            transport = SecretManagerServiceGrpcAsyncIOTransport(host=endpoint, channel=channel)
            return _Connection(SecretManagerServiceAsyncClient(transport=transport), None)
        try:
            creds, project = await asyncio.to_thread(_load_credentials, credentials_file)
        except auth_exc.GoogleAuthError as exc:
            source = "credentials_file" if credentials_file else "Application Default Credentials"
            raise BackendError(
                f"vault {self._vault!r}: no usable Google credentials from {source}"
                f" ({type(exc).__name__})"
            ) from None
        client = SecretManagerServiceAsyncClient(
            credentials=creds, client_options=ClientOptions(api_endpoint=endpoint)
        )
        return _Connection(client, project)

    async def client_for(
        self, settings: GcpSettings
    ) -> tuple[SecretManagerServiceAsyncClient, str]:
        """The client and project a fetch uses: project_id, else GCP_PROJECT_ID, else ADC's."""
        connection = await self._connection(settings)
        project = settings.project_id or self._environ.get(PROJECT_ENV) or connection.project
        if not project:
            raise BackendError(
                f"vault {self._vault!r}: no GCP project; set project_id in the vault config"
                f" or the reference query, or {PROJECT_ENV}"
            )
        return connection.client, project

    async def fetch(self, secret_id: str, version: int | None, settings: GcpSettings) -> Fetched:
        if not _SECRET_ID.fullmatch(secret_id):
            raise BackendError(
                f"{secret_id!r} is not a GCP secret id (letters, digits, '-' and '_', max 255)"
            )
        client, project = await self.client_for(settings)
        name = version_name(project, settings.location, secret_id, version)
        try:
            response = await client.access_secret_version(
                name=name, retry=None, timeout=settings.timeout
            )
        except (gexc.GoogleAPICallError, grpc.RpcError, auth_exc.GoogleAuthError) as exc:
            failure = map_error(exc, f"secret {name}")
            if isinstance(failure, CredentialsExpired):
                self._forget(settings)
            raise failure from None
        return self._fetched(response, name)

    def _forget(self, settings: GcpSettings) -> None:
        """The next call opens a new client, loading the credentials again (a rotated key
        file, new workload identity); the old one is closed at ``close``."""
        connection = self._connections.pop(self.connection_key(settings), None)
        if connection is not None:
            self._replaced.append(connection)

    @staticmethod
    def _fetched(response: AccessSecretVersionResponse, name: str) -> Fetched:
        payload = response.payload
        if "data_crc32c" in payload and google_crc32c.value(payload.data) != payload.data_crc32c:
            # Corrupted in transit or at rest: another read may well be intact.
            raise BackendUnavailable(f"secret {name}: payload checksum (crc32c) mismatch")
        label = (response.name or name).rsplit("/", 1)[-1]
        return Fetched(payload_text(payload.data), label if label != "latest" else None)

    async def close(self) -> None:
        connections = [*self._connections.values(), *self._replaced]
        self._connections, self._replaced = {}, []
        for connection in connections:
            try:
                await connection.client.transport.close()  # type: ignore[no-untyped-call]
            except Exception:  # noqa: S112 - every channel must get its close
                continue


KIND = BackendKind(name="gcp", settings=GcpSettings, create=GcpBackend, check=check)
