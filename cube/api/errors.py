"""The API's errors, and the one place where every error becomes an HTTP answer.

Three answer shapes exist on the wire (docs/e2b-protocol.md):

* REST and envd plain HTTP: ``{"code": <int status>, "message": str}`` (§2.1, §4);
* Connect RPCs: ``{"code": "<connect code>", "message": str}`` with Connect's HTTP status
  (§3.1);
* the sandbox proxy's 502 for a sandbox that is gone: ``{"sandboxId", "message", "code"}`` (§6).

Handlers raise an ``ApiError`` (or let a node/guest error through); the apps' error handlers
call ``rest_error`` / ``connect_error`` here, so the mapping lives in one module.
"""

from __future__ import annotations

from typing import Final

import msgspec

from actors import ActorError
from guest.protocol import ErrorCode, GuestError

__all__ = [
    "CONNECT_STATUS",
    "ApiError",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "SandboxGone",
    "ServiceUnavailable",
    "StreamAborted",
    "Unauthorized",
    "UnsupportedMediaType",
    "connect_body",
    "guest_http_status",
    "rest_body",
]


class ApiError(Exception):
    """An error answered to the client as it is: an HTTP status and a message."""

    status: int = 500
    connect_code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, error_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code


class BadRequest(ApiError):
    status = 400
    connect_code = ErrorCode.INVALID_ARGUMENT


class Unauthorized(ApiError):
    status = 401
    connect_code = ErrorCode.UNAUTHENTICATED


class Forbidden(ApiError):
    status = 403
    connect_code = ErrorCode.PERMISSION_DENIED


class NotFound(ApiError):
    status = 404
    connect_code = ErrorCode.NOT_FOUND


class Conflict(ApiError):
    status = 409
    connect_code = ErrorCode.ALREADY_EXISTS


class PayloadTooLarge(ApiError):
    status = 413
    connect_code = ErrorCode.RESOURCE_EXHAUSTED


class UnsupportedMediaType(ApiError):
    status = 415
    connect_code = ErrorCode.INVALID_ARGUMENT


class ServiceUnavailable(ApiError):
    status = 503
    connect_code = ErrorCode.UNAVAILABLE


class SandboxGone(ApiError):
    """The sandbox does not exist (killed, timed out, paused, never was): the proxy's 502."""

    status = 502
    connect_code = ErrorCode.UNAVAILABLE

    def __init__(self, sandbox_id: str) -> None:
        super().__init__("The sandbox was not found")
        self.sandbox_id = sandbox_id


class PortClosed(ApiError):
    """The sandbox runs, but nothing serves the requested port."""

    status = 502
    connect_code = ErrorCode.UNAVAILABLE

    def __init__(self, sandbox_id: str, port: int) -> None:
        super().__init__("The sandbox is running but port is not open")
        self.sandbox_id = sandbox_id
        self.port = port


class StreamAborted(Exception):
    """The upstream of a response died midway (the sandbox went away): drop the connection.

    Headers are gone already, so the only honest answer is the one E2B's proxy gives: cut the
    connection. The SDK then probes ``/health``, learns that the sandbox is gone, and says so.
    """


CONNECT_STATUS: Final = {
    ErrorCode.CANCELED: 499,
    ErrorCode.UNKNOWN: 500,
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.FAILED_PRECONDITION: 400,
    ErrorCode.ABORTED: 409,
    ErrorCode.OUT_OF_RANGE: 400,
    ErrorCode.UNIMPLEMENTED: 501,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DATA_LOSS: 500,
    ErrorCode.UNAUTHENTICATED: 401,
}
"""Connect's HTTP status for each code (the Connect protocol specification)."""


class RestErrorBody(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    error_code: str | None = None


class GoneBody(msgspec.Struct, omit_defaults=True):
    sandboxId: str
    message: str
    code: int
    port: int | None = None


class ConnectErrorBody(msgspec.Struct):
    code: str
    message: str


_ENCODER: Final = msgspec.json.Encoder()


def rest_body(error: Exception) -> tuple[int, bytes]:
    """The status and JSON body of a REST-style (or envd plain HTTP) error answer."""
    if isinstance(error, SandboxGone | PortClosed):
        port = error.port if isinstance(error, PortClosed) else None
        return 502, _ENCODER.encode(GoneBody(error.sandbox_id, error.message, 502, port))
    if isinstance(error, ApiError):
        return error.status, _ENCODER.encode(
            RestErrorBody(error.status, error.message, error.error_code)
        )
    if isinstance(error, GuestError):
        status = guest_http_status(error)
        return status, _ENCODER.encode(RestErrorBody(status, error.message or str(error)))
    return 500, _ENCODER.encode(RestErrorBody(500, "internal error"))


def guest_http_status(error: GuestError) -> int:
    """The plain-HTTP status for a guest error (envd's ``/files`` mapping)."""
    if error.code == ErrorCode.RESOURCE_EXHAUSTED and "space" in error.message.lower():
        return 507
    return CONNECT_STATUS.get(ErrorCode(error.code), 500)


def connect_code(error: Exception) -> ErrorCode:
    """The Connect code of any error a handler may raise."""
    if isinstance(error, GuestError):
        return ErrorCode(error.code)
    if isinstance(error, ApiError):
        return error.connect_code
    if isinstance(error, ActorError):
        return ErrorCode.UNAVAILABLE
    return ErrorCode.INTERNAL


def connect_message(error: Exception) -> str:
    if isinstance(error, GuestError | ApiError):
        return error.message or str(error)
    if isinstance(error, ActorError):
        return f"sandbox unavailable: {error}"
    return "internal error"


def connect_body(error: Exception) -> tuple[int, bytes]:
    """The status and JSON body of a unary Connect error (also for streams before a message)."""
    if isinstance(error, SandboxGone | PortClosed):
        return rest_body(error)  # the proxy's answer; the SDK keys on its message
    code = connect_code(error)
    body = ConnectErrorBody(code.value, connect_message(error))
    status = error.status if isinstance(error, ApiError) else CONNECT_STATUS[code]
    return status, _ENCODER.encode(body)
