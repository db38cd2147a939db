"""deploy/systemd: the unit as systemd reads it, its sandbox, and the daemon inside it.

``systemd-analyze verify`` needs every ``ExecStart`` binary to exist, and
``/usr/local/bin/secret-sidecar`` is where the README installs it, not where this
checkout has it: the copy verified here differs from the shipped unit only in that path,
which points at the project venv's ``secret-sidecar``. Needs the Debian package
``systemd`` (``systemd-analyze``, ``systemd-sysusers``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.probe import probe
from tests.canary import value
from tests.deploy.tooling import ROOT, tool

UNIT = ROOT / "deploy" / "systemd" / "secret-sidecar.service"
SYSUSERS = ROOT / "deploy" / "systemd" / "secret-sidecar.sysusers"
INSTALLED = "/usr/local/bin/secret-sidecar"
EXEC_START = f"{INSTALLED} run -c /etc/secret-sidecar/config.yaml"
CLI = Path(sys.executable).with_name("secret-sidecar")  # the project venv's entry point
# Directives issue 11 asks for, and the rest of the sandbox the README promises.
REQUIRED = {
    "Type": "exec",
    "User": "secret-sidecar",
    "Group": "secret-sidecar",
    "ExecStart": EXEC_START,
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "EnvironmentFile": "-/etc/secret-sidecar/env",
    "Restart": "on-failure",
    "RuntimeDirectory": "secret-sidecar",
    "RuntimeDirectoryMode": "0750",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "CapabilityBoundingSet": "",
    "SystemCallArchitectures": "native",
}
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # linux/prctl.h, Linux 6.3+


def directives(text: str) -> dict[str, list[str]]:
    """``[Service]`` directives as systemd sees them: name -> every value, in order."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            name, _, setting = line.partition("=")
            found.setdefault(name.strip(), []).append(setting.strip())
    return found


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), "verify", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The shipped unit with its ExecStart binary swapped for this checkout's."""
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(INSTALLED) == 1, "the unit names the binary once, in ExecStart"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED, str(CLI)), encoding="utf-8")
    return unit


def test_systemd_analyze_verify_accepts_the_unit_without_warnings(local_unit: Path) -> None:
    """Exit 0 and nothing printed: an unknown or misspelt directive is only a warning
    (systemd ignores it and runs the service without that protection), so silence is
    what says every line took effect."""
    done = verify(local_unit)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_reports_a_misspelt_directive(local_unit: Path) -> None:
    """The silence above means something: the same unit with one typo is reported."""
    text = local_unit.read_text(encoding="utf-8")
    local_unit.write_text(text.replace("ProtectSystem=", "ProtectSytem="), encoding="utf-8")
    done = verify(local_unit)
    assert "Unknown key 'ProtectSytem'" in done.stdout + done.stderr


