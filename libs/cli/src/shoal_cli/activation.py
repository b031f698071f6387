"""Socket activation of the docker gateway by `shoal up`.

The launcher binds the Docker socket itself and hands the listening socket to every
gateway it starts (at the same descriptor number: `docker.socket_fd`). So the gateway can
start at the first connection, not at boot (as Debian's docker.socket starts dockerd),
and a client that connects while the gateway is restarting waits in the socket's backlog
instead of being refused. A node whose gateway keeps state (containers with restart
policies, networks whose names it resolves) starts it at once: that state needs it running.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from shoal_common.config import Config

BACKLOG = 512
DOCKER_GATEWAY = "docker-gateway"


def gateway_has_state(config: Config) -> bool:
    """Whether a gateway ever ran on this state root (its records are there)."""
    return (Path(config.state_root) / DOCKER_GATEWAY / "docker.db").exists()


def starts_on_demand(config: Config) -> bool:
    return config.docker.on_demand and not gateway_has_state(config)


def listen(path: Path) -> socket.socket:
    """A unix socket listening at `path`, owner-only from the start (as the CRI socket); a
    socket file left there by a launcher that was killed is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    path.chmod(0o600)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def close(sock: socket.socket, path: Path) -> None:
    """Stop listening and remove the socket file (the run root's lock says it is ours)."""
    sock.close()
    if path.is_socket():
        path.unlink(missing_ok=True)
