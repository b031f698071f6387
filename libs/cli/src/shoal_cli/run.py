"""`shoal run IMAGE [CMD...]`: like `docker run`, over the CRI: pull if needed, a pod and a
container in it, its output until it exits, its exit code as ours; Ctrl-C stops it."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import uuid
from contextlib import suppress
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2 as cri
from shoal_common.config import Config

from shoal_cli.cri_client import (
    CliError,
    Cri,
    container_status,
    exit_status,
    exited,
    resolve,
    stop_container,
)
from shoal_cli.cri_logs import LogDecoder, LogFile, follow
from shoal_cli.output import SHORT

POD_NAMESPACE = "default"
# Pods made by `shoal run` say where their log directory is, so `shoal rm` removes it.
LOG_DIR_ANNOTATION = "shoal.io/cli-log-directory"
CLI_LABEL = "shoal.io/cli"
# The executor's choice of network for a pod (shoal_executor.domain.pod_network).
NETWORK_ANNOTATION = "io.shoal.network"
JOIN = "container:"
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


def _memory(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)[bB]?", text.strip())
    if not m:
        raise CliError(f"--memory {text!r}: expected BYTES, optionally with k, m or g")
    return int(m[1]) * 1024 ** " kmg".index((m[2] or " ").lower())


def _port(text: str) -> cri.PortMapping:
    """[IP:]HOSTPORT:CONTAINERPORT[/tcp|udp|sctp]"""
    spec, _, proto = text.partition("/")
    parts = spec.rsplit(":", 2)
    protocols = {"tcp": cri.TCP, "udp": cri.UDP, "sctp": cri.SCTP}
    if len(parts) < 2 or not all(p.isdigit() for p in parts[-2:]) or \
            (proto or "tcp").lower() not in protocols:
        raise CliError(f"--publish {text!r}: expected [IP:]HOSTPORT:CONTAINERPORT[/PROTO]")
    return cri.PortMapping(protocol=protocols[(proto or "tcp").lower()],
                           host_port=int(parts[-2]), container_port=int(parts[-1]),
                           host_ip=parts[0] if len(parts) == 3 else "")


def _security(user: str) -> cri.LinuxContainerSecurityContext:
    """USER[:GROUP]: a uid or a user name in the image, and a numeric gid."""
    sec = cri.LinuxContainerSecurityContext()
    name, _, group = user.partition(":")
    if name.isdigit():
        sec.run_as_user.value = int(name)
    elif name:
        sec.run_as_username = name
    if group:
        if not group.isdigit():
            raise CliError(f"--user {user!r}: the group must be a numeric gid")
        sec.run_as_group.value = int(group)
    return sec


async def network_options(api: Cri, network: str, ports: list[cri.PortMapping]
                          ) -> tuple[dict[str, str], cri.NamespaceOption]:
    """--network as the pod's annotations and namespace options: `host` is the host's
    network namespace, `container:ID` (a pod or container id, or a unique prefix) that
    pod's, anything else (a network's name, `none`) the executor's choice."""
    options = cri.NamespaceOption()
    if not network:
        return {}, options
    if network == "host":
        if ports:
            raise CliError("--publish with --network host: the container's ports are the "
                           "host's already")
        options.network = cri.NODE
        return {}, options
    if network.startswith(JOIN):
        ident = network.removeprefix(JOIN)
        target = await resolve(api, ident)
        pod_id = target.pod_sandbox_id if isinstance(target, cri.Container) else target.id
        return {NETWORK_ANNOTATION: JOIN + pod_id}, options
    return {NETWORK_ANNOTATION: network}, options


def _container_config(args: argparse.Namespace, name: str) -> cri.ContainerConfig:
    envs = []
    for item in args.env:
        key, sep, value = item.partition("=")
        if not key:
            raise CliError(f"-e {item!r}: expected KEY=VALUE")
        envs.append(cri.KeyValue(key=key, value=value if sep else os.environ.get(key, "")))
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=args.image),
        args=args.cmd, envs=envs, working_dir=args.workdir or "", log_path=f"{name}.log",
        labels={CLI_LABEL: "run"})
    if args.memory:
        config.linux.resources.memory_limit_in_bytes = _memory(args.memory)
    if args.user:
        config.linux.security_context.CopyFrom(_security(args.user))
    return config


