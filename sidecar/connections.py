"""Connections to the socket API: bounded in number, in header time and size, and every
refusal below the application (a malformed request line, a header too long) answered
with our JSON error instead of aiohttp's plain text.

aiohttp bounds header sizes but has no deadline for a request that arrives a byte at a
time (slowloris) and no limit on open connections; both live here, in a subclass of
its connection handler, so the application and its middlewares stay unaware of them.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from sidecar.access import Peer, peer_of
from sidecar.config import ListenConfig
from sidecar.logging import get_logger

log = get_logger("sidecar.connections")


def error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response, for when no request object exists yet."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class ConnectionCount:
    """Open connections across the API listener, against ``listen.max_connections``."""

    limit: int
    open: int = 0


class GuardedConnection(RequestHandler):
    """One client connection, with a connection bound and a deadline for its headers."""

    def __init__(
        self, manager: Any, *, count: ConnectionCount, header_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._count = count
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_deadline: float | None = None  # while a request's headers are due
        self._counted = False
        self._peer: Peer | None = None

    @property
    def peer(self) -> Peer:
        """Who is connected, read at the first request and kept for the connection."""
        if self._peer is None:
            self._peer = peer_of(self.transport)
        return self._peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._count.open >= self._count.limit:
            log.warning("connection.refused", reason="max_connections", limit=self._count.limit)
            message = f"more than {self._count.limit} open connections"
            self._refuse(429, "Too Many Requests", "too_many_requests", message)
            return
        self._count.open += 1
        self._counted = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._counted:
            self._count.open -= 1
            self._counted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """The header deadline runs from a request's first byte until its headers parse.

        A deadline is a number per request; the timer that checks it is armed at most
        once per ``header_timeout`` per connection (a timer per request was 3 us of
        every read) and moves itself on to a later deadline when it fires early."""
        if self._header_deadline is None and self._current_request is None and not self._messages:
            self._header_deadline = self._loop.time() + self._header_timeout
            if self._header_timer is None:
                self._header_timer = self._loop.call_at(self._header_deadline, self._check)
        super().data_received(data)
        if self._messages or self._current_request is not None:
            self._header_deadline = None

    def _disarm(self) -> None:
        self._header_deadline = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _check(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None or self._current_request is not None or self._messages:
            return
        if self._loop.time() < deadline:  # a later request's deadline: check again then
            self._header_timer = self._loop.call_at(deadline, self._check)
            return
        log.info("connection.header_timeout", timeout_seconds=self._header_timeout)
        message = f"request headers not received within {self._header_timeout:g} s"
        self._refuse(408, "Request Timeout", "request_timeout", message)

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        if self.transport is not None:
            self.transport.write(error_bytes(status, reason, code, message))
        self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """What the parser refused, as JSON. aiohttp's text (it may quote the request) is
        neither returned nor logged: only the kind of problem."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            code, text = "internal_error", "internal error"
        elif isinstance(exc, LineTooLong):
            code, text = "invalid_request", "request line or a header is too long"
        else:
            code, text = "invalid_request", f"malformed HTTP request ({type(exc).__name__})"
        log.info("request.malformed", status=status, error_type=type(exc).__name__)
        response = web.json_response({"error": {"code": code, "message": text}}, status=status)
        response.force_close()
        return response


def connection_factory(server: web.Server, listen: ListenConfig) -> Any:
    """The protocol factory for the API listener: aiohttp's server, our connections."""
    count = ConnectionCount(listen.max_connections)
    options: dict[str, Any] = {
        "header_timeout": listen.header_timeout,
        "keepalive_timeout": listen.idle_timeout,
        "max_line_size": listen.max_header_size,
        "max_field_size": listen.max_header_size,
        "max_headers": listen.max_headers,
        "access_log": None,
        "auto_decompress": False,  # no endpoint takes compressed bodies: never inflate one
    }

    def make() -> GuardedConnection:
        return GuardedConnection(server, count=count, loop=asyncio.get_running_loop(), **options)

    return make


class GuardedSite(web.SockSite):
    """``SockSite`` on an already bound socket, serving through ``GuardedConnection``."""

    def __init__(self, runner: web.BaseRunner, sock: Any, listen: ListenConfig) -> None:
        super().__init__(runner, sock, backlog=listen.backlog)
        self._listen = listen

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            connection_factory(server, self._listen), sock=self._sock, backlog=self._backlog
        )
