"""The docker gateway serves on a socket `shoal up` hands it only if that really is a unix
socket listening at the configured path (a wrong descriptor would serve the API elsewhere)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from shoal_common.config import ConfigError, load_config
from shoal_common.errors import FailedPrecondition
from shoal_docker_gateway.api.server import inherited_listener


def _listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_a_listening_socket_at_the_path_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    with _listening(path) as held:
        got = inherited_listener(os.dup(held.fileno()), path)
        with got:
            assert got.getsockname() == str(path) and not got.getblocking()


def test_anything_else_is_refused_and_left_open(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    r, w = os.pipe()
    elsewhere = _listening(tmp_path / "other.sock")
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))  # at the path, but not listening
    try:
        for fd in (r, elsewhere.fileno(), bound.fileno()):
            with pytest.raises(FailedPrecondition, match=rf"docker\.socket_fd {fd}"):
                inherited_listener(fd, path)
            os.fstat(fd)  # still open: not ours to close
        with pytest.raises(FailedPrecondition, match=r"docker\.socket_fd 999"):
            inherited_listener(999, path)
    finally:
        for fd in (r, w):
            os.close(fd)
        elsewhere.close()
        bound.close()


@pytest.mark.parametrize("value", [0, 2, -2])
def test_stdio_or_negative_numbers_are_refused(value: int) -> None:
    with pytest.raises(ConfigError, match=r"docker\.socket_fd"):
        load_config(env={}, overrides=[f"docker.socket_fd={value}"])
