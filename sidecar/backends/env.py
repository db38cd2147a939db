"""Kong's ``env`` vault: secrets from this process's environment variables.

The sidecar's own environment also holds the credentials it uses for the other
backends (``AWS_*``, ``VAULT_*``, ``GOOGLE_*``, ``KONG_VAULT_*``...). Those are never
served, whatever the vault's ``prefix``: a reference must not turn the env backend
into a way to read what the sidecar exists to keep to itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pydantic import Field

from sidecar.backends.base import BackendKind, Fetched, VaultSettings
from sidecar.errors import BackendFailure, Forbidden, SecretNotFound

# Variables read as credentials or credential locations by the sidecar or its SDKs.
RESERVED_PREFIXES = (
    "AWS_",  # botocore: keys, session token, profile, role and web-identity files
    "KONG_VAULT_",  # base config of every backend used directly, tokens included
    "VAULT_",  # hvac and the Vault CLI: VAULT_TOKEN, VAULT_ADDR, client certificates
    "GOOGLE_",  # GOOGLE_APPLICATION_CREDENTIALS and friends
    "GCP_",
    "CLOUDSDK_",  # gcloud's own configuration and credentials
    "SECRET_MANAGER_",  # the GCP emulator address
)


class EnvSettings(VaultSettings):
    # Kong's env schema: a letter, '_' or '-', then letters, digits, '_' or '-'.
    prefix: str | None = Field(default=None, pattern=r"^[A-Za-z_-][A-Za-z0-9_-]*$")


def variable_name(secret_id: str, version: int | None, prefix: str | None) -> str:
    """Kong's rule: upper(prefix + id), dashes to underscores; ``#2`` is ``_PREVIOUS``."""
    name = ((prefix or "") + secret_id).upper().replace("-", "_")
    return f"{name}_PREVIOUS" if version == 2 else name


def check(secret_id: str, version: int | None, settings: EnvSettings) -> None:
    """Refuse the sidecar's own credentials before anything is looked up or cached."""
    name = variable_name(secret_id, version, settings.prefix)
    if name.startswith(RESERVED_PREFIXES):
        raise Forbidden(
            f"environment variable {name} is reserved for the sidecar's own credentials"
            f" (no variable starting with {', '.join(RESERVED_PREFIXES)} is served)"
        )


class EnvBackend:
    """Reads variables at fetch time, so a reload or refresh sees a changed environment."""

    def __init__(self, vault: str, environ: Mapping[str, str] | None = None) -> None:
        self._vault = vault
        self._environ = os.environ if environ is None else environ

    async def start(self, settings: EnvSettings) -> None:
        return None

    async def fetch(self, secret_id: str, version: int | None, settings: EnvSettings) -> Fetched:
        return self._read(secret_id, version, settings)

    async def fetch_many(
        self, items: Sequence[tuple[str, int | None]], settings: EnvSettings
    ) -> list[Fetched | BackendFailure]:
        """All at once: one call, one metric and one log line for a prefetch of thousands."""
        results: list[Fetched | BackendFailure] = []
        for secret_id, version in items:
            try:
                results.append(self._read(secret_id, version, settings))
            except SecretNotFound as exc:
                results.append(exc)
        return results

    def _read(self, secret_id: str, version: int | None, settings: EnvSettings) -> Fetched:
        name = variable_name(secret_id, version, settings.prefix)
        value = self._environ.get(name)
        if value is None:
            raise SecretNotFound(f"environment variable {name} is not set")
        return Fetched(value=value, version=str(version) if version else None)

    async def close(self) -> None:
        return None


KIND = BackendKind(name="env", settings=EnvSettings, create=EnvBackend, remote=False, check=check)
