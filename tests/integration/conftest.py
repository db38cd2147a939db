from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.canary import value
from tests.integration.harness import Daemon

# The daemons' environment. The values that tests compare whole or by substring
# ("hunter2-integration") hold the canary, so the harness's scans cover every test that
# reads them; the JSON secret carries one in a field no test reads, so an error that
# quotes the document is caught. Values compared exactly elsewhere stay plain.
SECRETS = {
    "DB_PASSWORD": value("hunter2-integration"),
    "DB_PASSWORD_PREVIOUS": "old-hunter2",
    "DB_JSON": json.dumps({"username": "app", "password": "p4ss", "api_key": value("api-key")}),
    "APP_TOKEN": value("app-prefixed-token"),
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
    failures: list[Exception] = []
    for daemon in made:  # every daemon stops, even after one reported a leak
        try:
            daemon.stop()
        except Exception as exc:
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise ExceptionGroup("stopping the daemons failed", failures)


@pytest.fixture
async def daemon(make_daemon: MakeDaemon) -> Daemon:
    """A running daemon on the default config plus the test secrets in its environment."""
    return await make_daemon().started()
