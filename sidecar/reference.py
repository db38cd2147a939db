"""Parse Kong vault references the way Kong does, so gateway and sidecar read the same secret.

A reference is ``{vault://<name>/<secret-id>[/<key>][/][?<query>][#<version>]}``. Kong defines
the grammar by behaviour (``kong/pdk/vault.lua`` on top of LuaSocket's ``url.parse`` and nginx's
unescaping), quirks included; any difference would make one reference name two secrets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import unquote_to_bytes

from sidecar.errors import InvalidReference

__all__ = ["ConfigValue", "InvalidReference", "Reference", "is_reference", "parse"]

ConfigValue: TypeAlias = str | bool | list[str | bool]

_PREFIX = "{vault://"
_SUFFIX = "}"
# Decimal only: Kong's tonumber() would also take "1.5", "0x10" or "inf", which name no version.
_VERSION = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Reference:
    """One parsed reference: which vault (``name``), which secret, and how to read it."""

    name: str
    resource: str
    key: str | None = None
    version: int | None = None
    config: dict[str, ConfigValue] | None = None


def is_reference(text: str) -> bool:
    """Tell references from plain values by shape alone, as Kong does before it parses."""
    return isinstance(text, str) and text.startswith(_PREFIX) and text.endswith(_SUFFIX)


def parse(text: str) -> Reference:
    """Split a reference into its parts, failing with Kong's messages in Kong's order of checks.

    Raises ``InvalidReference`` and nothing else, whatever the input.
    """
    if not is_reference(text):
        raise InvalidReference(f"not a reference [{text}]")

    def invalid(reason: str) -> InvalidReference:
        return InvalidReference(f"reference url {reason} [{text}]")

    rest, has_fragment, fragment = text[len(_PREFIX) : -len(_SUFFIX)].partition("#")
    rest, _, query = rest.partition("?")
    authority, has_path, path = rest.partition("/")

    name = _host(authority)
    if not name:
        raise invalid("is missing host")
    if not has_path:
        raise invalid("is missing path")
    path = path.partition(";")[0]  # ";params" are not part of the path, as in any URL parser
    if not path:
        raise invalid("has empty path")

    version: int | None = None
    if has_fragment:
        if not _VERSION.fullmatch(fragment):
            raise invalid("has invalid version")
        try:
            version = int(fragment)
        except ValueError:  # more digits than int() agrees to convert
            raise invalid("has invalid version") from None

    # Kong decodes each segment twice: LuaSocket's unescape, then ngx.unescape_uri.
    segments = [_decode(part, twice=True) for part in path.split("/") if part]
    if not segments:
        raise invalid("has invalid path")
    key: str | None = None
    # A trailing "/" keeps the whole path as the id: how AWS names containing "/" are addressed.
    if len(segments) > 1 and not path.endswith("/"):
        key = segments.pop()
    return Reference(name, "/".join(segments), key, version, _config(query))


def _host(authority: str) -> str:
    """Drop userinfo, port and IPv6 brackets exactly as LuaSocket's ``url.parse`` does."""
    if "@" in authority:
        authority = authority.partition("@")[2]  # up to the *first* "@", unlike urllib
    head, colon, port = authority.rpartition(":")
    if colon and "]" not in port:
        authority = head
    if len(authority) > 2 and authority[0] == "[" and authority[-1] == "]":
        authority = authority[1:-1]
    return authority


def _unquote(raw: bytes, *, plus: bool) -> bytes:
    return unquote_to_bytes(raw.replace(b"+", b" ") if plus else raw)


def _decode(raw: str, *, twice: bool = False) -> str:
    """Percent-decode on bytes (``+`` is a space), like nginx, so split UTF-8 sequences rejoin.

    ``surrogatepass`` and ``replace`` keep any ``str`` (even lone surrogates) from raising.
    """
    data = raw.encode("utf-8", "surrogatepass")
    if twice:
        data = _unquote(data, plus=False)
    return _unquote(data, plus=True).decode("utf-8", "replace")


def _config(query: str) -> dict[str, ConfigValue] | None:
    """Read the query like ``ngx.decode_args``: bare keys are True, repeated keys make lists."""
    config: dict[str, ConfigValue] = {}
    for pair in query.split("&"):
        raw_key, has_value, raw_value = pair.partition("=")
        if not raw_key:
            continue
        key = _decode(raw_key)
        value: str | bool = _decode(raw_value) if has_value else True
        previous = config.get(key)
        if previous is None:
            config[key] = value
        elif isinstance(previous, list):
            previous.append(value)
        else:
            config[key] = [previous, value]
    return config or None
