"""A blocking HTTP/1.1 client for one fuzz case: raw bytes out, one response (or none) in.

Nothing here trusts the server: the response is parsed by hand from the bytes, so a
malformed answer is seen as such instead of being smoothed over by an HTTP library.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT = 5.0  # seconds a case may take, sending included
RECV = 65536
_HEX = b"0123456789abcdefABCDEF"
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")  # the server echoes 0.9 or 2.0 if asked so


@dataclass
class Response:
    """One parsed response; ``body`` is None for an event stream (its head is enough)."""

    status: int
    head: bytes
    headers: list[tuple[str, str]]
    body: bytes | None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()


@dataclass
class Exchange:
    """What one case observed: a response, a close, a timeout, or an unparsable answer."""

    response: Response | None = None
    closed: bool = False  # the server closed before (or instead of) a complete response
    timed_out: bool = False
    malformed: str | None = None  # the answer was not HTTP/1.x
    send_error: str | None = None
    received: bytes = b""
    elapsed: float = 0.0
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen first


class _Incomplete(Exception):
    """More bytes are needed to finish the response."""


class _Malformed(Exception):
    """The bytes are not an HTTP response."""


def request_method(data: bytes) -> bytes:
    """The method token of the first request in ``data`` (as the server will read it)."""
    return data.lstrip(b"\r\n").split(b" ", 1)[0]


def exchange(
    path: Path,
    data: bytes,
    *,
    half_close: bool,
    timeout: float = TIMEOUT,
    sync: Callable[[], object] | None = None,
) -> Exchange:
    """Send ``data`` on a fresh connection and read the first final response.

    ``half_close`` shuts our sending side after the data: for a request we know is
    incomplete, so the server sees that no more is coming and must close (or answer).
    ``sync`` runs between sending and half-closing (a request on another connection):
    once it is answered the server has seen our bytes and could answer early (a 404
    needs no body), so what it does when the client then hangs up is exercised too.
    """
    started = time.monotonic()
    deadline = started + timeout
    result = Exchange()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            result.send_error = f"connect: {exc!r}"
            result.closed = True
            return result
        try:
            sock.sendall(data)
            if half_close:
                if sync is not None:
                    sync()
                sock.shutdown(socket.SHUT_WR)
        except TimeoutError:  # the server stopped reading, and did not answer either
            result.timed_out = True
            result.send_error = "send timed out"
        except OSError as exc:  # the server may answer and close before reading it all
            result.send_error = repr(exc)
        if not result.timed_out:
            _receive(sock, deadline, result, head_only=request_method(data) == b"HEAD")
        if half_close and result.response is not None and not result.closed:
            _await_close(sock, deadline, result)
    result.elapsed = time.monotonic() - started
    return result


def _receive(sock: socket.socket, deadline: float, result: Exchange, *, head_only: bool) -> None:
    """Read until the first final response is complete, the server closes, or time is up."""
    buffer = b""
    while True:
        try:
            result.response, _, result.interim = _parse(buffer, head_only=head_only, eof=False)
            break
        except _Incomplete:
            pass
        except _Malformed as exc:
            result.malformed = str(exc)
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            result.timed_out = True
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(RECV)
        except TimeoutError:
            result.timed_out = True
            break
        except OSError:  # ECONNRESET: the server closed with our bytes unread
            chunk = b""
        if not chunk:
            result.closed = True
            try:  # a response delimited by the close (no Content-Length)
                result.response, _, result.interim = _parse(buffer, head_only=head_only, eof=True)
            except _Incomplete:
                pass
            except _Malformed as exc:
                result.malformed = str(exc)
            break
        buffer += chunk
    result.received = buffer


def _await_close(sock: socket.socket, deadline: float, result: Exchange) -> None:
    """After our EOF, the server must close too (it may still send what it had)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            result.timed_out = True
            return
        sock.settimeout(remaining)
        try:
            if not sock.recv(RECV):
                result.closed = True
                return
        except TimeoutError:
            result.timed_out = True
            return
        except OSError:
            result.closed = True
            return


