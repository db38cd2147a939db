"""The YAML configuration, validated once into frozen typed objects.

Every setting has a default, so no file at all runs the env backend on
``./sidecar.sock``. Unknown keys are errors (a typo must not silently fall back
to a default), and every error names the key, the value and what is allowed.
A Kong decK file loads as is: its ``vaults:`` are ours, other entities ignored.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sidecar.backends import BACKEND_NAMES, load_kind
from sidecar.backends.base import MAX_TTL
from sidecar.errors import ConfigError

PREFIX_PATTERN = r"^[a-z][a-z0-9-]*[a-z0-9]$"
# Kong's loaded vault names may not be prefixes: ours plus the other bundled ones.
RESERVED_NAMES = BACKEND_NAMES | {"azure", "conjur"}
# Kong's tag: printable ASCII but ',' and '/', or any non-ASCII character; never empty.
# Compiled on first use (``re`` keeps it): 5 ms at every start, for a field few files set.
_TAG = r"[ !-+\-.0-~\u0080-\U0010ffff]+"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
Seconds = Annotated[float, Field(ge=0)]
Ttl = Annotated[float, Field(ge=0, le=MAX_TTL)]  # Kong's typedefs.ttl
SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path is 108 with its NUL)
# Sections whose values may be echoed in errors; ``vaults`` hold credentials, so never.
_ECHOED = frozenset({"listen", "metrics", "log", "cache", "refresh", "limits", "watch", "facade"})


def _never(loc: tuple[int | str, ...]) -> bool:
    return False


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenConfig(_Model):
    socket: Path = Path("sidecar.sock")
    mode: int = 0o660
    group: str | int | None = None
    max_concurrent_requests: int = Field(default=1024, gt=0)
    backlog: int = Field(default=1024, gt=0)  # pending connections (gateway workers start at once)
    drain_timeout: Seconds = 10.0
    max_connections: int = Field(default=1024, gt=0)  # open at once; beyond: 429 and close
    header_timeout: float = Field(default=10.0, gt=0)  # a request's line and headers (slowloris)
    body_timeout: float = Field(default=10.0, gt=0)  # reading a request body
    idle_timeout: float = Field(default=75.0, gt=0)  # a keep-alive connection with no request
    max_header_size: int = Field(default=8190, ge=256, le=65536)  # request line or one header
    max_headers: int = Field(default=64, gt=0, le=1024)

    @field_validator("socket")
    @classmethod
    def _fits(cls, path: Path) -> Path:
        """The kernel silently truncates longer paths in some calls and refuses in others."""
        size = len(os.fsencode(path))
        if size > SUN_PATH_MAX:
            raise ValueError(f"is {size} bytes; a Unix socket path has at most {SUN_PATH_MAX}")
        return path

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, value: object) -> int:
        """Accept ``"0660"`` as YAML users write it; refuse world-writable modes."""
        if isinstance(value, str):
            if not re.fullmatch(r"0?[0-7]{3}", value):
                raise ValueError("must be an octal mode such as '0660'")
            value = int(value, 8)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
            raise ValueError("must be an octal mode such as '0660'")
        if value & 0o002:
            raise ValueError("must not be world-writable (o+w): anyone could read secrets")
        return value


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as host and port; the validators have checked it."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsConfig(_Model):
    address: str = "127.0.0.1:9464"

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]*):\d{1,5}", value):
            raise ValueError("must be host:port (e.g. 127.0.0.1:9464) or '' to disable")
        return value

    @property
    def host_port(self) -> tuple[str, int] | None:
        if not self.address:
            return None
        host, port = split_address(self.address)
        return host or "0.0.0.0", port  # noqa: S104 - an explicit ":port" means all


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    # A "request" line for every request, or only for those answered with an error.
    requests: Literal["errors", "all"] = "errors"
    # Repeat reads are counted and logged once per (peer, reference, outcome) this often.
    audit_interval: float = Field(default=60.0, gt=0)


class CacheConfig(_Model):
    """Defaults for every vault; a vault's own ``ttl``/``neg_ttl``/``resurrect_ttl`` win."""

    ttl: Ttl = 300.0  # 0: Kong's "no rotation" (fetched once, refreshed only on demand)
    neg_ttl: Ttl = 30.0  # 0: no negative caching
    resurrect_ttl: Ttl = 3600.0
    max_entries: int = Field(default=100_000, gt=0)
    backend_timeout: float = Field(default=10.0, gt=0)  # whole call, retries included
    backend_retries: int = Field(default=2, ge=0)  # extra attempts after a transient failure
    retry_backoff: float = Field(default=0.1, gt=0)  # first backoff; doubles, full jitter
    retry_backoff_max: float = Field(default=2.0, gt=0)


