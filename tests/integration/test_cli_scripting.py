"""`resolve` and `get` as scripts use them, like `kong vault get`: Kong's short form, the
value alone on stdout, the error alone on stderr, no log line unless --verbose."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SECRETS
from tests.integration.harness import Daemon

PASSWORD = SECRETS["DB_PASSWORD"]


async def cli(*args: str) -> tuple[int, str, str]:
    """``python -m sidecar ARGS`` with the test secrets in its environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **SECRETS},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def commands(daemon: Daemon) -> dict[str, tuple[str, ...]]:
    """Both one-shot commands: the argument list after the reference."""
    return {"resolve": (), "get": ("--socket", str(daemon.socket))}


# Kong's short form `<name>/<resource>[/<key>]` is wrapped as `{vault://...}`, query and
# version included; a full reference works as it is.
SHORT_FORMS = [
    ("env/db-password", PASSWORD),
    ("{vault://env/db-password}", PASSWORD),
    ("env/db-json/username", "app"),
    ("env/db-password#2", "old-hunter2"),
]


async def test_short_form_and_reference_print_only_the_value(daemon: Daemon) -> None:
    """`resolve` and `get` take Kong's short form as well as a reference; on success
    stdout is the value and a newline, stderr is empty (no log line at all)."""
    for ref, value in SHORT_FORMS:
        for command, rest in commands(daemon).items():
            assert await cli(command, ref, *rest) == (0, value + "\n", ""), (command, ref)


async def test_failures_print_one_error_line_and_exit_1(daemon: Daemon) -> None:
    """A runtime failure: nothing on stdout, one line `secret-sidecar: <code>: <message>`."""
    for command, rest in commands(daemon).items():
        code, out, err = await cli(command, "env/absent", *rest)
        assert (code, out) == (1, ""), command
        assert err == "secret-sidecar: not_found: environment variable ABSENT is not set\n"
        code, out, err = await cli(command, "nowhere/x", *rest)
        assert (code, out) == (1, "")
        assert err.startswith("secret-sidecar: unknown_vault: ")
        assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("env", "reference url is missing path [{vault://env}]"),
        ("", "reference url is missing host [{vault://}]"),
        ("env/", "reference url has empty path [{vault://env/}]"),
        ("env/x#v1", "reference url has invalid version [{vault://env/x#v1}]"),
        ("{vault://env/x", "not a reference [{vault://env/x]"),  # a mistyped reference,
        ("vault://env/x", "not a reference [vault://env/x]"),  # not a short form
    ],
)
async def test_an_argument_that_is_no_reference_is_a_usage_error(
    tmp_path: Path, arg: str, message: str
) -> None:
    """Exit 2 with Kong's message (on the wrapped short form), checked before any
    daemon is asked: `get` says so even with no daemon on the socket."""
    expected = (2, "", f"secret-sidecar: invalid_reference: {message}\n")
    assert await cli("resolve", arg) == expected
    assert await cli("get", arg, "--socket", str(tmp_path / "none.sock")) == expected


async def test_a_refused_query_field_is_a_usage_error(daemon: Daemon) -> None:
    """A query field a reference may not set is the argument's fault too: exit 2, from
    the one-shot resolver and from the daemon alike."""
    for command, rest in commands(daemon).items():
        code, out, err = await cli(command, "env/password?prefix=db_", *rest)
        assert (code, out) == (2, ""), command
        assert err.startswith("secret-sidecar: invalid_reference: query field 'prefix'")


async def test_verbose_logs_json_lines_on_stderr(daemon: Daemon) -> None:
    """--verbose adds the log (JSON lines, stderr); stdout stays the value alone."""
    code, out, err = await cli("resolve", "--verbose", "env/db-password")
    assert (code, out) == (0, PASSWORD + "\n")
    calls = [line for line in json_lines(err) if line["event"] == "backend.call"]
    assert [(c["vault"], c["secret_id"], c["outcome"]) for c in calls] == [
        ("env", "db-password", "ok")
    ]
    code, out, err = await cli("get", "-v", "env/db-password", "--socket", str(daemon.socket))
    assert (code, out) == (0, PASSWORD + "\n")
    [line] = json_lines(err)
    assert (line["event"], line["ref"], line["status"]) == ("get", "{vault://env/db-password}", 200)
    assert PASSWORD not in err
