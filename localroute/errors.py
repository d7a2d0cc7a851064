"""The exception tree of localroute, mapped to OpenAI error bodies in one place (server/errors.py).

    LocalrouteError
    ├── ConfigError                 bad settings or calibration file (CLI exits non-zero)
    ├── InvalidRequestError  400    a client's mistake
    │   ├── ContextLengthExceededError  400 context_length_exceeded
    │   ├── UnsupportedCapabilityError  400 unsupported_capability: no tier has what the request needs
    │   ├── RequestTooLargeError 413    the body is over max_body_bytes
    │   └── RequestTimeoutError  408    the body did not arrive in http_body_timeout_s
    ├── AuthenticationError  401
    ├── ModelNotFoundError   404
    ├── NotFoundError        404    a stored object (a Response) that is not there
    ├── RateLimitError       429    queue full, budget exhausted (with retry_after_s)
    │   └── BudgetExceededError 429 budget_exceeded: the period's (or key's) frontier spend cap
    ├── GenerationError      500    one request failed inside a local engine; the engine goes on
    ├── UpstreamError        502    the frontier failed
    ├── BackendUnavailableError 503 a local engine is not loaded, busy or missing its extra
    │   ├── MissingExtraError 503 missing_extra (also an ImportError): the message names the extra
    │   ├── EngineDeadError   503 engine_dead: the tier's engine process died; it is restarting
    │   └── CircuitOpenError  503 upstream_circuit_open: the frontier is presumed down, failing fast
    └── ClientDisconnectedError 499 the client left; nobody reads the answer (nginx's 499)

GenerationError and EngineDeadError are vLLM's split (EngineGenerateError vs EngineDeadError): the
first ends one request, the second means the tier is down.
"""

from __future__ import annotations


class LocalrouteError(Exception):
    """Base of every error localroute raises on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s


class ConfigError(LocalrouteError):
    error_type = "config_error"


class InvalidRequestError(LocalrouteError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class UnsupportedCapabilityError(InvalidRequestError):
    """No tier of the ladder can serve what the request needs (tools, images, n > 1, ...)."""

    code = "unsupported_capability"


class RequestTooLargeError(InvalidRequestError):
    """The body is over `max_body_bytes`."""

    status_code = 413
    code = "request_too_large"


class RequestTimeoutError(InvalidRequestError):
    """The body did not arrive in time; the answer closes the connection (server/errors.py)."""

    status_code = 408
    code = "request_timeout"


class AuthenticationError(LocalrouteError):
    """No API key, or a wrong one (OpenAI's shape: type invalid_request_error, code invalid_api_key)."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFoundError(LocalrouteError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(LocalrouteError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class RateLimitError(LocalrouteError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceededError(RateLimitError):
    """The frontier spend cap for this period (or this key) is reached."""

    code = "budget_exceeded"


class GenerationError(LocalrouteError):
    """An exception while decoding one request (sampling, grammar, stop handling): that request
    ends with this error and its slot is freed; the engine and its other requests go on."""

    status_code = 500
    error_type = "server_error"
    code = "generation_failed"


class UpstreamError(LocalrouteError):
    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"


class BackendUnavailableError(LocalrouteError):
    status_code = 503
    error_type = "service_unavailable"
    code = "backend_unavailable"


class MissingExtraError(BackendUnavailableError, ImportError):
    """An optional engine is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed: install it with pip install 'localroute[{extra}]'",
            code="missing_extra",
        )
        self.package = package
        self.extra = extra


class EngineDeadError(BackendUnavailableError):
    """The engine itself is gone (its process crashed), not one request: the tier is down until the
    supervisor has restarted it (vLLM's EngineDeadError vs EngineGenerateError)."""

    code = "engine_dead"


class CircuitOpenError(BackendUnavailableError):
    """The upstream is presumed down: failing fast instead of paying its deadlines again."""

    code = "upstream_circuit_open"


class ClientDisconnectedError(LocalrouteError):
    """The client went away; its work was cancelled. Nobody reads this answer (nginx's 499)."""

    status_code = 499
    error_type = "client_closed_request"
    code = "client_disconnected"
