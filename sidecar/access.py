"""Who may read what over the socket: peer credentials matched against ``clients:``.

The kernel vouches for the peer (SO_PEERCRED, SO_PEERGROUPS), so a uid/gid rule
cannot be spoofed by the caller. With no rules, anyone who can open the socket may
read and is an admin; the socket's mode and group are then the access control.
Checks run on the parsed reference, before its vault is looked up, so a caller
cannot probe vault names, settings or backend errors outside its globs.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from sidecar.config import ClientRule
from sidecar.errors import Forbidden
from sidecar.reference import Reference

_UCRED = struct.Struct("3i")
# Linux >= 4.13: the peer's supplementary groups as of connect(), like SO_PEERCRED.
SO_PEERGROUPS: int | None = getattr(
    socket, "SO_PEERGROUPS", 59 if sys.platform == "linux" else None
)
_GROUPS_BUFFER = 4 * 256  # grown once to the kernel's NGROUPS_MAX if a peer has more
_NGROUPS_MAX = 65536


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int | None
    uid: int | None
    gid: int | None
    groups: frozenset[int] = frozenset()  # supplementary groups

    @classmethod
    def of(cls, sock: Any) -> Peer:
        """Read the peer's credentials from a connected Unix socket; unknown otherwise."""
        if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
            return cls(None, None, None)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return cls(None, None, None)
        pid, uid, gid = _UCRED.unpack(raw)
        return cls(pid, uid, gid, _groups(sock, pid))

    def gids(self) -> frozenset[int]:
        return self.groups | ({self.gid} if self.gid is not None else set())


def _groups(sock: Any, pid: int) -> frozenset[int]:
    """SO_PEERGROUPS where the kernel has it, else the ``Groups:`` line of /proc/<pid>/status.

    /proc is the fallback only: the pid may have been reused, or live in another pid
    namespace (a sidecar container), where SO_PEERGROUPS still answers correctly.
    """
    sizes = (_GROUPS_BUFFER, 4 * _NGROUPS_MAX) if SO_PEERGROUPS is not None else ()
    for size in sizes:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
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


class AccessPolicy:
    def __init__(self, rules: tuple[ClientRule, ...]) -> None:
        self.rules = rules

    def _rules_of(self, peer: Peer) -> list[ClientRule]:
        gids = peer.gids()
        return [
            rule
            for rule in self.rules
            if (rule.uid is not None and rule.uid == peer.uid)
            or (rule.gid is not None and rule.gid in gids)
        ]

    def allows(self, peer: Peer, name: str, resource: str) -> bool:
        if not self.rules:
            return True
        target = f"{name}/{resource}"
        return any(
            fnmatchcase(target, pattern) for rule in self._rules_of(peer) for pattern in rule.allow
        )

    def is_admin(self, peer: Peer) -> bool:
        """May refresh everything and see which secret ids are cached or missing."""
        return not self.rules or any(rule.admin for rule in self._rules_of(peer))

    def check(self, peer: Peer, reference: Reference) -> None:
        if not self.allows(peer, reference.name, reference.resource):
            raise Forbidden(
                f"peer uid={peer.uid} gid={peer.gid} may not read "
                f"{reference.name}/{reference.resource}"
            )

    def check_admin(self, peer: Peer, what: str) -> None:
        if not self.is_admin(peer):
            raise Forbidden(f"{what} needs a client rule with admin: true (peer uid={peer.uid})")
