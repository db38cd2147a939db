"""``secret-sidecar health``: the container's health and readiness probe.

Kubernetes exec probes and Docker's ``HEALTHCHECK`` start a process every few seconds for
the life of the pod, so this speaks HTTP/1.1 over the socket with the standard library
alone: no event loop, no aiohttp, no config file. The answer is the exit code (0 when the
daemon says 200); the reasons a daemon gives for not being ready go to stderr, never a
value, since /healthz and /readyz carry none.
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path


class _UnixConnection(http.client.HTTPConnection):
    """``HTTPConnection`` whose transport is the daemon's Unix socket."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("sidecar", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def probe(path: Path, *, ready: bool, timeout: float) -> tuple[bool, str]:
    """Ask ``/readyz`` (``ready``) or ``/healthz``; ``(passed, what to report)``."""
    endpoint = "/readyz" if ready else "/healthz"
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("GET", endpoint)
        response = connection.getresponse()
        body = response.read(64 * 1024).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return False, f"cannot ask the daemon at {path}: {exc}"
    finally:
        connection.close()
    if response.status == 200:
        return True, ""
    return False, f"{endpoint} answered {response.status}: {body}"
