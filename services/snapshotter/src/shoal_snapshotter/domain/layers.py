"""Unpacking an image's layers into committed snapshots keyed by chain ID.

Per layer: skip if its chain is committed; else, under the chain's lock, prepare an active
snapshot (labelled `shoal/unpack`), stream the blob from the content store into the layer
applier (a worker thread for small layers, a child process for big ones: unpack.worker),
check the diff ID, commit under the chain ID marked as not yet flushed (domain.flush flushes
it in the background). Any
failure or cancellation throws the active snapshot away, so a committed chain is always a
whole layer; a crash leaves only an active snapshot that the next start (or the next unpack
of that chain) removes.

Sequential (the native driver, whose layers copy their parent's tree, or one worker): each
layer is prepared on its committed parent and applied onto the parent's full tree (for
overlayfs through a mounted overlay), one after another.

Parallel (overlayfs, whose layers are directories of their own changes): every layer is
prepared without a parent and applied at once (up to `workers` at a time) into its own upper
dir with overlay whiteouts; each then waits for the layer below to be committed, copies up
what it keeps of the lower directories (unpack.lower), and is committed onto it, so layers
are committed strictly in chain order (the commit transaction checks the parent). A layer
that cannot be applied alone (a hardlink to a lower layer's file, a path through a lower
layer's symlink such as usrmerge's `lib -> usr/lib`) is thrown away and applied again the
sequential way once its parent is committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pickle
import re
import sys
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import structlog
from shoal_common import faults
from shoal_common.errors import FailedPrecondition, Internal, Invalid, ShoalError, Unavailable
from shoal_common.messages.images import ContentInfo, LayerInfo
from shoal_common.messages.snapshots import SnapshotCommitted, UnpackReply
from shoal_common.oci import chain_ids

from shoal_snapshotter.domain import metrics
from shoal_snapshotter.domain.content import (
    ContentSource,
    Ingest,
    LocalReader,
    Prefetcher,
    ThreadReader,
    open_local,
)
from shoal_snapshotter.domain.drivers import fs_dir
from shoal_snapshotter.domain.flush import Flusher
from shoal_snapshotter.domain.locks import ChainLocks
from shoal_snapshotter.domain.snapshots import LABEL_LAYER, LABEL_UNPACK, Snapshots
from shoal_snapshotter.store.metadata import SnapshotRow
from shoal_snapshotter.unpack import (
    ApplyResult,
    LayerFormatError,
    LowerLayerNeeded,
    UnsafeLayerError,
    Whiteouts,
    merge_lower_dirs,
)
from shoal_snapshotter.unpack.follow import ContentChanged, Following
from shoal_snapshotter.unpack.worker import apply_and_digest

log = structlog.get_logger("shoal.snapshotter.unpack")
T = TypeVar("T")

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Layers from this size (compressed) are applied in a child process, smaller ones in a
# thread: a process costs about 0.2 s of interpreter start, but escapes the GIL.
PROCESS_MIN_BYTES = 4 << 20
_WORKER = "shoal_snapshotter.unpack.worker"


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


class _BelowFailed(Exception):
    """The layer below was not committed (it failed, or was cancelled): neither is this one.
    Its own error is the one reported."""


class Unpacker:
    def __init__(self, snapshots: Snapshots, locks: ChainLocks, flusher: Flusher, *,
                 workers: int = 4, ahead: int = 4,
                 process_min_bytes: int = PROCESS_MIN_BYTES) -> None:
        self.snapshots = snapshots
        self.locks = locks
        self.flusher = flusher
        self.ahead = ahead
        self.workers = max(1, workers)
        self.process_min_bytes = process_min_bytes
        # Own pool: a burst of layer applies must not occupy the loop's default executor,
        # which the mounts, usage walks and the like share.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers,
                                                           thread_name_prefix="unpack")
        # Applies in flight, over every image: a layer waiting for one holds no thread, no
        # prefetched chunks and no mount yet.
        self._slots = asyncio.Semaphore(self.workers)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def unpack(self, namespace: str, image: str, layers: list[LayerInfo],
                     source: ContentSource) -> UnpackReply:
        chains = check_layers(image, layers)
        parents = ["", *chains[:-1]]
        if self.snapshots.driver.independent_layers and self.workers > 1 and len(layers) > 1:
            unpacked = await self._unpack_parallel(namespace, image, layers, chains, source)
        else:
            unpacked = 0
            for layer, chain, parent in zip(layers, chains, parents, strict=True):
                if await self._layer(namespace, image, layer, chain, parent, source, None):
                    unpacked += 1
        return UnpackReply(chain_id=chains[-1], unpacked=unpacked)

    async def _unpack_parallel(self, namespace: str, image: str, layers: list[LayerInfo],
                               chains: list[str], source: ContentSource) -> int:
        tasks: list[asyncio.Task[bool]] = []
        for i, (layer, chain) in enumerate(zip(layers, chains, strict=True)):
            tasks.append(asyncio.create_task(self._layer(
                namespace, image, layer, chain, chains[i - 1] if i else "", source,
                tasks[-1] if tasks else None)))
        try:
            pending: set[asyncio.Task[bool]] = set(tasks)
            while pending:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                failed = _first_failure(tasks)
                if failed is not None:
                    # The layers above cannot be committed now: stop them (each throws its
                    # active snapshot away). Those below go on, as they would one by one.
                    for task in tasks[failed + 1:]:
                        task.cancel()
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            raise
        failed = _first_failure(tasks)
        if failed is not None:
            exc = tasks[failed].exception()
            assert exc is not None
            raise exc
        return sum(task.result() for task in tasks)

    async def _committed(self, chain: str) -> bool:
        row = await self.snapshots.find(chain)
        if row is None:
            return False
        if row.kind != "committed":
            raise FailedPrecondition(f"snapshot {chain} exists but is {row.kind}, not a "
                                     "committed layer")
        return True

    async def _layer(self, namespace: str, image: str, layer: LayerInfo, chain: str,
                     parent: str, source: ContentSource,
                     below: asyncio.Task[bool] | None) -> bool:
        """Make sure `chain` is committed; True if this call unpacked it. With `below` (the
        parallel unpack's task for the parent chain) the layer is applied alone at once and
        committed after the parent; without, the parent must already be committed."""
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
                if below is None:
                    count, how = await self._unpack_layer(image, layer, chain, parent,
                                                          source), "onto parent"
                else:
                    count, how = await self._unpack_alone(image, layer, chain, parent, source,
                                                          below)
            except _BelowFailed:
                raise
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
                 seconds=round(elapsed, 3), tar_bytes=count, applied=how)
        await self.snapshots.announce(SnapshotCommitted(key=chain, parent=parent), namespace)
        return True

    async def _remove_dead_attempts(self, chain: str) -> None:
        # We hold the chain's lock, so any unpack snapshot for it belongs to a dead attempt.
        for snap in await self.snapshots.list_snapshots(kind="active"):
            if snap.labels.get(LABEL_UNPACK) == chain:
                row = await self.snapshots.find(snap.key)
                if row is not None:
                    log.info("removing unfinished unpack", key=row.key, chain_id=chain)
                    await self.snapshots.discard(row)

    async def _unpack_layer(self, image: str, layer: LayerInfo, chain: str, parent: str,
                            source: ContentSource) -> int:
        """Apply the layer onto its committed parent's tree, then commit it."""
        key = f"unpack/{chain}/{uuid.uuid4().hex[:12]}"
        row, parents = await self.snapshots.create(key, parent, "active", {LABEL_UNPACK: chain})
        snap_dir = self.snapshots.snap_dir(row.id)
        try:
            info = await self._info(image, layer, source)
            async with self.snapshots.driver.apply_root(
                    snap_dir, [self.snapshots.snap_dir(p.id) for p in parents]) as root:
                _, diff_id, count = await self._apply(root, source, info, Whiteouts.NATIVE)
            _check_diff_id(image, layer, diff_id)
            await self._commit(chain, key, layer)
        except BaseException:
            await self._discard(row, key)
            raise
        return count

    async def _unpack_alone(self, image: str, layer: LayerInfo, chain: str, parent: str,
                            source: ContentSource, below: asyncio.Task[bool]) -> tuple[int, str]:
        """Apply the layer into a snapshot of its own while the layers below are still being
        unpacked; commit it onto `parent` once `below` has committed that."""
        try:
            return await self._apply_alone(image, layer, chain, parent, source, below), "alone"
        except LowerLayerNeeded as exc:
            # Not the layer's fault: applied onto its parent's tree it may well be fine.
            metrics.LAYERS_REAPPLIED.inc()
            log.info("layer needs the layers below; applying it again onto them", image=image,
                     chain_id=chain, entry=exc.entry, reason=exc.reason)
        await _wait_below(below)
        return await self._unpack_layer(image, layer, chain, parent, source), "again onto parent"

    async def _apply_alone(self, image: str, layer: LayerInfo, chain: str, parent: str,
                           source: ContentSource, below: asyncio.Task[bool]) -> int:
        key = f"unpack/{chain}/{uuid.uuid4().hex[:12]}"
        # No parent yet (it may not be committed): an overlay layer's directory does not
        # depend on it; the commit sets it.
        row, _ = await self.snapshots.create(key, "", "active", {LABEL_UNPACK: chain})
        snap_dir = self.snapshots.snap_dir(row.id)
        try:
            info = await self._info(image, layer, source)
            result, diff_id, count = await self._apply(fs_dir(snap_dir), source, info,
                                                       Whiteouts.OVERLAY)
            _check_diff_id(image, layer, diff_id)
            await _wait_below(below)
            if result.lower_dirs or result.implied_dirs:
                parents = await self.snapshots.lineage(parent)
                async with self.snapshots.driver.lower_view(
                        snap_dir, [self.snapshots.snap_dir(p.id) for p in parents]) as lower:
                    await asyncio.to_thread(merge_lower_dirs, fs_dir(snap_dir), lower,
                                            result.lower_dirs, result.implied_dirs)
            await self._commit(chain, key, layer, parent)
        except BaseException:
            await self._discard(row, key)
            raise
        return count

    async def _commit(self, chain: str, key: str, layer: LayerInfo,
                      parent: str | None = None) -> None:
        # Shielded: a cancellation must not tear a commit in flight (which would then be
        # kept, see Snapshots.discard) from its outcome.
        await asyncio.shield(self.snapshots.commit(
            chain, key, {LABEL_LAYER: layer.diff_id}, internal=True, parent=parent,
            unsynced_boot=self.flusher.boot))
        self.flusher.committed()

    async def _discard(self, row: SnapshotRow, key: str) -> None:
        try:
            await asyncio.shield(self.snapshots.discard(row))
        except Exception as exc:  # start-up cleanup will get it
            log.warning("could not remove failed unpack", key=key, error=str(exc))

    @staticmethod
    async def _info(image: str, layer: LayerInfo, source: ContentSource) -> ContentInfo:
        info = await source.info(layer.digest)
        if not info.committed:
            # Still downloading: followed up to the manifest's size; what it decompresses
            # to is checked against the diff ID, as for a committed blob.
            return ContentInfo(digest=layer.digest, size=layer.size, path=info.path,
                               committed=False)
        if info.size != layer.size:
            raise Invalid(f"image {image}: layer {layer.digest} is {info.size} bytes in the "
                          f"content store, the manifest says {layer.size}")
        return info

    async def _apply(self, root: Path, source: ContentSource, info: ContentInfo,
                     whiteouts: Whiteouts) -> tuple[ApplyResult, str, int]:
        if not info.committed:
            return await self._apply_following(root, info, whiteouts)
        async with self._slots:
            await faults.point("snapshotter.unpack.apply")  # tests: a slow layer
            in_process = info.size >= self.process_min_bytes
            # On the puller's machine the blob is read from its file: no chunk crosses the
            # bus, and a worker process reads it as its stdin directly.
            local = open_local(info)
            if local is not None:
                metrics.CONTENT_READS.labels("local").inc()
                try:
                    if in_process:
                        return await self._apply_in_process(root, whiteouts, stdin=local)
                    return await self._apply_in_thread(root, LocalReader(local), whiteouts)
                finally:
                    os.close(local)
            metrics.CONTENT_READS.labels("bus").inc()
            fetch = Prefetcher(source, info.digest, info.size, ahead=self.ahead)
            try:
                if in_process:
                    return await self._apply_in_process(root, whiteouts, fetch=fetch)
                loop = asyncio.get_running_loop()
                return await self._apply_in_thread(root, ThreadReader(loop, fetch), whiteouts)
            finally:
                fetch.close()

    async def _apply_following(self, root: Path, info: ContentInfo,
                               whiteouts: Whiteouts) -> tuple[ApplyResult, str, int]:
        """Apply a blob while the puller downloads it, reading its ingest file as it grows;
        the download is watched, and a stopped one stops the apply."""
        ingest = await Ingest.open(info)  # waits for the download, holding no slot yet
        try:
            async with self._slots:
                await faults.point("snapshotter.unpack.apply")  # tests: a slow layer
                metrics.CONTENT_READS.labels("download").inc()
                if info.size >= self.process_min_bytes:
                    applying = self._apply_in_process(root, whiteouts, stdin=ingest.fd,
                                                      following=(info.size, info.digest))
                else:
                    reader = Following(ingest.fd, info.size, info.digest)
                    applying = self._apply_in_thread(root, reader, whiteouts)
                return await _watched(applying, ingest.watch())
        except ContentChanged as exc:
            raise Unavailable(str(exc)) from None
        finally:
            ingest.close()

    async def _apply_in_thread(self, root: Path, reader: ThreadReader | LocalReader | Following,
                               whiteouts: Whiteouts) -> tuple[ApplyResult, str, int]:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, apply_and_digest, reader, root, whiteouts)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread must stop writing before the snapshot is thrown away.
            reader.abort()
            await asyncio.wait([fut])
            raise

    async def _apply_in_process(self, root: Path, whiteouts: Whiteouts, *,
                                stdin: int | None = None,
                                fetch: Prefetcher | None = None,
                                following: tuple[int, str] | None = None
                                ) -> tuple[ApplyResult, str, int]:
        """The worker reads the blob from `stdin` (a file; with `following`, the size and
        digest of a download it follows) or from what we relay from `fetch`."""
        extra = [str(following[0]), following[1]] if following else []
        proc = await asyncio.create_subprocess_exec(
            # -P: no script or working directory on the path, only the installed code.
            sys.executable, "-P", "-m", _WORKER, str(root), whiteouts.value, str(os.getpid()),
            *extra,
            stdin=stdin if stdin is not None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            if fetch is not None:
                assert proc.stdin is not None
                try:
                    while chunk := await fetch.next():
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
                    proc.stdin.close()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the worker stopped reading (a refused entry): its outcome says why
            out = await proc.stdout.read()
            code = await proc.wait()
        except BaseException:
            # Dead before the snapshot is thrown away: nothing may write into it after.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        if code != 0 or not out:
            raise Internal(f"layer apply worker exited with status {code}")
        kind, value = pickle.loads(out)  # our own child's answer
        if kind == "error":
            raise value
        return value


async def _watched(applying: Coroutine[Any, Any, T], watch: Coroutine[Any, Any, None]) -> T:
    """`applying`'s outcome, unless `watch` raises first: then applying is cancelled (its
    worker killed, its reader aborted) and the watch's error raised."""
    task = asyncio.ensure_future(applying)
    watcher = asyncio.ensure_future(watch)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            error = watcher.exception()
            if error is not None:
                task.cancel()
                await asyncio.wait({task})
                raise error
        return await task
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.wait({task, watcher})


def _check_diff_id(image: str, layer: LayerInfo, diff_id: str) -> None:
    if diff_id != layer.diff_id:
        raise Invalid(f"image {image}: layer {layer.digest} uncompresses to diff ID "
                      f"{diff_id}, the image config says {layer.diff_id}")


def _first_failure(tasks: list[asyncio.Task[bool]]) -> int | None:
    """The lowest layer whose task failed on its own (not because of the layer below)."""
    for i, task in enumerate(tasks):
        if task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, _BelowFailed):
                return i
    return None


async def _wait_below(below: asyncio.Task[bool]) -> None:
    """Until the parallel unpack's task for the layer below is done (never cancelling it)."""
    await asyncio.wait([below])
    if below.cancelled() or below.exception() is not None:
        raise _BelowFailed()
