"""Directory-fd relative filesystem primitives on which the kernel never follows a symlink.

Every path is walked one component at a time from a directory fd with O_NOFOLLOW, so
nothing outside the root fd can be reached by a symlink (placed by this layer or an earlier
one): DirCache reports one it meets (SymlinkInPath) instead of following it, and
unpack.resolve follows it by hand, inside the root. The layer application is the only
writer of the snapshot while it runs, so a check made here stays true until it is used.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from .errors import LayerFormatError, UnsafeLayerError

# Walk/handle fds: usable as dir_fd, never open a symlink or a non-directory.
O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Real directory fds, for fchown/fchmod/fsetxattr/scandir (which reject O_PATH fds).
O_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Directory levels whose fds are cached; deeper levels are walked from the deepest cached one.
CACHE_DEPTH = 64

# Marks an overlay upper directory whose lower namesakes are hidden.
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"

# Called with the path of each directory DirCache creates and whether it replaced an
# overlay whiteout (and so was made opaque).
OnMkdir = Callable[[tuple[str, ...], bool], None]


class SymlinkInPath(UnsafeLayerError):
    """DirCache met a symlink at component `depth` of the path it walked; `target` is what
    it points to. An UnsafeLayerError, so a caller that does not follow it (unpack.resolve
    does) refuses the path."""

    def __init__(self, entry: str, where: str, depth: int, target: str) -> None:
        super().__init__(entry, f"{where!r} is a symlink")
        self.depth = depth
        self.target = target

    def __reduce__(self) -> tuple[type[UnsafeLayerError], tuple[str, str]]:
        return (UnsafeLayerError, (self.entry, self.reason))  # crosses processes as a refusal


def is_whiteout(st: os.stat_result) -> bool:
    """An overlayfs whiteout: a 0/0 character device."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """lstat relative to dir_fd; None when nothing is there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(dir_fd: int, name: str) -> bool:
    """Remove whatever `name` is (recursively for a directory). Return True if it was a dir."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):
        remove_tree(dir_fd, name)
        return True
    os.unlink(name, dir_fd=dir_fd)
    return False


def remove_tree(parent_fd: int, name: str) -> None:
    """Delete directory `name` under parent_fd and everything below it, never following symlinks.

    Holds at most two fds however deep the tree is: it descends by name and climbs back up
    through "..", checking device/inode so that a climb can only land where it came from.
    """
    parent = os.fstat(parent_fd)
    # One (name, parent dev, parent inode) per level, from `name` down to the current dir.
    levels: list[tuple[str, int, int]] = [(name, parent.st_dev, parent.st_ino)]
    cur = os.open(name, O_READ_DIR, dir_fd=parent_fd)
    try:
        while True:
            subdir = None
            with os.scandir(cur) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        subdir = entry.name
                        break
                    os.unlink(entry.name, dir_fd=cur)
            if subdir is not None:
                here = os.fstat(cur)
                child = os.open(subdir, O_READ_DIR, dir_fd=cur)
                os.close(cur)
                cur = child
                levels.append((subdir, here.st_dev, here.st_ino))
                continue
            done, up_dev, up_ino = levels.pop()
            if not levels:
                os.close(cur)
                cur = -1
                os.rmdir(done, dir_fd=parent_fd)
                return
            up = os.open("..", O_READ_DIR, dir_fd=cur)
            os.close(cur)
            cur = up
            st = os.fstat(cur)
            if (st.st_dev, st.st_ino) != (up_dev, up_ino):
                raise OSError(errno.ESTALE, "directory moved during removal", done)
            os.rmdir(done, dir_fd=cur)
    finally:
        if cur >= 0:
            os.close(cur)


class DirCache:
    """Resolves directory paths below a root fd, reusing the fds of the last path walked.

    Tar streams list entries depth-first, so keeping the chain of fds for the previous
    directory makes most lookups free. Fds handed out are borrowed: valid until the next
    get()/invalidate()/close(). Callers must invalidate() every directory they remove.
    """

    def __init__(self, root_fd: int, *, overlay: bool = False,
                 on_mkdir: OnMkdir | None = None) -> None:
        self._root_fd = root_fd
        # overlay: root is an overlay upper dir, where a whiteout means "deleted".
        self._overlay = overlay
        self._on_mkdir = on_mkdir
        self._names: list[str] = []
        self._fds: list[int] = []
        # Fd of the last directory deeper than CACHE_DEPTH, so fds stay bounded.
        self._deep: tuple[tuple[str, ...], int] | None = None

    def get(self, comps: tuple[str, ...], *, create: bool, entry: str) -> int | None:
        """Return a borrowed fd of the directory `comps` (root for ()).

        Missing directories are created 0755 root:root when `create`, else None is returned.
        A symlink on the way raises SymlinkInPath; another non-directory LayerFormatError.
        """
        shallow = comps[:CACHE_DEPTH]
        common = 0
        limit = min(len(self._names), len(shallow))
        while common < limit and self._names[common] == shallow[common]:
            common += 1
        self._truncate(common)
        cur = self._fds[-1] if self._fds else self._root_fd
        for i in range(common, len(shallow)):
            fd = self._open_dir(cur, comps, i, create=create, entry=entry)
            if fd is None:
                return None
            self._names.append(comps[i])
            self._fds.append(fd)
            cur = fd
        if len(comps) <= CACHE_DEPTH:
            return cur

        if self._deep is not None:
            if self._deep[0] == comps:
                return self._deep[1]
            self._close_deep()
        fd, owned = cur, False
        try:
            for i in range(CACHE_DEPTH, len(comps)):
                nxt = self._open_dir(fd, comps, i, create=create, entry=entry)
                if owned:
                    os.close(fd)
                    owned = False
                if nxt is None:
                    return None
                fd, owned = nxt, True
        except BaseException:
            if owned:
                os.close(fd)
            raise
        self._deep = (comps, fd)
        return fd

    def invalidate(self, comps: tuple[str, ...]) -> None:
        """Forget cached fds of `comps` and below: that directory was removed or replaced."""
        depth = len(comps)
        if depth <= len(self._names) and tuple(self._names[:depth]) == comps:
            self._truncate(depth - 1)
        if self._deep is not None and self._deep[0][:depth] == comps:
            self._close_deep()

    def close(self) -> None:
        self._truncate(0)
        self._close_deep()

    def _truncate(self, depth: int) -> None:
        while len(self._fds) > depth:
            os.close(self._fds.pop())
            self._names.pop()

    def _close_deep(self) -> None:
        if self._deep is not None:
            os.close(self._deep[1])
            self._deep = None

    def _open_dir(
        self, parent_fd: int, comps: tuple[str, ...], i: int, *, create: bool, entry: str
    ) -> int | None:
        name = comps[i]
        replaces_whiteout = False
        try:
            return os.open(name, O_PATH_DIR, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            where = "/".join(comps[: i + 1])
            st = lstat_at(parent_fd, name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise SymlinkInPath(entry, where, i, os.readlink(name, dir_fd=parent_fd)) from None
            if not (self._overlay and st is not None and is_whiteout(st)):
                raise LayerFormatError(
                    f"layer entry {entry!r}: {where!r} is not a directory"
                ) from None
            # A whiteout this layer wrote: the name is deleted, so nothing is found below
            # it, or a new directory is made there, opaque so the lower one stays hidden.
            if not create:
                return None
            os.unlink(name, dir_fd=parent_fd)
            replaces_whiteout = True
        # Implicit parent missing from the tar: created like containerd does, 0755 root:root.
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, O_READ_DIR, dir_fd=parent_fd)
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o755)
            if replaces_whiteout:
                os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
            if self._on_mkdir is not None:
                self._on_mkdir(comps[: i + 1], replaces_whiteout)
        except BaseException:
            os.close(fd)
            raise
        return fd
