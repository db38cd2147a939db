"""Peer credentials on each platform, with the OS simulated and our code left as it is.

Linux is the real kernel. macOS and the BSDs are what their kernels and C library
would answer: a socket whose ``getsockopt`` returns a ``struct xucred`` built with
``struct.pack``, a C library whose ``getpeereid`` is a ctypes callback, and a
``sys.platform`` to choose them. A platform with neither is served end to end on a
real Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from sidecar import access, cli
from sidecar.access import UNKNOWN, AccessPolicy, Peer, peer_of, reader_for
from sidecar.config import ClientRule, ListenConfig, parse_config
from sidecar.connections import GuardedConnection, connection_factory
from sidecar.errors import ConfigError
from sidecar.lifecycle import serve
from sidecar.metrics import Metrics

UNSUPPORTED = "sunos5"  # a platform with no reader: neither Linux, macOS nor getpeereid


def xucred(uid: int, groups: list[int], *, version: int = 0, ngroups: int | None = None) -> bytes:
    """``struct xucred`` as macOS lays it out: u_int, uid_t, short, 2 pad bytes, gid_t[16]."""
    count = len(groups) if ngroups is None else ngroups
    return struct.pack("=IIh2x16I", version, uid, count, *groups[:16], *[0] * (16 - len(groups)))


class DarwinSocket:
    """What macOS answers on a connected AF_UNIX socket: LOCAL_PEERCRED, LOCAL_PEERPID."""

    family = socket.AF_UNIX

    def __init__(self, cred: bytes, pid: int | None) -> None:
        self.cred, self.pid = cred, pid
        self.asked: list[tuple[int, int, int | None]] = []

    def getsockopt(self, level: int, option: int, size: int | None = None) -> Any:
        self.asked.append((level, option, size))
        if (level, option) == (0, 1):  # SOL_LOCAL, LOCAL_PEERCRED
            return self.cred[: size or len(self.cred)]
        if (level, option) == (0, 2) and self.pid is not None:  # LOCAL_PEERPID
            return self.pid
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")


@pytest.fixture
def platform(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set ``sys.platform`` (and forget the readers chosen so far, before and after)."""

    def use(name: str) -> None:
        monkeypatch.setattr(sys, "platform", name)

    reader_for.cache_clear()
    yield use
    reader_for.cache_clear()


class FakeLibc:
    """``ctypes.CDLL`` as a BSD has it: ``getpeereid`` answers (uid, gid), or fails (None)."""

    def __init__(self, answer: tuple[int, int] | None) -> None:
        self.answer = answer
        self.fds: list[int] = []
        uint_p = ctypes.POINTER(ctypes.c_uint32)
        prototype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, uint_p, uint_p, use_errno=True)
        self.getpeereid = prototype(self._getpeereid)

    def __call__(self, _name: object, use_errno: bool = False) -> FakeLibc:
        return self  # stands for the class: CDLL(None) is this library

    def _getpeereid(self, fd: int, uid: Any, gid: Any) -> int:
        self.fds.append(fd)
        if self.answer is None:
            ctypes.set_errno(errno.ENOTCONN)
            return -1
        uid[0], gid[0] = self.answer
        return 0


class LibcWithoutGetpeereid:
    """``ctypes.CDLL`` of a C library that has no ``getpeereid`` (glibc, Solaris)."""

    def __init__(self, _name: object, use_errno: bool = False) -> None:
        pass


def test_macos_reads_local_peercred_and_local_peerpid(platform: Any) -> None:
    """On macOS the uid comes from LOCAL_PEERCRED's xucred, the gid is its first group
    (the egid), every listed group counts for gid rules, the pid is LOCAL_PEERPID."""
    platform("darwin")
    sock = DarwinSocket(xucred(501, [20, 12, 61, 79]), pid=4242)
    peer = Peer.of(sock)
    assert peer == Peer(pid=4242, uid=501, gid=20, groups=frozenset({20, 12, 61, 79}))
    assert sock.asked == [(0, 1, 76), (0, 2, None)]
    policy = AccessPolicy((ClientRule(gid=61, allow=("env/*",)),))
    assert policy.allows(peer, "env", "db")