class LimitsConfig(_Model):
    """Backend protection per vault: calls in flight, and a token bucket of calls per second."""

    concurrency: int = Field(default=16, gt=0)
    rate: float = Field(default=50.0, gt=0)
    burst: int = Field(default=50, gt=0)


class RefreshConfig(_Model):
    """Background refresh: values are fetched again before their ttl ends."""

    enabled: bool = True
    window: tuple[float, float] = (0.75, 0.9)  # fraction of ttl, uniform jitter between
    max_backoff: float = Field(default=60.0, gt=0)  # cap of the retry backoff after failures
    idle_ttl: float | None = Field(default=None, gt=0)  # unread this long: dropped (3 x ttl)

    @field_validator("window")
    @classmethod
    def _fractions(cls, window: tuple[float, float]) -> tuple[float, float]:
        low, high = window
        if not 0 < low <= high < 1:
            raise ValueError("must be two fractions of ttl with 0 < low <= high < 1")
        return window


class WatchConfig(_Model):
    heartbeat: float = Field(default=15.0, gt=0)  # seconds between keep-alive comments
    queue: int = Field(default=64, gt=0)  # events buffered per watcher before it is dropped
    max_watchers: int = Field(default=256, gt=0)


_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class FacadeToken(_Model):
    """A token the Vault-KV facade accepts, and what it may read: the globs of a
    ``clients:`` rule over ``<vault>/<secret-id>``. The token itself is never in the
    config: it is read from a file or an environment variable, so the config (a
    ConfigMap) can be shown to anyone."""

    name: str = Field(pattern=_NAME)  # the peer in audit events
    token_file: Path | None = None
    token_env: str | None = Field(default=None, pattern=_ENV_NAME)
    allow: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> FacadeToken:
        if (self.token_file is None) == (self.token_env is None):
            raise ValueError("a facade token needs exactly one of token_file or token_env")
        return self


class FacadeRole(_Model):
    """A Kubernetes login role: the service accounts that may log in with it
    (``<namespace>/<name>`` globs) and what the tokens it hands out may read."""

    name: str = Field(pattern=_NAME)
    service_accounts: tuple[str, ...] = Field(min_length=1)
    allow: tuple[str, ...] = Field(min_length=1)


