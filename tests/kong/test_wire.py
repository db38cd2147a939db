"""The socket client ``secret_sidecar`` (behind both the Kong vault and plain OpenResty)
against answers the daemon does not send but HTTP allows: chunked bodies, a body ended
by closing, a pooled connection closed under a request, garbage. A scripted Unix-socket
server plays the daemon; nginx is real."""

from __future__ import annotations

import json
from pathlib import Path

from tests.kong.conftest import MakeNginx
from tests.kong.sockets import Connection, scripted_server

ANSWER = json.dumps({"ref": "{vault://env/x/}", "value": "scripted", "version": None,
                     "cached": True, "stale": False, "age_seconds": 1.5,
                     "expires_in_seconds": 41.7}).encode()  # fmt: skip


def with_length(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


async def test_the_reference_is_percent_encoded_in_the_query(
    make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """The request line carries the whole reference percent-encoded (``{``, ``/``, ``:``,
    ``#``, ``%`` and ``+`` included), and the answer's ttl is floored to whole seconds."""

    async def script(n: int, conn: Connection) -> None:
        await conn.request()
        await conn.send(with_length(ANSWER))

    path = tmp_path / "s.sock"
    async with scripted_server(path, script) as lines:
        nginx = make_nginx(base={"socket_path": str(path)})
        answer = await nginx.kong("{vault://sidecar/env/a%252Bb/#2}")
    assert answer["value"] == "scripted"
    assert answer["ttl"] == 41
    assert lines == ["GET /v1/secrets?ref=%7Bvault%3A%2F%2Fenv%2Fa%25252Bb%2F%232%7D HTTP/1.1"]


async def test_chunked_and_close_delimited_answers(make_nginx: MakeNginx, tmp_path: Path) -> None:
    """A chunked answer (with a chunk extension and a trailer) and one whose body ends
    when the server closes are read whole; after the second, a new connection is used."""

    async def script(n: int, conn: Connection) -> None:
        await conn.request()
        if n == 0:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            parts = [ANSWER[:10], ANSWER[10:11], ANSWER[11:]]
            chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts)
            await conn.send(head + chunks + b"0\r\nX-Trailer: t\r\n\r\n")
            await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + ANSWER)

    path = tmp_path / "s.sock"
    async with scripted_server(path, script) as lines:
        nginx = make_nginx(base={"socket_path": str(path)})
        chunked = await nginx.openresty("{vault://env/x/}", socket=str(path))
        closing = await nginx.openresty("{vault://env/x/}", socket=str(path))
        again = await nginx.openresty("{vault://env/x/}", socket=str(path))
    assert [chunked.get("value"), closing.get("value"), again.get("value")] == ["scripted"] * 3
    assert len(lines) == 3


async def test_a_pooled_connection_closed_under_a_request_is_retried(
    make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """The daemon closes a kept-alive connection just as the next request arrives (its
    idle timeout, a restart): the client asks again once on a new connection. A fresh
    connection that closes is not retried: that is the daemon failing."""

    async def script(n: int, conn: Connection) -> None:
        if n == 0:
            await conn.request()
            await conn.send(with_length(ANSWER))
            await conn.request()  # then close without answering
        elif n == 1:
            await conn.request()
            await conn.send(with_length(ANSWER))
            await conn.request()  # the third get: closed unanswered, like the first
        else:
            await conn.request()  # closes, unanswered: a fresh connection's failure

    path = tmp_path / "s.sock"
    async with scripted_server(path, script) as lines:
        nginx = make_nginx(base={"socket_path": str(path)})
        first = await nginx.openresty("{vault://env/x/}", socket=str(path))
        retried = await nginx.openresty("{vault://env/x/}", socket=str(path))
        assert [first.get("value"), retried.get("value")] == ["scripted", "scripted"]
        assert len(lines) == 3
        failed = await nginx.openresty("{vault://env/y/}", socket=str(path))
        assert len(lines) == 5  # on the pooled connection (closed), then on a fresh one
        fresh = await nginx.openresty("{vault://env/z/}", socket=str(path))
        assert len(lines) == 6  # nothing pooled: one attempt
    for answer in (failed, fresh):
        assert answer["err"].startswith("secret-sidecar: daemon_unreachable: ")
        assert answer["err"].endswith("reading the status line: closed")


async def test_answers_that_are_not_the_api_are_errors_without_their_body(
    make_nginx: MakeNginx, tmp_path: Path
) -> None:
    """Not HTTP, not JSON, an error without a code, a 200 without a string value: each
    is ``daemon_unreachable``, and the body (which might hold anything) is never quoted."""
    bodies = [
        b"SSH-2.0-not-http\r\n",
        with_length(b"plain text body-secret"),
        with_length(b'{"detail": "body-secret"}', "500 Internal Server Error"),
        with_length(b'{"value": 42, "note": "body-secret"}'),
    ]

    async def script(n: int, conn: Connection) -> None:
        await conn.request()
        await conn.send(bodies[n])

    path = tmp_path / "s.sock"
    errors = []
    async with scripted_server(path, script):
        nginx = make_nginx(base={"socket_path": str(path)})
        for _ in bodies:
            errors.append((await nginx.kong("{vault://sidecar/env/x/}"))["err"])
    assert [e.split(": ", 3)[-1] for e in errors] == [
        "the answer is not HTTP/1.x)",
        "answered 200 without a JSON object)",
        "answered 500 without an error code)",
        "answered 200 without a string value)",
    ]
    assert all("daemon_unreachable" in e and "body-secret" not in e for e in errors)
