"""The real daemon as a subprocess for the fuzz modules, driven by a blocking client.

Its environment holds canaries: values that a non-200 answer, the logs or an error
message must never show, and a fake backend credential that nothing may ever show.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.fuzz import wire

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# One set per test session: the strategies build requests that name them.
VALUE_CANARY = f"fuzz-canary-{secrets.token_hex(8)}"  # in secret values: only a 200 shows it
CREDENTIAL_CANARY = f"fuzz-cred-{secrets.token_hex(8)}"  # a backend credential: nothing shows it
PLAIN = f"plain-{secrets.token_hex(4)}"
SECRETS = {
    "CANARY": VALUE_CANARY,
    "CANARY_PREVIOUS": f"{VALUE_CANARY}-previous",
    "FUZZ_PLAIN": PLAIN,
    "FUZZ_JSON": json.dumps({"username": "app", "password": VALUE_CANARY}),
    "FUZZ_NESTED": json.dumps(
        {
            "obj": {"inner": VALUE_CANARY},
            "list": [VALUE_CANARY],
            "num": 7,
            "flag": True,
            "none": None,
        }
    ),
    "FUZZ_ARRAY": json.dumps([VALUE_CANARY]),
    "FUZZ_BROKEN": '{"password": "' + VALUE_CANARY,
    "FUZZ_B64": base64.b64encode(VALUE_CANARY.encode()).decode(),
}
# The env backend must never serve these (they are the sidecar's own credentials).
CREDENTIALS = {
    "AWS_SECRET_ACCESS_KEY": CREDENTIAL_CANARY,
    "KONG_VAULT_HCV_TOKEN": CREDENTIAL_CANARY,
}
# References a clean request must be answered 200 with exactly this value. None has a
# query: each vault has a bounded number of query variants, which fuzzing exhausts.
KNOWN_REFS = {
    "{vault://env/fuzz-plain}": PLAIN,
    "{vault://env/FUZZ_PLAIN}": PLAIN,
    "{vault://env/fuzz%2Dplain/}": PLAIN,
    "{vault://fz/plain}": PLAIN,
    "{vault://env/canary}": VALUE_CANARY,
    "{vault://env/canary#2}": f"{VALUE_CANARY}-previous",
    "{vault://env/fuzz-json/password}": VALUE_CANARY,
    "{vault://fz/json/username}": "app",
}


class FuzzDaemon:
    """``python -m sidecar run -c <file>`` in ``workdir``, with canary secrets in its env."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "s.sock"
        self.log_path = workdir / "daemon.log"
        self.config_path = workdir / "config.yaml"
        config: dict[str, Any] = {
            # a request that never completes its headers (PRI without a preface) is cut
            # at header_timeout: short here, so the case answers within the 5 s budget
            "listen": {"socket": str(self.socket), "header_timeout": 2},
            "metrics": {"address": ""},
            "log": {"level": "info", "format": "json"},
            "watch": {"heartbeat": 1},  # abandoned watch streams notice within a second
            "vaults": [{"prefix": "fz", "name": "env", "config": {"prefix": "FUZZ_"}}],
            "clients": [{"uid": os.getuid(), "allow": ["env/*", "fz/*"]}],
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> FuzzDaemon:
        env = {**os.environ, **SECRETS, **CREDENTIALS}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=log,
            )
        try:
            self.wait_for("/readyz", START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, target: str, timeout: float = wire.TIMEOUT) -> wire.Exchange:
        data = f"GET {target} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n".encode()
        return wire.exchange(self.socket, data, half_close=False, timeout=timeout)

    def answers(self, target: str = "/healthz") -> bool:
        if not self.alive() or not self.socket.exists():
            return False
        response = self.get(target).response
        return response is not None and response.status == 200

    def wait_for(self, target: str, within: float) -> None:
        """Poll until ``target`` answers 200; fail at once if the process exits."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"daemon exited {self.returncode()}:\n{self.logs()[-4000:]}")
            if self.answers(target):
                return
            time.sleep(0.02)
        raise AssertionError(f"daemon did not answer {target} within {within} s")

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.returncode()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def new_log_text(self) -> str:
        """What the daemon logged since the last call."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            data = log.read()
        data = data[: data.rfind(b"\n") + 1]  # whole lines only; the rest comes next time
        self._log_offset += len(data)
        return data.decode("utf-8", "replace")
