"""The daemon fixtures of tests/integration, and nginx processes for the Kong vault tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SECRETS, make_daemon
from tests.integration.harness import require_program
from tests.kong.nginx import MODULES, Nginx

__all__ = ["SECRETS", "MakeNginx", "make_daemon", "make_nginx", "missing"]

PACKAGES = "nginx libnginx-mod-http-lua lua-resty-core lua-cjson lua-socket"


def missing(what: str) -> None:
    """Fail under CI (.ci/run installs the packages), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI (apt-get install {PACKAGES})")
    pytest.skip(f"{what} is not installed (apt-get install {PACKAGES})")


MakeNginx = Callable[..., Nginx]


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator[MakeNginx]:
    """Start nginx processes in this test's temp dir (``Nginx`` arguments); each is
    stopped, and its error log scanned for canaries, at the end of the test."""
    program = require_program("nginx")
    for module in MODULES:
        if not Path(module).exists():
            missing(module)
    started: list[Nginx] = []
    counter = iter(range(100))

    def make(**options: Any) -> Nginx:
        nginx = Nginx(program, tmp_path / f"nginx{next(counter)}", **options)
        started.append(nginx)
        return nginx.start()

    yield make
    for nginx in started:
        nginx.stop()
