"""The real daemon as a subprocess on a real socket, and clients that talk to it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def require_program(name: str) -> str:
    """The path of an external program; under CI its absence fails the test."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required under CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


async def wait_until(predicate: Any, within: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


class Daemon:
    """``python -m sidecar run -c <file>`` in a temp dir; stderr (the logs) kept in a file."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.socket = workdir / "sidecar.sock"
        self.metrics_port = free_port()
        config.setdefault("listen", {}).setdefault("socket", str(self.socket))
        config.setdefault("metrics", {"address": f"127.0.0.1:{self.metrics_port}"})
        self.config_path = workdir / "config.yaml"
        self.write_config(config)
        self.log_path = workdir / "daemon.log"
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        return self.process

    async def started(self) -> Daemon:
        self.start()
        await wait_until(self._answers, START_TIMEOUT, "the daemon to answer /healthz")
        return self

    async def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.logs()}")
        if not self.socket.exists():
            return False
        try:
            status, _ = await self.request("GET", "/healthz")
        except aiohttp.ClientError:
            return False
        return status == 200

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket)),
            timeout=aiohttp.ClientTimeout(total=15),
        )

    async def request(
        self, method: str, path: str, *, params: Any = None, json_body: Any = None
    ) -> tuple[int, Any]:
        async with (
            self.session() as session,
            session.request(method, f"http://sidecar{path}", params=params, json=json_body) as r,
        ):
            return r.status, await r.json(content_type=None)

    async def get(self, ref: str) -> tuple[int, Any]:
        return await self.request("GET", "/v1/secrets", params={"ref": ref})
