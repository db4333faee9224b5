"""Error kinds and the one place their OpenAI-style bodies are shaped.

Every error the gateway answers with is ``{"error": {"message", "type", "param", "code"}}``
where ``code`` is the HTTP status as a string, as the LiteLLM proxy sends it.
"""

from __future__ import annotations


class ProxyError(Exception):
    """An error that is answered to the client as-is."""

    status = 500
    type = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None,
                 retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}
        self.retryable = retryable

    def to_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": str(self.status)}}

    def to_anthropic_body(self) -> dict:
        """The same error as Anthropic's API words it (the ``/v1/messages`` endpoint)."""
        kind = self.type if self.type in ANTHROPIC_TYPES.values() else anthropic_type(self.status)
        return {"type": "error", "error": {"type": kind, "message": self.message}}


class InvalidRequestError(ProxyError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(ProxyError):
    status = 401
    type = "auth_error"


class PermissionDeniedError(ProxyError):
    status = 403
    type = "permission_denied"


class NotFoundError(ProxyError):
    status = 404
    type = "not_found_error"


class MethodNotAllowedError(ProxyError):
    status = 405
    type = "method_not_allowed"


class RequestTooLargeError(ProxyError):
    status = 413
    type = "invalid_request_error"


class HeadersTooLargeError(ProxyError):
    status = 431
    type = "invalid_request_error"


class RateLimitError(ProxyError):
    status = 429
    type = "rate_limit_error"


class UpstreamError(ProxyError):
    """The provider answered with an error, or could not be reached (503)."""

    status = 502
    type = "api_error"


class UpstreamConnectionError(UpstreamError):
    status = 503
    type = "api_connection_error"


class UpstreamTimeoutError(UpstreamError):
    status = 408
    type = "timeout"


class ServiceUnavailableError(ProxyError):
    status = 503
    type = "service_unavailable"


# The OpenAI error `type` a client expects for an upstream status it is handed back.
UPSTREAM_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found_error",
    408: "timeout",
    409: "conflict",
    413: "invalid_request_error",
    422: "unprocessable_entity",
    429: "rate_limit_error",
}


# HTTP status -> the Anthropic error `type` sent with it.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def upstream_error(status: int, message: str, *, param: str | None = None,
                   headers: dict[str, str] | None = None) -> UpstreamError:
    """Build the error for a non-2xx provider reply, keeping its status for 4xx."""
    if status >= 500 or status < 400:
        kind = "api_error" if status != 503 else "service_unavailable"
        return UpstreamError(message, status=status if status >= 500 else 502, type=kind,
                             param=param, headers=headers, retryable=True)
    return UpstreamError(message, status=status, type=UPSTREAM_TYPES.get(status, "invalid_request_error"),
                         param=param, headers=headers, retryable=status in (408, 409, 429))


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (or timed out). Internal: handlers turn it into a 503."""
