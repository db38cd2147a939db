"""One tree of errors, each with the stable API code and HTTP status it maps to.

Everything the daemon refuses or fails at is one of these, so the server turns
errors into JSON in exactly one place. Messages are shown to callers and written
to logs: they must never contain a secret value or a credential.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class SidecarError(Exception):
    """Base of every error that has an API code."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class ConfigError(SidecarError, ValueError):
    """The configuration file or a vault's settings are invalid."""

    code = "invalid_config"
    status = 500


class InvalidRequest(SidecarError):
    code = "invalid_request"
    status = 400


class InvalidReference(SidecarError, ValueError):
    """A reference that does not parse, or asks for something its vault cannot do."""

    code = "invalid_reference"
    status = 400


class RequestTimeout(SidecarError):
    """The client was too slow sending its request line, headers or body."""

    code = "request_timeout"
    status = 408


class UnknownRoute(SidecarError):
    code = "not_found"
    status = 404


class MethodNotAllowed(SidecarError):
    code = "method_not_allowed"
    status = 405


class Forbidden(SidecarError):
    code = "forbidden"
    status = 403


class UnknownVault(SidecarError):
    code = "unknown_vault"
    status = 404


class PayloadTooLarge(SidecarError):
    code = "payload_too_large"
    status = 413


class TooManyRequests(SidecarError):
    code = "too_many_requests"
    status = 429


class FailureClass(enum.Enum):
    """What a backend failure says about the value, and so what the cache does with it.

    Only *gone* drops a good value at once. *Denied*, *transient* and *misconfigured*
    leave the last good value servable (stale) within ``resurrect_ttl``: a revoked
    policy, an outage or a bad deploy of the vault's config must not take a working
    gateway down with it. With nothing to serve, *transient* failures are retried with
    backoff (and early by readers), the others are remembered for ``neg_ttl``.
    """

    GONE = "gone"  # not found, deleted, version destroyed
    DENIED = "denied"  # the backend refuses our identity this secret
    TRANSIENT = "transient"  # timeouts, 5xx, throttling, our own expired credentials
    MISCONFIGURED = "misconfigured"  # the vault's settings are wrong; retrying will not help


class BackendFailure(SidecarError):
    """A backend could not produce a value; its ``failure_class`` decides what happens next.

    Unrecognised failures are transient: an odd exception must not drop a good value.
    """

    failure_class: ClassVar[FailureClass] = FailureClass.TRANSIENT

    @property
    def transient(self) -> bool:
        return self.failure_class is FailureClass.TRANSIENT


class SecretNotFound(BackendFailure):
    code = "not_found"
    status = 404
    failure_class = FailureClass.GONE


class AccessDenied(BackendFailure):
    code = "forbidden"
    status = 403
    failure_class = FailureClass.DENIED


class BackendError(BackendFailure):
    """The vault is misconfigured (no credentials, no region, refused request shape), or
    the backend answered something no retry will change (not base64, not a JSON map)."""

    code = "backend_error"
    status = 502
    failure_class = FailureClass.MISCONFIGURED


class BackendUnavailable(BackendFailure):
    """The backend is down, throttling or erroring and no usable cached value exists."""

    code = "backend_unavailable"
    status = 503


class Unrecognised(BackendUnavailable):
    """A failure no mapping knows (an SDK exception type, an AWS or gRPC code): transient,
    since an odd error must not drop a good value. ``kind`` names it for the one log line
    the resolver writes per vault and kind: a mapping to add, not news on every call."""

    def __init__(self, message: str, kind: str = "unknown") -> None:  # copy() passes message
        super().__init__(message)
        self.kind = kind

    @classmethod
    def of(cls, exc: BaseException, what: str) -> Unrecognised:
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return cls(f"{what}: unrecognised error ({type(exc).__name__})", kind)


class CredentialsExpired(BackendUnavailable):
    """Our own credentials for the backend expired or were revoked: the backend has
    dropped them so the next attempt authenticates again, and the call is retried."""


class BackendTimeout(BackendFailure):
    code = "backend_timeout"
    status = 504


class StartupError(SidecarError):
    """The daemon cannot start (socket in use, path not a socket, bind refused)."""

    code = "startup_failed"
    status = 500


class CannotMigrate(SidecarError):
    """``kong-migrate`` met a Kong file it cannot split safely; nothing was written."""

    code = "cannot_migrate"
    status = 400
