"""The log writer on real pipes (sidecar.log_writer), and the logging set-up around it
(sidecar.logging): in-process, and in a child process whose stderr is a pipe."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar import logging as sidecar_logging
from sidecar.log_writer import CHUNK, LogWriter

DEADLINE = 30.0  # seconds: only so a broken writer fails instead of hanging


class Reader:
    """Drains a pipe's read end in a thread, from ``start`` until EOF."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Reader:
        self._thread.start()
        return self

    def _run(self) -> None:
        while chunk := os.read(self.fd, 1 << 16):
            self.data += chunk

    def until_eof(self) -> bytes:
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "the pipe never reached EOF"
        return bytes(self.data)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # the test closed it
            os.close(fd)


def line(source: str, i: int, pad: int = 40) -> bytes:
    return json.dumps({"source": source, "i": i, "pad": "x" * pad}).encode() + b"\n"


def check_accounted(output: bytes, intended: list[bytes]) -> int:
    """Walk the output against the lines written, in order: each one is there, whole, or
    counted by the ``log.dropped`` line that follows the gap; returns the lines dropped."""
    assert output.endswith(b"\n")
    position = dropped = 0
    for got in output.splitlines(keepends=True):
        event = json.loads(got)
        if event.get("event") == "log.dropped":
            assert event["count"] > 0
            position += event["count"]
            dropped += event["count"]
            continue
        assert position < len(intended), f"a line nobody wrote: {got!r}"
        assert got == intended[position]
        position += 1
    assert position == len(intended), (
        f"{len(intended) - position} lines neither written nor counted"
    )
    return dropped


def write_all(writer: LogWriter, lines: list[bytes]) -> None:
    for item in lines:
        writer.write(item)


