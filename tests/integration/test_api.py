"""The socket API of a real daemon process: answers, every error code, limits."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess

import pytest

from tests.integration.conftest import SECRETS, MakeDaemon
from tests.integration.harness import Daemon, free_port, require_program, wait_until


async def test_get_secret_answers_value_and_cache_information(daemon: Daemon) -> None:
    """A first read is a miss, the second a hit with its age; the env naming is Kong's."""
    status, first = await daemon.get("{vault://env/db-password}")
    assert status == 200
    assert first == {
        "ref": "{vault://env/db-password}",
        "value": SECRETS["DB_PASSWORD"],
        "version": None,
        "cached": False,
        "stale": False,
        "age_seconds": 0.0,
        "expires_in_seconds": 300.0,
    }
    _, second = await daemon.get("{vault://env/db-password}")
    assert second["cached"] is True
    assert second["age_seconds"] >= 0


async def test_keys_and_versions(daemon: Daemon) -> None:
    """JSON keys and #2 (the _PREVIOUS variable) resolve."""
    assert (await daemon.get("{vault://env/db-json/username}"))[1]["value"] == "app"
    assert (await daemon.get("{vault://env/db-json/password}"))[1]["value"] == "p4ss"
    _, previous = await daemon.get("{vault://env/db-password#2}")
    assert (previous["value"], previous["version"]) == ("old-hunter2", "2")


async def test_batch_answers_in_order_with_per_reference_errors(daemon: Daemon) -> None:
    """A batch returns one result per ref, in order, errors inline."""
    refs = ["{vault://env/db-json/password}", "{vault://env/missing}", "bad", "{vault://x/y}"]
    status, body = await daemon.request("POST", "/v1/secrets:batch", json_body={"refs": refs})
    assert status == 200
    results = body["results"]
    assert [r["ref"] for r in results] == refs
    assert results[0]["value"] == "p4ss"
    assert [r.get("error", {}).get("code") for r in results[1:]] == [
        "not_found",
        "invalid_reference",
        "unknown_vault",
    ]


@pytest.mark.parametrize(
    ("ref", "status", "code", "message"),
    [
        ("nope", 400, "invalid_reference", "not a reference [nope]"),
        (
            "{vault://env/}",
            400,
            "invalid_reference",
            "reference url has empty path [{vault://env/}]",
        ),
        ("{vault://env/x?ttl=soon}", 400, "invalid_reference", "ttl: Input should be a valid"),
        ("{vault://env/db-password/k}", 400, "invalid_reference", "unable to json decode value"),
        (
            "{vault://env/db-json/nokey}",
            404,
            "not_found",
            "subfield nokey not found in JSON secret",
        ),
        ("{vault://env/absent}", 404, "not_found", "environment variable ABSENT is not set"),
        ("{vault://nowhere/x}", 404, "unknown_vault", "no vault with prefix or backend name"),
        ("{vault://env/db-password?base64_decode}", 502, "backend_error", "not base64"),
        ("{vault://" + "a" * 5000 + "}", 400, "invalid_request", "longer than 4096 bytes"),
    ],
)
async def test_error_codes(daemon: Daemon, ref: str, status: int, code: str, message: str) -> None:
    """Each failure has its HTTP status, stable code and a clear message."""
    got_status, body = await daemon.get(ref)
    assert got_status == status
    assert body["error"]["code"] == code
    assert message in body["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "message"),
    [
        ("GET", "/v1/secrets", {}, 400, "invalid_request", "exactly one 'ref'"),
        ("GET", "/v1/secrets", {"params": [("ref", "a"), ("ref", "b")]}, 400, "invalid_request",
         "exactly one"),
        ("POST", "/v1/secrets:batch", {"json_body": {"refs": "x"}}, 400, "invalid_request",
         "body must be"),
        ("POST", "/v1/secrets:batch", {"json_body": {"refs": [1]}}, 400, "invalid_request",
         "body must be"),
        ("POST", "/v1/secrets:batch", {"json_body": {"refs": ["x"] * 1001}}, 400,
         "invalid_request", "at most 1000"),
        ("GET", "/nope", {}, 404, "not_found", "no such endpoint"),
        ("DELETE", "/v1/secrets", {}, 405, "method_not_allowed", "DELETE is not allowed here"),
        ("GET", "/v1/secrets:batch", {}, 405, "method_not_allowed", "(allowed: POST)"),
        ("HEAD", "/healthz", {}, 405, "method_not_allowed", ""),
    ],
)  # fmt: skip
async def test_invalid_requests(
    daemon: Daemon,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    code: str,
    message: str,
) -> None:
    """Malformed requests, unknown routes and wrong methods get a JSON error with a code."""
    if method == "HEAD":  # no body to read: the status and Allow header say it
        async with daemon.session() as session, session.head(f"http://sidecar{path}") as r:
            assert (r.status, r.headers["Allow"]) == (405, "GET")
        return
    got_status, body = await daemon.request(method, path, **kwargs)
    assert got_status == status
    assert body["error"]["code"] == code
    assert message in body["error"]["message"]


