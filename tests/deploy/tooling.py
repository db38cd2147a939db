"""Where the deploy tests find their programs: the tool venv first, then PATH.

The tool venv (``.tools``, made by ``make tools`` from requirements/tools.txt) holds the
Helm SDK, the Kubernetes schemas, hadolint, yamllint and the compose parser, kept out of
the project's venv because they are large and none of them is a dependency.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import require_program

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "bin"

# What every deployment artefact agrees on (image, chart, manifests, compose, examples).
SOCKET_DIR = "/var/run/secret-sidecar"
SOCKET = f"{SOCKET_DIR}/sidecar.sock"
UID = GID = 10001
METRICS_PORT = 9464


# The tool venv's programs: a copy on PATH is not the pinned one, and the ``python`` on
# PATH lacks the Helm SDK.
FROM_TOOL_VENV = frozenset(
    {"python", "hadolint", "kubernetes-validate", "yamllint", "podman-compose", "uv"}
)


def tool(name: str) -> str:
    """The path of ``name``; under CI its absence fails the test, elsewhere it skips."""
    if name not in FROM_TOOL_VENV:
        return require_program(name)
    candidate = TOOLS / name
    if not candidate.exists():
        message = f"{candidate} is missing: run `make tools`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(candidate)


def run_tool(*argv: str, stdin: str | None = None, timeout: float = 120) -> str:
    """Run ``argv`` (``argv[0]`` looked up with :func:`tool`) and return its stdout.

    A non-zero exit fails the calling test with the program's own output, which is what a
    reader needs to fix the file it rejected.
    """
    command = [tool(argv[0]), *argv[1:]]
    done = subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    report = f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    assert done.returncode == 0, report
    return done.stdout
