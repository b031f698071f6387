"""Images as the CRI sees them: the puller's records in the caller's Shoal namespace
(`k8s.io` for kubelet and crictl)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence

import msgspec
from shoal_common.errors import FailedPrecondition, Invalid, NotFound
from shoal_common.messages.images import (
    ImageGetRequest,
    ImageInfo,
    ImageListRequest,
    ImageRemoveRequest,
    PullRequest,
    RegistryAuth,
)
from shoal_common.messages.snapshots import (
    FsUsageReply,
    FsUsageRequest,
    SnapshotKeyRequest,
    SnapshotListRequest,
    SnapshotUsage,
)

from shoal_cri_gateway.config import GatewayConfig
from shoal_cri_gateway.domain.namespaces import NamespacedClients
from shoal_cri_gateway.domain.pods import pull_id

# A pull without a client deadline may take this long (large images, slow registries);
# the puller itself fails a pull that stops making progress long before.
DEFAULT_PULL_TIMEOUT = 3600.0


MAX_REFERENCE = 4096  # what the bus messages accept (messages.fields.ImageRef)


def checked_ref(ref: str) -> str:
    if len(ref) > MAX_REFERENCE:
        raise Invalid(f"image reference is {len(ref)} characters long; at most "
                      f"{MAX_REFERENCE}: {ref[:64]}...")
    return ref


class Images:
    def __init__(self, clients: NamespacedClients, container_fs_path: str | None = None
                 ) -> None:
        """`container_fs_path`: None = the gateway's config (services.cri_gateway)."""
        self.clients = clients
        if container_fs_path is None:
            config = clients.bus.config.section(GatewayConfig)
            container_fs_path = config.container_fs_path
        self.container_fs_path = container_fs_path

    async def pull(self, ns: str, ref: str, auth: RegistryAuth | None,
                   timeout: float | None) -> str:
        """The pulled image's id; `timeout` is the client's remaining deadline."""
        secret = msgspec.msgpack.encode(auth) if auth is not None else b""
        reply = await self.clients(ns).images.pull(
            PullRequest(ref=checked_ref(ref), pull_id=pull_id(ref, secret), auth=auth),
            timeout=timeout if timeout is not None else DEFAULT_PULL_TIMEOUT)
        return reply.image.id

    async def list(self, ns: str, ref: str = "") -> list[ImageInfo]:
        reply = await self.clients(ns).images.list_images(ImageListRequest(
            ref=checked_ref(ref), with_config=True))
        return reply.images

    async def get(self, ns: str, ref: str) -> ImageInfo | None:
        try:
            return await self.clients(ns).images.get(ImageGetRequest(ref=checked_ref(ref),
                                                                     with_config=True))
        except NotFound:
            return None

    async def remove(self, ns: str, ref: str) -> None:
        try:
            await self.clients(ns).images.remove(ImageRemoveRequest(ref=checked_ref(ref)))
        except NotFound:
            pass  # the CRI makes removal idempotent

    async def fs_usage(self) -> tuple[FsUsageReply, FsUsageReply | None]:
        """The image filesystem and, when writable layers are on another one
        (`container_fs_path`), that container filesystem (else None: the same). Node-wide:
        layers are shared by every namespace."""
        # Like containerd: the image filesystem is where the snapshotter keeps the
        # unpacked layers (the compressed blobs are a cache of the registry).
        usage = await self.clients.cri.snapshots.fsusage(FsUsageRequest())
        if not self.container_fs_path:
            return usage, None
        if not os.path.isdir(self.container_fs_path):
            # kubelet would fail to size a filesystem it cannot stat: say why here.
            raise FailedPrecondition(f"services.cri_gateway.container_fs_path "
                                     f"{self.container_fs_path} is not a directory")
        layers = await self._writable_layers()
        used = sum(u.size for u in layers)
        inodes = sum(u.inodes for u in layers)
        # The snapshotter measures its whole state dir: the writable layers are the
        # container filesystem's, the rest (read-only layers) the image filesystem's.
        images = FsUsageReply(mountpoint=usage.mountpoint,
                              used_bytes=max(0, usage.used_bytes - used),
                              inodes_used=max(0, usage.inodes_used - inodes),
                              timestamp_ns=usage.timestamp_ns)
        return images, FsUsageReply(mountpoint=self.container_fs_path, used_bytes=used,
                                    inodes_used=inodes, timestamp_ns=time.time_ns())

    async def _writable_layers(self) -> Sequence[SnapshotUsage]:
        """The usage of every pod's and container's writable snapshot (the active ones
        the gateway prepared; an unpack's are the layers being made)."""
        snapshots = self.clients.cri.snapshots
        listed = await snapshots.list_snapshots(SnapshotListRequest(kind="active"))
        keys = [s.key for s in listed.snapshots if s.labels.get("shoal/owner") == "cri"]

        async def usage(key: str) -> SnapshotUsage:
            try:
                return await snapshots.usage(SnapshotKeyRequest(key=key))
            except NotFound:  # removed since it was listed
                return SnapshotUsage(size=0, inodes=0)

        return await asyncio.gather(*(usage(k) for k in keys))
