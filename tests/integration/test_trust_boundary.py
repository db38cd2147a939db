"""The trust boundary over the real socket: what a caller can steer, read, probe or break.

Clients run as another uid (``setpriv`` + ``curl``) where permissions and the ACL
are under test, and as raw sockets where the HTTP layer is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar import unix_socket
from sidecar.config import ListenConfig
from tests.backends.vault_server import FakeVault
from tests.integration.conftest import SECRETS, MakeDaemon
from tests.integration.harness import Daemon, require_program, wait_until
from tests.support import Listener

NOBODY = 65534
TOKEN = "hvs.trust-boundary-root-token"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A socket directory another uid can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sidecar-acl-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(
    socket_path: Path, path: str, *, groups: str | None = None, method: str = "GET"
) -> tuple[int, Any]:
    """``curl`` over the socket as uid/gid 65534 (plus ``groups``); (status, JSON) or (0, err)."""
    setpriv = require_program("setpriv")
    curl = require_program("curl")
    group_args = [f"--groups={groups}"] if groups else ["--clear-groups"]
    command = [
        setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", *group_args, curl, "-s", "-X",
        method, "--unix-socket", str(socket_path), "-w", "\n%{http_code}", f"http://sidecar{path}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        return 0, done.stderr or f"curl exit {done.returncode}"
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body) if body else None


def secrets_path(ref: str) -> str:
    from urllib.parse import quote  # noqa: PLC0415

    return "/v1/secrets?ref=" + quote(ref, safe="")


async def test_hostile_queries_reach_no_listener_over_the_socket(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    """{vault://hv/...?host=&port=} and ?token_file= are 400 naming the field; the port
    named sees no connection and the Vault gets only the configured vault's traffic."""
    vault = FakeVault()
    vault.enable_kv("secret", "v1")
    vault.put("secret", "app", {"x": "value-1"})
    root = vault.create_token()
    vault.start()
    try:
        config = {
            "vaults": [
                {"prefix": "hv", "name": "hcv", "config": {"port": vault.port, "token": root}}
            ]
        }
        env = {"KONG_VAULT_HCV_TOKEN": root, "KONG_VAULT_HCV_PORT": str(vault.port)}
        daemon = await make_daemon(config, env=env).started()
        assert (await daemon.get("{vault://hv/app/x}"))[1]["value"] == "value-1"
        seen = len(vault.seen)
        async with Listener() as listener:
            for ref in (
                f"{{vault://hv/app/x?host=127.0.0.1&port={listener.port}}}",
                f"{{vault://hcv/app/x?host=127.0.0.1&port={listener.port}}}",
                "{vault://hv/app/x?token_file=/etc/hostname}",
                "{vault://hv/app/x?namespace=other}",
            ):
                status, body = await daemon.get(ref)
                field = ref.partition("?")[2].partition("=")[0]
                assert (status, body["error"]["code"]) == (400, "invalid_reference"), ref
                assert f"query field '{field}' may not be set" in body["error"]["message"]
            await asyncio.sleep(0.1)
            assert listener.connections == 0
        assert len(vault.seen) == seen
    finally:
        vault.stop()
    daemon.stop()
    assert root not in daemon.logs()


async def test_env_backend_refuses_the_daemons_own_credentials(make_daemon: MakeDaemon) -> None:
    """AWS_SECRET_ACCESS_KEY in the daemon's environment is 403 over the socket."""
    daemon = await make_daemon(env={"AWS_SECRET_ACCESS_KEY": "aws-key-canary-77"}).started()
    for ref in ("{vault://env/aws-secret-access-key}", "{vault://env/aws_secret_access_key}"):
        status, body = await daemon.get(ref)
        assert (status, body["error"]["code"]) == (403, "forbidden")
        assert "aws-key-canary-77" not in json.dumps(body)
    assert (await daemon.get("{vault://env/db-password}"))[0] == 200


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
async def test_proxied_requests_are_refused(daemon: Daemon, header: str) -> None:
    """A relay from a network would carry these: 400 before any work."""
    async with (
        daemon.session() as session,
        session.get(
            "http://sidecar/v1/secrets",
            params={"ref": "{vault://env/db-password}"},
            headers={header: "203.0.113.7"},
        ) as response,
    ):
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (400, "invalid_request")
    assert header in body["error"]["message"]


@pytest.mark.parametrize(
    "ref", ["{vault://env/db\x00-password}", "{vault://env/db%00}", "{vault://env/a\x1b}"]
)
async def test_control_characters_are_invalid_references(daemon: Daemon, ref: str) -> None:
    """A NUL or control byte, raw or percent-encoded, is 400 invalid_reference (not 404)."""
    status, body = await daemon.get(ref)
    assert (status, body["error"]["code"]) == (400, "invalid_reference")


# --- peers as another uid: socket permissions, the ACL, admin-only detail ---


async def test_socket_permissions_keep_out_peers_outside_its_group(
    make_daemon: MakeDaemon, shared_dir: Path
) -> None:
    """Mode 0660 and the configured group are the first gate: nobody without it cannot connect."""
    sock = shared_dir / "s.sock"
    await make_daemon({"listen": {"socket": str(sock)}}).started()
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    status, err = as_nobody(sock, "/healthz")
    assert status == 0
    assert "Permission denied" in err or "7" in err  # curl: couldn't connect
    assert as_nobody(sock, "/healthz", groups=str(os.getgid()))[0] == 200


async def test_acl_runs_before_anything_names_a_vault(
    make_daemon: MakeDaemon, shared_dir: Path
) -> None:
    """An unauthorised peer gets 403 for unknown vaults, refused queries and missing ids
    alike, so it cannot probe what exists; within its globs it reads."""
    sock = shared_dir / "s.sock"
    config = {
        "listen": {"socket": str(sock), "group": NOBODY},
        "clients": [
            {"uid": NOBODY, "allow": ["env/db-*"]},
            {"uid": 0, "allow": ["*"], "admin": True},
        ],
        "prefetch": ["{vault://env/absent-but-prefetched}"],
    }
    daemon = await make_daemon(config).started()
    status, body = as_nobody(sock, secrets_path("{vault://env/db-password}"))
    assert (status, body["value"]) == (200, SECRETS["DB_PASSWORD"])
    for ref in (
        "{vault://env/app-token}",  # exists, outside the globs
        "{vault://nowhere/x}",  # unknown vault
        "{vault://env/other?host=evil}",  # refused query, outside the globs
        "{vault://hcv/x}",  # a backend with no config
    ):
        status, body = as_nobody(sock, secrets_path(ref))
        assert (status, body["error"]["code"]) == (403, "forbidden"), ref
    # refresh of a readable ref is fine; refresh-all, status and readiness detail are admin
    assert (
        as_nobody(sock, "/v1/refresh?ref=%7Bvault%3A%2F%2Fenv%2Fdb-password%7D", method="POST")[0]
        == 200
    )
    status, body = as_nobody(sock, "/v1/refresh", method="POST")
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert as_nobody(sock, "/v1/status") == (200, {"ready": False})
    assert as_nobody(sock, "/readyz") == (503, {"ready": False})
    # the admin (root, uid 0) sees what is missing and the vaults
    status, body = await daemon.request("GET", "/readyz")
    assert status == 503
    assert "ref:{vault://env/absent-but-prefetched}" in body["missing"]
    assert "vaults" in (await daemon.request("GET", "/v1/status"))[1]
    assert (await daemon.request("POST", "/v1/refresh"))[0] == 200


async def test_gid_rules_match_supplementary_groups(
    make_daemon: MakeDaemon, shared_dir: Path
) -> None:
    """A gid rule matches a peer whose supplementary groups include it (SO_PEERGROUPS)."""
    sock = shared_dir / "s.sock"
    config = {
        "listen": {"socket": str(sock), "group": NOBODY},
        "clients": [{"gid": 4242, "allow": ["env/db-password"]}],
    }
    await make_daemon(config).started()
    ref = secrets_path("{vault://env/db-password}")
    assert as_nobody(sock, ref, groups="4242")[0] == 200
    status, body = as_nobody(sock, ref)  # same uid, without the group
    assert (status, body["error"]["code"]) == (403, "forbidden")


# --- socket hygiene ---


def test_socket_mode_comes_from_the_umask_at_bind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is born with the configured mode, not the process umask's: even with
    chmod out of the way (the window it used to close), it is never wider."""
    monkeypatch.setattr(os, "chmod", lambda *_a, **_k: None)
    old = os.umask(0)
    try:
        sock = unix_socket.bind(ListenConfig(socket=tmp_path / "s.sock", mode=0o600))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o600
        assert os.umask(old) == old  # and the umask is restored
    finally:
        sock.close()


def test_world_writable_socket_directory_is_refused(tmp_path: Path) -> None:
    """Anyone could swap the socket in a world-writable, non-sticky directory."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(Exception, match="world-writable without the sticky bit"):
        unix_socket.bind(ListenConfig(socket=open_dir / "s.sock"))


# --- hostile HTTP: raw bytes on the socket ---


def exchange(path: Path, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send raw bytes, read until the daemon closes or ``wait`` passes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(wait)
        client.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.sendall(data)  # the daemon may answer and close before reading it all
        chunks = []
        try:
            while chunk := client.recv(65536):
                chunks.append(chunk)
                if _complete(b"".join(chunks)):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def parsed(raw: bytes) -> tuple[int, str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /v1/secrets?ref=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400,
         "invalid_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 400,
         "invalid_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
         + b"\r\n", 400, "invalid_request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "invalid_request"),
        (b"GET /v1/secrets?ref=%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_reference"),
        (b"POST /v1/secrets:batch HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
         + b"[" * 200_000, 400, "invalid_request"),
        (b"POST /v1/secrets:batch HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n\xff\xfe{}]", 400,
         "invalid_request"),
    ],
)  # fmt: skip
def test_malformed_http_gets_a_json_error(
    daemon: Daemon, request_bytes: bytes, status: int, code: str
) -> None:
    """Oversized lines and headers, non-HTTP bytes, invalid UTF-8 and deep nesting: a 4xx
    JSON error with a stable code, never a 500 or aiohttp's plain text."""
    got_status, content_type, body = parsed(exchange(daemon.socket, request_bytes))
    assert (got_status, body["error"]["code"]) == (status, code)
    assert content_type.startswith("application/json")


async def test_slow_clients_and_connection_floods_are_bounded(make_daemon: MakeDaemon) -> None:
    """Headers trickled past header_timeout get 408 and a close; a body that never comes
    408 too; beyond max_connections a new connection gets 429 and a close."""
    config = {"listen": {"header_timeout": 0.5, "body_timeout": 0.5, "max_connections": 4}}
    daemon = await make_daemon(config).started()
    slow = await asyncio.to_thread(exchange, daemon.socket, b"GET /healthz HTTP/1.1\r\nHo")
    status, _, answer = parsed(slow)
    assert (status, answer["error"]["code"]) == (408, "request_timeout")
    assert "request headers not received within 0.5 s" in answer["error"]["message"]
    body = b'POST /v1/secrets:batch HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"refs"'
    status, _, answer = parsed(await asyncio.to_thread(exchange, daemon.socket, body))
    assert (status, answer["error"]["code"]) == (408, "request_timeout")
    held = []
    for _ in range(4):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(daemon.socket))
        held.append(client)
    try:
        await asyncio.sleep(0.1)  # let the daemon accept them
        flood = await asyncio.to_thread(exchange, daemon.socket, b"")
        status, _, answer = parsed(flood)
        assert (status, answer["error"]["code"]) == (429, "too_many_requests")
    finally:
        for client in held:
            client.close()

    async def answers() -> bool:
        return (await daemon.request("GET", "/healthz"))[0] == 200

    from tests.integration.harness import wait_until  # noqa: PLC0415

    await wait_until(answers, 5, "a free connection slot after the held ones closed")


