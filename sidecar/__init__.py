"""secret-sidecar: resolves Kong vault references for a gateway over a Unix socket."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("secret-sidecar")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
