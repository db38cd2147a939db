"""The daemon fixtures of tests/integration, and nginx processes for the Kong vault tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SECRETS, make_daemon
from tests.integration.harness import require_program
from tests.kong.nginx import Nginx

__all__ = ["SECRETS", "MakeNginx", "make_daemon", "make_nginx"]

MakeNginx = Callable[..., Nginx]


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator[MakeNginx]:
    """Start nginx processes in this test's temp dir (``Nginx`` arguments); each is
    stopped, and its error log scanned for canaries, at the end of the test."""
    program = require_program("nginx")
    started: list[Nginx] = []
    counter = iter(range(100))

    def make(**options: Any) -> Nginx:
        nginx = Nginx(program, tmp_path / f"nginx{next(counter)}", **options)
        started.append(nginx)
        return nginx.start()

    yield make
    for nginx in started:
        nginx.stop()
