"""Which image names use which layers, so layers go away with the last image using them.

The snapshotter cannot see the puller's image records, so it keeps its own: every image
name (namespace + name) it unpacked for, with the chain IDs of its layers. A name is
recorded *before* its layers are unpacked, so a concurrent removal of unreferenced layers
never takes a layer an unpack in flight is about to build on. When a name is deleted (or
re-pointed by an update), its old layers are removed top-down as long as nothing else uses
them: no other image name, no child snapshot (a container's, a view, or the next layer).

While a pull downloads its layers (`images.fetching`), they can be unpacked as they stream
in. The image has no name yet, so those layers are held by a provisional one,
`fetching:<hash of the namespace and pull id>` (image names are canonical references, which
always have a registry host, so no image is ever called that). It is recorded before the
unpack and dropped a grace period after it ended, by when `images.create` has named the
image; the layers of a pull that failed are then collected. A restart drops every
provisional name before its clean-up collects unreferenced layers.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3

import structlog
from shoal_common.errors import Invalid
from shoal_common.messages.images import ImageFetching, LayerInfo
from shoal_common.messages.snapshots import UnpackReply

from shoal_snapshotter.domain import metrics
from shoal_snapshotter.domain.content import ContentSource
from shoal_snapshotter.domain.layers import Unpacker, check_layers
from shoal_snapshotter.domain.snapshots import Snapshots
from shoal_snapshotter.store import metadata as md

log = structlog.get_logger("shoal.snapshotter.images")


FETCHING = "fetching:"
MAX_FETCHING = 4  # unpacks following pulls at once; more pulls wait for images.create


class Images:
    def __init__(self, snapshots: Snapshots, unpacker: Unpacker, *,
                 fetching_grace: float = 120.0) -> None:
        self.snapshots = snapshots
        self.unpacker = unpacker
        self.fetching_grace = fetching_grace
        self._fetching: dict[str, asyncio.Task[None]] = {}  # by provisional name
        self._releases: set[asyncio.Task[None]] = set()

    # -- unpacking while the pull downloads ----------------------------------------------

    def start_fetching(self, namespace: str, event: ImageFetching,
                       source: ContentSource) -> bool:
        """Start unpacking a pull's layers as they download; False if not started (this
        pull's is running, or MAX_FETCHING others are)."""
        chains = check_layers(event.ref, event.layers)
        key = hashlib.sha256(f"{namespace}\0{event.pull_id}".encode()).hexdigest()[:32]
        name = FETCHING + key
        if name in self._fetching or len(self._fetching) >= MAX_FETCHING:
            return False
        task = asyncio.create_task(self._unpack_fetching(namespace, name, event, chains,
                                                         source))
        self._fetching[name] = task
        task.add_done_callback(lambda _: self._fetching.pop(name, None))
        return True

    async def _unpack_fetching(self, namespace: str, name: str, event: ImageFetching,
                               chains: list[str], source: ContentSource) -> None:
        await self.snapshots.db.transaction(
            lambda c: md.set_image_ref(c, namespace, name, chains, None))
        try:
            reply = await self.unpacker.unpack(namespace, event.ref, event.layers, source)
        except Exception as exc:  # a hint that did not work out: the image's unpack will
            metrics.FETCHING_UNPACKS.labels("failed").inc()
            log.info("could not unpack while the pull downloads; the image's unpack will",
                     ref=event.ref, error=getattr(exc, "message", None) or repr(exc))
        else:
            metrics.FETCHING_UNPACKS.labels("ok").inc()
            log.info("unpacked while the pull downloaded", ref=event.ref,
                     chain_id=reply.chain_id, unpacked=reply.unpacked)
        release = asyncio.create_task(self._release(namespace, name, chains))
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)

    async def _release(self, namespace: str, name: str, chains: list[str]) -> None:
        await asyncio.sleep(self.fetching_grace)
        await self.snapshots.db.transaction(
            lambda c: md.forget_image_refs(c, namespace, name))
        await self.snapshots.collect(list(reversed(chains)), namespace)

    async def forget_fetching(self) -> None:
        """At start: no unpack follows a pull any more, so no provisional name holds."""
        await self.snapshots.db.transaction(lambda c: md.forget_image_refs(c, None, FETCHING))

    async def close(self) -> None:
        """Stop following pulls (each throws its unfinished layers away) and the pending
        releases (the next start's clean-up does those)."""
        tasks = [*self._fetching.values(), *self._releases]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- image names ---------------------------------------------------------------------

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
