from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Daemon

SECRETS = {
    "DB_PASSWORD": "hunter2-integration",
    "DB_PASSWORD_PREVIOUS": "old-hunter2",
    "DB_JSON": '{"username": "app", "password": "p4ss"}',
    "APP_TOKEN": "app-prefixed-token",
}

MakeDaemon = Callable[..., Daemon]


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[MakeDaemon]:
    """Build daemons in this test's temp dir; each is stopped at the end of the test."""
    made: list[Daemon] = []
    counter = iter(range(100))

    def make(config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Daemon:
        workdir = tmp_path / f"d{next(counter)}"
        workdir.mkdir()
        daemon = Daemon(workdir, config or {}, {**SECRETS, **(env or {})})
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.stop()


@pytest.fixture
async def daemon(make_daemon: MakeDaemon) -> Daemon:
    """A running daemon on the default config plus the test secrets in its environment."""
    return await make_daemon().started()
