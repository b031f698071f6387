"""Finishing a layer applied in OVERLAY mode before its lower layers were final.

Applied onto the merged tree of its parents (NATIVE whiteouts), a layer keeps what it does
not restate of a directory that is already there: a directory it only implies (`a/b/f`
without an `a/b` entry) keeps the lower one's owner, mode and xattrs, and a directory it
lists keeps the lower one's xattrs it does not set. Applied alone into its own upper dir,
it cannot see them; `merge_lower_dirs` copies them up afterwards, from a read-only view of
the parents. It also checks every directory the layer implied where its upper dir had
nothing: onto the merged tree, a lower layer's symlink there (usrmerge's `lib -> usr/lib`)
would have been followed, and its file refused, so then the layer must be applied there.
Everything else an OVERLAY apply writes reads the same merged as applied onto the merged
tree (see `Whiteouts.OVERLAY`), and what it cannot do alone it refuses with
LowerLayerNeeded.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Mapping

from . import logs
from .errors import LayerFormatError, LowerLayerNeeded, UnsafeLayerError
from .safe_fs import O_READ_DIR, DirCache, lstat_at

_OPTIONAL_XATTR_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP)


def merge_lower_dirs(root: str | os.PathLike[str], lower: str | os.PathLike[str],
                     dirs: Mapping[tuple[str, ...], bool],
                     implied: Collection[tuple[str, ...]] = ()) -> int:
    """Give the directories `dirs` of the upper dir `root` (ApplyResult.lower_dirs: True =
    implied, False = listed) what they keep from the directory at the same path in `lower`,
    the parents' merged tree. Returns how many were changed.

    Raises LowerLayerNeeded when a directory the layer implied (True in `dirs`, or in
    `implied`: ApplyResult.implied_dirs) stands where the lower tree has something else:
    onto the merged tree the entries below it would have been written through that symlink,
    or refused (a file), so the layer must be applied there.
    """
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lower_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        os.close(root_fd)
        raise
    uppers, lowers = DirCache(root_fd), DirCache(lower_fd)
    changed = 0
    try:
        # Parents first, depth-first as the caches like it.
        for comps in sorted({*dirs, *implied}):
            entry = "/".join(comps)
            try:
                lparent = lowers.get(comps[:-1], create=False, entry=entry)
            except (UnsafeLayerError, LayerFormatError):
                continue  # below, a parent is not a directory: nothing shows through
            lst = lstat_at(lparent, comps[-1]) if lparent is not None else None
            if lparent is None or lst is None:
                continue
            if not stat.S_ISDIR(lst.st_mode):
                if dirs.get(comps) or comps in implied:
                    raise LowerLayerNeeded(entry, "a directory this layer implies where a "
                                           f"lower layer has a {_kind(lst)}")
                continue  # a listed directory replaces it, as onto the merged tree
            if comps not in dirs:
                continue  # replaced later in the layer: only the check above was owed
            uparent = uppers.get(comps[:-1], create=False, entry=entry)
            if uparent is None:
                raise LayerFormatError(f"directory {entry!r} is gone from the layer")
            if _copy_up(uparent, lparent, comps[-1], implied=dirs[comps], entry=entry):
                changed += 1
    finally:
        uppers.close()
        lowers.close()
        os.close(root_fd)
        os.close(lower_fd)
    return changed


def _copy_up(uparent: int, lparent: int, name: str, *, implied: bool, entry: str) -> bool:
    ufd = os.open(name, O_READ_DIR, dir_fd=uparent)
    try:
        lfd = os.open(name, O_READ_DIR, dir_fd=lparent)
        try:
            changed = False
            if implied:
                lst = os.fstat(lfd)
                os.fchown(ufd, lst.st_uid, lst.st_gid)
                os.fchmod(ufd, stat.S_IMODE(lst.st_mode))  # after chown: it clears setgid
                changed = True
            have = set(os.listxattr(ufd))
            for key in os.listxattr(lfd):
                if key in have or key.startswith("trusted.overlay."):
                    continue
                try:
                    os.setxattr(ufd, key, os.getxattr(lfd, key))
                    changed = True
                except OSError as e:
                    # The same rule as for a layer's own xattrs (apply._setxattr).
                    if key.startswith("user.") or e.errno not in _OPTIONAL_XATTR_ERRNOS:
                        raise
                    logs.warning("lower xattr not copied up", entry=entry, xattr=key,
                                 error=e.strerror)
            return changed
        finally:
            os.close(lfd)
    finally:
        os.close(ufd)


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "special file"
