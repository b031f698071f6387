"""A build's failure, in Docker's words: before the progress stream has started it is an
HTTP error (400, as dockerd answers a Dockerfile it cannot parse); after, the stream's
last message, whose `code` the CLI exits with (a RUN's exit status)."""

from __future__ import annotations

from shoal_docker_gateway.errors import DockerError


class BuildError(DockerError):
    status = 400

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