async def test_a_vault_id_cannot_walk_out_of_the_acl_globs(make_daemon: MakeDaemon) -> None:
    """Vault ids are URL paths: a dot segment, '?' or '#' would make the path read name
    another secret than the id the ACL matched. They are refused, and nothing is read."""
    vault = FakeVault()
    vault.enable_kv("secret", "v2")
    vault.put("secret", "team-a/app", {"k": "team-a"})
    vault.put("secret", "root", {"k": "root-only"})
    vault.start()
    try:
        token = vault.create_token()
        config = {
            "vaults": [{"prefix": "hv", "name": "hcv", "config": {
                "port": vault.port, "token": token, "kv": "v2"}}],
            "clients": [{"uid": os.getuid(), "allow": ["hv/team-a/*", "hv/*-public"]}],
        }  # fmt: skip
        daemon = await make_daemon(config).started()
        assert (await daemon.get("{vault://hv/team-a/app/k}"))[1]["value"] == "team-a"
        reads_before = len(vault.seen)
        for ref in (
            "{vault://hv/team-a/../root/}",
            "{vault://hv/team-a/%252E%252E/root/}",  # the same, encoded twice
            "{vault://hv/root%253F-public/}",  # "root?-public": the path ends at '?'
            "{vault://hv/root%2523-public/}",  # "root#-public"
            "{vault://hv/team-a/%25252e%25252e/root/}",  # a '%' left for Vault to decode
        ):
            status, body = await daemon.get(ref)
            assert (status, body["error"]["code"]) == (400, "invalid_reference"), ref
            assert "root-only" not in json.dumps(body)
        assert len(vault.seen) == reads_before
    finally:
        vault.stop()


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_client_that_leaves_mid_body_is_gone_not_a_server_error(
    daemon: Daemon, pipelined: bool
) -> None:
    """Half a batch body, then a close, alone or behind a pipelined request: the daemon
    counts a 499 (client gone), logs no internal error, and keeps serving. (The race in
    which aiohttp raises a bare RuntimeError instead is pinned in tests/unit.)"""
    partial = (b"POST /v1/secrets:batch HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
               b'\r\n{"refs": ["{vault://env/db-password}"')  # fmt: skip
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" if pipelined else b""
    for _ in range(5):
        reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
        writer.write(first + partial)
        await writer.drain()
        if pipelined:
            await reader.readuntil(b'"ok"}')  # the first answer; the second handler is next
        else:
            await asyncio.sleep(0.2)  # the handler is waiting for the rest of the body
        writer.close()
        await writer.wait_closed()

    async def counted() -> bool:
        return 'code="499",endpoint="/v1/secrets:batch"} 5.0' in await daemon.metrics()

    await wait_until(counted, 10, "five 499s for the batch endpoint")
    assert not [e for e in daemon.log_events() if e.get("event") == "request.failed"]
    assert (await daemon.get("{vault://env/db-password}"))[0] == 200


async def test_header_deadline_is_per_request_on_a_kept_alive_connection(
    make_daemon: MakeDaemon,
) -> None:
    """One timer per connection checks each request's header deadline: requests that
    keep coming on one connection for longer than ``header_timeout`` are all answered,
    and a later request trickled on that same connection still gets its 408."""
    daemon = await make_daemon({"listen": {"header_timeout": 0.5}}).started()
    reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
    try:
        for _ in range(8):  # 1.2 s of requests, each complete in time
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(len(b'{"status":"ok"}'))
            await asyncio.sleep(0.15)
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")
        status, _, answer = parsed(await asyncio.wait_for(reader.read(), 5))
        assert (status, answer["error"]["code"]) == (408, "request_timeout")
    finally:
        writer.close()
