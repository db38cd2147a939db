"""The one small interface every secret backend implements.

Modelled on Kong's vault strategies (``get(config, resource, version)``): a backend
knows how to fetch one secret id at one version with one effective config, and
nothing about caching, keys, references or HTTP. The resolver does the rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sidecar.errors import BackendFailure

# What a reference's query may set on any vault: how long to cache and how to decode,
# never where a request goes or whose credentials it carries.
QUERY_FIELDS: frozenset[str] = frozenset({"ttl", "neg_ttl", "resurrect_ttl", "base64_decode"})
MAX_TTL = 1e8  # seconds: Kong's typedefs.ttl bound for ttl, neg_ttl and resurrect_ttl


class VaultSettings(BaseModel):
    """Fields every vault accepts (Kong's names). Backends subclass it with their own.

    Frozen and hashable: the effective settings are part of the cache key, so a
    reference that overrides a field through its query gets its own entry.
    ``None`` for a duration means "the ``cache:`` default".

    A reference's query may set only ``query_fields`` (plus what the vault entity
    lists in ``query_overrides``): whoever writes gateway config must not be able to
    aim the sidecar's credentials at another host, or pick its identity.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fields any query may set (backends add their version selectors); vaults may open more.
    query_fields: ClassVar[frozenset[str]] = QUERY_FIELDS
    # Credentials, auth and file paths: no query sets them, whatever ``query_overrides`` says.
    operator_only: ClassVar[frozenset[str]] = frozenset()

    ttl: float | None = Field(default=None, ge=0, le=MAX_TTL)  # 0: Kong's "no rotation"
    neg_ttl: float | None = Field(default=None, ge=0, le=MAX_TTL)  # 0: no negative caching
    resurrect_ttl: float | None = Field(default=None, ge=0, le=MAX_TTL)
    base64_decode: bool = False
    # Ours, not Kong's: more fields a reference's query may set on this vault (off by default).
    query_overrides: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _widenable(self) -> VaultSettings:
        """Only real, non-credential fields can be opened to queries, and by name."""
        fields = set(type(self).model_fields) - {"query_overrides"}
        for name in self.query_overrides:
            if name not in fields:
                raise ValueError(f"query_overrides: {name!r} is not a field of this backend")
            if name in self.operator_only:
                raise ValueError(
                    f"query_overrides: {name!r} is a credential, auth or file field;"
                    " no reference may set it"
                )
        return self

    @classmethod
    def check_entity(cls, config: Mapping[str, Any]) -> None:
        """Kong's rules on a vault entity's own ``config``, checked when the config loads.

        Kong validates an entity's config alone (its ``KONG_VAULT_*`` base config
        applies only to a backend used directly), so rules that Kong's entity schema
        states across fields live here rather than in the settings' validators, which
        also see the env base config. Raise ``ValueError`` naming the field and what
        is allowed, never a value.
        """


@dataclass(frozen=True, slots=True)
class Fetched:
    """A value as the backend returned it, before key extraction.

    ``version`` is the backend's own version label (AWS VersionId, Vault KV
    version, GCP version number) when it has one, so callers can see rotation.
    """

    value: str = field(repr=False)
    version: str | None = None
    # JSON keys already read out of ``value`` (the resolver's memo: one parse per value)
    keys: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # reference text -> the answer's encoded fields that do not change while this value
    # is served (``Answer.encode``: one encoding per value and reference, not per read)
    answers: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)


@runtime_checkable
class Backend(Protocol):
    """One instance per vault. Created outside the loop; ``start`` runs inside it."""

    async def start(self, settings: Any) -> None:
        """Open clients and authenticate for the vault's own settings.

        Readiness waits for it, so "ready" means the vault can be used. References
        whose query changes connection settings get their clients on first use.
        Raise a ``BackendFailure`` if it fails; it is tried again on next use.
        """

    async def fetch(self, secret_id: str, version: int | None, settings: Any) -> Fetched:
        """Fetch one secret.

        Raise a ``BackendFailure`` of the right class (``errors.FailureClass``):
        ``SecretNotFound`` (gone), ``AccessDenied`` (denied), ``BackendError``
        (misconfigured), ``BackendUnavailable``/``BackendTimeout`` (transient) and
        ``CredentialsExpired`` after dropping what holds the expired credentials.
        Anything else is treated as transient. Messages must not contain the value or
        any credential.
        """

    async def close(self) -> None:
        """Release clients. Called once, even if ``start`` failed."""


@runtime_checkable
class BatchBackend(Backend, Protocol):
    """A backend that can fetch several secrets of one settings in one call.

    The resolver uses it for prefetch (and the refresher for due entries).
    Results come back in the order asked, each a value or the failure for it.
    """

    async def fetch_many(
        self, items: Sequence[tuple[str, int | None]], settings: Any
    ) -> list[Fetched | BackendFailure]: ...


@runtime_checkable
class AuthReporting(Protocol):
    """A backend that authenticates (Vault tokens) and reports it for the metrics."""

    auth_events: Counter[tuple[str, str]]  # (operation, outcome) -> count

    def token_ttl_remaining(self) -> dict[str, float | None]:
        """Seconds left per token (None: never expires)."""


@dataclass(frozen=True, slots=True)
class BackendKind:
    """What the registry needs to know about a backend module."""

    name: str
    settings: type[VaultSettings]
    create: Callable[[str], Backend]  # called with the vault prefix, for logs and metrics
    remote: bool = True  # remote backends get the vault's concurrency and rate limits
    # Raise a ``SidecarError`` (``InvalidReference``, ``Forbidden``) for a secret id,
    # version and settings this backend must never serve; called when a reference is
    # bound, so a refusal costs no cache entry and no backend call.
    check: Callable[[str, int | None, Any], None] = lambda secret_id, version, settings: None
