"""Recording an image whose blobs are committed, and telling the node: the last step of a
pull, and of the built-in images, so both reach the snapshotter the same way."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from shoal_common.messages import Event
from shoal_common.messages.images import ImageCreate, ImageUpdate

from shoal_puller.store.images import ImageStore, ManifestRecord

# (event, namespace, wait for JetStream's ack)
Publish = Callable[[Event, str, bool], Awaitable[None]]


async def record_image(images: ImageStore, publish: Publish, namespace: str, names: list[str],
                       target_digest: str, target_media_type: str, record: ManifestRecord,
                       blobs: list[str]) -> None:
    """Point `names` at the image in one transaction, then publish `images.create` or
    `images.update` for each name that is new or now points elsewhere (after the commit,
    so a consumer always finds the record the event announces)."""
    changes = await images.put(namespace, names, target_digest, target_media_type, record,
                               blobs)
    for change in changes:
        if change.created or change.changed:
            cls = ImageCreate if change.created else ImageUpdate
            await publish(cls(name=change.name, target_digest=target_digest,
                              manifest_digest=record.digest,
                              config_digest=record.config_digest, layers=record.layers),
                          namespace, True)