def _parse(buffer: bytes, *, head_only: bool, eof: bool) -> tuple[Response, bytes, list[int]]:
    """The first final response in ``buffer`` (1xx interim responses skipped)."""
    interim: list[int] = []
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if eof and buffer:
                raise _Malformed(f"truncated head {buffer[:80]!r}")
            raise _Incomplete
        head, rest = buffer[: end + 4], buffer[end + 4 :]
        status_line, *lines = head[:-4].split(b"\r\n")
        parts = status_line.split(b" ", 2)
        version = parts[0]
        if len(parts) < 2 or not _VERSION.fullmatch(version) or not parts[1].isdigit():
            raise _Malformed(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        headers = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon:
                raise _Malformed(f"bad header line {line[:80]!r}")
            headers.append(
                (name.decode("latin-1").strip().lower(), value.decode("latin-1").strip())
            )
        if 100 <= status < 200 and status != 101:
            interim.append(status)
            buffer = rest
            continue
        response = Response(status, head, headers, b"")
        if head_only or status in (101, 204, 304):
            return response, rest, interim
        if response.content_type == "text/event-stream":
            response.body = None
            return response, rest, interim
        encoding = (response.header("transfer-encoding") or "").lower()
        length = response.header("content-length")
        if "chunked" in encoding:
            response.body, rest = _dechunk(rest, eof=eof)
        elif length is not None:
            if not length.isdigit():
                raise _Malformed(f"bad Content-Length {length!r}")
            if len(rest) < int(length):
                if eof:
                    raise _Malformed(f"body shorter than Content-Length {length}")
                raise _Incomplete
            response.body, rest = rest[: int(length)], rest[int(length) :]
        elif eof:
            response.body, rest = rest, b""
        else:
            raise _Incomplete
        return response, rest, interim


def _dechunk(data: bytes, *, eof: bool) -> tuple[bytes, bytes]:
    body, pos = b"", 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            break
        size_text = data[pos:line_end].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Malformed(f"bad chunk size {size_text[:20]!r}") from None
        start = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n", start) if data[start : start + 2] != b"\r\n" else start
            if trailer_end < 0:
                break
            return body, data[trailer_end + 2 :]
        if len(data) < start + size + 2:
            break
        body += data[start : start + size]
        pos = start + size + 2
    if eof:
        raise _Malformed("truncated chunked body")
    raise _Incomplete


def request_is_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole first request by HTTP/1.1 framing, as llhttp reads it.

    False means the server is right to wait for more bytes (the head has not ended, or
    the body is shorter than its Content-Length or chunked framing says): such a case is
    half-closed instead of waited on. Anything malformed counts as complete, since the
    server can refuse it at once.
    """
    start = len(data) - len(data.lstrip(b"\r\n"))  # llhttp skips empty lines first
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        return False
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    for line in data[start:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif name.lower() == b"transfer-encoding":
            encodings.append(value.strip(b" \t"))
    body = data[end + 4 :]
    if encodings:
        if lengths or encodings[-1].split(b",")[-1].strip().lower() != b"chunked":
            return True  # refused outright
        return _chunks_complete(body)
    if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
        return True  # no body, or a refused length
    return len(body) >= int(lengths[0])


def _chunks_complete(body: bytes) -> bool:
    pos = 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return False
        size_text = body[pos:line_end].split(b";")[0]
        if not size_text or len(size_text) > 16 or size_text.strip(_HEX):
            return True  # refused outright
        size = int(size_text, 16)
        start = line_end + 2
        if size == 0:
            if body[start : start + 2] == b"\r\n":
                return True
            return body.find(b"\r\n\r\n", start) >= 0
        if len(body) < start + size + 2:
            return False
        if body[start + size : start + size + 2] != b"\r\n":
            return True
        pos = start + size + 2
