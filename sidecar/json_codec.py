"""JSON at orjson's speed with the stdlib's reach.

Answers and request bodies are the hot path, and orjson is several times the stdlib's
speed; what orjson refuses (integers past 64 bits, lone surrogates a percent-decoded
query can carry, NaN in a body) goes through the stdlib, so no valid input is an error
only because of the faster library.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def encode_json(document: Any) -> bytes:
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        return json.dumps(document).encode()


def decode_json(raw: bytes, charset: str = "utf-8") -> Any:
    """Raises ``ValueError`` (or ``RecursionError`` for nesting deeper than the stdlib
    parses) for what is not JSON. orjson reads an integer past 64 bits as a float: no
    body we accept carries numbers, so that is never a value we use."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw.decode(charset))
        except LookupError:  # a charset Python does not know
            raise ValueError(f"unknown charset {charset!r}") from None
