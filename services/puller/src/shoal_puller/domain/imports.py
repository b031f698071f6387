"""Importing images a client sends blob by blob (`images.import.*`, messages.transfer).

The import id names a lease: `begin` leases every blob the archive's images need before it
looks which the store lacks (so a garbage collection cannot take one meanwhile), a write is
accepted only for a blob under that lease, and `commit` checks each image whole
(`image_check`) before recording any, so an image is listed only once all of it is there
and sound. What a failed import wrote goes with `abort`, or with the first garbage
collection after its lease expires. All state is on disk (ingest files, the lease rows),
so every replica can take every call.
"""

from __future__ import annotations

import structlog
from shoal_common.errors import FailedPrecondition, Invalid, ShoalError
from shoal_common.messages.transfer import (
    ImportAbortReply,
    ImportAbortRequest,
    ImportBeginReply,
    ImportBeginRequest,
    ImportCommitReply,
    ImportCommitRequest,
    ImportPending,
    ImportWriteReply,
    ImportWriteRequest,
)

from shoal_puller.domain import metrics
from shoal_puller.domain.catalog import Catalog
from shoal_puller.domain.image_check import LEASE_TTL, CheckedImage, ImageChecker
from shoal_puller.domain.records import Publish, record_image
from shoal_puller.registry import Platform

log = structlog.get_logger("shoal.puller")

# Left free on the content store's filesystem whatever an import asks for.
FREE_RESERVE = 64 << 20


class Importer:
    def __init__(self, catalog: Catalog, publish: Publish, platform: Platform) -> None:
        self.catalog = catalog
        self.content = catalog.content
        self.images = catalog.images
        self.publish = publish
        self.checker = ImageChecker(self.content, self.images, platform)

    def _room(self, need: int, what: str) -> None:
        free = self.content.free_bytes()
        if need > free - FREE_RESERVE:
            raise FailedPrecondition(
                f"{what} needs {need} bytes in the content store ({self.content.root}), "
                f"which has {free} free (and keeps {FREE_RESERVE} of them)")

    async def begin(self, req: ImportBeginRequest) -> ImportBeginReply:
        sizes: dict[str, int] = {}
        for blob in req.blobs:
            if sizes.setdefault(blob.digest, blob.size) != blob.size:
                raise Invalid(f"blob {blob.digest} is declared with two sizes "
                              f"({sizes[blob.digest]} and {blob.size})")
        await self.images.lease(req.import_id, list(sizes), LEASE_TTL)
        missing, need = [], 0
        for digest, size in sizes.items():
            if self.content.exists(digest):
                if (have := self.content.size(digest)) != size:
                    raise Invalid(f"blob {digest} is declared as {size} bytes; the store "
                                  f"holds it, {have} bytes")
                continue
            held = min(self.content.ingest_size(digest), size)
            missing.append(ImportPending(digest=digest, offset=held))
            need += size - held
        self._room(need, f"import {req.import_id} ({len(missing)} blobs to send)")
        return ImportBeginReply(missing=missing)

    async def write(self, req: ImportWriteRequest) -> ImportWriteReply:
        if not await self.images.leased(req.import_id, req.digest):
            raise FailedPrecondition(f"blob {req.digest} is not part of import "
                                     f"{req.import_id} (not begun, or its lease expired)")
        if req.offset == 0:  # a blob's first chunk: room for it, more time for the import
            self._room(req.size, f"blob {req.digest}")
            await self.images.renew_lease(req.import_id, LEASE_TTL)
        held, new = await self.content.ingest_chunk(req.digest, req.size, req.offset,
                                                    req.data)
        metrics.IMPORTED_BYTES.inc(new)
        return ImportWriteReply(held=held, committed=held == req.size)

    async def commit(self, namespace: str, req: ImportCommitRequest) -> ImportCommitReply:
        """Check every image, then record them all; a retried commit records nothing new."""
        try:
            await self.images.renew_lease(req.import_id, LEASE_TTL)
            checked = [await self.checker.check(req.import_id, image) for image in req.images]
            _distinct_names(checked)
            for image in checked:
                await record_image(self.images, self.publish, namespace, image.names,
                                   image.target_digest, image.target_media_type,
                                   image.record, image.blobs)
        except Exception as exc:
            metrics.IMPORTS.labels(exc.code.value if isinstance(exc, ShoalError)
                                   else "internal").inc()
            raise
        # What the import sent that no image uses (other platforms of an index) goes now.
        leftovers = await self.images.lease_digests(req.import_id)
        await self.images.drop_lease(req.import_id)
        await self.catalog.collect_garbage(namespace, leftovers)
        metrics.IMPORTS.labels("ok").inc()
        infos = {}
        for image in checked:
            info = await self.images.info(namespace, image.record.config_digest)
            infos[info.id] = info
            log.info("imported image", names=image.names, digest=image.target_digest,
                     image_id=info.id)
        return ImportCommitReply(images=list(infos.values()))

    async def abort(self, namespace: str, req: ImportAbortRequest) -> ImportAbortReply:
        digests = await self.images.lease_digests(req.import_id)
        await self.images.drop_lease(req.import_id)
        deleted = await self.catalog.collect_garbage(namespace, digests)
        if digests:
            log.info("import aborted", import_id=req.import_id, blobs_deleted=len(deleted))
        return ImportAbortReply(deleted_blobs=deleted)


def _distinct_names(checked: list[CheckedImage]) -> None:
    owner: dict[str, str] = {}
    for image in checked:
        for name in image.names:
            if owner.setdefault(name, image.target_digest) != image.target_digest:
                raise Invalid(f"name {name} is given to two images of the archive "
                              f"({owner[name]} and {image.target_digest})")
