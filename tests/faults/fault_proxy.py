"""A fault-injecting HTTP/1.1 proxy in front of a real backend peer, switchable at runtime.

The daemon under test talks to this proxy as if it were Vault or Secrets Manager. The
proxy runs on its own thread and event loop (so blocking code in the test process, or
a test's own loop, never stalls it) and reads each request itself, so the fault in
force when a request arrives decides its fate, also on a kept-alive connection:

- ``PASS``: forwarded to the upstream peer, its answer relayed unchanged;
- ``HANG``: the request is read and never answered, until the fault is switched
  off (then the connection is reset, so no late answer arrives);
- ``RESET``: the connection is closed with ``SO_LINGER`` 0 (an RST) at once;
- ``INVALID_JSON``: ``200`` whose body is not JSON;
- ``WRONG_TYPES``: ``200`` with valid JSON of the wrong shape (Vault ``{"data": "x"}``,
  AWS ``{"SecretString": 5}``);
- ``HUGE``: ``200`` with a huge body (50 MiB unless ``set`` says otherwise; unterminated
  JSON, so the client reads it whole before it can tell it is garbage);
- ``THROTTLE``: Vault's ``429``, or AWS's ``400 {"__type": "ThrottlingException"}``
  with ``Content-Type: application/x-amz-json-1.1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import socket
import struct
import threading
from collections import Counter
from collections.abc import Coroutine
from http import HTTPStatus
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp

T = TypeVar("T")
Flavour = Literal["vault", "aws"]
MiB = 1024 * 1024
HUGE_SIZE = 50 * MiB
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te"}
)
_CHUNK = b"x" * MiB


class Fault(enum.Enum):
    PASS = "pass"
    HANG = "hang"
    RESET = "reset"
    INVALID_JSON = "invalid_json"
    WRONG_TYPES = "wrong_types"
    HUGE = "huge"
    THROTTLE = "throttle"
    TRUNCATED = "truncated"  # the body ends early: no SDK maps the error it raises


class _Request:
    __slots__ = ("body", "headers", "method", "target", "version")

    def __init__(
        self, method: str, target: str, version: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        self.method, self.target, self.version = method, target, version
        self.headers, self.body = headers, body

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    @property
    def keep_alive(self) -> bool:
        connection = (self.header("Connection") or "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


class FaultProxy:
    """``FaultProxy(upstream_url, "vault"|"aws").start()``, then ``set(Fault.HANG)`` (from
    any thread) and ``set(Fault.PASS)``; ``seen`` counts requests by the fault applied."""

    def __init__(self, upstream: str, flavour: Flavour) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = f"http://{parts.hostname}:{parts.port}"
        self.flavour: Flavour = flavour
        self.huge_size = HUGE_SIZE
        self.fault = Fault.PASS
        self.seen: Counter[Fault] = Counter()  # requests handled, by the fault applied
        self.hung = 0  # requests currently held by HANG
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"fault-proxy-{flavour}", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._http: aiohttp.ClientSession | None = None
        self._release: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- control, from the test's thread ------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def set(self, fault: Fault, *, huge_size: int | None = None) -> None:
        """Apply ``fault`` to every request read from now on; leaving ``HANG`` resets
        the connections it holds. ``huge_size`` sets the ``HUGE`` body size (default
        ``HUGE_SIZE``) for this fault."""
        self._call(self._set(fault, huge_size or HUGE_SIZE))

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=30)

    # -- on the proxy's loop --------------------------------------------------------------

    async def _start(self) -> None:
        self._http = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
        )
        self._release = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            _reset(writer)
        if self._http is not None:
            await self._http.close()

    async def _set(self, fault: Fault, huge_size: int) -> None:
        self.huge_size = huge_size
        if self.fault is Fault.HANG and fault is not Fault.HANG:
            assert self._release is not None
            self._release.set()
            self._release = asyncio.Event()
        self.fault = fault

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                fault = self.fault
                self.seen[fault] += 1
                if not await self._answer(fault, request, writer) or not request.keep_alive:
                    break
            writer.close()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                aiohttp.ClientError, TimeoutError):  # fmt: skip
            _reset(writer)  # the client went away, or the upstream did: so does the client's
        finally:
            self._writers.discard(writer)

    async def _answer(self, fault: Fault, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is gone."""
        if fault is Fault.PASS:
            status, headers, body = await self._forward(request)
            await _respond(writer, status, headers, body)
        elif fault is Fault.HANG:
            assert self._release is not None
            self.hung += 1
            try:
                await self._release.wait()
            finally:
                self.hung -= 1
            _reset(writer)
            return False
        elif fault is Fault.RESET:
            _reset(writer)
            return False
        elif fault is Fault.HUGE:
            await self._huge(writer)
        elif fault is Fault.TRUNCATED:
            kind = "application/json" if self.flavour == "vault" else "application/x-amz-json-1.1"
            writer.write(_head(200, [("Content-Type", kind)], 4096) + b'{"data": {"value"')
            await writer.drain()
            writer.close()  # a FIN, 4 KiB short: requests' ChunkedEncodingError, aiohttp's
            return False  # ClientPayloadError
        else:
            status, kind, document = self._canned(fault)
            await _respond(writer, status, [("Content-Type", kind)], document)
        return True

    def _canned(self, fault: Fault) -> tuple[int, str, bytes]:
        kind = "application/json" if self.flavour == "vault" else "application/x-amz-json-1.1"
        if fault is Fault.INVALID_JSON:
            return 200, kind, b'{"data": {"value": "trunc'
        if fault is Fault.WRONG_TYPES:
            document: dict[str, Any] = (
                {"data": "x"} if self.flavour == "vault" else {"SecretString": 5}
            )
            return 200, kind, json.dumps(document).encode()
        assert fault is Fault.THROTTLE
        if self.flavour == "vault":
            return 429, kind, json.dumps({"errors": ["rate limit quota exceeded"]}).encode()
        document = {"__type": "ThrottlingException", "message": "Rate exceeded"}
        return 400, kind, json.dumps(document).encode()

    async def _huge(self, writer: asyncio.StreamWriter) -> None:
        kind = "application/json" if self.flavour == "vault" else "application/x-amz-json-1.1"
        head = b'{"data": {"value": "' if self.flavour == "vault" else b'{"SecretString": "'
        writer.write(_head(200, [("Content-Type", kind)], self.huge_size) + head)
        left = self.huge_size - len(head)
        view = memoryview(_CHUNK)
        while left > 0:
            step = min(left, len(_CHUNK))
            writer.write(view[:step])
            left -= step
            await writer.drain()

    async def _forward(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self._http is not None
        headers = [(k, v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
        async with self._http.request(
            request.method,
            self.upstream + request.target,
            headers=headers,
            data=request.body or None,
            allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            back = [(k, v) for k, v in _raw_headers(upstream) if k.lower() not in _HOP_BY_HOP]
            return upstream.status, back, body


def _raw_headers(response: aiohttp.ClientResponse) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers]


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """One request (head and Content-Length or chunked body); None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    request = _Request(method, target, version, headers, b"")
    if (request.header("Transfer-Encoding") or "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        request.body = b"".join(parts)
    else:
        request.body = await reader.readexactly(int(request.header("Content-Length") or 0))
    return request


def _head(status: int, headers: list[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(
    writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    writer.write(_head(status, headers, len(body)) + body)
    await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, not a FIN: ``SO_LINGER`` on, linger time 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
