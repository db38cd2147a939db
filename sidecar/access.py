"""Who may read what over the socket: peer credentials matched against ``clients:``.

The kernel vouches for the peer (SO_PEERCRED), so a uid/gid rule cannot be
spoofed by the caller. With no rules, anyone who can open the socket may read;
the socket's mode and group are then the access control.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from sidecar.config import ClientRule
from sidecar.errors import Forbidden
from sidecar.reference import Reference

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int | None
    uid: int | None
    gid: int | None

    @classmethod
    def of(cls, sock: Any) -> Peer:
        """Read SO_PEERCRED from a connected Unix socket; unknown on other transports."""
        if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
            return cls(None, None, None)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return cls(None, None, None)
        pid, uid, gid = _UCRED.unpack(raw)
        return cls(pid, uid, gid)


class AccessPolicy:
    def __init__(self, rules: tuple[ClientRule, ...]) -> None:
        self.rules = rules

    def allows(self, peer: Peer, name: str, resource: str) -> bool:
        if not self.rules:
            return True
        target = f"{name}/{resource}"
        return any(
            fnmatchcase(target, pattern)
            for rule in self.rules
            if (rule.uid is not None and rule.uid == peer.uid)
            or (rule.gid is not None and rule.gid == peer.gid)
            for pattern in rule.allow
        )

    def check(self, peer: Peer, reference: Reference) -> None:
        if not self.allows(peer, reference.name, reference.resource):
            raise Forbidden(
                f"peer uid={peer.uid} gid={peer.gid} may not read "
                f"{reference.name}/{reference.resource}"
            )