@pytest.mark.parametrize(
    ("cred", "pid", "expected"),
    [
        (xucred(501, [20]), None, Peer(None, 501, 20, frozenset({20}))),  # no LOCAL_PEERPID
        (xucred(0, [0, *range(1, 15)], ngroups=40), 7, Peer(7, 0, 0, frozenset(range(15)))),
        (xucred(501, [], ngroups=0), 7, Peer(7, 501, None, frozenset())),
        (xucred(501, [20], version=1), 7, UNKNOWN),  # a layout we do not know
        (xucred(501, [20])[:40], 7, UNKNOWN),  # shorter than an xucred
    ],
    ids=["no-pid", "ngroups-clamped-to-16", "no-groups", "unknown-version", "short"],
)
def test_macos_xucred_edge_cases(
    platform: Any, cred: bytes, pid: int | None, expected: Peer
) -> None:
    """What the kernel may hand back, read without guessing: a count beyond the 16
    slots is clamped, an unknown version or a short buffer is an unknown peer."""
    platform("darwin")
    assert Peer.of(DarwinSocket(cred, pid)) == expected


def test_macos_without_local_peercred_is_an_unknown_peer(platform: Any) -> None:
    """A getsockopt the kernel refuses is an unknown peer, never an error (no 500)."""
    platform("darwin")

    class Refusing(DarwinSocket):
        def getsockopt(self, level: int, option: int, size: int | None = None) -> Any:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    assert Peer.of(Refusing(b"", None)) == UNKNOWN


