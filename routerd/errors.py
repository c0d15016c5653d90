"""One error hierarchy carrying HTTP status and a machine code.

Handlers raise these; one middleware renders them in the route's dialect
(Ollama: {"error": msg}; OpenAI: {"error": {"message", "type", "code"}}).
"""

from __future__ import annotations


class RouterdError(Exception):
    status: int = 500
    code: str = "internal_error"
    type: str = "server_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(RouterdError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class Unauthorized(RouterdError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class Forbidden(RouterdError):
    status = 403
    code = "forbidden"
    type = "permission_error"


class NotFound(RouterdError):
    """No route for the method and path."""

    status = 404
    code = "not_found"
    type = "invalid_request_error"


class MethodNotAllowed(RouterdError):
    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"

    def __init__(self, message: str, *, allow: str = "") -> None:
        super().__init__(message, headers={"Allow": allow} if allow else None)


class EngineRejected(RouterdError):
    """The engine refused the request with a 4xx (e.g. a prompt longer than the context):
    its status and message pass through."""

    code = "invalid_request"
    type = "invalid_request_error"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ModelNotFound(RouterdError):
    status = 404
    code = "model_not_found"
    type = "not_found_error"


class PayloadTooLarge(RouterdError):
    status = 413
    code = "payload_too_large"
    type = "invalid_request_error"


class ModelTooLarge(RouterdError):
    """The model cannot fit even with every idle model evicted."""

    status = 507
    code = "insufficient_memory"
    type = "server_error"


class TooManyRequests(RouterdError):
    """A per-key limit (requests per minute, concurrent requests) was reached."""

    status = 429
    code = "rate_limited"
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class QueueFull(RouterdError):
    status = 503
    code = "queue_full"
    type = "server_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class ModelFailed(RouterdError):
    """The model crash-looped or failed to load; the message carries the reason."""

    status = 503
    code = "model_failed"
    type = "server_error"


class ModelBusy(RouterdError):
    """The model is in use with other load options; retry when those requests finish."""

    status = 503
    code = "model_busy"
    type = "server_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class LoadOptionsFailed(RouterdError):
    """The engine would not start with the load options this request asked for: the
    request's error, not the model's."""

    status = 400
    code = "load_options_failed"
    type = "invalid_request_error"


class UpstreamError(RouterdError):
    """The engine failed before the first byte of the answer."""

    status = 502
    code = "upstream_error"
    type = "server_error"


class UpstreamUnavailable(UpstreamError):
    """The engine (or a peer) said it cannot take the request now (503, 429): retry later."""

    status = 503
    code = "upstream_unavailable"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class ShuttingDown(RouterdError):
    status = 503
    code = "shutting_down"
    type = "server_error"
