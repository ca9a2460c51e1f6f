"""The exception hierarchy: one root, one family per concern.

This module imports nothing from the package so every layer can raise these.
HTTP mapping lives in `llmsvc.gateway.errors`, nowhere else.
"""


class LlmsvcError(Exception):
    """Root of every error llmsvc raises on purpose."""


class ConfigError(LlmsvcError):
    """The configuration is invalid; the message names the setting."""


class WalError(LlmsvcError):
    """The write-ahead log cannot be used as asked."""


class WalLocked(WalError):
    """Another daemon holds the WAL directory's lock."""


class WalFatal(WalError):
    """A write or fsync failed: the page cache can no longer be trusted."""


class WalFull(WalError):
    """The WAL's disk is full: requests are refused until space returns."""


class StoreError(LlmsvcError):
    """The SQL store failed or is unreachable."""


class BackupError(LlmsvcError):
    """A backup or restore could not be made; the message says why."""


class ProviderError(LlmsvcError):
    """An upstream provider call failed.

    `retryable` says whether another try could succeed; the gateway, not the
    adapter, decides what to do with it.
    """

    retryable = False

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code or "upstream_error"


class ProviderUnavailable(ProviderError):
    """The provider could not be reached or failed transiently (connect, 429, 5xx).

    `retry_after` is the upstream's Retry-After, in seconds, when it sent one.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class ClientError(LlmsvcError):
    """The client's request is wrong; the message says what to fix."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class HeaderTooLarge(ClientError):
    """The request's line and headers together are over `max_header_bytes`."""

    status = 431
    code = "request_header_too_large"


class UriTooLong(ClientError):
    """The request line alone is over `max_header_bytes`."""

    status = 414
    code = "uri_too_long"


class RequestTimeout(ClientError):
    """The request's head or body did not arrive within its timeout."""

    status = 408
    code = "request_timeout"


class UnknownModel(ClientError):
    status = 404
    code = "model_not_found"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


class Unauthorized(ClientError):
    """No admin token, or the wrong one; says nothing of the resource asked for."""

    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    """Who asks is known, but not this way: a console form posted without its session's CSRF
    token, or from a page of another origin."""

    status = 403
    code = "forbidden"


class InvalidApiKey(ClientError):
    """A `/v1/*` request with no key, or one unknown, revoked or expired (`auth = "keys"`)."""

    status = 401
    code = "invalid_api_key"


class ModelNotAllowed(ClientError):
    """The caller's key may not use the model asked for."""

    status = 403
    code = "model_not_allowed"


class RateLimited(ClientError):
    """A key or team is over its requests or tokens per minute; `kind` is which (OpenAI's
    error type), `headers` the `Retry-After` and `x-ratelimit-*` the 429 carries."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(message)
        self.kind = kind
        self.headers = headers


class BudgetExceeded(RateLimited):
    """A key's or team's spend this period has reached its budget."""

    code = "budget_exceeded"


class Conflict(ClientError):
    """The request cannot be done in the daemon's current state (e.g. a restore)."""

    status = 409
    code = "conflict"


class ServiceUnavailable(LlmsvcError):
    """The daemon cannot take the request now (draining, WAL unwritable)."""
