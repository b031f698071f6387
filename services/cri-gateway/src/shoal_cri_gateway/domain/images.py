"""Images as the CRI sees them: the puller's records in namespace k8s.io."""

from __future__ import annotations

import msgspec
from shoal_common.clients import Clients
from shoal_common.errors import Invalid, NotFound
from shoal_common.messages.images import (
    ImageGetRequest,
    ImageInfo,
    ImageListRequest,
    ImageRemoveRequest,
    PullRequest,
    RegistryAuth,
)
from shoal_common.messages.snapshots import FsUsageReply, FsUsageRequest

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
    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    async def pull(self, ref: str, auth: RegistryAuth | None, timeout: float | None) -> str:
        """The pulled image's id; `timeout` is the client's remaining deadline."""
        secret = msgspec.msgpack.encode(auth) if auth is not None else b""
        reply = await self.clients.images.pull(
            PullRequest(ref=checked_ref(ref), pull_id=pull_id(ref, secret), auth=auth),
            timeout=timeout if timeout is not None else DEFAULT_PULL_TIMEOUT)
        return reply.image.id

    async def list(self, ref: str = "") -> list[ImageInfo]:
        reply = await self.clients.images.list_images(ImageListRequest(ref=checked_ref(ref),
                                                                       with_config=True))
        return reply.images

    async def get(self, ref: str) -> ImageInfo | None:
        try:
            return await self.clients.images.get(ImageGetRequest(ref=checked_ref(ref),
                                                                 with_config=True))
        except NotFound:
            return None

    async def remove(self, ref: str) -> None:
        try:
            await self.clients.images.remove(ImageRemoveRequest(ref=checked_ref(ref)))
        except NotFound:
            pass  # the CRI makes removal idempotent

    async def fs_usage(self) -> FsUsageReply:
        # Like containerd: the image filesystem is where the snapshotter keeps the
        # unpacked layers (the compressed blobs are a cache of the registry).
        return await self.clients.snapshots.fsusage(FsUsageRequest())
