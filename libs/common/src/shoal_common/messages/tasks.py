"""Executor commands (`shoal.v1.<node>.tasks.<verb>`): pod sandboxes and containers.

The CRI's own configs travel as their protobuf encoding (`bytes` fields below): the
`runtime.v1` schema is already declared once, by the CRI, and the executor — which turns
them into OCI specs — decodes them with the same generated types kubelet uses."""

from __future__ import annotations

from shoal_common.messages.base import Message
from shoal_common.messages.fields import HandlerName, ObjectId, Seconds
from shoal_common.messages.snapshots import Mount


class SandboxCreateRequest(Message):
    id: ObjectId  # caller-chosen; a retry with the same id returns the existing sandbox
    config: bytes  # runtime.v1 PodSandboxConfig
    pause_image_config: bytes  # the pause image's config JSON
    rootfs: list[Mount]  # the pause container's snapshot
    runtime_handler: HandlerName = ""


class SandboxInfo(Message):
    id: str
    state: str  # "ready" or "notready"
    ip: str = ""
    additional_ips: list[str] = []
    netns_path: str = ""  # "" for host network
    pid: int = 0  # the pause process (0: none, see `pinned`)
    created_at: float = 0.0
    pinned: bool = False  # no pause process: its namespaces are pinned by bind mounts


class SandboxIdRequest(Message):
    id: ObjectId


class ContainerCreateRequest(Message):
    id: ObjectId  # caller-chosen; a retry with the same id returns the existing container
    sandbox_id: ObjectId
    config: bytes  # runtime.v1 ContainerConfig
    sandbox_config: bytes  # runtime.v1 PodSandboxConfig of its pod
    image_config: bytes  # the image config JSON
    rootfs: list[Mount]  # the container's writable snapshot
    runtime_handler: HandlerName = ""


class ContainerCreateReply(Message):
    id: str
    pid: int
    bundle: str
    stop_signal: int


class ContainerStopRequest(Message):
    id: ObjectId
    timeout: Seconds = 10.0  # then SIGKILL


class ContainerIdRequest(Message):
    id: ObjectId
