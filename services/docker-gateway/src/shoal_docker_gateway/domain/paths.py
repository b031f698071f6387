"""Where the gateway keeps a container's files on the node."""

from __future__ import annotations

from pathlib import Path

from shoal_docker_gateway.domain.backend import Backend

# The CRI log file of a container (CRI format: "TIME STREAM P|F TEXT" lines), relative to
# its log directory; `docker logs` reads it.
LOG_FILE = "container.log"


def state_dir(backend: Backend) -> Path:
    return backend.config.state_dir("docker-gateway")


def log_directory(backend: Backend, cid: str) -> Path:
    """The pod's CRI log directory for Docker container `cid` (64 hex, checked by caller)."""
    return Path(backend.config.docker.log_root) / cid


def log_path(backend: Backend, cid: str) -> Path:
    return log_directory(backend, cid) / LOG_FILE


def volumes_dir(backend: Backend) -> Path:
    """Named volumes: <volumes_dir>/<name>/_data, as Docker lays them out."""
    return state_dir(backend) / "volumes"