class Run:
    """One `shoal run`: pull if needed, pod, container, logs until it exits, cleanup."""

    def __init__(self, api: Cri, config: Config, args: argparse.Namespace) -> None:
        self.api = api
        self.config = config
        self.args = args
        self.pod_id = ""
        self.container_id = ""
        self.log_dir = ""
        self.interrupts = 0
        self.stopping: asyncio.Task[None] | None = None

    def on_signal(self) -> None:
        """Ctrl-C: stop the container (again: kill it); before it starts, give up."""
        self.interrupts += 1
        if not self.container_id:
            return  # seen after the step in flight
        timeout = 10 if self.interrupts == 1 else 0
        print(f"\nshoal run: stopping {self.container_id[:SHORT]}"
              + (" (Ctrl-C again to kill it)" if timeout else ""), file=sys.stderr)
        self.stopping = asyncio.ensure_future(self._stop(timeout))

    async def _stop(self, timeout: int) -> None:
        with suppress(grpc.aio.AioRpcError):
            await stop_container(self.api, self.container_id, timeout)

    async def run(self) -> int:
        args = self.args
        name = args.name or f"run-{uuid.uuid4().hex[:8]}"
        if not NAME_RE.match(name):
            raise CliError(f"--name {name!r}: use letters, digits, '_', '.' and '-' "
                           "(at most 63, starting with a letter or digit)")
        ctr_config = _container_config(args, name)
        ports = [_port(p) for p in args.publish]
        annotations, namespaces = await network_options(self.api, args.network, ports)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal)
        try:
            # Ctrl-C is looked at between steps until the container exists.
            await self._pull(args.image, args.pull)
            if not self.interrupts:
                pod_config = await self._run_pod(name, ports, annotations, namespaces)
                if not self.interrupts:
                    self.container_id = (await self.api.runtime.CreateContainer(
                        cri.CreateContainerRequest(pod_sandbox_id=self.pod_id,
                                                   config=ctr_config,
                                                   sandbox_config=pod_config))).container_id
            if self.interrupts:
                # Ctrl-C before the container ran: nothing of this run is worth keeping.
                await self._cleanup(always=True)
                return 130
            await self.api.runtime.StartContainer(cri.StartContainerRequest(
                container_id=self.container_id))
            return await self._wait(f"{self.log_dir}/{ctr_config.log_path}")
        except BaseException:
            # A pod without its container is of no use: removed even without --rm.
            await self._cleanup(always=not self.container_id)
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _pull(self, image: str, always: bool) -> None:
        spec = cri.ImageSpec(image=image)
        if not always:
            status = await self.api.images.ImageStatus(cri.ImageStatusRequest(image=spec))
            if status.image.id:
                return
        print(f"Pulling {image} ...", file=sys.stderr)
        await self.api.images.PullImage(cri.PullImageRequest(image=spec))

    async def _run_pod(self, name: str, ports: list[cri.PortMapping],
                       annotations: dict[str, str], namespaces: cri.NamespaceOption
                       ) -> cri.PodSandboxConfig:
        uid = str(uuid.uuid4())
        log_dir = Path(self.config.run_root) / "cli-logs" / uid
        log_dir.mkdir(parents=True, mode=0o700)
        self.log_dir = str(log_dir)
        hostname = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "shoal"
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE),
            hostname=hostname, log_directory=self.log_dir, port_mappings=ports,
            labels={CLI_LABEL: "run"},
            annotations={**annotations, LOG_DIR_ANNOTATION: self.log_dir})
        if namespaces.network:  # else left unset, as before
            config.linux.security_context.namespace_options.CopyFrom(namespaces)
        try:
            self.pod_id = (await self.api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(
                config=config))).pod_sandbox_id
        except BaseException:
            shutil.rmtree(log_dir, ignore_errors=True)
            raise
        return config

    async def _wait(self, log_path: str) -> int:
        status = cri.ContainerStatus()

        async def finished() -> bool:
            nonlocal status
            try:
                status = (await container_status(self.api, self.container_id)).status
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                raise CliError(f"container {self.container_id[:SHORT]} was removed "
                               "(its exit code went with it)") from None
            return exited(status.state)

        log = LogFile(log_path)
        try:
            await follow(log, finished, LogDecoder())
        finally:
            log.close()
        if self.stopping is not None:
            await self.stopping
        if status.reason == "OOMKilled":
            print("shoal run: the container was killed for exceeding its memory limit",
                  file=sys.stderr)
        if self.args.rm:
            await remove_pod(self.api, self.config, self.pod_id, self.log_dir)
        return exit_status(status.exit_code)

    async def _cleanup(self, always: bool) -> None:
        """After a failure: remove the pod (with --rm, or when `always`); errors here
        would only hide the one being reported."""
        if self.pod_id and (always or self.args.rm):
            with suppress(grpc.aio.AioRpcError):
                await remove_pod(self.api, self.config, self.pod_id, self.log_dir)
        elif not self.pod_id and self.log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)


async def remove_pod(api: Cri, config: Config, pod_id: str, log_dir: str) -> None:
    """Stop and remove a pod, and the log directory `shoal run` made for it."""
    await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    if log_dir and Path(log_dir).parent == Path(config.run_root) / "cli-logs":
        shutil.rmtree(log_dir, ignore_errors=True)


async def run(api: Cri, config: Config, args: argparse.Namespace) -> int:
    return await Run(api, config, args).run()