def test_lines_from_several_threads_arrive_whole_and_in_order(pipe: tuple[int, int]) -> None:
    """Four threads writing at once, some lines longer than one atomic pipe write: every
    line arrives whole, each thread's in its order, none dropped."""
    read_end, write_end = pipe
    reader = Reader(read_end).start()
    writer = LogWriter(write_end)
    sent = {
        f"t{k}": [
            line(f"t{k}", i, pad=3 * CHUNK if i % 50 == 7 else 40 + i % 90) for i in range(500)
        ]
        for k in range(4)
    }
    threads = [threading.Thread(target=write_all, args=(writer, lines)) for lines in sent.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert writer.close()
    os.close(write_end)
    output = reader.until_eof()
    received: dict[str, list[bytes]] = {source: [] for source in sent}
    for got in output.splitlines(keepends=True):
        received[json.loads(got)["source"]].append(got)
    assert received == sent
    assert writer.dropped == 0


def test_one_thread_lines_keep_their_exact_order(pipe: tuple[int, int]) -> None:
    """A single writer's lines come out byte for byte in the order written."""
    read_end, write_end = pipe
    reader = Reader(read_end).start()
    writer = LogWriter(write_end)
    intended = [line("main", i, pad=i % 300) for i in range(3000)]
    write_all(writer, intended)
    assert writer.close()
    os.close(write_end)
    assert reader.until_eof() == b"".join(intended)


def test_a_stalled_pipe_costs_lines_not_waits_and_the_gap_is_announced(
    pipe: tuple[int, int],
) -> None:
    """Nobody reads: ``write`` returns every time (a blocking one would hang this test),
    lines past the queue are dropped and counted. Once the pipe is read, the first line
    accepted is preceded by a ``log.dropped`` line whose count closes the gap exactly."""
    read_end, write_end = pipe
    writer = LogWriter(write_end, capacity=16 * 1024)
    intended = [line("flood", i) for i in range(3000)]  # some 200 kB: past pipe and queue
    write_all(writer, intended)
    assert writer.dropped > 0
    reader = Reader(read_end).start()
    deadline = time.monotonic() + DEADLINE
    while True:  # the queue frees up as the pipe is read: until a line is accepted
        after = line("after", len(intended))
        before = writer.dropped
        writer.write(after)
        intended.append(after)
        if writer.dropped == before:
            break
        assert time.monotonic() < deadline, "no line accepted after the pipe was read"
        time.sleep(0.001)
    assert writer.close()
    os.close(write_end)
    output = reader.until_eof()
    assert check_accounted(output, intended) == writer.dropped
    *_, announcement, accepted = output.splitlines(keepends=True)
    assert json.loads(announcement)["event"] == "log.dropped"  # right where the gap is
    assert accepted == intended[-1]


def test_the_gap_is_announced_once_writing_resumes_even_with_no_line_after(
    pipe: tuple[int, int],
) -> None:
    """A quiet daemon logs nothing after the stall: the ``log.dropped`` line still comes
    as soon as the pipe is read again, not only at exit."""
    read_end, write_end = pipe
    writer = LogWriter(write_end, capacity=16 * 1024)
    intended = [line("flood", i) for i in range(3000)]
    write_all(writer, intended)
    assert writer.dropped > 0
    reader = Reader(read_end).start()
    deadline = time.monotonic() + DEADLINE
    while b"log.dropped" not in reader.data:  # no write, no flush: the thread's own doing
        assert time.monotonic() < deadline, "the gap was never announced"
        time.sleep(0.01)
    assert writer.close()
    os.close(write_end)
    output = reader.until_eof()
    assert check_accounted(output, intended) == writer.dropped
    # not necessarily last: lines accepted after an early gap (the thread had drained
    # some into the pipe meanwhile) follow its announcement
    events = [json.loads(raw).get("event") for raw in output.splitlines()]
    assert "log.dropped" in events


def test_flush_gives_up_on_a_pipe_that_takes_nothing_then_finishes_once_read(
    pipe: tuple[int, int],
) -> None:
    """``flush`` waits only while lines get written: on a stalled pipe it returns False
    (the process may exit), and once the pipe is read it writes everything."""
    read_end, write_end = pipe
    writer = LogWriter(write_end)
    intended = [line("main", i, pad=200) for i in range(1000)]  # 250 kB: more than the pipe
    write_all(writer, intended)
    assert writer.flush(timeout=0.2) is False
    reader = Reader(read_end).start()
    assert writer.flush() is True
    os.close(write_end)
    assert reader.until_eof() == b"".join(intended)
    assert writer.dropped == 0


def test_a_reader_gone_loses_lines_counted_and_never_hangs(pipe: tuple[int, int]) -> None:
    """The read end closed (the collector died): writes fail with EPIPE, the lines are
    counted as dropped, and ``flush`` returns instead of waiting for a reader."""
    read_end, write_end = pipe
    os.close(read_end)
    writer = LogWriter(write_end)
    write_all(writer, [line("main", i) for i in range(10)])
    assert writer.flush()
    assert writer.dropped == 10  # lost announcements are not counted as lines
    writer.close()


def test_a_non_blocking_descriptor_waits_for_room_instead_of_losing_lines(
    pipe: tuple[int, int],
) -> None:
    """Someone made the shared pipe non-blocking (EAGAIN when full): the writer waits for
    the reader rather than spin or drop."""
    read_end, write_end = pipe
    os.set_blocking(write_end, False)
    writer = LogWriter(write_end)
    intended = [line("main", i, pad=200) for i in range(1000)]
    write_all(writer, intended)
    assert writer.flush(timeout=0.2) is False  # the pipe is full: EAGAIN, nothing lost
    reader = Reader(read_end).start()
    assert writer.close()
    os.close(write_end)
    assert reader.until_eof() == b"".join(intended)
    assert writer.dropped == 0


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(got) for got in text.splitlines() if got.startswith("{")]


def test_module_level_loggers_follow_every_configure(capsys: pytest.CaptureFixture[str]) -> None:
    """A logger made before ``configure`` (modules make theirs at import) takes each new
    configuration: the level of a reload, ``silence``, and the console format."""
    log = sidecar_logging.get_logger("tests.follow")
    assert sidecar_logging.get_logger("tests.follow") is log
    sidecar_logging.configure("info", "json")
    log.debug("hidden.debug")
    log.info("shown.info")
    sidecar_logging.configure("debug", "json")
    log.debug("shown.debug")
    sidecar_logging.silence()
    log.error("hidden.silenced")
    sidecar_logging.configure("info", "console")
    log.info("shown.console")
    err = capsys.readouterr().err
    assert [e["event"] for e in _events(err)] == ["shown.info", "shown.debug"]
    assert "hidden" not in err
    console = err.splitlines()[-1]
    assert "shown.console" in console
    assert "component=tests.follow" in console


