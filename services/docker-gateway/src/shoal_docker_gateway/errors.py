"""Errors as the Docker Engine API gives them: a status code and `{"message": ...}`, the text
the docker CLI prints after "Error response from daemon: "."""

from __future__ import annotations

import grpc
from shoal_common.errors import ErrorCode, ShoalError


class DockerError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadParameter(DockerError):
    status = 400


class NotFound(DockerError):
    status = 404


class Conflict(DockerError):
    status = 409


class NotModified(DockerError):
    status = 304


class Unsupported(DockerError):
    status = 501


class Unavailable(DockerError):
    status = 503


def no_such_container(ident: str) -> NotFound:
    return NotFound(f"No such container: {ident}")


def no_such_image(ref: str) -> NotFound:
    return NotFound(f"No such image: {ref}")


# gRPC status of a CRI call -> the HTTP status Docker gives for the same kind of failure.
_GRPC_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
}
_SHOAL_STATUS = {
    ErrorCode.NOT_FOUND: 404, ErrorCode.ALREADY_EXISTS: 409, ErrorCode.INVALID: 400,
    ErrorCode.FAILED_PRECONDITION: 409, ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 503,
}


def from_exception(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) for an error from the CRI gateway or a Shoal service."""
    if isinstance(exc, DockerError):
        return exc.status, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        return _GRPC_STATUS.get(exc.code(), 500), exc.details() or exc.code().name
    if isinstance(exc, ShoalError):
        return _SHOAL_STATUS.get(exc.code, 500), exc.message
    return 500, f"internal error: {type(exc).__name__}"
