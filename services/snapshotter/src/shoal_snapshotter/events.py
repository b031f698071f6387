"""The snapshotter's reactions to image events (consumed with shoal_common.consumer)."""

from __future__ import annotations

import time

import structlog
from shoal_common import codec
from shoal_common.bus import Bus
from shoal_common.consumer import Delivery, Handler, permanent_by_default
from shoal_common.messages.images import ImageCreate, ImageDelete, ImageFetching, ImageUpdate

from shoal_snapshotter.domain import metrics
from shoal_snapshotter.domain.content import BusContent, FetchingContent
from shoal_snapshotter.domain.images import Images

log = structlog.get_logger("shoal.snapshotter.events")


TOPICS = (ImageCreate.TOPIC, ImageUpdate.TOPIC, ImageDelete.TOPIC)
# With unpack_while_fetching: a pull's layers announced before they download.
FETCHING_TOPICS = (*TOPICS, ImageFetching.TOPIC)
# An announcement older than this (a redelivery, a consumer that was away) is of a pull
# that has long finished or failed: the image's own events do the rest.
FETCHING_MAX_AGE = 30.0


# A bad or unsafe image, a blob the content store no longer has, a conflicting snapshot:
# retrying cannot help. Anything else (puller unavailable, timeouts, I/O) may pass.
is_permanent = permanent_by_default


def image_event_handler(images: Images, bus: Bus) -> Handler:
    async def handle(d: Delivery) -> None:
        if d.topic in (ImageCreate.TOPIC, ImageUpdate.TOPIC):
            typ: type[ImageCreate | ImageUpdate] = \
                ImageCreate if d.topic == ImageCreate.TOPIC else ImageUpdate
            event = codec.decode(d.data, typ)
            reply = await images.unpack(d.namespace, event.name, event.layers,
                                        BusContent(bus, d.namespace), seq=d.seq)
            if reply is not None:
                log.info("image unpacked", image=event.name, chain_id=reply.chain_id,
                         unpacked=reply.unpacked)
        elif d.topic == ImageFetching.TOPIC:
            fetching = codec.decode(d.data, ImageFetching)
            # Started, not awaited: the event is settled at once (it is only a hint).
            if d.attempt > 1 or time.time() - d.stored > FETCHING_MAX_AGE or \
                    not images.start_fetching(d.namespace, fetching,
                                              FetchingContent(bus, d.namespace)):
                metrics.FETCHING_UNPACKS.labels("skipped").inc()
        elif d.topic == ImageDelete.TOPIC:
            delete = codec.decode(d.data, ImageDelete)
            removed = await images.delete(d.namespace, delete.name, seq=d.seq)
            log.info("image deleted", image=delete.name, removed_layers=len(removed))

    return handle