def test_the_unit_sets_the_hardening_it_promises() -> None:
    """Each directive of issue 11 and the README, with exactly that value."""
    found = directives(UNIT.read_text(encoding="utf-8"))
    wrong = {k: found.get(k) for k, v in REQUIRED.items() if found.get(k) != [v]}
    assert not wrong, f"missing or different: {wrong}"
    assert found["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "DynamicUser" not in found, "a dedicated user: the README says why"
    assert "PrivateUsers" not in found, "it would hide peer uids from the clients: ACL"


def test_security_exposure_is_low(local_unit: Path) -> None:
    """``systemd-analyze security --offline`` rates the sandbox "OK", at most 1.9 of 10.

    The score comes from systemd's own table (1.2 on Debian 12's systemd 252); the bound
    leaves room for a newer table, not for a dropped directive (``--threshold`` counts
    tenths: the exit is non-zero above 19)."""
    done = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--threshold=19", str(local_unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    overall = [line for line in done.stdout.splitlines() if "Overall exposure" in line]
    assert done.returncode == 0, done.stdout + done.stderr
    assert overall, done.stdout


def test_sysusers_file_creates_the_user_and_group(tmp_path: Path) -> None:
    """``systemd-sysusers --dry-run`` on an empty root: a system user and group named
    secret-sidecar, the names the unit runs as."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    done = subprocess.run(
        [tool("systemd-sysusers"), f"--root={root}", "--dry-run", str(SYSUSERS)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "Creating group 'secret-sidecar'" in report
    assert "Creating user 'secret-sidecar'" in report


# Sets the kernel's MemoryDenyWriteExecute (kept across exec), then becomes argv[1:].
_MDWE_LAUNCHER = f"""
import ctypes, os, sys
if ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(97)
os.execv(sys.argv[1], sys.argv[1:])
"""


def under_mdwe(*argv: str) -> list[str]:
    return [sys.executable, "-c", _MDWE_LAUNCHER, *argv]


@pytest.fixture
def mdwe() -> None:
    """Skip where the kernel has no PR_SET_MDWE (before 6.3); prove it bites where it has."""
    probe_wx = (
        "import mmap\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "except PermissionError:\n"
        "    raise SystemExit(0)\n"
        "raise SystemExit(1)\n"
    )
    done = subprocess.run(under_mdwe(sys.executable, "-c", probe_wx), timeout=30, check=False)
    if done.returncode == 97:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert done.returncode == 0, "a writable+executable mapping was allowed under MDWE"


@pytest.fixture
def daemon_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"listen: {{socket: {tmp_path / 'sidecar.sock'}}}\n"
        "metrics: {address: ''}\n"
        "vaults: [{prefix: app, name: env, config: {prefix: APP_}}]\n"
        "prefetch: ['{vault://app/db-password}']\n",
        encoding="utf-8",
    )
    return config


def _wait_ready(socket: Path, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise AssertionError(f"the daemon exited {daemon.returncode}:\n{log.read_text()}")
        if probe(socket, ready=True, timeout=1)[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready within 20 s:\n{log.read_text()}")


def _get(socket: Path, ref: str, environ: dict[str, str]) -> str:
    done = subprocess.run(
        [str(CLI), "get", ref, "--socket", str(socket)],
        capture_output=True, text=True, timeout=30, check=False, env=environ,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.usefixtures("mdwe")
def test_daemon_runs_reloads_and_stops_under_memory_deny_write_execute(
    daemon_config: Path,
) -> None:
    """The unit's ``MemoryDenyWriteExecute=yes`` holds for CPython, uvloop, aiohttp and the
    backend SDKs: under PR_SET_MDWE every backend module imports, and the daemon starts,
    serves a secret, reloads on the unit's ``ExecReload`` signal (SIGHUP) and exits 0
    on SIGTERM."""
    imports = "import sidecar.backends.aws, sidecar.backends.gcp, sidecar.backends.hcv, grpc"
    done = subprocess.run(
        under_mdwe(sys.executable, "-c", imports),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    secret = value("systemd db-password")
    reloaded = value("systemd db-password after reload")
    environ = {**os.environ, "APP_DB_PASSWORD": secret, "NEW_DB_PASSWORD": reloaded}
    socket = daemon_config.parent / "sidecar.sock"
    log_path = daemon_config.with_name("daemon.log")
    log = log_path.open("wb")
    daemon = subprocess.Popen(
        under_mdwe(str(CLI), "run", "-c", str(daemon_config)),
        env=environ, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        _wait_ready(socket, daemon, log_path)
        assert _get(socket, "{vault://app/db-password}", environ) == secret + "\n"
        daemon_config.write_text(
            daemon_config.read_text(encoding="utf-8").replace("prefix: APP_", "prefix: NEW_"),
            encoding="utf-8",
        )
        daemon.send_signal(signal.SIGHUP)  # the new vault config (prefix NEW_) takes over
        deadline = time.monotonic() + 20
        while (answer := _get(socket, "{vault://app/db-password}", environ)) != reloaded + "\n":
            assert answer == secret + "\n"
            assert time.monotonic() < deadline, "SIGHUP did not reload the config"
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert not socket.exists(), "the socket is removed on stop"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        log.close()
