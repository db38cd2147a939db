"""The API's Unix socket file: where it may live, created with its mode, removed only if ours.

The socket's mode and group are the first access control (connecting needs write
permission on it), so it is created with them, under a umask, in a directory nobody
else can swap it out of; a stale socket is replaced only if it really is a socket
nobody answers on.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from pathlib import Path

from sidecar.config import ListenConfig
from sidecar.errors import StartupError
from sidecar.logging import get_logger

log = get_logger("sidecar.unix_socket")


def problems(listen: ListenConfig) -> list[str]:
    """Everything that would stop ``bind`` or make the socket unsafe, without binding."""
    found = []
    parent = listen.socket.absolute().parent
    try:
        mode = os.stat(parent).st_mode
    except OSError as exc:
        found.append(f"socket directory {parent} is not usable: {exc.strerror}")
    else:
        if not stat.S_ISDIR(mode):
            found.append(f"socket directory {parent} is not a directory")
        elif mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            found.append(
                f"socket directory {parent} is world-writable without the sticky bit:"
                " anyone could replace the socket; use a directory only the sidecar can write"
            )
    if listen.group is not None:
        try:
            _gid(listen.group)
        except KeyError:
            found.append(f"listen.group {listen.group!r} is not a group on this host")
    with contextlib.suppress(OSError):
        if not stat.S_ISSOCK(os.lstat(listen.socket).st_mode):
            found.append(f"{listen.socket} exists and is not a socket; refusing to replace it")
    return found


def bind(listen: ListenConfig) -> socket.socket:
    """Bind with the configured mode already applied (umask), set the group, return unlistened.

    Nobody can connect to a socket that is not listening yet, and the umask means
    the file never exists with a wider mode than ours, not even for a moment.
    """
    found = problems(listen)
    if found:
        raise StartupError("; ".join(found))
    path = listen.socket
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        previous = os.umask(0o777 & ~listen.mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(previous)  # process-wide: restored at once
        os.chmod(path, listen.mode)  # umask cannot add bits; chmod makes the mode exact
        if listen.group is not None:
            os.chown(path, -1, _gid(listen.group))
    except (OSError, KeyError) as exc:
        sock.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        raise StartupError(f"cannot create socket {path}: {exc}") from exc
    sock.setblocking(False)
    return sock


def _gid(group: str | int) -> int:
    return group if isinstance(group, int) else grp.getgrnam(group).gr_gid


def _clear_stale(path: Path) -> None:
    """Remove a socket file no daemon answers on; refuse anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("socket.stale_removed", socket=str(path))
        return
    finally:
        probe.close()
    raise StartupError(f"another process is serving on {path}; stop it or choose another socket")


def remove(path: Path, inode: int) -> None:
    """Unlink the socket only if it is still ours (a successor may have replaced it)."""
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
