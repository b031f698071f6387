"""Snapshot drivers: how a snapshot's directory is laid out and mounted.

Every snapshot owns `snapshots/<id>/`:

- overlayfs: `fs/` is the overlay upper dir (this layer's changes only), `work/` its workdir.
  Mounts stack the ancestors' `fs/` dirs as lowerdirs.
- native: `fs/` is a full copy of the parent's tree plus this snapshot's changes; mounts
  are bind mounts of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from shoal_common.errors import FailedPrecondition
from shoal_common.messages.snapshots import Mount

from shoal_snapshotter.domain import mounts as sysmount
from shoal_snapshotter.domain.fsutil import copy_tree, remove_dir

log = structlog.get_logger("shoal.snapshotter.drivers")

DRIVERS = ("overlayfs", "native")


def fs_dir(snap_dir: Path) -> Path:
    return snap_dir / "fs"


def work_dir(snap_dir: Path) -> Path:
    return snap_dir / "work"


def mnt_dir(snap_dir: Path) -> Path:
    """Where an unpack mounts the snapshot's overlay; inside the snapshot's own directory so
    removing the snapshot finds (and unmounts) what a crashed unpack left mounted."""
    return snap_dir / "mnt"


def _mkdir(path: Path, mode: int) -> None:
    path.mkdir(exist_ok=True)
    os.chown(path, 0, 0)
    os.chmod(path, mode)  # not subject to the umask


class Driver(ABC):
    name: str
    # Whether a layer's files can be written before its parents are final: true when a
    # snapshot's directory holds only its own changes (overlayfs), not a copy of its
    # parent's tree (native).
    independent_layers = False

    @abstractmethod
    async def populate(self, snap_dir: Path, parents: list[Path]) -> None:
        """Create the files of a new snapshot in the empty `snap_dir`; `parents` are the
        ancestors' snapshot dirs, nearest first."""

    @abstractmethod
    def mounts(self, snap_dir: Path, parents: list[Path], *, readonly: bool) -> list[Mount]:
        """How to mount an active (`readonly=False`) or view snapshot."""

    @abstractmethod
    def apply_root(self, snap_dir: Path,
                   parents: list[Path]) -> contextlib.AbstractAsyncContextManager[Path]:
        """The directory to apply a layer into with native whiteouts: it shows the parent's
        full tree, and everything written there lands in this snapshot."""

    def lower_view(self, snap_dir: Path,
                   parents: list[Path]) -> contextlib.AbstractAsyncContextManager[Path]:
        """A read-only view of the parents' merged tree (only with independent_layers)."""
        raise NotImplementedError(f"the {self.name} driver has no separate layer directories")


def _bind(source: Path, readonly: bool) -> list[Mount]:
    return [Mount(type="bind", source=str(source), options=["rbind", "ro" if readonly else "rw"])]


class NativeDriver(Driver):
    name = "native"

    async def populate(self, snap_dir: Path, parents: list[Path]) -> None:
        fs = fs_dir(snap_dir)
        _mkdir(fs, 0o755)
        if parents:
            await copy_tree(fs_dir(parents[0]), fs)

    def mounts(self, snap_dir: Path, parents: list[Path], *, readonly: bool) -> list[Mount]:
        return _bind(fs_dir(snap_dir), readonly)

    @contextlib.asynccontextmanager
    async def apply_root(self, snap_dir: Path, parents: list[Path]) -> AsyncIterator[Path]:
        yield fs_dir(snap_dir)


