"""Who may read what over the socket: peer credentials matched against ``clients:``.

The kernel vouches for the peer, so a uid/gid rule cannot be spoofed by the caller.
How it is asked depends on the platform: ``SO_PEERCRED`` (+ ``SO_PEERGROUPS``) on
Linux, ``LOCAL_PEERCRED`` (+ ``LOCAL_PEERPID``) on macOS, ``getpeereid()`` on the
BSDs. Where none works the peer is unknown: reads without rules still work, and
``check_rules_enforceable`` refuses a config with rules (unknown peers match no rule).
With no rules, anyone who can open the socket may read and is an admin; the socket's
mode and group are then the access control. Checks run on the parsed reference,
before its vault is looked up, so a caller cannot probe vault names, settings or
backend errors outside its globs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from sidecar.errors import ConfigError, Forbidden
from sidecar.logging import get_logger

if TYPE_CHECKING:
    from sidecar.config import ClientRule
    from sidecar.reference import Reference

log = get_logger("sidecar.access")

_UCRED = struct.Struct("3i")  # Linux struct ucred: pid, uid, gid
_LINUX_SO_PEERCRED = 17
_LINUX_SO_PEERGROUPS = 59  # Linux >= 4.13; Python names it from 3.12 only
_GROUPS_BUFFER = 4 * 256  # grown once to the kernel's NGROUPS_MAX if a peer has more
_NGROUPS_MAX = 65536

# macOS <sys/un.h>, <sys/ucred.h>: struct xucred {u_int cr_version; uid_t cr_uid;
# short cr_ngroups; gid_t cr_groups[NGROUPS]} with NGROUPS 16; cr_groups[0] is the egid.
SOL_LOCAL = 0
LOCAL_PEERCRED = 1
LOCAL_PEERPID = 2
XUCRED_VERSION = 0
XUCRED = struct.Struct("=IIh2x16I")

PeerReader = Callable[[Any], "Peer"]
"""Reads the credentials of the peer of a connected ``AF_UNIX`` socket; may raise OSError."""


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int | None
    uid: int | None
    gid: int | None
    groups: frozenset[int] = frozenset()  # supplementary groups
    # A caller of the Vault-KV facade: its token's name (who it is in audit events) and
    # that token's globs, which are what it may read (``clients:`` rules are for uids).
    token: str | None = None
    token_allow: tuple[str, ...] = ()

    @classmethod
    def of(cls, sock: Any) -> Peer:
        """Read the peer's credentials from a connected Unix socket; unknown otherwise."""
        if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
            return UNKNOWN
        read = reader_for(sys.platform)
        if read is None:
            return UNKNOWN
        try:
            return read(sock)
        except OSError:
            return UNKNOWN

    @property
    def known(self) -> bool:
        return self.uid is not None

    def gids(self) -> frozenset[int]:
        return self.groups | ({self.gid} if self.gid is not None else set())


UNKNOWN = Peer(None, None, None)
MAX_VERDICTS = 65_536  # remembered access verdicts per policy


def peer_of(transport: Any) -> Peer:
    """The peer at the other end of a connection (an asyncio or uvloop transport).

    Credentials are the peer's as of connect(); the socket API reads them once per
    connection (``GuardedConnection.peer``): uvloop builds a socket object per call."""
    if transport is None:
        return UNKNOWN
    return Peer.of(transport.get_extra_info("socket"))


@functools.cache
def reader_for(platform: str) -> PeerReader | None:
    """How this platform tells who is at the other end of a Unix socket; None: it cannot."""
    if platform.startswith("linux"):
        return _read_linux
    if platform == "darwin":
        return _read_darwin
    getpeereid = _libc_getpeereid()
    return None if getpeereid is None else functools.partial(_read_getpeereid, getpeereid)


def peer_credentials_supported() -> bool:
    """Whether peer uid/gid can be read here, so ``clients:`` rules can be enforced."""
    return reader_for(sys.platform) is not None


def check_rules_enforceable(rules: tuple[ClientRule, ...]) -> None:
    """Refuse ``clients:`` rules on a platform where no peer's uid/gid can be read."""
    if rules and not peer_credentials_supported():
        raise ConfigError(
            f"clients: peer credentials cannot be read on this platform ({sys.platform}), "
            "so uid/gid rules cannot be enforced; remove `clients:` and restrict the "
            "socket with listen.mode and listen.group instead"
        )


def _read_linux(sock: Any) -> Peer:
    option = getattr(socket, "SO_PEERCRED", _LINUX_SO_PEERCRED)
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    return Peer(pid, uid, gid, _linux_groups(sock, pid))


