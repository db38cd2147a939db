"""An in-process Secret Manager for tests: the real gRPC service, state in memory.

No Secret Manager emulator can be installed here, so this serves
``google.cloud.secretmanager.v1.SecretManagerService/AccessSecretVersion`` with
``grpc.aio`` and the library's own request/response types, behaving as GCP does:
``latest`` is the newest version whatever its state, a disabled or destroyed
version is FAILED_PRECONDITION, a missing one NOT_FOUND, and the routing header
the client must send is checked. Errors can be injected per status code.
"""

from __future__ import annotations

import asyncio
import enum
import re
from dataclasses import dataclass, field

import google_crc32c
import grpc
from google.cloud.secretmanager_v1.types import (
    AccessSecretVersionRequest,
    AccessSecretVersionResponse,
    SecretPayload,
)

SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"
_NAME = re.compile(r"(projects/[^/]+(?:/locations/[^/]+)?/secrets/[^/]+)/versions/([^/]+)")


class State(enum.Enum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    DESTROYED = "DESTROYED"


class Checksum(enum.Enum):
    RIGHT = "right"
    WRONG = "wrong"
    ABSENT = "absent"


@dataclass
class Version:
    data: bytes
    state: State = State.ENABLED
    checksum: Checksum = Checksum.RIGHT


@dataclass
class Call:
    """What one AccessSecretVersion request carried."""

    name: str
    time_remaining: float | None
    metadata: dict[str, str]


@dataclass
class FakeSecretManager:
    """Secrets by parent path (``projects/p[/locations/l]/secrets/s``), versions from 1."""

    secrets: dict[str, list[Version]] = field(default_factory=dict)
    denied: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)
    hang: bool = False
    _failures: list[grpc.StatusCode] = field(default_factory=list)
    _failing: grpc.StatusCode | None = None
    _server: grpc.aio.Server | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    target: str = ""

    @staticmethod
    def parent(project: str, secret_id: str, location: str | None = None) -> str:
        where = f"projects/{project}" + (f"/locations/{location}" if location else "")
        return f"{where}/secrets/{secret_id}"

    def add(
        self,
        project: str,
        secret_id: str,
        data: str | bytes,
        *,
        location: str | None = None,
        state: State = State.ENABLED,
        checksum: Checksum = Checksum.RIGHT,
    ) -> int:
        """Add a version; return its number."""
        raw = data.encode() if isinstance(data, str) else data
        versions = self.secrets.setdefault(self.parent(project, secret_id, location), [])
        versions.append(Version(raw, state, checksum))
        return len(versions)

    def set_state(self, project: str, secret_id: str, number: int, state: State) -> None:
        self.secrets[self.parent(project, secret_id)][number - 1].state = state

    def fail(self, code: grpc.StatusCode, times: int = 1) -> None:
        """Answer the next ``times`` calls with ``code``."""
        self._failures.extend([code] * times)

    def fail_always(self, code: grpc.StatusCode | None) -> None:
        """Answer every call with ``code`` until called with ``None``."""
        self._failing = code

    @property
    def names(self) -> list[str]:
        return [call.name for call in self.calls]

    async def start(self) -> str:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self._access,
            request_deserializer=AccessSecretVersionRequest.deserialize,
            response_serializer=AccessSecretVersionResponse.serialize,
        )
        methods = {"AccessSecretVersion": handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self.target = f"127.0.0.1:{port}"
        return self.target

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            await self._server.stop(None)

    async def _access(
        self, request: AccessSecretVersionRequest, context: grpc.aio.ServicerContext
    ) -> AccessSecretVersionResponse:
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        self.calls.append(Call(request.name, context.time_remaining(), metadata))
        if self.hang:
            await self._release.wait()
        code = self._failures.pop(0) if self._failures else self._failing
        if code is not None:
            await context.abort(code, f"injected {code.name}")
        if metadata.get("x-goog-request-params") != f"name={request.name}":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing routing header")
        match = _NAME.fullmatch(request.name)
        if match is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid resource name")
        assert match is not None
        parent, wanted = match.groups()
        if parent in self.denied:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "Permission denied")
        versions = self.secrets.get(parent)
        if not versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Secret [{parent}] not found")
        assert versions
        if wanted == "latest":
            number = len(versions)
        elif wanted.isdigit() and int(wanted) > 0:
            number = int(wanted)
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid version id")
        name = f"{parent}/versions/{number}"
        if number > len(versions):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Secret Version [{name}] not found")
        version = versions[number - 1]
        if version.state is not State.ENABLED:
            message = f"Secret Version [{name}] is in {version.state.value} state."
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        payload = SecretPayload(data=version.data)
        if version.checksum is not Checksum.ABSENT:
            crc = google_crc32c.value(version.data)
            payload.data_crc32c = crc if version.checksum is Checksum.RIGHT else crc ^ 1
        return AccessSecretVersionResponse(name=name, payload=payload)
