"""Unpacking an image's layers into committed snapshots keyed by chain ID.

Per layer, in order: skip if its chain is committed; else, under the chain's lock, prepare an
active snapshot on the parent chain (labelled `shoal/unpack`), stream the blob from the
content store into the layer applier (in a worker thread), check the diff ID, flush, commit
under the chain ID. Any failure or cancellation throws the active snapshot away, so a
committed chain is always a whole layer; a crash leaves only an active snapshot that the
next start (or the next unpack of that chain) removes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import re
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import structlog
from shoal_common.errors import FailedPrecondition, Invalid, ShoalError
from shoal_common.messages.images import LayerInfo
from shoal_common.messages.snapshots import SnapshotCommitted, UnpackReply

from shoal_snapshotter.domain import metrics
from shoal_snapshotter.domain.content import ContentSource, Prefetcher, ThreadReader
from shoal_snapshotter.domain.drivers import fs_dir
from shoal_snapshotter.domain.locks import ChainLocks
from shoal_snapshotter.domain.mounts import syncfs
from shoal_snapshotter.domain.snapshots import LABEL_LAYER, LABEL_UNPACK, Snapshots
from shoal_snapshotter.unpack import (
    ApplyResult,
    LayerFormatError,
    UnsafeLayerError,
    Whiteouts,
    apply_layer,
)
from shoal_snapshotter.unpack.compression import open_decompressed

log = structlog.get_logger("shoal.snapshotter.unpack")

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " +
    DiffID(Ln))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chains.append(diff_id if not chains else
                      "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


def check_layers(image: str, layers: list[LayerInfo]) -> list[str]:
    """The layers' chain IDs, after checking that each is the one its diff IDs imply: chain IDs
    are the keys snapshots are shared by, so a wrong one would poison other images."""
    if not layers:
        raise Invalid(f"image {image}: no layers")
    for layer in layers:
        for field in ("digest", "diff_id", "chain_id"):
            if not _DIGEST_RE.match(getattr(layer, field)):
                raise Invalid(f"image {image}: layer {field} {getattr(layer, field)!r} is not "
                              "a sha256 digest")
    chains = chain_ids([layer.diff_id for layer in layers])
    for i, (layer, chain) in enumerate(zip(layers, chains, strict=True)):
        if layer.chain_id != chain:
            raise Invalid(f"image {image}: layer {i} chain ID {layer.chain_id} does not follow "
                          f"from the diff IDs (expected {chain})")
    return chains


class _Digesting(io.RawIOBase):
    """Passes the uncompressed tar stream through sha256: the diff ID of what was applied."""

    def __init__(self, inner: BinaryIO) -> None:
        super().__init__()
        self._inner = inner
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.count += n
        return n


def _apply_sync(blob: BinaryIO, root: Path) -> tuple[ApplyResult, str, int]:
    # The unpack module has no hook to see the decompressed bytes, so decompress here (magic
    # sniffed: gzip, zstd or plain tar, whatever the media type claims), hash on the way,
    # and hand apply_layer a plain tar. It reads its input to the end, so the hash covers
    # every byte of the tar stream.
    digesting = _Digesting(open_decompressed(blob, None))
    result = apply_layer(digesting, root, whiteouts=Whiteouts.NATIVE, allow_devices=True,
                         compression="none")
    return result, "sha256:" + digesting.sha.hexdigest(), digesting.count


class Unpacker:
    def __init__(self, snapshots: Snapshots, locks: ChainLocks, *, workers: int = 4,
                 ahead: int = 4) -> None:
        self.snapshots = snapshots
        self.locks = locks
        self.ahead = ahead
        # Own pool: a burst of layer applies must not occupy the loop's default executor,
        # which the mounts, usage walks and the like share.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix="unpack")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def unpack(self, namespace: str, image: str, layers: list[LayerInfo],
                     source: ContentSource) -> UnpackReply:
        chains = check_layers(image, layers)
        unpacked = 0
        parent = ""
        for layer, chain in zip(layers, chains, strict=True):
            if await self._layer(namespace, image, layer, chain, parent, source):
                unpacked += 1
            parent = chain
        return UnpackReply(chain_id=parent, unpacked=unpacked)

    async def _committed(self, chain: str) -> bool:
        row = await self.snapshots.find(chain)
        if row is None:
            return False
        if row.kind != "committed":
            raise FailedPrecondition(f"snapshot {chain} exists but is {row.kind}, not a "
                                     "committed layer")
        return True

    async def _layer(self, namespace: str, image: str, layer: LayerInfo, chain: str,
                     parent: str, source: ContentSource) -> bool:
        """Make sure `chain` is committed; True if this call unpacked it."""
        if await self._committed(chain):
            metrics.LAYERS_UNPACKED.labels("exists").inc()
            return False
        async with self.locks.hold(chain):
            # Someone may have committed it since we looked: then the work is done once.
            if await self._committed(chain):
                metrics.LAYERS_UNPACKED.labels("exists").inc()
                return False
            await self._remove_dead_attempts(chain)
            started = time.perf_counter()
            try:
                count = await self._unpack_layer(image, layer, chain, parent, source)
            except UnsafeLayerError as exc:
                metrics.LAYERS_UNPACKED.labels("unsafe").inc()
                raise Invalid(f"image {image}: layer {layer.digest} is unsafe and was refused: "
                              f"{exc}", details={"image": image, "layer": layer.digest,
                                                 "entry": exc.entry}) from None
            except LayerFormatError as exc:
                metrics.LAYERS_UNPACKED.labels("invalid").inc()
                raise Invalid(f"image {image}: layer {layer.digest}: {exc}",
                              details={"image": image, "layer": layer.digest}) from None
            except Invalid:
                metrics.LAYERS_UNPACKED.labels("invalid").inc()
                raise
            except ShoalError as exc:
                metrics.LAYERS_UNPACKED.labels("error").inc()
                raise type(exc)(f"image {image}: layer {layer.digest}: {exc.message}",
                                details=exc.details) from None
            except Exception:
                metrics.LAYERS_UNPACKED.labels("error").inc()
                raise
            elapsed = time.perf_counter() - started
        metrics.LAYERS_UNPACKED.labels("ok").inc()
        metrics.UNPACK_SECONDS.observe(elapsed)
        metrics.UNPACKED_BYTES.inc(count)
        log.info("layer unpacked", image=image, chain_id=chain, digest=layer.digest,
                 seconds=round(elapsed, 3), tar_bytes=count)
        await self.snapshots.announce(SnapshotCommitted(key=chain, parent=parent), namespace)
        return True

    async def _remove_dead_attempts(self, chain: str) -> None:
        # We hold the chain's lock, so any unpack snapshot for it belongs to a dead attempt.
        for snap in await self.snapshots.list(kind="active"):
            if snap.labels.get(LABEL_UNPACK) == chain:
                row = await self.snapshots.find(snap.key)
                if row is not None:
                    log.info("removing unfinished unpack", key=row.key, chain_id=chain)
                    await self.snapshots.discard(row)

    async def _unpack_layer(self, image: str, layer: LayerInfo, chain: str, parent: str,
                            source: ContentSource) -> int:
        key = f"unpack/{chain}/{uuid.uuid4().hex[:12]}"
        row, parents = await self.snapshots.create(key, parent, "active", {LABEL_UNPACK: chain})
        snap_dir = self.snapshots.snap_dir(row.id)
        try:
            size = await source.size(layer.digest)
            if size != layer.size:
                raise Invalid(f"image {image}: layer {layer.digest} is {size} bytes in the "
                              f"content store, the manifest says {layer.size}")
            async with self.snapshots.driver.apply_root(
                    snap_dir, [self.snapshots.snap_dir(p.id) for p in parents]) as root:
                _, diff_id, count = await self._apply(root, source, layer.digest, size)
            if diff_id != layer.diff_id:
                raise Invalid(f"image {image}: layer {layer.digest} uncompresses to diff ID "
                              f"{diff_id}, the image config says {layer.diff_id}")
            await asyncio.to_thread(syncfs, fs_dir(snap_dir))
            await self.snapshots.commit(chain, key, {LABEL_LAYER: layer.diff_id}, internal=True)
        except BaseException:
            try:
                await asyncio.shield(self.snapshots.discard(row))
            except Exception as exc:  # start-up cleanup will get it
                log.warning("could not remove failed unpack", key=key, error=str(exc))
            raise
        return count

    async def _apply(self, root: Path, source: ContentSource, digest: str,
                     size: int) -> tuple[ApplyResult, str, int]:
        loop = asyncio.get_running_loop()
        fetch = Prefetcher(source, digest, size, ahead=self.ahead)
        reader = ThreadReader(loop, fetch)
        fut = loop.run_in_executor(self._pool, _apply_sync, reader, root)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread must stop writing before the snapshot is thrown away.
            reader.abort()
            fetch.close()
            await asyncio.wait([fut])
            raise
        finally:
            fetch.close()
