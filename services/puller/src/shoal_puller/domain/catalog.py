"""Looking images up, removing them, and garbage-collecting the blobs nobody needs."""

from __future__ import annotations

import time

import structlog
from shoal_common.errors import Invalid, ShoalError
from shoal_common.messages.images import (
    ContentDelete,
    ContentUsageReply,
    ImageDelete,
    ImageInfo,
    ImageRemoveReply,
)

from shoal_puller.domain import metrics
from shoal_puller.domain.pull import Publish
from shoal_puller.registry import parse_reference
from shoal_puller.store.content import ContentStore
from shoal_puller.store.images import ImageStore

log = structlog.get_logger("shoal.puller")


def normalise(ref: str) -> str:
    """A name as stored (`docker.io/library/busybox:latest`), or `ref` itself when it is not
    a reference (an image id or id prefix)."""
    try:
        return str(parse_reference(ref))
    except Invalid:
        return ref


class Catalog:
    def __init__(self, content: ContentStore, images: ImageStore, publish: Publish) -> None:
        self.content = content
        self.images = images
        self.publish = publish

    async def resolve(self, namespace: str, ref: str) -> str:
        """The image id for a name, id or id prefix."""
        if not ref:
            raise Invalid("image reference is empty")
        try:
            return await self.images.resolve(namespace, normalise(ref))
        except ShoalError:
            if normalise(ref) == ref:
                raise
            return await self.images.resolve(namespace, ref)

    async def get(self, namespace: str, ref: str, with_config: bool) -> ImageInfo:
        info = await self.images.info(namespace, await self.resolve(namespace, ref))
        if with_config:
            info.config = self.content.read(info.id)
        return info

    async def list_images(self, namespace: str, ref: str, with_config: bool) -> list[ImageInfo]:
        if not ref:
            infos = await self.images.list_images(namespace)
        else:
            try:
                infos = [await self.images.info(namespace, await self.resolve(namespace, ref))]
            except ShoalError:
                infos = []
        if with_config:
            for info in infos:
                info.config = self.content.read(info.id)
        return infos

    async def remove(self, namespace: str, ref: str) -> ImageRemoveReply:
        """Remove every name of the image `ref` resolves to, then collect garbage."""
        image_id = await self.resolve(namespace, ref)
        names = await self.images.remove(namespace, image_id)
        for name in names:
            await self.publish(ImageDelete(name=name, config_digest=image_id), namespace, True)
        deleted = await self.collect_garbage(namespace)
        log.info("removed image", image_id=image_id, names=names, blobs_deleted=len(deleted))
        return ImageRemoveReply(removed_names=names, deleted_blobs=deleted)

    async def collect_garbage(self, namespace: str,
                              candidates: list[str] | None = None) -> list[str]:
        """Delete blobs no image name references and no pull holds a lease on. Each blob is
        re-checked while its lock is held, so an in-flight pull (which leases before it
        locks) never loses a blob it is about to use. `candidates`: only these digests (an
        import's), whose partial ingests go too."""
        deleted = []
        pool = self.content.list_digests() if candidates is None else candidates
        for digest in await self.images.unreferenced(pool):
            with self.content.try_locked(digest) as locked:
                if not locked or not await self.images.unreferenced([digest]):
                    continue
                existed = self.content.exists(digest)
                self.content.delete_locked(digest)
            if not existed:
                continue
            deleted.append(digest)
            metrics.GC_DELETED.inc()
            await self.publish(ContentDelete(digest=digest), namespace, True)
        return deleted

    def usage(self) -> ContentUsageReply:
        used, inodes = self.content.usage()
        return ContentUsageReply(mountpoint=str(self.content.root), used_bytes=used,
                                 inodes_used=inodes, timestamp_ns=time.time_ns())
