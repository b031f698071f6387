"""The snapshot API in containerd's terms: prepare, view, commit, remove, mounts, stat, usage,
list; plus start-up cleanup and removal of unreferenced unpacked layers.

Order of effects, so that a crash at any point leaves something start-up cleanup fixes:
- create: row first, then the directory (built under a temporary name, renamed into place),
  so a directory without a row is always garbage;
- remove: row first (in the transaction that checks for children), then the directory
  (unmounted, renamed into trash/, deleted).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from shoal_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    Invalid,
    NotFound,
    ShoalError,
)
from shoal_common.messages import Event
from shoal_common.messages.snapshots import (
    Mount,
    SnapshotInfo,
    SnapshotRemoved,
    SnapshotUsage,
)
from shoal_common.sqlite import Database

from shoal_snapshotter.domain import metrics
from shoal_snapshotter.domain import mounts as sysmount
from shoal_snapshotter.domain.drivers import Driver, fs_dir, mnt_dir
from shoal_snapshotter.domain.fsutil import disk_usage, remove_dir
from shoal_snapshotter.domain.locks import ChainLocks
from shoal_snapshotter.store import metadata as md
from shoal_snapshotter.store.metadata import Kind, SnapshotRow

log = structlog.get_logger("shoal.snapshotter")

# On the active snapshot an unpack works in: the chain ID it will be committed as. Such a
# snapshot whose chain lock is free belongs to a dead unpack and is removed.
LABEL_UNPACK = "shoal/unpack"
# On committed snapshots made by an unpack: the layer's diff ID. Only these are removed
# automatically once no image references them.
LABEL_LAYER = "shoal/layer"
_RESERVED = (LABEL_UNPACK, LABEL_LAYER)
# On a view, set by its caller: the snapshotter mounts the view itself, at the view's own
# `mnt/`, and answers one read-only bind of that directory, where the driver's mounts would
# be an overlay of several layers. For callers that need a directory (the gateway's image
# volumes, which the executor binds into containers). Removing the view unmounts it.
LABEL_MOUNTED_VIEW = "shoal/mounted-view"
MAX_KEY = 4096

Publish = Callable[[Event, str], Awaitable[None]]


def info(row: SnapshotRow) -> SnapshotInfo:
    return SnapshotInfo(key=row.key, parent=row.parent, kind=row.kind, created=row.created,
                        updated=row.updated, labels=row.labels)


def _check_key(key: str, what: str = "key") -> None:
    if not key or len(key) > MAX_KEY or "\0" in key:
        raise Invalid(f"snapshot {what} must be 1..{MAX_KEY} characters without NUL")


def _user_labels(labels: dict[str, str]) -> dict[str, str]:
    bad = [k for k in labels if k in _RESERVED]
    if bad:
        raise Invalid(f"label {bad[0]!r} is reserved for the snapshotter")
    return labels


class Snapshots:
    def __init__(self, db: Database, driver: Driver, root: Path, publish: Publish) -> None:
        self.db = db
        self.driver = driver
        self.root = root
        self.snap_root = root / "snapshots"
        self.trash = root / "trash"
        self.publish = publish
        self.snap_root.mkdir(parents=True, exist_ok=True)
        self.trash.mkdir(parents=True, exist_ok=True)
        # Directories being built by this process, so a concurrent idempotent retry waits
        # for the first instead of copying the parent a second time.
        self._building: dict[int, asyncio.Future[None]] = {}

    def snap_dir(self, snap_id: int) -> Path:
        return self.snap_root / str(snap_id)

    def fs(self, snap_id: int) -> Path:
        return fs_dir(self.snap_dir(snap_id))

    # -- reading -------------------------------------------------------------------------

    async def get(self, key: str) -> SnapshotRow:
        row = await self.db.run(lambda c: md.get(c, key))
        if row is None:
            raise NotFound(f"snapshot {key} not found")
        return row

    async def find(self, key: str) -> SnapshotRow | None:
        return await self.db.run(lambda c: md.get(c, key))

    async def lineage(self, key: str) -> list[SnapshotRow]:
        """Snapshot `key` and its ancestors, nearest first."""

        def query(conn: sqlite3.Connection) -> list[SnapshotRow]:
            row = md.get(conn, key)
            if row is None:
                raise NotFound(f"snapshot {key} not found")
            return md.ancestors(conn, row.id)

        return await self.db.run(query)

    async def stat(self, key: str) -> SnapshotInfo:
        _check_key(key)
        return info(await self.get(key))

    async def list_snapshots(self, parent: str = "", kind: str = "") -> list[SnapshotInfo]:
        if kind and kind not in md.KINDS:
            raise Invalid(f"kind {kind!r} is not one of {', '.join(md.KINDS)}")
        rows = await self.db.run(lambda c: md.list_rows(c, parent=parent, kind=kind))
        return [info(r) for r in rows]

    async def usage(self, key: str) -> SnapshotUsage:
        _check_key(key)
        row = await self.get(key)
        used = await asyncio.to_thread(disk_usage, self.fs(row.id))
        return SnapshotUsage(size=used.bytes, inodes=used.inodes)

    async def counts(self) -> dict[str, int]:
        return await self.db.run(md.count_by_kind)

    # -- creating ------------------------------------------------------------------------

    async def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        row, parents = await self.create(key, parent, "active", _user_labels(labels))
        return self._mounts(row, parents)

    async def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        row, parents = await self.create(key, parent, "view", _user_labels(labels))
        return await self._view_mounts(row, parents)

    async def create(self, key: str, parent: str, kind: Kind,
                     labels: dict[str, str]) -> tuple[SnapshotRow, list[SnapshotRow]]:
        """Create (or find again, for a retry with the same key, parent and kind) a snapshot
        and its directory. Returns it and its ancestors, nearest first."""
        _check_key(key)
        if parent:
            _check_key(parent, "parent")

        def txn(conn: sqlite3.Connection) -> tuple[SnapshotRow, list[SnapshotRow]]:
            existing = md.get(conn, key)
            if existing is not None:
                if existing.kind == kind and existing.parent == parent:
                    return existing, md.ancestors(conn, existing.parent_id)
                raise AlreadyExists(f"snapshot {key} already exists ({existing.kind}"
                                    f"{', parent ' + existing.parent if existing.parent else ''})")
            parent_id = None
            if parent:
                prow = md.get(conn, parent)
                if prow is None:
                    raise NotFound(f"parent snapshot {parent} not found")
                if prow.kind != "committed":
                    raise FailedPrecondition(f"parent snapshot {parent} is {prow.kind}; only "
                                             "committed snapshots can be parents")
                parent_id = prow.id
            snap_id = md.insert(conn, key=key, parent_id=parent_id, kind=kind, labels=labels,
                                now=time.time())
            row = md.get_by_id(conn, snap_id)
            assert row is not None
            return row, md.ancestors(conn, parent_id)

        row, parents = await self.db.transaction(txn)
        await self._ensure_dir(row, parents)
        return row, parents

    async def _ensure_dir(self, row: SnapshotRow, parents: list[SnapshotRow]) -> None:
        while not self.snap_dir(row.id).is_dir():
            building = self._building.get(row.id)
            if building is not None:
                await asyncio.wait([building])  # then look again: it may have failed
                continue
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._building[row.id] = done
            try:
                await self._build_dir(row, parents)
            finally:
                del self._building[row.id]
                done.set_result(None)
            return

    async def _build_dir(self, row: SnapshotRow, parents: list[SnapshotRow]) -> None:
        final = self.snap_dir(row.id)
        # pid in the name: start-up cleanup removes only temporaries of dead processes.
        tmp = self.snap_root / f"{row.id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        try:
            await self.driver.populate(tmp, [self.snap_dir(p.id) for p in parents])
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                await asyncio.to_thread(remove_dir, tmp)  # another replica built it first
        except BaseException:
            await asyncio.shield(asyncio.to_thread(remove_dir, tmp))
            raise

    # -- mounts --------------------------------------------------------------------------

    def _mounts(self, row: SnapshotRow, parents: list[SnapshotRow]) -> list[Mount]:
        return self.driver.mounts(self.snap_dir(row.id), [self.snap_dir(p.id) for p in parents],
                                  readonly=row.kind == "view")

    async def mounts(self, key: str) -> list[Mount]:
        _check_key(key)
        row = await self.get(key)
        if row.kind == "committed":
            raise FailedPrecondition(f"snapshot {key} is committed; mount a view or an active "
                                     "snapshot prepared on it")
        parents = await self.db.run(lambda c: md.ancestors(c, row.parent_id))
        await self._ensure_dir(row, parents)
        return await self._view_mounts(row, parents)

    async def _view_mounts(self, row: SnapshotRow, parents: list[SnapshotRow]) -> list[Mount]:
        """The driver's mounts, or for a view labelled LABEL_MOUNTED_VIEW whose mounts are
        not already one directory: a bind of the view mounted at its `mnt/`."""
        mounts = self._mounts(row, parents)
        if (row.kind != "view" or LABEL_MOUNTED_VIEW not in row.labels
                or (len(mounts) == 1 and mounts[0].type == "bind")):
            return mounts
        try:
            target = await asyncio.to_thread(self._mount_view, self.snap_dir(row.id),
                                             mounts[0])
        except OSError as exc:
            raise Internal(f"mounting view {row.key}: {exc}") from None
        return [Mount(type="bind", source=str(target), options=["rbind", "ro"])]

    @staticmethod
    def _mount_view(snap_dir: Path, overlay: Mount) -> Path:
        target = mnt_dir(snap_dir)
        fd = os.open(snap_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Replicas asked for the same view at once: one mounts, the others find it
            # mounted (two stacked mounts would outlive one unmount).
            fcntl.flock(fd, fcntl.LOCK_EX)
            target.mkdir(mode=0o700, exist_ok=True)
            if os.path.realpath(target) not in sysmount.mounts_under(target):
                sysmount.mount(overlay.source, target, overlay.type, list(overlay.options),
                               sysmount.MS_RDONLY)
        finally:
            os.close(fd)
        return target

    # -- commit / remove -----------------------------------------------------------------

    async def commit(self, name: str, key: str, labels: dict[str, str], *,
                     internal: bool = False, parent: str | None = None,
                     unsynced_boot: str = "") -> SnapshotInfo:
        """Commit active snapshot `key` as `name`. `parent` (internal): the committed layer
        to put it on, for a snapshot prepared without one because its parent was not
        committed yet (a layer unpacked in parallel); checked in the same transaction, so
        no layer is ever committed before its parent. `unsynced_boot` (internal): the boot
        in which its files were written and not flushed yet (see domain.flush)."""
        _check_key(name, "name")
        _check_key(key)
        if not internal:
            _user_labels(labels)

        def txn(conn: sqlite3.Connection) -> SnapshotRow:
            row = md.get(conn, key)
            if row is None:
                done = md.get(conn, name)
                if done is not None and done.kind == "committed" and done.source_key == key:
                    return done  # a retry of a commit that happened
                raise NotFound(f"snapshot {key} not found")
            if row.kind != "active":
                raise FailedPrecondition(f"snapshot {key} is {row.kind}; only active snapshots "
                                         "can be committed")
            if md.get(conn, name) is not None:
                raise AlreadyExists(f"snapshot {name} already exists")
            parent_id = row.parent_id
            if parent:
                prow = md.get(conn, parent)
                if prow is None or prow.kind != "committed":
                    raise FailedPrecondition(f"snapshot {key} cannot be committed on {parent}:"
                                             " that is not a committed snapshot")
                if row.parent_id not in (None, prow.id):
                    raise FailedPrecondition(f"snapshot {key} already has parent {row.parent}")
                parent_id = prow.id
            md.commit(conn, row.id, name=name, source_key=key, labels=labels, now=time.time(),
                      parent_id=parent_id, unsynced_boot=unsynced_boot)
            committed = md.get_by_id(conn, row.id)
            assert committed is not None
            return committed

        return info(await self.db.transaction(txn))

    async def remove(self, key: str, namespace: str) -> None:
        _check_key(key)

        def txn(conn: sqlite3.Connection) -> SnapshotRow:
            row = md.get(conn, key)
            if row is None:
                raise NotFound(f"snapshot {key} not found")
            if md.has_children(conn, row.id):
                raise FailedPrecondition(f"snapshot {key} has children; remove them first")
            md.delete(conn, row.id)
            return row

        row = await self.db.transaction(txn)
        await self.discard_dir(row.id)
        if row.kind == "committed":
            await self.announce(SnapshotRemoved(key=row.key), namespace)
        if row.parent:
            # Its parent may be an unpacked layer whose image is gone, kept only for this.
            await self.collect([row.parent], namespace)

    async def discard(self, row: SnapshotRow) -> None:
        """Remove a snapshot we own (an unpack's active snapshot), children or not checked.
        Only while it is still active: an unpack cancelled while its commit went through
        keeps the committed layer (others may already build on it)."""
        if await self.db.transaction(lambda c: md.delete_active(c, row.id)):
            await self.discard_dir(row.id)

    async def discard_dir(self, snap_id: int) -> None:
        """Remove a directory whose row is gone. A failure is logged, not raised: the removal
        happened as far as callers can see, and start-up cleanup retries the files."""
        try:
            await asyncio.shield(asyncio.to_thread(self._discard_dir, self.snap_dir(snap_id)))
        except OSError as exc:
            log.warning("could not remove snapshot files; left for start-up cleanup",
                        path=str(self.snap_dir(snap_id)), error=str(exc))

    def _discard_dir(self, path: Path) -> None:
        if not os.path.lexists(path):
            return
        sysmount.unmount_all_under(path)  # never delete through a mount
        grave = self.trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return  # someone else's cleanup got there first
        remove_dir(grave)

    async def collect(self, chains: list[str], namespace: str) -> list[str]:
        """Remove the given unpacked layers that no image references and nothing is built on,
        then their parents likewise. `chains` top first. Returns the chains removed."""

        def txn(conn: sqlite3.Connection, chain: str) -> SnapshotRow | None:
            row = md.get(conn, chain)
            if (row is None or row.kind != "committed" or LABEL_LAYER not in row.labels
                    or md.has_children(conn, row.id) or md.chain_referenced(conn, chain)):
                return None
            md.delete(conn, row.id)
            return row

        removed: list[str] = []
        todo = list(dict.fromkeys(chains))
        while todo:
            chain = todo.pop(0)
            row = await self.db.transaction(functools.partial(txn, chain=chain))
            if row is None:
                continue
            await self.discard_dir(row.id)
            removed.append(chain)
            log.info("removed unreferenced layer", chain_id=chain)
            await self.announce(SnapshotRemoved(key=chain), namespace)
            if row.parent and row.parent not in todo:
                todo.append(row.parent)
        return removed

    async def announce(self, event: Event, namespace: str) -> None:
        # The change is done and durable; a lost event must not turn it into an error (the
        # caller would retry something that already happened).
        try:
            await self.publish(event, namespace)
        except ShoalError as exc:
            log.warning("could not publish event", topic=type(event).TOPIC, error=exc.message)

    # -- start-up ------------------------------------------------------------------------

    async def remove_torn(self, boot: str, namespace: str) -> list[str]:
        """Remove the layers committed in an earlier boot whose files were never flushed (a
        power loss may have torn them) and every snapshot built on them, in one transaction
        (a snapshot is never left on a missing parent). Returns the keys removed."""

        def txn(conn: sqlite3.Connection) -> list[SnapshotRow]:
            rows = md.with_descendants(conn, md.unsynced_elsewhere(conn, boot))
            if rows:
                md.delete_many(conn, [r.id for r in rows])
            return rows

        rows = await self.db.transaction(txn)
        metrics.TORN_SNAPSHOTS.inc(len(rows))
        for row in rows:
            log.warning("removing a snapshot whose layer files may be torn: committed in an "
                        "earlier boot and never flushed", key=row.key, kind=row.kind)
            await self.discard_dir(row.id)
        for row in rows:
            if row.kind == "committed":
                await self.announce(SnapshotRemoved(key=row.key), namespace)
        return [r.key for r in rows]

    async def cleanup(self, locks: ChainLocks, namespace: str) -> None:
        """Remove what crashed processes left: trash, temporaries of dead processes,
        directories without a row, active unpack snapshots whose chain lock is free, and
        unpacked layers no image references any more."""
        await asyncio.to_thread(self._cleanup_files)
        # Directories first, rows second: a row is always written before its directory, so a
        # directory seen here whose row is missing afterwards really is garbage.
        dirs = await asyncio.to_thread(
            lambda: [p for p in self.snap_root.iterdir() if p.name.isdigit()])
        known = await self.db.run(md.ids)
        for path in dirs:
            if int(path.name) not in known:
                log.info("removing orphan snapshot directory", path=str(path))
                await self.discard_dir(int(path.name))

        stale = await self.db.run(lambda c: md.list_rows(c, kind="active"))
        for row in stale:
            chain = row.labels.get(LABEL_UNPACK)
            if chain is None:
                continue  # a container's snapshot: its owner removes it
            fd = locks.try_acquire(chain)
            if fd is None:
                continue  # an unpack in another process is working in it
            try:
                log.info("removing unfinished unpack", key=row.key, chain_id=chain)
                await self.discard(row)
            finally:
                locks.release(fd)

        leaves = await self.db.run(lambda c: md.unreferenced_leaves(c, LABEL_LAYER))
        if leaves:
            await self.collect(leaves, namespace)

    def _cleanup_files(self) -> None:
        doomed = list(self.trash.iterdir())
        for entry in list(self.snap_root.iterdir()):
            _, sep, rest = entry.name.partition(".tmp-")
            pid = rest.split("-", 1)[0]
            if sep and pid.isdigit() and not _alive(int(pid)):
                doomed.append(entry)
        for entry in doomed:
            try:
                sysmount.unmount_all_under(entry)
                remove_dir(entry)
            except OSError as exc:  # e.g. another replica's cleanup racing on the same tree
                log.warning("could not remove leftover files", path=str(entry), error=str(exc))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
