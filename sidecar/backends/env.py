"""Kong's ``env`` vault: secrets from this process's environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping

from sidecar.backends.base import BackendKind, Fetched, VaultSettings
from sidecar.errors import SecretNotFound


class EnvSettings(VaultSettings):
    prefix: str | None = None


def variable_name(secret_id: str, version: int | None, prefix: str | None) -> str:
    """Kong's rule: upper(prefix + id), dashes to underscores; ``#2`` is ``_PREVIOUS``."""
    name = ((prefix or "") + secret_id).upper().replace("-", "_")
    return f"{name}_PREVIOUS" if version == 2 else name


class EnvBackend:
    """Reads variables at fetch time, so a reload or refresh sees a changed environment."""

    def __init__(self, vault: str, environ: Mapping[str, str] | None = None) -> None:
        self._vault = vault
        self._environ = os.environ if environ is None else environ

    async def start(self, settings: EnvSettings) -> None:
        return None

    async def fetch(self, secret_id: str, version: int | None, settings: EnvSettings) -> Fetched:
        name = variable_name(secret_id, version, settings.prefix)
        value = self._environ.get(name)
        if value is None:
            raise SecretNotFound(f"environment variable {name} is not set")
        return Fetched(value=value, version=str(version) if version else None)

    async def close(self) -> None:
        return None


KIND = BackendKind(name="env", settings=EnvSettings, create=EnvBackend, remote=False)
