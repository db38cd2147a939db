"""The AWS test peer: moto's server on 127.0.0.1, and a small proxy in front of it.

moto cannot throttle, hang or count calls, so every call from the backend goes
through ``MotoProxy``, which records it (operation, region, access key id, the
parameters) and can answer with an injected fault instead of forwarding it.
Seeding goes straight to moto, so it is never counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from aiohttp import web
from moto.server import ThreadedMotoServer

from tests.canary import credential

REGION = "us-east-1"
# moto takes any keys: both carry the credential canary, so a key that reaches a log line,
# an error or a scrape fails the test (tests.canary)
ACCESS_KEY = credential("AKIATESTING")
SECRET_KEY = credential("testing-secret-key")
# Variables of the standard chain that must not leak in from the machine running tests.
CHAIN_VARIABLES = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_SESSION_NAME", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_ENDPOINT_URL_STS", "AWS_CA_BUNDLE",
)  # fmt: skip
_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def isolate_environment(environ: MutableMapping[str, str], config_dir: str) -> None:
    """Fake env credentials, no profile, files or instance metadata: never real AWS."""
    for name in CHAIN_VARIABLES:
        environ.pop(name, None)
    environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    environ["AWS_CONFIG_FILE"] = os.path.join(config_dir, "aws-config")
    environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(config_dir, "aws-credentials")
    environ["AWS_EC2_METADATA_DISABLED"] = "true"


def isolate_process_environment(monkeypatch: pytest.MonkeyPatch, config_dir: str) -> None:
    """``isolate_environment`` applied to this process through ``monkeypatch`` (undone
    after the test): the backend's credential chain reads ``os.environ``."""
    for name in CHAIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    environ: dict[str, str] = {}
    isolate_environment(environ, config_dir)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's server in a thread on a free port; yields its URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


async def moto_reset(url: str) -> None:
    """Forget every secret and role, and turn IAM checks off again."""
    async with aiohttp.ClientSession() as http:
        for path, data in (("/moto-api/reset", b""), ("/moto-api/reset-auth", b"inf")):
            async with http.post(url + path, data=data) as response:
                response.raise_for_status()


async def moto_auth(url: str) -> None:
    """Turn IAM checks on: unknown access keys get 403 (until the next reset)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/moto-api/reset-auth", data=b"0") as response,
    ):
        response.raise_for_status()


@asynccontextmanager
async def aws_client(url: str, service: str, region: str = REGION) -> AsyncIterator[Any]:
    """A client straight to moto (not through the proxy), to seed and change state."""
    session = AioSession()
    async with session.create_client(
        service,
        region_name=region,
        endpoint_url=url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=AioConfig(retries={"total_max_attempts": 1, "mode": "standard"}),
    ) as client:
        yield client


@dataclass(frozen=True, slots=True)
class Call:
    """One request the backend made, as the proxy saw it."""

    operation: str
    region: str | None
    access_key: str | None
    params: dict[str, Any]


@dataclass(slots=True)
class Fault:
    """Answer ``times`` matching calls (None: all) with ``status``/``code``, or hang them."""

    code: str
    status: int = 400
    times: int | None = None
    operation: str | None = None
    hang: bool = False

    def matches(self, operation: str) -> bool:
        return (self.times is None or self.times > 0) and self.operation in (None, operation)


@dataclass
class MotoProxy:
    """A forwarding HTTP proxy to moto that counts calls and injects faults."""

    upstream: str
    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    url: str = ""
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _http: aiohttp.ClientSession | None = None

    async def start(self) -> MotoProxy:
        self._http = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    def fail(self, code: str, *, status: int = 400, times: int | None = None,
             operation: str | None = None) -> None:  # fmt: skip
        self.faults.append(Fault(code, status, times, operation))

    def hang(self, operation: str | None = None) -> None:
        """Never answer matching calls (until the proxy stops): a read timeout."""
        self.faults.append(Fault("Hang", 504, None, operation, hang=True))

    def heal(self) -> None:
        self.faults.clear()

    def count(self, operation: str) -> int:
        return sum(1 for call in self.calls if call.operation == operation)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        call = _describe(request, body)
        self.calls.append(call)
        fault = next((f for f in self.faults if f.matches(call.operation)), None)
        if fault is not None:
            if fault.times is not None:
                fault.times -= 1
            if fault.hang:
                await self._released.wait()
            return _error(fault, json_api="X-Amz-Target" in request.headers)
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._http.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            answer = await upstream.read()
            back = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            return web.Response(status=upstream.status, body=answer, headers=back)


def _error(fault: Fault, *, json_api: bool) -> web.Response:
    """The error as the protocol has it: JSON for Secrets Manager, XML for STS."""
    message = "injected by the test proxy"
    if json_api:
        body = json.dumps({"__type": fault.code, "message": message})
        kind = "application/x-amz-json-1.1"
    else:
        body = (
            "<ErrorResponse><Error><Type>Sender</Type>"
            f"<Code>{fault.code}</Code><Message>{message}</Message>"
            "</Error><RequestId>test</RequestId></ErrorResponse>"
        )
        kind = "text/xml"
    return web.Response(status=fault.status, body=body.encode(), content_type=kind)


def _describe(request: web.Request, body: bytes) -> Call:
    """Operation from X-Amz-Target (JSON APIs) or Action (STS's query API)."""
    target = request.headers.get("X-Amz-Target", "")
    if target:
        operation = target.rsplit(".", 1)[-1]
        params: dict[str, Any] = json.loads(body or b"{}")
    else:
        form = parse_qs(body.decode())
        params = {k: v[0] for k, v in form.items()}
        operation = params.get("Action", request.method)
    # "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/secretsmanager/aws4_request, ..."
    scope = request.headers.get("Authorization", "").partition("Credential=")[2].split(",")[0]
    parts = scope.split("/")
    return Call(
        operation,
        parts[2] if len(parts) > 2 else None,
        parts[0] if len(parts) > 2 else None,
        params,
    )
