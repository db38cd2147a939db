"""secret-sidecar: resolves Kong vault references for a gateway over a Unix socket."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata on first use only.

    Every command imports this package, ``health`` probes every few seconds included,
    and importlib.metadata (with the email and zipfile modules it loads) costs more than
    the rest of a probe; only ``--version`` and the build-info metric need the version.
    """
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        found = version("secret-sidecar")
    except PackageNotFoundError:  # running from a source tree that was not installed
        found = "0.0.0"
    globals()["__version__"] = found  # later reads find it without this function
    return found
