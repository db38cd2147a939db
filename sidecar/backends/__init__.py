"""Backends, one module per Kong backend name, loaded on first use.

Lazy loading keeps start-up fast and lets a build run without the SDKs of
backends it does not use: only a backend module imports its SDK.
"""

from __future__ import annotations

import importlib

from sidecar.backends.base import Backend, BackendKind, BatchBackend, Fetched, VaultSettings
from sidecar.errors import ConfigError

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendKind",
    "BatchBackend",
    "Fetched",
    "VaultSettings",
    "load_kind",
]

BACKEND_NAMES: frozenset[str] = frozenset({"env", "aws", "gcp", "hcv"})


def load_kind(name: str) -> BackendKind:
    """Import ``sidecar.backends.<name>`` and return its ``KIND``."""
    if name not in BACKEND_NAMES:
        raise ConfigError(f"unknown backend {name!r}; allowed: {', '.join(sorted(BACKEND_NAMES))}")
    try:
        module = importlib.import_module(f"sidecar.backends.{name}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("sidecar"):
            raise  # our own module missing is a broken install, not a config choice
        raise ConfigError(
            f"backend {name!r} needs {exc.name}, which is not installed:"
            f" pip install 'secret-sidecar[{name}]' (or [all])"
        ) from exc
    kind: BackendKind = module.KIND
    return kind
