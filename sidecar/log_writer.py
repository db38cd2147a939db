"""Log lines to stderr from a thread of their own, so a slow reader never stalls the loop.

The daemon's stderr is a pipe to a log collector (a container runtime, journald's
socket). A write to a full pipe blocks, and on the event loop's thread that would hold
every request for as long as the collector does not read. ``LogWriter.write`` only
queues the line; one background thread writes the queue to the file descriptor, many
lines per system call. The queue is bounded: when it is full (the pipe stalled for
long) a new line is dropped and counted, and as soon as lines get written again a
``log.dropped`` line with the count takes the place of the gap, so it is never silent.

A regular file has no reader to wait for: ``FileWriter`` writes it at once.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

import orjson

CAPACITY = 4 << 20  # bytes queued or being written before new lines are dropped
IDLE_TIMEOUT = 5.0  # seconds flush() waits while no line gets written
CHUNK = select.PIPE_BUF  # a write this size to a pipe is atomic: nothing lands mid-line
BEHIND = 1 << 16  # bytes waiting at once: the thread is behind, one write takes them all
MARKER_ROOM = 512  # bytes kept for the log.dropped line when the queue frees up


class Writer(Protocol):
    """Where rendered lines go: ``write`` takes one whole line, newline included."""

    def write(self, line: bytes) -> None: ...

    def flush(self, timeout: float = IDLE_TIMEOUT) -> bool: ...


def dropped_json(count: int) -> bytes:
    """The default ``log.dropped`` line (``sidecar.logging`` renders its own)."""
    event = {"event": "log.dropped", "count": count, "level": "warning"}
    return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)


class LogWriter:
    """A bounded queue of lines and the thread that writes them to ``fd``.

    The thread is a daemon thread: a collector that never reads again must not keep the
    process from exiting. Whoever stops the process calls ``flush`` first (the daemon on
    its way out, ``atexit`` as the net), which waits as long as lines keep getting
    written and gives up after ``timeout`` seconds without progress.
    """

    def __init__(
        self,
        fd: int,
        *,
        capacity: int = CAPACITY,
        dropped_line: Callable[[int], bytes] = dropped_json,
    ) -> None:
        self.dropped_line = dropped_line  # sidecar.logging sets it to the configured format
        self.dropped = 0  # every line lost since the start (the Prometheus counter)
        self._fd = fd
        self._capacity = capacity
        self._lock = threading.Lock()
        self._has_lines = threading.Condition(self._lock)  # the thread waits on it
        self._progress = threading.Condition(self._lock)  # flush() waits on it
        self._lines: list[bytes] = []
        self._pending = 0  # bytes queued plus bytes taken by the thread and not yet written
        self._unreported = 0  # drops the next log.dropped line will announce
        self._written = 0  # chunks written: flush()'s sign of progress
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        """Queue one line (never blocks on the file descriptor), or drop and count it."""
        with self._lock:
            room = self._capacity - self._pending
            if self._closed or len(line) + (MARKER_ROOM if self._unreported else 0) > room:
                self._unreported += 1
                self.dropped += 1
                return
            if self._unreported:
                self._announce()
            self._queue(line)

    def _announce(self) -> None:
        self._queue(_Announcement(self.dropped_line(self._unreported), self._unreported))
        self._unreported = 0

    def _queue(self, line: bytes) -> None:
        self._lines.append(line)
        self._pending += len(line)
        if len(self._lines) == 1:  # the thread sleeps only on an empty queue
            self._has_lines.notify()

    def flush(self, timeout: float = IDLE_TIMEOUT) -> bool:
        """Wait until every queued line is written, announcing drops not yet announced;
        False if ``timeout`` seconds passed without a line written (the pipe stalled)."""
        with self._lock:
            if self._unreported and not self._closed:
                self._announce()  # past capacity if need be: the last word on the loss
            while self._pending:
                written = self._written
                self._progress.wait(timeout)  # woken only by a chunk written
                if self._written == written and self._pending:
                    return False
            return True

    def close(self, timeout: float = IDLE_TIMEOUT) -> bool:
        """Flush, then end the thread; later lines are dropped (and counted)."""
        flushed = self.flush(timeout)
        with self._lock:
            self._closed = True
            self._has_lines.notify()
        self._thread.join(timeout)
        return flushed and not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._lines and not self._closed:
                    self._has_lines.wait()
                if not self._lines:
                    return
                batch, self._lines = self._lines, []
            # Each write is a GIL round trip (the loop holds the GIL while it works): with
            # more than BEHIND bytes waiting, one write takes them all, or PIPE_BUF-sized
            # writes would fall further behind with every burst (and drop lines).
            chunks = _chunks(batch) if sum(map(len, batch)) <= BEHIND else iter([batch])
            for lines in chunks:
                data = b"".join(lines)
                written = _write_all(self._fd, data)
                with self._lock:
                    self._pending -= len(data)
                    self._written += 1
                    if not written:  # the reader is gone, the disk full: the lines are lost
                        self._lost(lines)
                    elif self._unreported and not self._lines:
                        self._announce()  # writing resumed, and no line came to carry it
                    self._progress.notify_all()

    def _lost(self, lines: list[bytes]) -> None:
        """Count lines that could not be written; an announcement lost with them passes
        its count on to the next one, so the counts still add up."""
        announced = [line.announced for line in lines if isinstance(line, _Announcement)]
        self.dropped += len(lines) - len(announced)
        self._unreported += len(lines) - len(announced) + sum(announced)


class _Announcement(bytes):
    """A ``log.dropped`` line, told apart from the lines it counts."""

    announced: int  # lines lost that it tells of

    def __new__(cls, line: bytes, announced: int) -> _Announcement:
        self = super().__new__(cls, line)
        self.announced = announced
        return self


def _chunks(lines: list[bytes]) -> Iterator[list[bytes]]:
    """Whole lines in chunks of at most ``CHUNK`` bytes (a longer line alone): each is an
    atomic write to a pipe, so no other writer of the same pipe (a C library's message,
    a traceback) lands inside a line."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > CHUNK:
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield chunk


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data``; False if the descriptor refuses it for good (EPIPE, EBADF).

    A descriptor someone else made non-blocking (a shared pipe) answers EAGAIN when
    full: wait until it takes more rather than spin or lose the line.
    """
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
        except OSError:
            return False
    return True


class FileWriter:
    """Lines written at once, on the caller's thread, to a descriptor that is a regular
    file: no reader can stall a file (a write costs one system call into the page
    cache), and each line is there before the answer it describes is sent, as tools and
    tests that read the file right after a request expect."""

    def __init__(self, fd: int) -> None:
        self.dropped = 0  # lines the file refused (a full disk)
        self._fd = fd
        self._lock = threading.Lock()

    def write(self, line: bytes) -> None:
        with self._lock:
            if not _write_all(self._fd, line):
                self.dropped += 1

    def flush(self, timeout: float = IDLE_TIMEOUT) -> bool:
        return True


class StreamWriter:
    """Lines written at once to a text stream that is not the process's stderr (pytest's
    capture, an in-process CLI run): in order with what the caller itself writes there."""

    dropped = 0

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def write(self, line: bytes) -> None:
        with self._lock:
            self.stream.write(line.decode(errors="replace"))
            self.stream.flush()

    def flush(self, timeout: float = IDLE_TIMEOUT) -> bool:
        return True
