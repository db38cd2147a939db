"""structlog set-up: one JSON object per line on stderr, with a redaction safety net.

Stderr, because ``secret-sidecar resolve`` prints the value on stdout and the two
must never mix. Code logs secret ids and references, never values; the
redaction processor is the net under that rule, not the rule itself.

Lines are rendered to bytes and handed to ``sidecar.log_writer``: when stderr is a
pipe or socket a background thread writes them, so a log collector that stops reading costs
dropped lines (counted, and announced by a ``log.dropped`` line), never a stalled
event loop. Whoever ends the process calls ``flush`` first; ``atexit`` is the net.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO, cast

import orjson
import structlog

from sidecar.log_writer import IDLE_TIMEOUT, FileWriter, LogWriter, StreamWriter, Writer

REDACTED = "<redacted>"
SENSITIVE_KEYS = frozenset(
    {
        "value",
        "values",
        "secret",
        "secret_value",
        "password",
        "token",
        "authorization",
        "credentials",
        "aws_secret_access_key",
        "secret_access_key",
        "approle_secret_id",
        "client_key",
        "client_token",
        "jwt",
    }
)


_SCALARS = frozenset({str, int, float, bool, type(None)})  # most values: no Mapping check
_known_keys: dict[Any, bool] = {}  # key -> sensitive: the keys code logs are few
_KNOWN_MAX = 4096  # nested mappings may bring arbitrary keys: stop learning past this


def _sensitive(key: Any) -> bool:
    found = str(key).lower() in SENSITIVE_KEYS
    if len(_known_keys) < _KNOWN_MAX:
        _known_keys[key] = found
    return found


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values under sensitive keys, also inside nested mappings.

    It runs on every line, so a key's verdict is remembered rather than lower-cased
    each time, and a scalar value skips the (slow, ABC) Mapping check.
    """
    known = _known_keys
    for key, item in event.items():
        sensitive = known.get(key)
        if sensitive is None:
            sensitive = _sensitive(key)
        if sensitive:
            event[key] = REDACTED
        elif type(item) not in _SCALARS and isinstance(item, Mapping):
            event[key] = redact(_logger, _method, dict(item))
    return event


