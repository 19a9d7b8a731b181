"""The one place that turns exceptions into OpenAI error envelopes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mrs.errors import ContextLengthExceeded, InvalidRequest, ModelExists, ModelNotFound, ModelUnavailable, MrsError, Overloaded

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1


class AuthenticationFailed(MrsError):
    """No API key, or one that is not the server's (HTTP 401)."""


class PermissionDenied(MrsError):
    """A valid key that may not do this, e.g. manage models without an admin key (HTTP 403)."""


class RequestTimedOut(MrsError):
    """The generation ran past the server's ``request_timeout_s`` (HTTP 504)."""


@dataclass
class ErrorReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """'field.path: what is wrong' for the first pydantic error, and the field's name."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return (f"{loc}: {message}" if loc else message), (loc or None)


def to_reply(exc: BaseException) -> ErrorReply:
    """Status, envelope and headers for any exception; unknown ones are logged, never echoed."""
    if isinstance(exc, ValidationError):
        message, param = validation_message(exc)
        return ErrorReply(400, envelope(message, "invalid_request_error", param))
    if isinstance(exc, AuthenticationFailed):
        # Connection: close because the refused request's body is never read, and a
        # keep-alive client would otherwise send its next request into that unread body.
        return ErrorReply(401, envelope(exc.message, "authentication_error", None, "invalid_api_key"),
                          {"WWW-Authenticate": "Bearer", "Connection": "close"})
    if isinstance(exc, PermissionDenied):
        return ErrorReply(403, envelope(exc.message, "permission_error", None, "admin_key_required"),
                          {"Connection": "close"})
    if isinstance(exc, RequestTimedOut):
        return ErrorReply(504, envelope(exc.message, "timeout_error", None, "request_timeout"))
    if isinstance(exc, ContextLengthExceeded):
        return ErrorReply(400, envelope(exc.message, "invalid_request_error", exc.param or "messages",
                                        "context_length_exceeded"))
    if isinstance(exc, ModelExists):
        return ErrorReply(409, envelope(exc.message, "invalid_request_error", exc.param, "model_exists"))
    if isinstance(exc, InvalidRequest):
        return ErrorReply(400, envelope(exc.message, "invalid_request_error", exc.param))
    if isinstance(exc, ModelNotFound):
        return ErrorReply(404, envelope(exc.message, "invalid_request_error", "model", "model_not_found"))
    if isinstance(exc, Overloaded):
        return ErrorReply(429, envelope(exc.message, "rate_limit_error", None, "overloaded"),
                          {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ModelUnavailable):
        return ErrorReply(503, envelope(exc.message, "service_unavailable", exc.param, "model_unavailable"),
                          {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, MrsError):
        log.error("request failed: %s", exc.message)
        return ErrorReply(500, envelope(exc.message, "server_error"))
    log.exception("internal error", exc_info=exc)
    return ErrorReply(500, envelope("internal server error; see the server log", "server_error"))
