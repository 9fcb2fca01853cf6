"""The error tree of epp.

    EppError
    ├── ConfigError                 bad flags or files: one line, exit code 2
    └── Rejected                    a request epp refuses; becomes an ext_proc ImmediateResponse
        ├── BadRequest        400   body is not JSON, or has no usable ``model``
        ├── ModelNotFound     404   model not served by this pool
        ├── PayloadTooLarge   413   body over ``--max-body-bytes``
        ├── HeadersTooMany    431   epp's headers would push the request past the proxy's header-count limit
        ├── Shed              429   pool saturated and the request may be dropped
        ├── PathNotAllowed    403   a model server's admin path, not routed through the gateway
        └── NoEndpoints       503   no ready endpoint (or none matches the subset hint)

Each ``Rejected`` subclass carries its HTTP status and a low-cardinality ``reason``
that doubles as the ``error_code`` metric label.  The wire conversion lives in exactly
one place: :func:`epp.extproc.responses.immediate_response`.  Messages may quote
client input: :func:`clip` bounds every quoted value, and a message as a whole is cut at
``MAX_MESSAGE`` characters, so a megabyte model name never comes back whole.
"""

from __future__ import annotations


class EppError(Exception):
    """Root of every error epp raises on purpose."""


class ConfigError(EppError):
    """A flag, pool file or profile file is invalid."""


MAX_MESSAGE = 512
MAX_QUOTED = 128


def clip(value: object, limit: int = MAX_QUOTED) -> str:
    """``repr(value)`` of at most ``limit`` characters, saying how much was left out."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


class Rejected(EppError):
    """A request epp answers itself instead of routing it."""

    http_status: int = 500
    reason: str = "Internal"
    error_type: str = "server_error"

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE]}…(+{len(message) - MAX_MESSAGE} chars)"
        super().__init__(message)
        self.message = message


class BadRequest(Rejected):
    http_status = 400
    reason = "BadRequest"
    error_type = "invalid_request_error"


class ModelNotFound(Rejected):
    http_status = 404
    reason = "NotFound"
    error_type = "model_not_found"


class PathNotAllowed(Rejected):
    http_status = 403
    reason = "Forbidden"
    error_type = "permission_denied"


class PayloadTooLarge(Rejected):
    http_status = 413
    reason = "PayloadTooLarge"
    error_type = "invalid_request_error"


class HeadersTooMany(Rejected):
    http_status = 431
    reason = "HeadersTooMany"
    error_type = "invalid_request_error"


class Shed(Rejected):
    http_status = 429
    reason = "ResourceExhausted"
    error_type = "rate_limit_exceeded"


class NoEndpoints(Rejected):
    http_status = 503
    reason = "ServiceUnavailable"
    error_type = "service_unavailable"