class FacadeKubernetes(_Model):
    """``POST /v1/auth/<auth_path>/login`` with a projected service-account token,
    verified against the cluster's signing keys, issuer and audience."""

    auth_path: str = Field(default="kubernetes", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    jwks_file: Path | None = None  # the keys, as the API server's /openid/v1/jwks serves them
    discovery_url: str | None = Field(default=None, pattern=r"^https?://")  # the issuer's
    ca_file: Path | None = None  # for discovery_url over https with a private CA
    # Sent as a bearer token to discovery_url's origin only, read at each fetch: the API
    # server serves discovery to authenticated service accounts by default (the pod's
    # own /var/run/secrets/kubernetes.io/serviceaccount/token).
    discovery_token_file: Path | None = None
    # Life of a handed-out token. Short, because Kong caches it for its lease and keeps
    # using it after a sidecar restart (which forgets it): reads fail until it expires.
    token_ttl: float = Field(default=120.0, gt=0, le=86400)
    leeway: float = Field(default=30.0, ge=0, le=300)  # clock skew allowed on exp/nbf/iat
    roles: tuple[FacadeRole, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_key_source(self) -> FacadeKubernetes:
        if (self.jwks_file is None) == (self.discovery_url is None):
            raise ValueError("kubernetes login needs exactly one of jwks_file or discovery_url")
        if len({role.name for role in self.roles}) != len(self.roles):
            raise ValueError("role names must be unique")
        return self


class FacadeConfig(_Model):
    """A HashiCorp Vault KV API on a loopback TCP port, for Kong's bundled ``hcv`` vault
    (Konnect-managed gateways), over the same resolver, cache, limits and audit."""

    enabled: bool = False
    address: str = "127.0.0.1:8200"
    # Beyond loopback, anyone who can reach the port and holds a token reads secrets
    # in clear HTTP: only for a network namespace shared with the gateway alone.
    allow_non_loopback: bool = False
    mount: str = Field(default="secret", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kv: Literal["v1", "v2"] = "v2"
    tokens: tuple[FacadeToken, ...] = ()
    kubernetes: FacadeKubernetes | None = None

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):\d{1,5}", value):
            raise ValueError("must be host:port, such as 127.0.0.1:8200")
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return split_address(self.address)

    @model_validator(mode="after")
    def _safe(self) -> FacadeConfig:
        if not self.enabled:
            return self
        host = self.host_port[0]
        if not self.allow_non_loopback and not _loopback(host):
            raise ValueError(
                f"facade.address {self.address} is not a loopback address: the facade"
                " answers secrets in clear HTTP to any token holder that reaches it; use"
                " 127.0.0.1 or ::1, or set allow_non_loopback: true (see docs/konnect.md)"
            )
        if not self.tokens and self.kubernetes is None:
            raise ValueError("an enabled facade needs tokens or kubernetes login")
        names = [token.name for token in self.tokens]
        if self.kubernetes is not None:
            names += [f"kubernetes:{role.name}" for role in self.kubernetes.roles]
        if len(set(names)) != len(names):
            raise ValueError("facade token names must be unique")
        return self


def _loopback(host: str) -> bool:
    """A literal loopback address, or ``localhost``; any other name could resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class VaultEntity(_Model):
    """Kong's vault entity, refused where Kong's schema refuses it (docs/kong.md).

    ``id``/timestamps from a decK dump are accepted and unused. Each backend's own
    entity rules run here too (``VaultSettings.check_entity``), so ``load_config``
    fails on them; its field rules run on the env-overlaid config when the vaults
    are built, before anything listens.
    """

    # An entity's config holds credentials: a ValidationError's text must not show them.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    prefix: str = Field(pattern=PREFIX_PATTERN)
    name: Literal["env", "aws", "gcp", "hcv"]
    description: str | None = Field(default=None, min_length=1)  # Kong: no empty strings
    config: dict[str, Any] = Field(default_factory=dict, repr=False)  # credentials live here
    tags: tuple[str, ...] | None = None
    limits: LimitsConfig | None = None  # ours, not Kong's: default is the top-level limits
    id: str | None = None
    created_at: int | None = None
    updated_at: int | None = None

    @field_validator("prefix")
    @classmethod
    def _not_a_backend(cls, value: str) -> str:
        if value in RESERVED_NAMES:
            names = ", ".join(sorted(RESERVED_NAMES))
            raise ValueError(f"must not be a backend name (Kong reserves {names})")
        return value

    @field_validator("tags")
    @classmethod
    def _kong_tags(cls, tags: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for tag in tags or ():
            if not re.fullmatch(_TAG, tag):
                raise ValueError(
                    "a tag must be printable ASCII other than ',' and '/' (or non-ASCII"
                    " text), and not empty"
                )
        return tags

    @field_validator("id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is not None and not _UUID.fullmatch(value):
            raise ValueError("must be a UUID such as 4e8b8b7a-0b0e-4f5e-9d5c-1c2b3a4d5e6f")
        return value

    @field_validator("config")
    @classmethod
    def _kong_entity_rules(cls, config: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is not None:
            load_kind(name).settings.check_entity(config)
        return config


class ClientRule(_Model):
    """Peer-credential ACL: globs over ``<vault name>/<secret id>``.

    ``gid`` matches the peer's primary or any supplementary group. ``admin`` adds
    what names secret ids without reading them: refresh-all, ``/v1/status`` and
    ``/readyz`` details.
    """

    uid: int | None = None
    gid: int | None = None
    allow: tuple[str, ...] = ()
    admin: bool = False

    @model_validator(mode="after")
    def _has_subject(self) -> ClientRule:
        if self.uid is None and self.gid is None:
            raise ValueError("a client rule needs uid or gid")
        if not self.allow and not self.admin:
            raise ValueError("a client rule needs allow globs or admin: true")
        return self


class Config(_Model):
    listen: ListenConfig = ListenConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    cache: CacheConfig = CacheConfig()
    refresh: RefreshConfig = RefreshConfig()
    limits: LimitsConfig = LimitsConfig()
    watch: WatchConfig = WatchConfig()
    facade: FacadeConfig = FacadeConfig()
    vaults: tuple[VaultEntity, ...] = ()
    prefetch: tuple[str, ...] = ()
    clients: tuple[ClientRule, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _deck(cls, data: Any) -> Any:
        """A decK file carries other Kong entities: keep only what is ours."""
        if isinstance(data, dict) and "_format_version" in data:
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data

    @field_validator("vaults")
    @classmethod
    def _unique_prefixes(cls, vaults: tuple[VaultEntity, ...]) -> tuple[VaultEntity, ...]:
        seen: set[str] = set()
        for vault in vaults:
            if vault.prefix in seen:
                raise ValueError(f"prefix {vault.prefix!r} is used by more than one vault")
            seen.add(vault.prefix)
        return vaults

    @field_validator("prefetch")
    @classmethod
    def _references(cls, refs: tuple[str, ...]) -> tuple[str, ...]:
        from sidecar.reference import parse  # noqa: PLC0415 - reference imports errors only

        for ref in refs:
            parse(ref)
        return refs

    @model_validator(mode="after")
    def _prefetch_fits(self) -> Config:
        """Prefetched entries are pinned but not exempt from ``max_entries`` (the bound is
        the bound): more of them than fit would evict each other, refetched on every read."""
        if len(self.prefetch) > self.cache.max_entries:
            raise ValueError(
                f"prefetch has {len(self.prefetch)} references but cache.max_entries is"
                f" {self.cache.max_entries}; raise max_entries or prefetch fewer"
            )
        return self


def describe_errors(
    exc: ValidationError,
    where: str,
    model: type[BaseModel],
    echo: Callable[[tuple[int | str, ...]], bool] = _never,
) -> str:
    """One line per problem: the key path and what is allowed; the value only if harmless.

    ``echo(loc)`` says whether a value at that path may be shown (objects that hold
    credentials: never). An unknown key's value is never shown: it is often a
    misplaced credential.
    """
    lines = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        path = ".".join([where, *map(str, loc)])
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (allowed: {_keys_at(model, loc[:-1])})")
        elif echo(loc):
            lines.append(f"{path}: {err['msg']} (got {short(err.get('input'))})")
        else:
            lines.append(f"{path}: {err['msg']}")
    return "; ".join(lines)


def _keys_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The field names of the model found at ``loc`` (list indexes skipped)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not isinstance(current, type):
            continue
        field = current.model_fields.get(part) if issubclass(current, BaseModel) else None
        if field is None:
            return "see the documentation"
        current = next(
            (t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
             if isinstance(t, type) and issubclass(t, BaseModel)),
            None,
        )  # fmt: skip
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return "see the documentation"
    return ", ".join(current.model_fields)


def short(value: object) -> str:
    """``repr`` cut to 80 characters: names and values from users can be anything."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# libyaml's safe loader where PyYAML has it (its wheels do): the pure-Python one took
# 0.49 s for a 10 000-reference prefetch list and 10 s for 100 000, libyaml 0.03 s.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config(path: Path | None) -> Config:
    """Read and validate ``path``; ``None`` gives the embedded default."""
    if path is None:
        return Config()
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)  # noqa: S506 - a safe loader
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        # PyYAML's message quotes the offending line, which may hold a credential.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping, got {type(raw).__name__}")
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, Any], where: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, where, Config, _plain_setting)) from None


def _plain_setting(loc: tuple[int | str, ...]) -> bool:
    return bool(loc) and loc[0] in _ECHOED