def test_redaction_and_the_line_format(capsys: pytest.CaptureFixture[str]) -> None:
    """Sensitive keys are redacted whatever their case and depth, a key seen before and
    after included; the line has the component, level and a UTC timestamp."""
    sidecar_logging.configure("info", "json")
    log = sidecar_logging.get_logger("tests.redact")
    for _ in range(2):  # the second time, every key's verdict is remembered
        log.info(
            "redact.me",
            Token="t-1",
            detail={"PASSWORD": "p-1", "deeper": {"client_token": "c-1", "ok": 1}},
            count=2**70,  # past 64 bits: the stdlib encoder's path
        )
    err = capsys.readouterr().err
    assert "t-1" not in err
    assert "p-1" not in err
    assert "c-1" not in err
    first, second = _events(err)
    assert first["Token"] == first["detail"]["PASSWORD"] == sidecar_logging.REDACTED
    assert first["detail"]["deeper"] == {"client_token": sidecar_logging.REDACTED, "ok": 1}
    assert first["count"] == 2**70
    assert (first["component"], first["level"]) == ("tests.redact", "info")
    stamp = datetime.datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert first["timestamp"].endswith("Z")
    assert {k: v for k, v in second.items() if k != "timestamp"} == {
        k: v for k, v in first.items() if k != "timestamp"
    }


CHILD = """
import logging, sys, threading
from sidecar import logging as sidecar_logging

sidecar_logging.configure("info", "json")
log = sidecar_logging.get_logger("child")
library = logging.getLogger("library")

def work(source):
    for i in range(300):
        log.info("structlog", source=source, i=i, pad="x" * (5000 if i % 40 == 3 else 30))
        library.warning("stdlib %s %d", source, i)

threads = [threading.Thread(target=work, args=(f"t{k}",)) for k in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
log.error("last", source="main")
"""


def run_child(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=DEADLINE, check=True
    )
    return done.stderr.decode()


def test_structlog_and_library_lines_share_one_writer_and_exit_writes_them() -> None:
    """A process whose stderr is a pipe: structlog lines and stdlib ``logging`` records
    from several threads come out as whole JSON lines, each thread's two kinds in the
    order it logged them (one queue for both), and the last line logged before a plain
    exit is written (``atexit``)."""
    events = [json.loads(got) for got in run_child(CHILD).splitlines()]  # whole lines only
    by_thread: dict[str, list[tuple[str, int]]] = {f"t{k}": [] for k in range(3)}
    for event in events:
        if event.get("logger") == "library":  # "stdlib <source> <i>"
            kind, source, i = event["event"].split()
            by_thread[source].append((kind, int(i)))
        elif event["event"] == "structlog":
            by_thread[event["source"]].append(("structlog", event["i"]))
    for logged in by_thread.values():
        assert logged == [(kind, i) for i in range(300) for kind in ("structlog", "stdlib")]
    assert events[-1]["event"] == "last"
    assert len(events) == 3 * 600 + 1


def test_lines_queued_before_silence_are_still_written() -> None:
    """``silence`` (a one-shot command) stops new lines; those already queued still reach
    stderr before the process exits."""
    err = run_child(
        "from sidecar import logging as sidecar_logging\n"
        "sidecar_logging.configure()\n"
        "log = sidecar_logging.get_logger('child')\n"
        "for i in range(2000):\n"
        "    log.info('before', i=i)\n"
        "sidecar_logging.silence()\n"
        "log.error('after')\n"
    )
    events = [json.loads(got) for got in err.splitlines()]
    assert [e["i"] for e in events] == list(range(2000))


def test_a_regular_file_has_each_line_when_the_call_returns(tmp_path: Path) -> None:
    """stderr a regular file (no reader to stall it): the line is written at once, on
    the caller's thread, before anything else the process does (``flush`` not needed)."""
    log_file = tmp_path / "stderr.log"
    code = (
        "import os\n"
        "from sidecar import logging as sidecar_logging\n"
        "sidecar_logging.configure()\n"
        "sidecar_logging.get_logger('child').info('at.once')\n"
        "print(open('/proc/self/fd/2').read().count('at.once'), flush=True)\n"
        "os._exit(0)\n"  # no atexit, no flush
    )
    with log_file.open("wb") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr,
            timeout=DEADLINE, check=True,
        )  # fmt: skip
    assert done.stdout == b"1\n"
    assert [json.loads(got)["event"] for got in log_file.read_text().splitlines()] == ["at.once"]
