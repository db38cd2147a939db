"""Who may use the Vault-KV facade: its tokens, and what each may read.

Two kinds: tokens from the config (each read from a file or an environment variable,
so the config never holds one) and tokens the facade hands out at Kubernetes login,
which live only in this process and expire. Only SHA-256 digests are kept; a
presented token is compared against each configured digest in constant time, and
looked up among handed-out ones by digest, so timing tells nothing about a token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sidecar.config import FacadeToken
from sidecar.errors import ConfigError, TooManyRequests

MIN_LENGTH = 16  # characters of a configured token: anything shorter is guessable
MAX_ISSUED = 10_000  # live handed-out tokens; beyond, login answers 429


@dataclass(frozen=True, slots=True)
class Holder:
    """A token's owner: ``name`` is the peer in audit events, ``allow`` its globs."""

    name: str
    allow: tuple[str, ...]
    expires: float | None = None  # monotonic clock; None: a configured token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._configured: list[tuple[bytes, Holder]] = []
        self._issued: dict[bytes, Holder] = {}

    def load(self, tokens: tuple[FacadeToken, ...], environ: Mapping[str, str]) -> None:
        """Read every configured token; all or none (a reload keeps the old set on error)."""
        loaded = [
            (_digest(_read(token, environ)), Holder(token.name, token.allow)) for token in tokens
        ]
        self._configured = loaded

    def issue(self, name: str, allow: tuple[str, ...], ttl: float) -> str:
        """A new random token for ``name``, valid ``ttl`` seconds, known only to us."""
        now = self._clock()
        if len(self._issued) >= MAX_ISSUED:
            self._issued = {d: h for d, h in self._issued.items() if h.expires and h.expires > now}
            if len(self._issued) >= MAX_ISSUED:
                raise TooManyRequests(f"more than {MAX_ISSUED} facade tokens are live")
        token = "ss." + secrets.token_urlsafe(32)
        self._issued[_digest(token)] = Holder(name, allow, now + ttl)
        return token

    def revoke_names(self, keep: set[str]) -> None:
        """Drop handed-out tokens whose role is gone (after a reload)."""
        self._issued = {d: h for d, h in self._issued.items() if h.name in keep}

    def holder(self, presented: str | None) -> Holder | None:
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for stored, holder in self._configured:  # every one compared: no early exit
            if hmac.compare_digest(stored, digest):
                found = holder
        if found is not None:
            return found
        issued = self._issued.get(digest)
        if issued is None or issued.expires is None:
            return None
        if issued.expires <= self._clock():
            del self._issued[digest]
            return None
        return issued


def _read(token: FacadeToken, environ: Mapping[str, str]) -> str:
    where = f"facade token {token.name!r}"
    if token.token_file is not None:
        try:
            value = token.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {token.token_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: {token.token_file} is not UTF-8 text") from None
    else:
        assert token.token_env is not None  # the model requires one of the two
        value = environ.get(token.token_env, "").strip()
        if not value:
            raise ConfigError(f"{where}: environment variable {token.token_env} is not set")
    if len(value) < MIN_LENGTH:
        raise ConfigError(f"{where} is shorter than {MIN_LENGTH} characters")
    return value
