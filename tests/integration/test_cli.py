"""The CLI as users run it: run, get, resolve, check, and the exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import SECRETS
from tests.integration.harness import Daemon


async def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **SECRETS, **(env or {})}, cwd=cwd,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_get_asks_the_running_daemon(daemon: Daemon) -> None:
    """`get REF --socket` prints the value and exits 0; an error exits 1 with code and message."""
    code, out, _ = await cli("get", "{vault://env/db-password}", "--socket", str(daemon.socket))
    assert (code, out) == (0, SECRETS["DB_PASSWORD"] + "\n")
    code, out, err = await cli("get", "{vault://env/absent}", "--socket", str(daemon.socket))
    assert (code, out) == (1, "")
    assert "not_found: environment variable ABSENT is not set" in err


async def test_get_without_daemon_fails_clearly(tmp_path: Path) -> None:
    """No daemon on the socket: exit 1 and say where we looked."""
    code, _, err = await cli("get", "{vault://env/x}", "--socket", str(tmp_path / "none.sock"))
    assert code == 1
    assert "cannot ask the daemon at" in err


async def test_resolve_one_shot_without_daemon(tmp_path: Path) -> None:
    """`resolve` prints the value with no daemon; failures exit 1 without a value."""
    code, out, _ = await cli("resolve", "{vault://env/db-json/username}")
    assert (code, out) == (0, "app\n")
    code, out, err = await cli("resolve", "{vault://env/nope}")
    assert (code, out) == (1, "")
    assert "not_found" in err


async def test_check_reports_vaults_and_prefetch(tmp_path: Path) -> None:
    """`check` validates, tries each vault and prefetch ref, exits 1 if any fails."""
    good = tmp_path / "good.yaml"
    good.write_text(
        "vaults: [{prefix: app, name: env, config: {prefix: db_}}]\n"
        "prefetch: ['{vault://app/password}']\n"
    )
    code, out, _ = await cli("check", "-c", str(good))
    assert code == 0
    assert json.loads(out) == {
        "socket": "ok",
        "vaults": {"app": "ok"},
        "prefetch": {"{vault://app/password}": "ok"},
    }
    assert SECRETS["DB_PASSWORD"] not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefetch: ['{vault://env/absent}']\n")
    code, out, _ = await cli("check", "-c", str(bad))
    assert code == 1
    assert "not_found" in json.loads(out)["prefetch"]["{vault://env/absent}"]


async def test_config_and_usage_errors_exit_2(tmp_path: Path) -> None:
    """An invalid config or bad arguments exit 2 with the reason on stderr."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {mode: '0777'}\n")
    code, _, err = await cli("run", "-c", str(bad))
    assert code == 2
    assert "listen.mode" in err
    assert "world-writable" in err
    code, _, _ = await cli("frobnicate")
    assert code == 2


async def test_check_and_run_refuse_an_unsafe_socket_place(tmp_path: Path) -> None:
    """A world-writable, non-sticky socket directory or an unknown group: `check` names
    both and exits 1; `run` refuses to start."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: {{socket: {open_dir}/s.sock, group: no-such-group-xyz}}\n")
    code, out, _ = await cli("check", "-c", str(config))
    assert code == 1
    problems = json.loads(out)["socket"]
    assert any("world-writable without the sticky bit" in p for p in problems)
    assert any("'no-such-group-xyz' is not a group" in p for p in problems)
    code, _, err = await cli("run", "-c", str(config))
    assert code == 1
    assert "world-writable without the sticky bit" in err
    assert not (open_dir / "s.sock").exists()
    open_dir.chmod(0o1777)  # sticky, like /tmp: nobody can replace another's file
    config.write_text(f"listen: {{socket: {open_dir}/s.sock}}\n")
    code, out, _ = await cli("check", "-c", str(config))
    assert (code, json.loads(out)["socket"]) == (0, "ok")


async def test_health_answers_with_the_exit_code(daemon: Daemon, tmp_path: Path) -> None:
    """`health` exits 0 on a serving (`--ready`: ready) daemon, 1 with the reason if none."""
    for probe in ((), ("--ready",)):
        code, out, err = await cli("health", "--socket", str(daemon.socket), *probe)
        assert (code, out, err) == (0, "", "")
    code, out, err = await cli("health", "--ready", "--socket", str(tmp_path / "none.sock"))
    assert (code, out) == (1, "")
    assert err.startswith("secret-sidecar: not_ready: cannot ask the daemon at")
