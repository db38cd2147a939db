"""A JSON answer written to the connection as one whole HTTP/1.1 message.

aiohttp's ``Response`` builds a header multidict, formats it, and goes through its
payload writer for every answer: about half of what a cached read costs at the
socket (the issue 10 profile; a bare aiohttp server doubles its requests per second
with this class). Our answers are small, complete JSON documents with a fixed set of
headers, so the status line and headers are formatted here into bytes and written
with the body in one ``transport.write``. aiohttp still owns the connection: parsing,
keep-alive, pipelining order, lingering on unread bodies and closing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from sidecar.json_codec import encode_json

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_FIXED = b"Server: secret-sidecar\r\nContent-Type: application/json\r\n"
_CLOSE = b"Connection: close\r\n"


class _Clock:
    """The Date header (RFC 9110 section 6.6.1: an origin server with a clock sends it),
    formatted once a second rather than per answer."""

    second = -1
    header = b""

    @classmethod
    def date(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.header = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return cls.header


class JSONMessage(web.StreamResponse):
    """``body`` is the encoded JSON document; ``headers`` (such as ``Allow``) are added
    to the fixed ones, formatted once here (``self.headers`` is not read again). The
    connection stays open when the request allows it, as with aiohttp's own responses;
    a ``Connection: close`` request gets that header back."""

    def __init__(self, body: bytes, status: int = 200, headers: Mapping[str, str] | None = None):
        super().__init__(status=status)  # headers: formatted below, never a multidict
        self.body = body
        self._extra = (
            b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
            if headers
            else b""
        )
        self._keep: bool | None = None
        self._sent = False
        self._writer: AbstractStreamWriter | None = None

    @property
    def keep_alive(self) -> bool | None:
        return self._keep

    @property
    def prepared(self) -> bool:
        return self._sent

    def force_close(self) -> None:
        self._keep = False

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._sent:
            return self._writer
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if self._keep is None:
            self._keep = request.keep_alive
        body = self.body if request.method != "HEAD" else b""  # HEAD: GET's headers only
        transport.write(
            b"%s%s%s%s%sContent-Length: %d\r\n\r\n%s"
            % (_STATUS_LINES[self.status], _FIXED, _Clock.date(), self._extra,
               b"" if self._keep else _CLOSE, len(self.body), body)
        )  # fmt: skip
        self._sent = True
        self._writer = request.writer
        return self._writer

    @classmethod
    def of(
        cls, document: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> JSONMessage:
        """A JSON document's message: the one way every listener answers with JSON."""
        return cls(encode_json(document), status, headers)

    async def write_eof(self, data: bytes = b"") -> None:
        """The message is already written; wait only while the peer is not reading, as
        aiohttp's writer does, so a client that never reads cannot grow our buffer."""
        if self._writer is not None:
            await self._writer.drain()
