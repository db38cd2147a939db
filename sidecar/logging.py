"""structlog set-up: one JSON object per line on stderr, with a redaction safety net.

Stderr, because ``secret-sidecar resolve`` prints the value on stdout and the two
must never mix. Code logs secret ids and references, never values; the
redaction processor is the net under that rule, not the rule itself.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import orjson
import structlog

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


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values under sensitive keys, also inside nested mappings."""
    for key, item in event.items():
        if str(key).lower() in SENSITIVE_KEYS:
            event[key] = REDACTED
        elif isinstance(item, Mapping):
            event[key] = redact(_logger, _method, dict(item))
    return event


_stdlib_handler: logging.Handler | None = None


def _json(event: Any, **_: Any) -> str:
    """orjson, several times the stdlib's speed; a type it cannot encode becomes str, and
    what it refuses outright (integers past 64 bits, from a reference's ``#version``)
    goes through the stdlib: a log line must never fail the request it describes."""
    try:
        return orjson.dumps(event, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(event, default=str)


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog for the whole process; safe to call again on reload.

    Warnings and errors that libraries log through stdlib ``logging`` (aiohttp, hvac,
    botocore, gRPC) are rendered the same way, so stderr stays one JSON object a line.
    """
    global _stdlib_handler  # noqa: PLW0603 - one process-wide handler, replaced on reload
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_json)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    root.addHandler(handler)
    _stdlib_handler = handler
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _drop(_logger: Any, _method: str, _event: MutableMapping[str, Any]) -> Any:
    raise structlog.DropEvent


def silence() -> None:
    """No log output at all, for ``get``/``resolve``: their stderr is the error alone.

    Library records (stdlib ``logging``, and ``warnings`` routed into it) reach a
    handler that discards them, so Python's last-resort handler prints nothing either.
    """
    global _stdlib_handler  # noqa: PLW0603 - the same process-wide slot as configure()
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    _stdlib_handler = logging.NullHandler()
    root.addHandler(_stdlib_handler)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[_drop],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