async def test_body_over_one_mebibyte_is_413(daemon: Daemon) -> None:
    """A batch body over 1 MiB is refused with payload_too_large."""
    huge = json.dumps({"refs": ["{vault://env/db-password}"], "pad": "x" * (1024 * 1024)})
    async with daemon.session() as session:
        response = await session.post(
            "http://sidecar/v1/secrets:batch", data=io.BytesIO(huge.encode())
        )
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (413, "payload_too_large")


async def test_malformed_json_body_is_invalid_request(daemon: Daemon) -> None:
    """A body that is not JSON is a 400 with a hint of the expected shape."""
    async with daemon.session() as session:
        response = await session.post("http://sidecar/v1/secrets:batch", data=b"{not json")
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (400, "invalid_request")


async def _hold_request(daemon: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Start a batch request whose body never completes: it stays in flight."""
    reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
    writer.write(
        b"POST /v1/secrets:batch HTTP/1.1\r\nHost: sidecar\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"refs": '
    )
    await writer.drain()
    return reader, writer


async def test_too_many_concurrent_requests_is_429_but_health_answers(
    make_daemon: MakeDaemon,
) -> None:
    """Beyond max_concurrent_requests callers get 429; /healthz and /readyz still answer."""
    daemon = await make_daemon({"listen": {"max_concurrent_requests": 1}}).started()
    _, writer = await _hold_request(daemon)
    try:

        async def saturated() -> bool:
            status, _ = await daemon.get("{vault://env/db-password}")
            return status == 429

        await wait_until(saturated, what="the held request to occupy the only slot")
        status, body = await daemon.get("{vault://env/db-password}")
        assert (status, body["error"]["code"]) == (429, "too_many_requests")
        assert (await daemon.request("GET", "/healthz"))[0] == 200
        assert (await daemon.request("GET", "/readyz"))[0] == 200
    finally:
        writer.close()


async def test_refresh_refetches_and_never_returns_values(daemon: Daemon) -> None:
    """POST /v1/refresh?ref= refetches that reference and answers without the value."""
    await daemon.get("{vault://env/db-password}")
    status, body = await daemon.request(
        "POST", "/v1/refresh", params={"ref": "{vault://env/db-password}"}
    )
    assert status == 200
    (result,) = body["refreshed"]
    assert result["cached"] is False
    assert "value" not in result
    status, body = await daemon.request("POST", "/v1/refresh")
    assert (status, body["refreshed"]) == (200, {"ok": 1})


async def test_status_shows_counts_not_values(daemon: Daemon) -> None:
    """/v1/status reports per-vault counts and never a value."""
    await daemon.get("{vault://env/db-password}")
    await daemon.get("{vault://env/absent}")
    status, body = await daemon.request("GET", "/v1/status")
    assert status == 200
    env = body["vaults"]["env"]
    assert (env["entries"], env["fresh"], env["failed"]) == (2, 1, 1)
    assert env["last_error"]["code"] == "not_found"
    assert SECRETS["DB_PASSWORD"] not in json.dumps(body)


async def test_curl_over_the_unix_socket(daemon: Daemon) -> None:
    """The README's curl command works against the daemon."""
    curl = require_program("curl")
    process = await asyncio.create_subprocess_exec(
        curl, "-s", "--unix-socket", str(daemon.socket),
        "http://localhost/v1/secrets?ref=%7Bvault%3A%2F%2Fenv%2Fdb-password%7D",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 10)
    assert json.loads(out)["value"] == SECRETS["DB_PASSWORD"]


async def test_forbidden_for_peer_outside_client_rules(make_daemon: MakeDaemon) -> None:
    """With clients: rules, a peer matching none gets 403; globs limit what a peer reads."""
    me = os.getuid()
    config = {
        "clients": [{"uid": me, "allow": ["env/db-json"]}, {"uid": me + 4242, "allow": ["*"]}]
    }
    daemon = await make_daemon(config).started()
    assert (await daemon.get("{vault://env/db-json/username}"))[0] == 200
    status, body = await daemon.get("{vault://env/db-password}")
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await daemon.request("POST", "/v1/refresh")
    assert (status, body["error"]["code"]) == (403, "forbidden")


async def test_backend_unavailable_and_timeout_codes(make_daemon: MakeDaemon) -> None:
    """A backend that refuses connections is 503; one that never answers is 504."""
    closed = free_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never speaks gRPC
    mute = silent.getsockname()[1]
    try:
        vaults = [
            {"prefix": "down", "name": "gcp",
             "config": {"project_id": "p", "emulator_host": f"127.0.0.1:{closed}"}},
            {"prefix": "mute", "name": "gcp",
             "config": {"project_id": "p", "emulator_host": f"127.0.0.1:{mute}"}},
        ]  # fmt: skip
        config = {"vaults": vaults, "cache": {"backend_timeout": 0.5, "retry_backoff": 0.01}}
        daemon = await make_daemon(config).started()
        status, body = await daemon.get("{vault://down/db}")
        assert (status, body["error"]["code"]) == (503, "backend_unavailable")
        status, body = await daemon.get("{vault://mute/db}")
        assert (status, body["error"]["code"]) == (504, "backend_timeout")
        assert "did not answer within 0.5 s" in body["error"]["message"]
    finally:
        silent.close()


async def _exchange(daemon: Daemon, raw: bytes) -> bytes:
    """Write raw request bytes, read until the daemon closes the connection."""
    reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_answers_are_framed_for_keep_alive_pipelining_head_and_close(daemon: Daemon) -> None:
    """Answers are written as whole messages (sidecar/http_message.py), so the framing is
    ours to get right: pipelined requests are answered in order on one connection, each
    with Date and an exact Content-Length; HEAD gets the headers and no body; a request
    asking ``Connection: close`` gets that header and the connection closes after it."""
    get = "GET /v1/secrets?ref={ref} HTTP/1.1\r\nHost: x\r\n{extra}\r\n"
    raw = "".join([
        get.format(ref="%7Bvault%3A%2F%2Fenv%2Fdb-password%7D", extra=""),
        "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        get.format(ref="%7Bvault%3A%2F%2Fenv%2Fmissing%7D", extra=""),
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]).encode()  # fmt: skip
    data = await _exchange(daemon, raw)
    answers: list[tuple[str, dict[str, str], bytes]] = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
        length = 0 if len(answers) == 1 else int(headers["content-length"])  # 1: HEAD
        body, data = data[:length], data[length:]
        answers.append((status, headers, body))
    assert [a[0] for a in answers] == [
        "HTTP/1.1 200 OK", "HTTP/1.1 405 Method Not Allowed",
        "HTTP/1.1 404 Not Found", "HTTP/1.1 200 OK",
    ]  # fmt: skip
    assert json.loads(answers[0][2])["value"] == SECRETS["DB_PASSWORD"]
    assert int(answers[1][1]["content-length"]) > 0  # as GET would have, without the body
    assert json.loads(answers[2][2])["error"]["code"] == "not_found"
    assert json.loads(answers[3][2]) == {"status": "ok"}
    assert all("date" in h and h["content-type"] == "application/json" for _, h, _ in answers)
    assert "connection" not in answers[0][1]
    assert answers[3][1]["connection"] == "close"