def _linux_groups(sock: Any, pid: int) -> frozenset[int]:
    """SO_PEERGROUPS where the kernel has it, else the ``Groups:`` line of /proc/<pid>/status.

    /proc is the fallback only: the pid may have been reused, or live in another pid
    namespace (a sidecar container), where SO_PEERGROUPS still answers correctly.
    """
    option = getattr(socket, "SO_PEERGROUPS", _LINUX_SO_PEERGROUPS)
    for size in (_GROUPS_BUFFER, 4 * _NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, option, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:  # more groups than the buffer holds
                continue
            break
        count = len(raw) // 4
        return frozenset(struct.unpack(f"{count}I", raw[: 4 * count]))
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Groups:"):
                return frozenset(int(gid) for gid in line.split()[1:])
    return frozenset()


def _read_darwin(sock: Any) -> Peer:
    """``LOCAL_PEERCRED``: the effective uid and the first 16 groups (the egid first)."""
    return parse_xucred(sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, XUCRED.size), _darwin_pid(sock))


def _darwin_pid(sock: Any) -> int | None:
    """``LOCAL_PEERPID`` (macOS 10.8+); the pid is for the audit log only, never for access."""
    try:
        pid: int = sock.getsockopt(SOL_LOCAL, LOCAL_PEERPID)
    except OSError:
        return None
    return pid


def parse_xucred(raw: bytes, pid: int | None = None) -> Peer:
    """A ``struct xucred`` as macOS returns it; an unknown layout version is an unknown peer."""
    if len(raw) < XUCRED.size:
        return UNKNOWN
    version, uid, ngroups, *groups = XUCRED.unpack(raw[: XUCRED.size])
    if version != XUCRED_VERSION:
        return UNKNOWN
    groups = groups[: max(0, min(ngroups, len(groups)))]
    return Peer(pid, uid, groups[0] if groups else None, frozenset(groups))


def _libc_getpeereid() -> Any:
    """``int getpeereid(int, uid_t *, gid_t *)`` from the C library (the BSDs), else None."""
    try:
        getpeereid = ctypes.CDLL(None, use_errno=True).getpeereid
    except (AttributeError, OSError, TypeError):
        return None
    uid_p = ctypes.POINTER(ctypes.c_uint32)  # uid_t and gid_t are 32-bit unsigned on the BSDs
    getpeereid.argtypes = (ctypes.c_int, uid_p, uid_p)
    getpeereid.restype = ctypes.c_int
    return getpeereid


def _read_getpeereid(getpeereid: Any, sock: Any) -> Peer:
    """Effective uid and gid only: no pid, no supplementary groups (gid rules match the egid)."""
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"getpeereid: {errno.errorcode.get(code, code)}")
    return Peer(None, uid.value, gid.value)


class AccessPolicy:
    def __init__(self, rules: tuple[ClientRule, ...]) -> None:
        self.rules = rules
        self._verdicts: dict[tuple[Peer, str, str], bool] = {}
        if not peer_credentials_supported():
            log.warning(
                "access.peer_unknown",
                reason=f"peer credentials cannot be read on {sys.platform}",
                rules=len(rules),  # rules match no unknown peer: with any, reads are refused
            )

    def _rules_of(self, peer: Peer) -> list[ClientRule]:
        gids = peer.gids()
        return [
            rule
            for rule in self.rules
            if (rule.uid is not None and rule.uid == peer.uid)
            or (rule.gid is not None and rule.gid in gids)
        ]

    def allows(self, peer: Peer, name: str, resource: str) -> bool:
        """Remembered per (peer, vault, secret id): the rules' globs cost 6 us a read with
        four rules, and a verdict depends on nothing else (a reload makes a new policy)."""
        if not self.rules and peer.token is None:
            return True
        asked = (peer, name, resource)
        verdict = self._verdicts.get(asked)
        if verdict is None:
            target = f"{name}/{resource}"
            if peer.token is not None:
                patterns: Iterable[str] = peer.token_allow
            else:
                patterns = (pattern for rule in self._rules_of(peer) for pattern in rule.allow)
            verdict = any(fnmatchcase(target, pattern) for pattern in patterns)
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()  # more distinct readers x secrets than any gateway has
            self._verdicts[asked] = verdict
        return verdict

    def is_admin(self, peer: Peer) -> bool:
        """May refresh everything and see which secret ids are cached or missing."""
        if peer.token is not None:
            return False
        return not self.rules or any(rule.admin for rule in self._rules_of(peer))

    def check(self, peer: Peer, reference: Reference) -> None:
        if not self.allows(peer, reference.name, reference.resource):
            if peer.token is not None:
                who = f"token {peer.token!r}"
            elif peer.known:
                who = f"uid={peer.uid} gid={peer.gid}"
            else:
                who = "unknown (no credentials)"
            raise Forbidden(f"peer {who} may not read {reference.name}/{reference.resource}")

    def check_admin(self, peer: Peer, what: str) -> None:
        if not self.is_admin(peer):
            raise Forbidden(f"{what} needs a client rule with admin: true (peer uid={peer.uid})")
