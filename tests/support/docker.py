"""A Shoal node with the Docker gateway for end-to-end tests, and the real clients that drive
it: Debian's docker CLI (deploy/setup.sh --test takes it out of the docker.io package; no
dockerd), docker-compose and the docker SDK, all pointed at the node's docker.sock."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.processes import ServiceProcess
from support.shoal import RunningShoal, running_node

DOCKER_CLI = Path(sys.executable).parent.parent / "libexec" / "docker"
NAMESPACE = "moby"


@dataclass
class DockerNode:
    """A running node with its Docker gateway: `docker(...)` runs the CLI against it."""

    shoal: RunningShoal
    socket: Path
    config_dir: Path  # DOCKER_CONFIG: the CLI's own files, not ~/.docker
    gateway: ServiceProcess | None = None
    gateway_argv: list[str] = field(default_factory=list)

    def kill9_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.kill9()

    def start_gateway(self) -> None:
        """A new gateway process with the first one's flags, serving when this returns."""
        services = self.shoal.services
        self.gateway = services.start("docker-gateway", extra=self.gateway_argv)
        services.wait_serving(self.gateway)

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self, **more: str) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_CONFIG": str(self.config_dir),
                "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0", **more}

    def docker(self, *args: str, input: bytes | None = None, timeout: float = 120,
               check: bool = True, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[bytes]:
        """`docker ARGS...`: its output; a non-zero exit fails the test (unless not `check`)."""
        proc = subprocess.run([str(DOCKER_CLI), *args], input=input, capture_output=True,
                              timeout=timeout, env=self.env(**(env or {})),
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout.decode(errors='replace')}\n"
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc

    def out(self, *args: str, **kw: Any) -> str:
        """`docker ARGS...`'s stdout as text, stripped."""
        return self.docker(*args, **kw).stdout.decode(errors="replace").strip()

    def sdk(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.host, timeout=120)

    def compose(self, project_dir: Path, *args: str, timeout: float = 300,
                check: bool = True) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(["docker-compose", *args], cwd=project_dir, capture_output=True,
                              timeout=timeout, env=self.env(), stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} exited {proc.returncode}:"
                                 f"\n{proc.stdout.decode(errors='replace')}\n"
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc


def docker_node_fixture(name: str, extra: Sequence[str] = ()) -> Any:
    """A module-scoped `dnode` fixture: one node with its Docker gateway for a module's
    tests (each leaves it as it found it): `dnode = docker_node_fixture("images")`."""

    @pytest.fixture(scope="module", name="dnode")
    async def dnode(nats_url: str, tmp_path_factory: pytest.TempPathFactory,
                    images: dict[str, str]) -> AsyncIterator[DockerNode]:
        if not DOCKER_CLI.exists():
            raise AssertionError(f"{DOCKER_CLI} is missing: run ./deploy/setup.sh --test")
        root = tmp_path_factory.mktemp("dnode")
        async with running_node(nats_url, root, f"t{os.getpid()}-d{name}", images,
                                namespaces=[NAMESPACE]) as node:
            services = node.services
            logs = root / "docker-logs"
            argv = [*services.extra, "--set", f'docker.log_root="{logs}"', *extra]
            gateway = services.start("docker-gateway", extra=argv)
            services.wait_serving(gateway)
            config_dir = root / "docker-config"
            config_dir.mkdir()
            yield DockerNode(node, services.node.run_root / "docker.sock", config_dir,
                             gateway, argv)

    return dnode