def test_bsd_reads_getpeereid(platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a BSD the C library's getpeereid gives the effective uid and gid of the peer
    of that very socket (its fd); no pid, no supplementary groups."""
    libc = FakeLibc((1001, 1002))
    monkeypatch.setattr(ctypes, "CDLL", libc)
    platform("freebsd14")
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert Peer.of(left) == Peer(None, 1001, 1002)
        assert libc.fds == [left.fileno()]
    assert access.peer_credentials_supported()


def test_bsd_getpeereid_failure_is_an_unknown_peer(
    platform: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getpeereid returning -1 (a peer already gone) leaves the peer unknown."""
    monkeypatch.setattr(ctypes, "CDLL", FakeLibc(None))
    platform("netbsd10")
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert Peer.of(left) == UNKNOWN


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the real SO_PEERCRED")
def test_linux_reads_so_peercred_and_groups() -> None:
    """On Linux the kernel's SO_PEERCRED and SO_PEERGROUPS: this very process."""
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        peer = Peer.of(left)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert peer.groups == frozenset(os.getgroups())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the real SO_PEERCRED")
async def test_peer_is_read_once_per_connection(tmp_path: Path) -> None:
    """Credentials are fixed at connect(): every request of a socket API connection
    shares one read; another connection gets its own."""
    seen: list[Peer] = []

    async def handle(request: web.BaseRequest) -> web.Response:
        assert isinstance(request.protocol, GuardedConnection)
        seen.append(request.protocol.peer)
        return web.Response(text="ok")

    factory = connection_factory(web.Server(handle), ListenConfig())
    path = str(tmp_path / "p.sock")
    server = await asyncio.get_running_loop().create_unix_server(factory, path)
    async with server:
        for requests in (2, 1):  # two requests on one connection, then another connection
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as session:
                for _ in range(requests):
                    async with session.get("http://sidecar/") as response:
                        assert response.status == 200
    first, again, second = seen
    assert first is again
    assert first == second
    assert first is not second
    assert (first.uid, first.pid) == (os.getuid(), os.getpid())
    assert peer_of(None) == UNKNOWN


# --- a platform where no peer credentials can be read ---


@pytest.fixture
def unsupported(platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither Linux nor macOS, and a C library without getpeereid."""
    monkeypatch.setattr(ctypes, "CDLL", LibcWithoutGetpeereid)
    platform(UNSUPPORTED)
    assert reader_for(UNSUPPORTED) is None
    assert not access.peer_credentials_supported()


@contextlib.asynccontextmanager
async def served(tmp_path: Path, extra: dict[str, Any]) -> AsyncIterator[aiohttp.ClientSession]:
    """The daemon in this loop on a real socket; a client session on it."""
    path = tmp_path / "s.sock"
    config = parse_config({"listen": {"socket": str(path)}, "metrics": {"address": ""}, **extra})
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve(config, shutdown_trigger=stop.wait, ready=ready, metrics=Metrics())
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(path)),
            timeout=aiohttp.ClientTimeout(total=10),
        ) as session:
            yield session
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


REF = "{vault://env/peer-test}"


async def test_unknown_peers_read_when_there_are_no_rules(
    unsupported: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without peer credentials a daemon without `clients:` serves reads (no 500); the
    peer is logged as unknown, and the daemon says once why."""
    monkeypatch.setenv("PEER_TEST", "v1")
    with structlog.testing.capture_logs() as logs:
        async with served(tmp_path, {}) as session:
            async with session.get("http://s/v1/secrets", params={"ref": REF}) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["value"] == "v1"
            async with session.get("http://s/v1/status") as response:
                assert response.status == 200  # no rules: every peer is an admin
    reads = [line for line in logs if line["event"] == "secret.read"]
    assert [(r["uid"], r["gid"], r["pid"]) for r in reads] == [(None, None, None)]
    warned = [line for line in logs if line["event"] == "access.peer_unknown"]
    assert warned
    assert UNSUPPORTED in warned[0]["reason"]


def test_rules_are_refused_where_peers_cannot_be_known(
    unsupported: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`clients:` rules that could never match are a config error: `run` and `check`
    refuse them (exit 2) naming the reason, before the socket exists."""
    config = tmp_path / "c.yaml"
    sock = tmp_path / "s.sock"
    config.write_text(f"listen: {{socket: {sock}}}\nclients: [{{uid: 0, allow: ['*']}}]\n")
    for command in ("run", "check"):
        assert cli.main([command, "-c", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("secret-sidecar: invalid_config: clients: peer credentials cannot")
        assert UNSUPPORTED in err
        assert not sock.exists()
    with pytest.raises(ConfigError, match="cannot be enforced"):
        access.check_rules_enforceable((ClientRule(uid=0, allow=("*",)),))
    access.check_rules_enforceable(())  # no rules: nothing to enforce


async def test_rules_fail_closed_if_served_anyway(
    unsupported: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve` given rules anyway (no CLI in front) refuses every read: an unknown peer
    matches no rule."""
    monkeypatch.setenv("PEER_TEST", "v1")
    async with (
        served(tmp_path, {"clients": [{"uid": os.getuid(), "allow": ["*"]}]}) as session,
        session.get("http://s/v1/secrets", params={"ref": REF}) as response,
    ):
        assert response.status == 403
        body = await response.json()
    assert body["error"]["code"] == "forbidden"
    assert "unknown" in body["error"]["message"]


def test_remembered_verdicts_are_per_peer_and_per_policy() -> None:
    """Verdicts are remembered per (peer, vault, secret id): one peer's allowed read never
    answers for another peer, a token for a uid, or a reloaded (new) policy."""
    rules = parse_config({"clients": [{"uid": 1000, "allow": ["env/team-a/*"]}]}).clients
    policy = AccessPolicy(rules)
    reader, other = Peer(1, 1000, 1000), Peer(2, 1001, 1001)
    token = Peer(None, None, None, token="ci", token_allow=("env/other/*",))
    for _ in range(3):  # asked again and again, in turn: the memo answers after the first
        assert policy.allows(reader, "env", "team-a/db")
        assert not policy.allows(other, "env", "team-a/db")
        assert not policy.allows(token, "env", "team-a/db")
        assert policy.allows(token, "env", "other/x")
        assert not policy.allows(reader, "env", "team-b/db")
    reloaded = AccessPolicy(
        parse_config({"clients": [{"uid": 1001, "allow": ["env/team-a/*"]}]}).clients
    )
    assert (
        reloaded.allows(reader, "env", "team-a/db"),
        reloaded.allows(other, "env", "team-a/db"),
    ) == (False, True)