class OverlayDriver(Driver):
    name = "overlayfs"
    independent_layers = True

    def __init__(self, unpack_options: list[str]) -> None:
        # Extra options for our own unpack mounts (e.g. metacopy=off), found by the probe.
        self.unpack_options = unpack_options

    async def populate(self, snap_dir: Path, parents: list[Path]) -> None:
        _mkdir(fs_dir(snap_dir), 0o755)
        _mkdir(work_dir(snap_dir), 0o700)

    def _lowerdir(self, parents: list[Path]) -> str:
        return "lowerdir=" + ":".join(str(fs_dir(p)) for p in parents)

    def mounts(self, snap_dir: Path, parents: list[Path], *, readonly: bool) -> list[Mount]:
        if readonly:
            if not parents:
                return _bind(fs_dir(snap_dir), True)
            if len(parents) == 1:
                # overlayfs needs two lowerdirs without an upper; one layer is just a bind.
                return _bind(fs_dir(parents[0]), True)
            return [Mount(type="overlay", source="overlay",
                          options=["index=off", self._lowerdir(parents)])]
        if not parents:
            return _bind(fs_dir(snap_dir), False)
        return [Mount(type="overlay", source="overlay", options=[
            "index=off", self._lowerdir(parents), f"upperdir={fs_dir(snap_dir)}",
            f"workdir={work_dir(snap_dir)}"])]

    @contextlib.asynccontextmanager
    async def apply_root(self, snap_dir: Path, parents: list[Path]) -> AsyncIterator[Path]:
        # The layer is applied through a mounted overlay (parents + this upper dir) with
        # native whiteouts, rather than into the bare upper dir with overlay whiteouts:
        # - a hardlink to a file of a lower layer works (the kernel copies the file up, then
        #   links it), where the bare upper dir has no such file and the applier refuses it;
        # - deletions, opaque directories and replaced directories are turned into upper-dir
        #   whiteouts/opaque markers by the kernel itself, exactly as it will read them;
        # - both drivers run the same applier code path on the same view of the tree, so
        #   they produce the same result by construction.
        # This is what containerd effectively does for overlay layers with hardlinks.
        if not parents:
            yield fs_dir(snap_dir)
            return
        target = mnt_dir(snap_dir)
        target.mkdir(mode=0o700, exist_ok=True)
        options = ["index=off", *self.unpack_options, self._lowerdir(parents),
                   f"upperdir={fs_dir(snap_dir)}", f"workdir={work_dir(snap_dir)}"]
        await asyncio.to_thread(sysmount.mount, "overlay", target, "overlay", options)
        try:
            yield target
        finally:
            await asyncio.to_thread(_unmount_and_remove, target)

    @contextlib.asynccontextmanager
    async def lower_view(self, snap_dir: Path, parents: list[Path]) -> AsyncIterator[Path]:
        if not parents:
            raise ValueError("a layer without parents has no lower view")
        if len(parents) == 1:
            yield fs_dir(parents[0])  # committed, so nobody writes it any more
            return
        # Mounted where apply_root mounts, so removing the snapshot unmounts it if a crash
        # left it behind; overlayfs without an upper dir is read-only.
        target = mnt_dir(snap_dir)
        target.mkdir(mode=0o700, exist_ok=True)
        await asyncio.to_thread(sysmount.mount, "overlay", target, "overlay",
                                ["index=off", self._lowerdir(parents)], sysmount.MS_RDONLY)
        try:
            yield target
        finally:
            await asyncio.to_thread(_unmount_and_remove, target)


def _unmount_and_remove(target: Path) -> None:
    sysmount.unmount_all_under(target)
    with contextlib.suppress(FileNotFoundError):
        target.rmdir()


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str = ""
    unpack_options: tuple[str, ...] = ()


def probe_overlay(state_dir: Path) -> Probe:
    """Really mount a two-layer overlay (with an upper dir) under the state dir, where the
    snapshots will live, and unmount it. Also finds whether `metacopy=off` is accepted: our
    unpack mounts must write full copies into upper dirs, never metadata-only ones that
    would depend on how a later mount is configured."""
    if any(c in str(state_dir) for c in ",:\\"):
        return Probe(False, f"state dir {state_dir} contains ',', ':' or '\\', which overlay "
                     "mount options cannot carry")
    base = state_dir / f"probe-{uuid.uuid4().hex[:12]}"
    try:
        for name in ("l1", "l2", "u", "w", "m"):
            (base / name).mkdir(parents=True)
        (base / "l1" / "f").write_bytes(b"probe")
        common = [f"lowerdir={base / 'l2'}:{base / 'l1'}", f"upperdir={base / 'u'}",
                  f"workdir={base / 'w'}"]
        last = ""
        for extra in (["metacopy=off"], []):
            try:
                sysmount.mount("overlay", base / "m", "overlay", ["index=off", *extra, *common])
            except OSError as exc:
                last = exc.strerror or str(exc)
                continue
            try:
                if (base / "m" / "f").read_bytes() != b"probe":
                    return Probe(False, "overlay mount shows wrong content")
            finally:
                sysmount.unmount_all_under(base / "m")
            return Probe(True, unpack_options=tuple(extra))
        return Probe(False, f"mounting overlay under {state_dir} failed: {last}")
    except OSError as exc:
        return Probe(False, f"overlay probe under {state_dir} failed: {exc}")
    finally:
        with contextlib.suppress(OSError):
            sysmount.unmount_all_under(base)
        remove_dir(base)


def choose_driver(wanted: str, state_dir: Path, recorded: str | None,
                  has_snapshots: bool) -> Driver:
    """Pick the driver: `wanted` is "auto", "overlayfs" or "native". Existing snapshots pin the
    driver they were made with (their directories only make sense to it)."""
    if wanted not in ("auto", *DRIVERS):
        raise FailedPrecondition(f"snapshotter driver {wanted!r} is not one of auto, "
                                 f"{', '.join(DRIVERS)}")
    if recorded and has_snapshots:
        if wanted not in ("auto", recorded):
            raise FailedPrecondition(
                f"snapshotter driver {wanted!r} asked for, but the snapshots in {state_dir} "
                f"were made by {recorded!r}; remove them or keep {recorded!r}")
        wanted = recorded
    if wanted == "native":
        return NativeDriver()
    probe = probe_overlay(state_dir)
    if probe.ok:
        return OverlayDriver(list(probe.unpack_options))
    if wanted == "overlayfs":
        raise FailedPrecondition(f"snapshotter driver overlayfs is not usable: {probe.reason}")
    log.warning("overlayfs not usable; using the native driver", reason=probe.reason)
    return NativeDriver()
