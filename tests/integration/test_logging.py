"""The daemon's logs on a stderr pipe that its reader stops reading: requests go on,
lost lines are counted and announced, and a normal stop writes everything queued."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SECRETS
from tests.integration.harness import Daemon, wait_until

BATCH = 1000  # references per request (the API's limit)
MAX_BATCHES = 12  # some 8.5 MB of log lines: twice the writer's queue (4 MiB)
DROPPED = re.compile(r"^secret_sidecar_log_lines_dropped_total (\S+)$", re.MULTILINE)


class PipedDaemon(Daemon):
    """The daemon with stderr on a pipe that the test reads only once it chooses to."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        super().__init__(workdir, config, SECRETS)
        self.received = bytearray()
        self._pipe: int | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> subprocess.Popen[bytes]:
        read_end, write_end = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)],
                cwd=self.workdir,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=write_end,
            )
        finally:
            os.close(write_end)  # the daemon holds the only write end: EOF when it exits
        self._pipe = read_end
        self._log_checked = False
        return self.process

    def start_reading(self) -> None:
        """From now on the pipe is drained (until the daemon exits)."""
        pipe = self._pipe
        assert pipe is not None

        def drain() -> None:
            try:
                while chunk := os.read(pipe, 1 << 16):
                    self.received += chunk
            finally:
                os.close(pipe)

        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()

    def stop(self) -> int:
        if self._reader is None and self._pipe is not None:
            self.start_reading()  # a test that failed early: let the daemon write and exit
        code = super().stop()
        if self._reader is not None:
            self._reader.join(15)
        return code

    def exited(self) -> int:
        """The exit code once the process ends by itself (a SIGTERM sent before, say):
        ``stop`` would send another, and one during the final flush kills the process."""
        assert self.process is not None
        return self.process.wait(15)

    def logs(self) -> str:
        return bytes(self.received).decode(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """Every line as a JSON object: a line cut or mixed with another fails here."""
        text = bytes(self.received).decode()
        assert text.endswith("\n"), text[-200:]
        events = [json.loads(line) for line in text.splitlines()]
        assert all(isinstance(event, dict) for event in events)
        return events

    async def dropped(self) -> float:
        match = DROPPED.search(await self.metrics())
        assert match is not None, "no log_lines_dropped counter"
        return float(match.group(1))


MakePiped = Callable[..., PipedDaemon]


@pytest.fixture
def make_piped(tmp_path: Path) -> Iterator[MakePiped]:
    """Piped daemons in this test's temp dir; each is stopped (and its log scanned) after."""
    made: list[PipedDaemon] = []

    def make(config: dict[str, Any] | None = None) -> PipedDaemon:
        workdir = tmp_path / f"p{len(made)}"
        workdir.mkdir()
        made.append(PipedDaemon(workdir, config or {}))
        return made[-1]

    yield make
    for daemon in made:
        daemon.stop()


def _missing(batch: int, count: int = BATCH) -> list[str]:
    """References to unset variables: each read is a failure, logged at once (the backend
    call, the failure, the audit event: some 700 bytes)."""
    return [f"{{vault://env/missing-{batch}-{i}}}" for i in range(count)]


async def _flood(daemon: PipedDaemon, batch: int, count: int = BATCH) -> None:
    refs = _missing(batch, count)
    status, body = await daemon.request("POST", "/v1/secrets:batch", json_body={"refs": refs})
    assert status == 200
    assert {r["error"]["code"] for r in body["results"]} == {"not_found"}


async def test_a_stderr_nobody_reads_costs_log_lines_not_requests(make_piped: MakePiped) -> None:
    """With stderr a pipe nobody reads, the daemon keeps answering reads and /healthz
    while its log backs up; lines past its queue are dropped and counted (metric). Once
    the pipe is read again every line is a whole JSON object, a ``log.dropped`` line
    says how many went missing, and the counts add up."""
    daemon = make_piped()
    await daemon.started()
    floods = 0
    while floods == 0 or await daemon.dropped() == 0:
        assert floods < MAX_BATCHES, "no line dropped: is the pipe being read?"
        await _flood(daemon, floods)  # a synchronous writer blocks the loop here, for good
        floods += 1
    status, body = await daemon.get("{vault://env/db-password}")
    assert (status, body["value"]) == (200, SECRETS["DB_PASSWORD"])
    assert await daemon.request("GET", "/healthz") == (200, {"status": "ok"})

    daemon.start_reading()

    async def after_logged() -> bool:
        """A failed read (logged every time) until one of its lines is written: the first
        may come while the queue is still full, and be dropped too."""
        await daemon.get("{vault://env/after-the-stall}")
        return b"after-the-stall" in daemon.received

    await wait_until(after_logged, 30, "the line logged after the stall")
    dropped = await daemon.dropped()
    assert daemon.stop() == 0

    events = daemon.lines()
    announced = [e for e in events if e["event"] == "log.dropped"]
    assert announced, "lines were dropped but no log.dropped line says so"
    assert sum(e["count"] for e in announced) == dropped
    assert all(e["level"] == "warning" and e["count"] > 0 for e in announced)
    flood_reads = {
        e["ref"] for e in events if e["event"] == "secret.read" and "missing-" in e["ref"]
    }
    assert len(flood_reads) + dropped >= floods * BATCH  # each read left a line, or a count
    after = next(i for i, e in enumerate(events) if "after-the-stall" in str(e.get("ref")))
    assert events.index(announced[0]) < after  # the gap is announced where it was
    assert events[-1]["event"] == "stopped"


async def test_sigterm_writes_every_queued_line(make_piped: MakePiped) -> None:
    """Lines still queued when SIGTERM arrives (the pipe full, not read yet) are all
    written before the process exits, down to the final ``stopped``; nothing dropped."""
    daemon = make_piped()
    await daemon.started()
    await _flood(daemon, 0, 500)  # some 350 kB: past the pipe's buffer, within the queue
    assert await daemon.dropped() == 0
    daemon.signal(signal.SIGTERM)
    daemon.start_reading()
    assert daemon.exited() == 0
    daemon.stop()  # the log scanned for canaries

    events = daemon.lines()
    reads = {e["ref"] for e in events if e["event"] == "secret.read"}
    assert reads >= set(_missing(0, 500))
    assert not [e for e in events if e["event"] == "log.dropped"]
    names = [e["event"] for e in events]
    assert {"listening", "ready", "draining"} <= set(names)
    assert names[-1] == "stopped"
