"""What a start loads: what its configuration and its command need, nothing more.

A backend's SDK (aiobotocore/botocore, hvac and requests, google and grpc) is imported
when a vault of that backend is configured or first named, never before: an env-only
daemon must not pay its seconds of CPU and tens of MiB. The ``health`` probe, started
every few seconds for a pod's whole life, imports the standard library alone; ``get``
needs no config, so no pydantic; ``resolve`` serves nothing, so no aiohttp.

What loaded is read from the interpreter itself, with nothing changed in the process:
``PYTHONPROFILEIMPORTTIME=1`` (``-X importtime``) writes one ``import time:`` line to
stderr for each module the first time an ``import`` statement loads it, indented under
the module that imported it. A module loaded by ``importlib.import_module`` (our
backends are) gets no line, but what it imports does, as lines of their own, so an SDK
is seen wherever it is imported from. A failed import (an optional dependency that is
absent) gets a line too; the SDKs are all installed in the test environment, so a line
for one of them means it was loaded.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

from tests.integration.conftest import MakeDaemon
from tests.integration.harness import Daemon, wait_until
from tests.integration.test_cli import cli

PROFILE = {"PYTHONPROFILEIMPORTTIME": "1"}
SDKS = frozenset(
    {"aiobotocore", "botocore", "boto3", "hvac", "requests", "google", "grpc", "ruamel", "jwt"}
)
_LINE = re.compile(r"import time: +\d+ \| +\d+ \| ( *)(\S+)")


Line = tuple[int, str]  # (depth, module)


def import_lines(stderr: str) -> list[Line]:
    return [(len(m[1]), m[2]) for m in map(_LINE.fullmatch, stderr.splitlines()) if m]


def ours(lines: list[Line]) -> list[Line]:
    """The lines from the first import of ``sidecar`` on, not the interpreter's start
    (``site`` and the ``.pth`` files of the environment)."""
    first = next(i for i, (depth, name) in enumerate(lines) if depth == 0 and "sidecar" in name)
    while first > 0 and lines[first - 1][0] > 0:  # the modules it imported came before it
        first -= 1
    return lines[first:]


def importers(lines: list[Line]) -> dict[str, list[str]]:
    """Each module imported, with the modules that imported it, nearest first.

    The interpreter writes a module's line when its import ends, so after the lines of
    the modules it imported: a module's importer is the next line indented less.
    """
    chains: dict[str, list[str]] = {}
    for index, (depth, name) in enumerate(lines):
        chain, level = [], depth
        for outer_depth, outer in lines[index + 1 :]:
            if level == 0:
                break
            if outer_depth < level:
                chain.append(outer)
                level = outer_depth
        chains.setdefault(name, chain)
    return chains


def matching(modules: dict[str, list[str]], packages: frozenset[str]) -> list[str]:
    """``package (imported by a <- b <- c)`` for each of these top-level packages loaded."""
    found: dict[str, list[str]] = {}
    for name, chain in modules.items():
        package = name.partition(".")[0]
        if package in packages and (package not in found or name == package):
            found[package] = chain
    return [
        f"{package} (imported by {' <- '.join(chain) or 'importlib or the interpreter'})"
        for package, chain in sorted(found.items())
    ]


async def _ready(daemon: Daemon) -> bool:
    status, _ = await daemon.request("GET", "/readyz")
    return status == 200


async def test_an_env_only_daemon_loads_no_backend_sdk(make_daemon: MakeDaemon) -> None:
    """Start, prefetch, a read, a status and a scrape: no SDK is imported along the way."""
    daemon = await make_daemon({"prefetch": ["{vault://env/db-password}"]}, PROFILE).started()
    await wait_until(lambda: _ready(daemon), what="the daemon to be ready")
    status, body = await daemon.get("{vault://env/db-json/username}")
    assert (status, body["value"]) == (200, "app")
    assert (await daemon.request("GET", "/v1/status"))[0] == 200
    await daemon.metrics()
    assert daemon.stop() == 0
    modules = importers(import_lines(daemon.logs()))
    assert "sidecar.lifecycle" in modules, "no import lines: PYTHONPROFILEIMPORTTIME ignored?"
    assert matching(modules, SDKS) == []


async def test_a_configured_backend_loads_its_sdk(make_daemon: MakeDaemon) -> None:
    """The counterpart, so the test above can fail: a daemon with an aws vault shows
    botocore, imported by the backend module (itself loaded by importlib)."""
    config = {"vaults": [{"prefix": "cloud", "name": "aws", "config": {"region": "eu-west-1"}}]}
    daemon = await make_daemon(config, PROFILE).started()
    assert daemon.stop() == 0
    modules = importers(import_lines(daemon.logs()))
    assert matching(modules, frozenset({"botocore", "aiobotocore"})) != []


async def test_health_imports_the_standard_library_alone(daemon: Daemon) -> None:
    code, out, err = await cli("health", "--ready", "--socket", str(daemon.socket), env=PROFILE)
    assert (code, out) == (0, ""), err
    modules = importers(ours(import_lines(err)))
    assert "sidecar.probe" in modules
    packages = {name.partition(".")[0] for name in modules}
    outside = frozenset(packages - {"sidecar"} - sys.stdlib_module_names)
    assert matching(modules, outside) == []


async def test_get_loads_no_config_and_no_sdk(daemon: Daemon) -> None:
    """``get`` only asks the daemon: pydantic and YAML are the config's."""
    code, out, err = await cli(
        "get", "env/db-json/username", "--socket", str(daemon.socket), env=PROFILE
    )
    assert (code, out) == (0, "app\n"), err
    modules = importers(ours(import_lines(err)))
    assert "aiohttp" in modules
    assert matching(modules, SDKS | {"pydantic", "pydantic_core", "yaml"}) == []


async def test_resolve_with_the_env_backend_loads_no_server_and_no_sdk(tmp_path: Path) -> None:
    code, out, err = await cli("resolve", "env/db-json/username", env=PROFILE, cwd=tmp_path)
    assert (code, out) == (0, "app\n"), err
    modules = importers(ours(import_lines(err)))
    assert "sidecar.resolver" in modules
    assert matching(modules, SDKS | {"aiohttp"}) == []


async def test_version_is_the_installed_one() -> None:
    """Looked up only for ``--version`` (and the build-info metric), still the real one."""
    code, out, err = await cli("--version")
    assert (code, out, err) == (0, version("secret-sidecar") + "\n", "")
