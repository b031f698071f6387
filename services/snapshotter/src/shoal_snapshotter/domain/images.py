"""Which image names use which layers, so layers go away with the last image using them.

The snapshotter cannot see the puller's image records, so it keeps its own: every image
name (namespace + name) it unpacked for, with the chain IDs of its layers. A name is
recorded *before* its layers are unpacked, so a concurrent removal of unreferenced layers
never takes a layer an unpack in flight is about to build on. When a name is deleted (or
re-pointed by an update), its old layers are removed top-down as long as nothing else uses
them: no other image name, no child snapshot (a container's, a view, or the next layer).
"""

from __future__ import annotations

import sqlite3

import structlog
from shoal_common.errors import Invalid
from shoal_common.messages.images import LayerInfo
from shoal_common.messages.snapshots import UnpackReply

from shoal_snapshotter.domain.content import ContentSource
from shoal_snapshotter.domain.layers import Unpacker, check_layers
from shoal_snapshotter.domain.snapshots import Snapshots
from shoal_snapshotter.store import metadata as md

log = structlog.get_logger("shoal.snapshotter.images")


class Images:
    def __init__(self, snapshots: Snapshots, unpacker: Unpacker) -> None:
        self.snapshots = snapshots
        self.unpacker = unpacker

    async def unpack(self, namespace: str, name: str, layers: list[LayerInfo],
                     source: ContentSource, *, seq: int | None = None) -> UnpackReply | None:
        """Record that `name` uses these layers, unpack them, then drop the layers its
        previous version used and nothing else does. `seq` is the event's stream sequence
        (None for a direct request); a stale event changes nothing and returns None."""
        if not name:
            raise Invalid("unpack: the image name is required (it keeps the layers alive)")
        chains = check_layers(name, layers)

        def txn(conn: sqlite3.Connection) -> tuple[bool, list[str]]:
            return md.set_image_ref(conn, namespace, name, chains, seq)

        applied, before = await self.snapshots.db.transaction(txn)
        if not applied:
            log.info("skipping stale image event", image=name, seq=seq)
            return None
        reply = await self.unpacker.unpack(namespace, name, layers, source)
        dropped = [c for c in reversed(before) if c not in chains]
        if dropped:
            await self.snapshots.collect(dropped, namespace)
        return reply

    async def delete(self, namespace: str, name: str, *, seq: int | None = None) -> list[str]:
        """Forget `name`; remove its layers nothing else uses. Returns the chains removed."""

        def txn(conn: sqlite3.Connection) -> tuple[bool, list[str]]:
            return md.delete_image_ref(conn, namespace, name, seq)

        applied, before = await self.snapshots.db.transaction(txn)
        if not applied or not before:
            return []
        # Top-down: a layer's children block its removal, so the top goes first.
        return await self.snapshots.collect(list(reversed(before)), namespace)