class _Timestamp:
    """``TimeStamper(fmt="iso", utc=True)``'s field at a fraction of its cost (it built a
    datetime per line): the part up to the second is formatted once a second."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second, prefix = self._second
        if int(now) != second:
            second = int(now)
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, prefix)  # one assignment: threads see a matching pair
        event["timestamp"] = f"{prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


_stamp = _Timestamp()
_LINE = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
Render = Callable[[Any, str, MutableMapping[str, Any]], bytes]  # an event to a line of bytes
_stdlib_handler: logging.Handler | None = None
_writer: Writer | None = None  # where lines go now (set by configure)
_stderr: LogWriter | FileWriter | None = None  # fd 2's: made once, kept across reloads
_loggers: dict[str, _Named] = {}


def _json_line(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> bytes:
    """orjson, several times the stdlib's speed, to the bytes the writer takes (newline
    included); a type it cannot encode becomes str, and what it refuses outright
    (integers past 64 bits, from a reference's ``#version``) goes through the stdlib:
    a log line must never fail the request it describes."""
    try:
        return orjson.dumps(event, default=str, option=_LINE)
    except orjson.JSONEncodeError:
        return json.dumps(event, default=str).encode() + b"\n"


def _json(event: Any, **_: Any) -> str:
    """``_json_line`` for structlog's JSONRenderer (library records): a str, no newline."""
    return _json_line(None, "", event)[:-1].decode()


class _ConsoleLine:
    """structlog's console renderer, as a line of bytes."""

    def __init__(self) -> None:
        self._render = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> bytes:
        return (self._render(logger, method, event) + "\n").encode()


class _Sink:
    """The logger at the end of structlog's chain: every level writes the rendered line."""

    def __init__(self, writer: Writer) -> None:
        self.msg = self.debug = self.info = self.warning = self.warn = writer.write
        self.error = self.err = self.critical = self.fatal = self.exception = writer.write


class _WriterHandler(logging.Handler):
    """Library records (stdlib ``logging``) into the same writer as structlog's lines,
    so the two never interleave within a line and keep their order."""

    def __init__(self, writer: Writer) -> None:
        super().__init__(logging.WARNING)
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.write(self.format(record).encode() + b"\n")
        except Exception:
            self.handleError(record)


class _Named:
    """A module's logger (``log = get_logger(...)`` at import): the bound logger behind it
    is built once per ``configure``/``silence``, not per call.

    structlog's own ``cache_logger_on_first_use`` would keep whatever configuration a
    module-level logger first met, for good: a reload's new level, or ``configure`` after
    ``silence``, would never reach it. Here both rebuild every named logger.
    """

    _FAST = ("debug", "info", "warning", "error", "critical", "exception", "log")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self.rebuild()

    def rebuild(self) -> None:
        bound = structlog.get_logger(component=self._name).bind()
        self._bound = bound
        for method in self._FAST:  # plain attributes: a call costs no lookup through here
            setattr(self, method, getattr(bound, method))

    def __getattr__(self, name: str) -> Any:
        if name == "_bound":  # not built yet (a copy): no recursion
            raise AttributeError(name)
        return getattr(self._bound, name)


def _destination(stream: TextIO) -> Writer:
    """fd 2, when a pipe, socket or terminal (what a reader can stall), gets the
    background writer; fd 2 as a regular file is written at once; any other stream
    too (pytest's capture: a test's lines stay in that test's section)."""
    global _stderr  # noqa: PLW0603 - one writer (thread) per process
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: StringIO
        fd = -1
    if fd != 2:
        return StreamWriter(stream)
    if _stderr is None:
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        _stderr = FileWriter(fd) if regular else LogWriter(fd)
        atexit.register(_stderr.flush)
    return _stderr


def _use(writer: Writer, render: Render) -> None:
    """Lines bound for the previous destination are out before the new one starts."""
    global _writer  # noqa: PLW0603 - the process-wide destination, replaced on configure
    if _writer is not None and _writer is not writer:
        _writer.flush()
    _writer = writer
    if isinstance(writer, LogWriter):
        writer.dropped_line = _dropped_line(render)


def _dropped_line(render: Render) -> Callable[[int], bytes]:
    """The writer's announcement of lost lines, rendered like every other line."""

    def line(count: int) -> bytes:
        event = {"component": "sidecar.logging", "event": "log.dropped", "count": count}
        return render(None, "warning", _stamp(None, "warning", {**event, "level": "warning"}))

    return line


def _replace_stdlib_handler(handler: logging.Handler) -> None:
    global _stdlib_handler  # noqa: PLW0603 - one process-wide handler, replaced on reload
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    root.addHandler(handler)
    _stdlib_handler = handler


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog for the whole process; safe to call again on reload.

    Warnings and errors that libraries log through stdlib ``logging`` (aiohttp, hvac,
    botocore, gRPC) are rendered the same way and go through the same writer, so stderr
    stays one JSON object a line.
    """
    writer = _destination(sys.stderr)
    render: Render = _json_line if fmt == "json" else _ConsoleLine()
    _use(writer, render)
    handler = _WriterHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                _stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                structlog.processors.JSONRenderer(serializer=_json)
                if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False),
            ],
        )
    )
    _replace_stdlib_handler(handler)
    sink = _Sink(writer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _stamp,
            structlog.processors.format_exc_info,
            redact,
            render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=False,  # _Named caches, and follows a reconfigure
    )
    _rebuild()


def _drop(_logger: Any, _method: str, _event: MutableMapping[str, Any]) -> Any:
    raise structlog.DropEvent


def silence() -> None:
    """No log output at all, for ``get``/``resolve``: their stderr is the error alone.

    Library records (stdlib ``logging``, and ``warnings`` routed into it) reach a
    handler that discards them, so Python's last-resort handler prints nothing either.
    Lines queued before are still written (``flush``, ``atexit``).
    """
    _replace_stdlib_handler(logging.NullHandler())
    logging.captureWarnings(True)
    structlog.configure(
        processors=[_drop],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    _rebuild()


def _rebuild() -> None:
    for logger in _loggers.values():
        logger.rebuild()


def flush(timeout: float = IDLE_TIMEOUT) -> bool:
    """Write every queued line before the process ends (or before the caller writes to
    stderr itself); False if the pipe took nothing for ``timeout`` seconds."""
    done = _stderr.flush(timeout) if _stderr is not None else True
    return (_writer.flush(timeout) if _writer is not None else True) and done


def dropped_lines() -> int:
    """Log lines lost since the start (stderr not read for long, or its reader gone)."""
    return _stderr.dropped if _stderr is not None else 0


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """One logger per name, for module level: it follows every ``configure``."""
    named = _loggers.get(name)
    if named is None:
        named = _loggers[name] = _Named(name)
    return cast(structlog.typing.FilteringBoundLogger, named)
