"""What a spec is built from: the pod, the container, and what the host can enforce."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cri_api.v1 import api_pb2 as cri

from shoal_executor.domain.cgroups import HostCgroups
from shoal_executor.domain.checks.userns import IdMap


@dataclass
class PodContext:
    """What the container needs of its pod."""

    sandbox_id: str
    config: cri.PodSandboxConfig
    netns_path: str = ""  # "" = host network
    pid_ns_path: str = ""  # the pause process' pid namespace when the pod shares one
    ipc_ns_path: str = ""
    uts_ns_path: str = ""
    hostname_path: str = ""  # files the pod provides, bind-mounted into containers
    resolv_conf_path: str = ""
    hosts_path: str = ""
    shm_path: str = ""
    host_network: bool = False
    host_pid: bool = False
    host_ipc: bool = False
    userns: IdMap | None = None  # None: the host's user namespace
    userns_path: str = ""  # the pod's user namespace, which all its containers join

    @classmethod
    def of(cls, sandbox_id: str, config: cri.PodSandboxConfig, userns: IdMap | None = None,
           **paths: str) -> PodContext:
        opts = config.linux.security_context.namespace_options
        return cls(sandbox_id, config, host_network=opts.network == cri.NODE,
                   host_pid=opts.pid == cri.NODE, host_ipc=opts.ipc == cri.NODE,
                   userns=userns, **paths)


@dataclass
class ContainerContext:
    container_id: str
    config: cri.ContainerConfig
    image_config: dict[str, Any]
    rootfs: str  # the mounted writable snapshot
    cgroups_path: str
    is_sandbox: bool = False  # the pod's pause container
    extra_env: list[str] = field(default_factory=list)
    # CRI mount index → what to bind instead of its host path (an idmapped copy of it).
    mount_sources: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SpecInput:
    """Everything a section builder reads, the optional parts of the CRI config named.

    `sec` and `res` are None when the CRI config has no `linux` part at all, which differs
    from an empty one: an empty NamespaceOption's pid mode is POD (the enum's zero value)."""

    pod: PodContext
    ctr: ContainerContext
    host: HostCgroups

    @property
    def cfg(self) -> cri.ContainerConfig:
        return self.ctr.config

    @property
    def image(self) -> dict[str, Any]:
        """The image's runtime config (Entrypoint, Cmd, Env, User, WorkingDir...)."""
        return self.ctr.image_config.get("config") or {}

    @property
    def sec(self) -> cri.LinuxContainerSecurityContext | None:
        return self.cfg.linux.security_context if self.cfg.HasField("linux") else None

    @property
    def res(self) -> cri.LinuxContainerResources | None:
        return self.cfg.linux.resources if self.cfg.HasField("linux") else None

    @property
    def privileged(self) -> bool:
        return bool(self.sec and self.sec.privileged)

    @property
    def hostname(self) -> str:
        return self.pod.config.hostname or ""
