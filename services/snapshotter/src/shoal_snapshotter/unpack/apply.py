"""Apply one OCI layer (a tar stream) onto a snapshot directory without leaving it."""

from __future__ import annotations

import decimal
import enum
import errno
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from . import logs
from .compression import Readable, open_decompressed
from .errors import LayerFormatError, LowerLayerNeeded, UnsafeLayerError
from .resolve import resolve
from .safe_fs import (
    O_READ_DIR,
    OVERLAY_OPAQUE_XATTR,
    DirCache,
    is_whiteout,
    lstat_at,
    remove_at,
)
from .tarstream import FastTarInfo, TarStream

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_T = TypeVar("_T")
_CHUNK = 1 << 20  # sparse members' reads
# Failures on which an xattr outside user.* is skipped (fs or privileges refuse it here).
_OPTIONAL_XATTR_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP)


class Whiteouts(enum.Enum):
    """How deletions in the layer are recorded in the target directory."""

    # root is this layer's own overlay upper dir; lower layers are separate directories.
    OVERLAY = "overlay"
    # root already holds the full parent filesystem; deletions are carried out.
    NATIVE = "native"


@dataclass
class ApplyResult:
    entries: int = 0  # tar members read, including whiteouts and skipped ones
    bytes_written: int = 0  # regular file content bytes
    # OVERLAY mode: directories of the upper dir over which the lower layers' namesakes
    # (if directories) still show, and so lend them what applying onto the merged tree would
    # have kept: True = only implied by a deeper entry (owner, mode and xattrs come from
    # below), False = listed by the layer (only the xattrs it did not set). For
    # merge_lower_dirs once the lower layers are final.
    lower_dirs: dict[tuple[str, ...], bool] = field(default_factory=dict)
    # OVERLAY mode: every directory made for a deeper entry where the upper dir had nothing
    # (and no opaque parent hid the lower layers), kept even if a later entry lists or
    # replaces it. Onto the merged tree that entry's path would have gone through whatever
    # the lower layers have there: merge_lower_dirs checks that it is a directory.
    implied_dirs: set[tuple[str, ...]] = field(default_factory=set)


def apply_layer(
    stream: Readable,
    root: str | os.PathLike[str],
    *,
    whiteouts: Whiteouts,
    allow_devices: bool = True,
    compression: str | None = None,
) -> ApplyResult:
    """Apply the layer tar in `stream` onto the existing directory `root`.

    Symlinks on the way to an entry's directory are followed inside root (unpack.resolve:
    one pointing outside leads to the same path inside), so nothing outside root is ever
    touched. Raises UnsafeLayerError for an entry that is refused (a name or hardlink that
    climbs out of root with `..`, a device when not allowed, ...), LayerFormatError for a
    corrupt or unsupported stream. OVERLAY mode raises LowerLayerNeeded for an entry that
    cannot be applied without the lower layers (a hardlink to a file that is not in this
    layer): apply the layer again onto the merged tree, with NATIVE whiteouts. On any error
    root is left half-applied and should be thrown away.
    """
    tar_stream = TarStream(open_decompressed(stream, compression))
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        applier = _Applier(root_fd, whiteouts, allow_devices)
        try:
            applier.run(tar_stream)
        finally:
            applier.close()
    finally:
        os.close(root_fd)
    return applier.result


