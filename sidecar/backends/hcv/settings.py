"""The ``hcv`` vault's settings: Kong's fields, and Kong's rules on them (docs/kong.md)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from sidecar.backends.base import VaultSettings

KUBE_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path


class HcvSettings(VaultSettings):
    """Kong's hcv fields and defaults, plus ``token_file``, TLS files and a request timeout.

    ``auth_method`` is declared last so its validator sees the credential fields
    and can say which one is missing without echoing any of them.
    """

    # Credentials, how to log in, and files to read: never set by a reference's query.
    operator_only: ClassVar[frozenset[str]] = frozenset({
        "auth_method", "token", "token_file", "kube_role", "kube_auth_path",
        "kube_api_token_file", "approle_auth_path", "approle_role_id", "approle_secret_id",
        "approle_secret_id_file", "approle_response_wrapping", "ca_cert", "client_cert",
        "client_key",
    })  # fmt: skip

    # Kong refuses empty strings in every string field: so do we (Field(min_length=1)).
    protocol: Literal["http", "https"] = "http"
    host: str = "127.0.0.1"
    port: int = Field(default=8200, ge=1, le=65535)
    namespace: str | None = Field(default=None, min_length=1)
    mount: str = Field(default="secret", min_length=1)
    kv: Literal["v1", "v2"] = "v1"
    token: SecretStr | None = Field(default=None, min_length=1)
    token_file: str | None = Field(default=None, min_length=1)
    kube_role: str | None = Field(default=None, min_length=1)
    kube_auth_path: str = Field(default="kubernetes", min_length=1)
    kube_api_token_file: str = Field(default=KUBE_TOKEN_FILE, min_length=1)
    approle_auth_path: str = Field(default="approle", min_length=1)
    approle_role_id: SecretStr | None = Field(default=None, min_length=1)
    approle_secret_id: SecretStr | None = Field(default=None, min_length=1)
    approle_secret_id_file: str | None = Field(default=None, min_length=1)
    approle_response_wrapping: bool = False
    ca_cert: str | None = Field(default=None, min_length=1)
    client_cert: str | None = Field(default=None, min_length=1)
    client_key: str | None = Field(default=None, min_length=1)
    timeout: float = Field(default=5.0, gt=0)  # per request (connect, read); resolver bounds all
    auth_method: Literal["token", "approle", "kubernetes"] = Field(
        default="token", validate_default=True
    )

    @field_validator("host")
    @classmethod
    def _kong_host(cls, host: str) -> str:
        return kong_host(host)

    @field_validator("auth_method")
    @classmethod
    def _credentials_present(cls, method: str, info: ValidationInfo) -> str:
        """Kong's rules: what each auth method needs before anything is sent."""
        data = info.data
        if method == "token" and not (data.get("token") or data.get("token_file")):
            raise ValueError("token auth needs token or token_file (or KONG_VAULT_HCV_TOKEN)")
        if method == "approle" and not data.get("approle_role_id"):
            raise ValueError("approle auth needs approle_role_id")
        if method == "approle" and not (
            data.get("approle_secret_id") or data.get("approle_secret_id_file")
        ):
            raise ValueError("approle auth needs approle_secret_id or approle_secret_id_file")
        if method == "kubernetes" and not data.get("kube_role"):
            raise ValueError("kubernetes auth needs kube_role")
        if bool(data.get("client_cert")) != bool(data.get("client_key")):
            raise ValueError("client_cert and client_key go together")
        return method

    @classmethod
    def check_entity(cls, config: Mapping[str, Any]) -> None:
        """Kong's entity check: a kubernetes vault carries no token of its own."""
        if config.get("auth_method") == "kubernetes" and config.get("token") is not None:
            raise ValueError(
                "token must not be set when auth_method is kubernetes (Kong refuses it;"
                " the token comes from the Kubernetes login)"
            )


def kong_host(host: str) -> str:
    """Kong's ``typedefs.host``: a host name, an IPv4 or an IPv6 address, with no port.

    A bare IPv6 address comes back in brackets, as a URL needs it.
    """
    allowed = "must be a host name or an IP address, without scheme, port or path"
    if host.count(":") > 1:  # IPv6, bracketed or not
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise ValueError(allowed) from None
        return f"[{bare}]"
    if ":" in host:
        raise ValueError(allowed)
    if re.fullmatch(r"[\d.]+", host):  # IPv4 (leading zeros allowed, as in Kong)
        parts = host.split(".")
        if len(parts) != 4 or not all(re.fullmatch(r"\d{1,3}", p) and int(p) <= 255 for p in parts):
            raise ValueError(allowed)
        return host
    segments = host.split(".")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", host) or any(
        segment.endswith("-") or (not segment and index != len(segments) - 1)
        for index, segment in enumerate(segments)
    ):
        raise ValueError(allowed)
    return host
