"""One tree of errors, each with the stable API code and HTTP status it maps to.

Everything the daemon refuses or fails at is one of these, so the server turns
errors into JSON in exactly one place. Messages are shown to callers and written
to logs: they must never contain a secret value or a credential.
"""

from __future__ import annotations

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


class BackendFailure(SidecarError):
    """A backend could not produce a value.

    ``transient`` decides what the cache does with it: a transient failure
    (timeout, 5xx, throttling) lets the last good value be served stale within
    ``resurrect_ttl``; a permanent one (not found, denied) is remembered for
    ``neg_ttl``.
    """

    transient: ClassVar[bool] = False


class SecretNotFound(BackendFailure):
    code = "not_found"
    status = 404


class AccessDenied(BackendFailure):
    code = "forbidden"
    status = 403


class BackendError(BackendFailure):
    """The backend refused in a way retrying will not fix (bad config, bad answer)."""

    code = "backend_error"
    status = 502


class BackendUnavailable(BackendFailure):
    """The backend is down, throttling or erroring and no usable cached value exists."""

    code = "backend_unavailable"
    status = 503
    transient = True


class BackendTimeout(BackendFailure):
    code = "backend_timeout"
    status = 504
    transient = True


class StartupError(SidecarError):
    """The daemon cannot start (socket in use, path not a socket, bind refused)."""

    code = "startup_failed"
    status = 500
