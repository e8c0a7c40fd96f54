"""The one error hierarchy of loraplex.

Every error a user can cause is a `LoraplexError`. The server maps it once to OpenAI-shaped
JSON (`{"error": {message, type, param, code}}`) with `http_status`; the CLI prints `message`
and exits 2. Messages name the bad value and say how to fix it.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class. Subclasses set the HTTP status and the OpenAI error type/code."""

    http_status = 400
    type = "invalid_request_error"
    code: str | None = None
    # Seconds a client should wait before retrying (the HTTP Retry-After header), or None.
    retry_after: float | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        if self.retry_after is None:
            return None
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(LoraplexError):
    """A malformed request, option or input file."""

    code = "invalid_value"


class PayloadTooLarge(BadRequest):
    """A request body over the configured limit (refused before it is read)."""

    http_status = 413
    code = "payload_too_large"


class ConfigError(LoraplexError):
    """A setting or command-line option that cannot work as given."""

    code = "invalid_config"


class AdapterNotFound(LoraplexError):
    http_status = 404
    code = "model_not_found"


class AdapterInvalid(LoraplexError):
    """An adapter directory that is not a servable PEFT LoRA (files, format, checksums).

    `problems` lists every issue found, so a user fixes them all in one round.
    """

    code = "adapter_invalid"

    def __init__(self, message: str, *, problems: list[str] | None = None, param: str | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message, param=param)


class AdapterIncompatible(AdapterInvalid):
    """A valid adapter that does not fit the served base model or rank limit."""

    code = "adapter_incompatible"


class Conflict(LoraplexError):
    http_status = 409
    code = "conflict"


class AuthenticationError(LoraplexError):
    http_status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(LoraplexError):
    http_status = 403
    type = "permission_error"
    code = "forbidden"


class CapacityExceeded(LoraplexError):
    http_status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after = 1.0


class NotReady(LoraplexError):
    http_status = 503
    type = "service_unavailable"
    code = "not_ready"
    retry_after = 5.0


class StoreUnavailable(NotReady):
    """The registry database or the artifact store cannot be reached right now."""

    code = "store_unavailable"
