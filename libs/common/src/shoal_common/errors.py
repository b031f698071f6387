"""Error codes shared by every service, and their one mapping to gRPC status codes."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    INVALID = "invalid"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


# The names of grpc.StatusCode members, so this module does not import grpc; the gateway
# resolves them with `grpc.StatusCode[GRPC_STATUS[code]]`.
GRPC_STATUS: dict[ErrorCode, str] = {
    ErrorCode.NOT_FOUND: "NOT_FOUND",
    ErrorCode.ALREADY_EXISTS: "ALREADY_EXISTS",
    ErrorCode.INVALID: "INVALID_ARGUMENT",
    ErrorCode.FAILED_PRECONDITION: "FAILED_PRECONDITION",
    ErrorCode.UNAVAILABLE: "UNAVAILABLE",
    ErrorCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    ErrorCode.INTERNAL: "INTERNAL",
}

# Codes a caller may retry on another replica without knowing more.
RETRYABLE: frozenset[ErrorCode] = frozenset({ErrorCode.UNAVAILABLE})


class ShoalError(Exception):
    """An error that crosses the bus: a code from DESIGN.md plus a human message."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None,
                 details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @classmethod
    def from_code(cls, code: str, message: str,
                  details: dict[str, str] | None = None) -> ShoalError:
        """Rebuild the most specific error class for a code received over the bus."""
        try:
            parsed = ErrorCode(code)
        except ValueError:
            return ShoalError(f"{message} (unknown error code {code!r})", details=details)
        return _BY_CODE[parsed](message, details=details)


class NotFound(ShoalError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(ShoalError):
    code = ErrorCode.ALREADY_EXISTS


class Invalid(ShoalError):
    code = ErrorCode.INVALID


class FailedPrecondition(ShoalError):
    code = ErrorCode.FAILED_PRECONDITION


class Unavailable(ShoalError):
    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(ShoalError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Internal(ShoalError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[ShoalError]] = {
    cls.code: cls
    for cls in (NotFound, AlreadyExists, Invalid, FailedPrecondition, Unavailable,
                DeadlineExceeded, Internal)
}