class _StrictTarInfo(FastTarInfo):
    """tarfile takes a corrupt header after the first as a silent end of archive; refuse it."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _StrictTarInfo:
        try:
            return super().frombuf(buf, encoding, errors)
        # Both exist (HeaderError subclasses) but typeshed omits them; HeaderError itself
        # would also catch EOFHeaderError/EmptyHeaderError, which end the archive.
        except (tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
                tarfile.TruncatedHeaderError) as e:  # type: ignore[attr-defined]
            raise LayerFormatError(f"corrupt tar header: {e}") from e


class _Applier:
    def __init__(self, root_fd: int, whiteouts: Whiteouts, allow_devices: bool) -> None:
        self.result = ApplyResult()
        self._native = whiteouts is Whiteouts.NATIVE
        self._allow_devices = allow_devices
        self._dirs = DirCache(root_fd, overlay=not self._native,
                              on_mkdir=None if self._native else self._implied_dir)
        # OVERLAY: directories of this layer that hide everything below them (opaque ones),
        # so directories made under them take nothing from the lower layers.
        self._hiding: set[tuple[str, ...]] = set()
        # Directory times are set last: writing their contents would bump them again.
        self._dir_times: dict[tuple[str, ...], tuple[int, int]] = {}
        # NATIVE: paths this layer wrote (and their ancestors), which an opaque marker keeps.
        self._written: set[tuple[str, ...]] = set()

    def close(self) -> None:
        self._dirs.close()

    def run(self, stream: TarStream) -> None:
        try:
            # Mode "r" on a forward-only TarStream reads as "r|" (tarfile.next only seeks
            # ahead); contents are copied from the TarStream itself (_regular).
            tar = tarfile.TarFile(
                fileobj=stream,  # type: ignore[arg-type]  # read/tell/seek is all "r" uses
                mode="r",
                encoding="utf-8",
                errors="surrogateescape",
                tarinfo=_StrictTarInfo,
            )
        except tarfile.TarError as e:
            raise LayerFormatError(f"not a tar stream: {e}") from e
        with tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as e:
                    raise LayerFormatError(f"corrupt tar stream: {e}") from e
                if member is None:
                    break
                # Streaming: nothing needs earlier headers, so don't keep them all in memory.
                tar.members.clear()  # type: ignore[attr-defined]  # undocumented, not in typeshed
                self.result.entries += 1
                try:
                    self._apply(tar, stream, member)
                except tarfile.TarError as e:
                    raise LayerFormatError(f"corrupt tar stream at {member.name!r}: {e}") from e
                except OSError as e:
                    e.add_note(f"while applying layer entry {member.name!r}")
                    raise
        self._set_dir_times()
        # Read to the end so gzip checks its trailer and a digesting caller sees every byte.
        stream.drain()

    # --- entries -------------------------------------------------------------------------

    def _apply(self, tar: tarfile.TarFile, stream: TarStream, m: tarfile.TarInfo) -> None:
        comps = normalize(m.name, m.name)
        if not comps:
            return  # the root itself: its metadata belongs to the snapshot owner (containerd too)
        base, parent = comps[-1], comps[:-1]
        if any(c.startswith(WHITEOUT_META_PREFIX) for c in parent) or (
            base.startswith(WHITEOUT_META_PREFIX) and base != WHITEOUT_OPAQUE
        ):
            return  # AUFS bookkeeping (.wh..wh.plnk etc.), meaningless here
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(m, parent, base)
            return
        if (m.ischr() or m.isblk()) and not self._allow_devices:
            raise UnsafeLayerError(m.name, "device nodes are not allowed in this layer")
        if m.islnk():
            self._hardlink(m, comps)
            return

        real, pfd = self._parent(m, parent)
        comps = (*real, base)
        self._mark_written(comps)
        if m.isdir():
            self._directory(m, pfd, comps)
        elif m.isreg():
            self._regular(tar, stream, m, pfd, comps)
        elif m.issym():
            if not m.linkname:
                raise LayerFormatError(f"layer entry {m.name!r}: symlink with empty target")
            self._create(pfd, comps, lambda: os.symlink(m.linkname, base, dir_fd=pfd))
            self._node_metadata(m, pfd, base, is_symlink=True)
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            device = os.makedev(m.devmajor, m.devminor) if kind != stat.S_IFIFO else 0
            self._replace(pfd, comps)
            os.mknod(base, kind | 0o600, device, dir_fd=pfd)
            self._node_metadata(m, pfd, base, is_symlink=False)
        else:
            raise LayerFormatError(f"layer entry {m.name!r}: unsupported tar type {m.type!r}")

    def _parent(self, m: tarfile.TarInfo, parent: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
        """The directory of an entry named below `parent`, made if missing: its real path
        (symlinks followed inside root) and a borrowed fd."""
        real, fd = resolve(self._dirs, parent, create=True, entry=m.name,
                           overlay=not self._native)
        assert fd is not None  # create=True never yields None
        return real, fd

    def _directory(self, m: tarfile.TarInfo, pfd: int, comps: tuple[str, ...]) -> None:
        base = comps[-1]
        st = None
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)  # the common case: nothing there (no lstat)
        except FileExistsError:
            st = lstat_at(pfd, base)
            if st is None or not stat.S_ISDIR(st.st_mode):
                # A directory over an existing directory keeps it (and its contents).
                if st is not None:
                    os.unlink(base, dir_fd=pfd)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, O_READ_DIR, dir_fd=pfd)
        try:
            if not self._native:
                self._overlay_dir(fd, comps, st)
            self._fd_metadata(m, fd)
        finally:
            os.close(fd)
        self._dir_times[comps] = _times(m)

    def _overlay_dir(self, fd: int, comps: tuple[str, ...], before: os.stat_result | None) -> None:
        """Bookkeeping for a directory entry in OVERLAY mode; `before` is what the upper dir
        had at that name."""
        if before is None:
            if not self._under_hiding(comps):
                self.result.lower_dirs[comps] = False
        elif not stat.S_ISDIR(before.st_mode):
            # It replaces something this layer wrote (a whiteout, a file...), which hid the
            # lower layers' namesake: the new directory must hide it too, as the kernel's
            # mkdir over a whiteout does.
            os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
            self._hiding.add(comps)
        elif comps in self.result.lower_dirs:
            self.result.lower_dirs[comps] = False  # now listed: owner and mode are its own

    def _implied_dir(self, comps: tuple[str, ...], replaced_whiteout: bool) -> None:
        """DirCache made a directory the layer did not list (OVERLAY mode)."""
        if replaced_whiteout:
            self._hiding.add(comps)
        elif not self._under_hiding(comps):
            self.result.lower_dirs[comps] = True
            self.result.implied_dirs.add(comps)

    def _under_hiding(self, comps: tuple[str, ...]) -> bool:
        return bool(self._hiding) and any(comps[:i] in self._hiding
                                          for i in range(1, len(comps)))

    def _regular(self, tar: tarfile.TarFile, stream: TarStream, m: tarfile.TarInfo, pfd: int,
                 comps: tuple[str, ...]) -> None:
        base = comps[-1]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = self._create(pfd, comps, lambda: os.open(base, flags, 0o600, dir_fd=pfd))
        try:
            if m.sparse is None:
                stream.seek(m.offset_data)  # (where it already is)
                if stream.copy_to(fd, m.size) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
                self.result.bytes_written += m.size
            else:  # GNU sparse: tarfile maps the holes (rare: a slow path is fine)
                content = tar.extractfile(m)
                assert content is not None  # a regular file
                while chunk := content.read(_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    self.result.bytes_written += len(chunk)
            self._fd_metadata(m, fd)
            atime, mtime = _times(m)
            os.utime(fd, ns=(atime, mtime))
        finally:
            os.close(fd)

    def _hardlink(self, m: tarfile.TarInfo, comps: tuple[str, ...]) -> None:
        # Absolute targets are taken relative to root, like entry names; `..` may not climb out.
        # The target's directory resolves like an entry's (containerd does the same); its
        # last component is not followed: a hardlink to a symlink links the symlink.
        target = normalize(m.linkname, m.name)
        if not target:
            raise UnsafeLayerError(m.name, "hardlink to the root directory")
        tdir, tparent = resolve(self._dirs, target[:-1], create=False, entry=m.name,
                                overlay=not self._native)
        target = (*tdir, target[-1])
        tst = lstat_at(tparent, target[-1]) if tparent is not None else None
        if not self._native and (tst is None or is_whiteout(tst)):
            # Maybe a file of a lower layer, which is not in this directory to link to.
            raise LowerLayerNeeded(m.name, f"hardlink target {m.linkname!r} is not in this "
                                   "layer")
        if tst is None:
            raise UnsafeLayerError(m.name, f"hardlink target {m.linkname!r} does not exist in root")
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafeLayerError(m.name, f"hardlink target {m.linkname!r} is a directory")
        assert tparent is not None
        # Own a copy: resolving the link's parent may recycle the cached fd of the target's.
        tfd = os.dup(tparent)
        try:
            real, pfd = self._parent(m, comps[:-1])
            comps = (*real, comps[-1])
            if target == comps:
                return
            self._mark_written(comps)
            self._replace(pfd, comps)
            os.link(target[-1], comps[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _whiteout(self, m: tarfile.TarInfo, parent: tuple[str, ...], base: str) -> None:
        parent, pfd = self._parent(m, parent)  # the real directory: whiteouts follow symlinks too
        if self._native:
            # Overlay creates parents of whiteouts in the upper dir; keep them likewise.
            self._mark_written(parent)
        if base == WHITEOUT_OPAQUE:
            if self._native:
                self._clear_opaque(m, parent)
                return
            if not parent:
                raise LowerLayerNeeded(m.name, "overlayfs ignores an opaque root directory")
            fd = os.open(".", O_READ_DIR, dir_fd=pfd)
            try:
                os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
            finally:
                os.close(fd)
            self._hiding.add(parent)
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise UnsafeLayerError(m.name, f"whiteout of {name!r}")
        comps = (*parent, name)
        self._replace(pfd, comps)
        if not self._native:
            # overlayfs whiteout: a 0/0 character device hiding the lower entry.
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)

    def _clear_opaque(self, m: tarfile.TarInfo, dir_comps: tuple[str, ...]) -> None:
        """Remove everything below dir_comps that this layer did not write itself.

        Directories this layer wrote are kept but cleared recursively too: under an opaque
        directory overlayfs shows nothing from lower layers at any depth.
        """
        todo = [dir_comps]
        while todo:
            comps = todo.pop()
            dfd = self._dirs.get(comps, create=True, entry=m.name)
            assert dfd is not None
            rfd = os.open(".", O_READ_DIR, dir_fd=dfd)
            try:
                with os.scandir(rfd) as it:
                    children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            finally:
                os.close(rfd)
            for name, is_dir in children:
                child = (*comps, name)
                if child in self._written:
                    if is_dir:
                        todo.append(child)
                    continue
                self._replace(dfd, child)

    # --- helpers -------------------------------------------------------------------------

    def _create(self, pfd: int, comps: tuple[str, ...], make: Callable[[], _T]) -> _T:
        """make() the entry at comps (in directory pfd), replacing whatever is there.

        make() is tried first: it creates (O_CREAT|O_EXCL, symlink...) and so fails with
        EEXIST exactly when something is at that name (a symlink included, never followed);
        when it succeeds, _replace would have found nothing to remove. One lstat fewer for
        every new entry, the same outcome for every other.
        """
        try:
            return make()
        except FileExistsError:
            self._replace(pfd, comps)
            return make()

    def _replace(self, pfd: int, comps: tuple[str, ...]) -> None:
        """Remove whatever exists at comps (in directory pfd), keeping the caches right."""
        if remove_at(pfd, comps[-1]):
            self._dirs.invalidate(comps)
            depth = len(comps)
            for tracked in (self._dir_times, self.result.lower_dirs):
                for key in [k for k in tracked if k[:depth] == comps]:
                    del tracked[key]
            for key in [k for k in self._hiding if k[:depth] == comps]:
                self._hiding.discard(key)

    def _mark_written(self, comps: tuple[str, ...]) -> None:
        if not self._native:
            return
        for depth in range(len(comps), 0, -1):
            prefix = comps[:depth]
            if prefix in self._written:
                break  # its ancestors were added with it
            self._written.add(prefix)

    def _fd_metadata(self, m: tarfile.TarInfo, fd: int) -> None:
        """Owner, mode and xattrs of a regular file or directory through a real fd."""
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, stat.S_IMODE(m.mode))  # after chown, which clears setuid/setgid
        for key, value in _xattrs(m):
            self._setxattr(m, fd, key, value)

    def _node_metadata(self, m: tarfile.TarInfo, pfd: int, base: str, *, is_symlink: bool) -> None:
        """Metadata of a symlink, device or fifo by name, never following the last component."""
        os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if not is_symlink:  # Linux symlinks have no mode of their own
            os.chmod(base, stat.S_IMODE(m.mode), dir_fd=pfd, follow_symlinks=False)
        # No *xattrat() in Python: reach the entry through our directory fd's /proc link.
        path = f"/proc/self/fd/{pfd}/{base}"
        for key, value in _xattrs(m):
            self._setxattr(m, path, key, value)
        atime, mtime = _times(m)
        os.utime(base, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _setxattr(self, m: tarfile.TarInfo, target: int | str, key: str, value: bytes) -> None:
        if key.startswith("trusted.overlay."):
            # overlayfs control attributes (redirect, metacopy, ...) must not come from images.
            logs.warning("layer xattr ignored", entry=m.name, xattr=key)
            return
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as e:
            if key.startswith("user.") or e.errno not in _OPTIONAL_XATTR_ERRNOS:
                raise
            logs.warning("layer xattr not applied", entry=m.name, xattr=key, error=e.strerror)

    def _set_dir_times(self) -> None:
        for comps, (atime, mtime) in sorted(self._dir_times.items()):
            try:
                pfd = self._dirs.get(comps[:-1], create=False, entry="/".join(comps))
            except (UnsafeLayerError, LayerFormatError):
                continue  # a later entry turned an ancestor into something else
            if pfd is None:
                continue
            st = lstat_at(pfd, comps[-1])
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.utime(comps[-1], ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)


def normalize(name: str, entry: str) -> tuple[str, ...]:
    """Split a tar path into components relative to root.

    Leading "/" and "./" are dropped (absolute names live inside root, as in containerd);
    ".." that would climb above root is an escape.
    """
    comps: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not comps:
                raise UnsafeLayerError(entry, f"path {name!r} climbs out of root")
            comps.pop()
            continue
        comps.append(comp)
    return tuple(comps)


def _xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    # tarfile decodes PAX values as UTF-8 with surrogateescape; this restores binary values.
    return [
        (key[len(_XATTR_PAX_PREFIX) :], value.encode("utf-8", "surrogateescape"))
        for key, value in m.pax_headers.items()
        if key.startswith(_XATTR_PAX_PREFIX)
    ]


def _times(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns; PAX strings are parsed exactly, tarfile's floats lose precision."""
    mtime = _pax_ns(m.pax_headers.get("mtime"))
    if mtime is None:
        mtime = int(m.mtime) * 1_000_000_000 if float(m.mtime).is_integer() else int(m.mtime * 1e9)
    atime = _pax_ns(m.pax_headers.get("atime"))
    return (mtime if atime is None else atime), mtime


def _pax_ns(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(decimal.Decimal(value).scaleb(9).to_integral_value(decimal.ROUND_FLOOR))
    except (decimal.InvalidOperation, ValueError):
        return None
