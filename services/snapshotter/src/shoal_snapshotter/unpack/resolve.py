"""Finding the directory a layer entry goes in: symlinks on the way are followed inside root.

The rule is containerd's (`fs.RootPath` on an entry's parent path, before writing the
entry there) and what moby's unpack gets from running chrooted: a symlink met on the way
to an entry's parent directory is followed, scoped to the root. An absolute target starts
again at the root, and `..` at the root stays there, so a target pointing outside (`/etc`,
`../../..`) lands on the same path inside the root, never outside it. This is what makes
usrmerge images work: a base layer has `lib -> usr/lib`, later layers write `lib/...`.

The entry's own name is never followed: an entry replaces a symlink of that name.

`..` in a target climbs from the directory reached so far, as the kernel (and so the
container) resolves it: with `a -> x/y`, `a/../b` is `x/b`. continuity's RootPath cleans a
target lexically first (there `b`); the two differ only for a `..` that follows a symlink
inside a target. A component that does not exist is taken as a plain directory (it cannot
be a symlink), as both containerd and filepath-securejoin (umoci) do.

DirCache walks every path with O_NOFOLLOW and reports the symlinks it meets; the kernel
never follows one, so a symlink can only lead where this module sends the walk.
"""

from __future__ import annotations

from .errors import LayerFormatError, LowerLayerNeeded
from .safe_fs import DirCache, SymlinkInPath

# Symlinks followed for one path at most: continuity's RootPath and filepath-securejoin
# allow 255 too (a loop must end somewhere).
MAX_SYMLINKS = 255
# Components left to walk at most; far longer than any real path, it bounds what a hostile
# chain of long targets costs per entry.
MAX_COMPONENTS = 4096


def resolve(dirs: DirCache, comps: tuple[str, ...], *, create: bool, entry: str,
            overlay: bool) -> tuple[tuple[str, ...], int | None]:
    """Resolve the directory `comps` (normalised, below root), following symlinks inside
    root: (its real path below root, with no symlink in it, and a borrowed DirCache fd of
    it, or None when it is missing and not `create`). With `create`, missing directories
    are made where the resolved path needs them, and only there.

    `overlay`: root is a layer's upper dir alone. A `..` climbing out of a directory that is
    not there depends on what the lower layers have at that name (a symlink would move the
    climb), so that raises LowerLayerNeeded. Directories it makes are checked against the
    lower layers later (ApplyResult.implied_dirs), which covers the rest.
    """
    try:
        return comps, dirs.get(comps, create=create, entry=entry)
    except SymlinkInPath as link:  # rare: take the slow path only then
        return _follow(dirs, comps, link, create=create, entry=entry, overlay=overlay)


def _follow(dirs: DirCache, path: tuple[str, ...], link: SymlinkInPath, *, create: bool,
            entry: str, overlay: bool) -> tuple[tuple[str, ...], int | None]:
    links = 1
    done, todo = _expand(path, link, [], entry)
    while True:
        # Walk up to the next "..", or to the end, in one lookup; `done` has no symlink.
        cut = todo.index("..") if ".." in todo else len(todo)
        path = done + tuple(c for c in todo[:cut] if c not in ("", "."))
        final = cut == len(todo)
        try:
            # Nothing is made before the whole path is known: a ".." may still turn away.
            fd = dirs.get(path, create=create and final, entry=entry)
        except SymlinkInPath as found:
            links += 1
            if links > MAX_SYMLINKS:
                raise LayerFormatError(f"layer entry {entry!r}: more than {MAX_SYMLINKS} "
                                       "symlinks on its path (a loop?)") from None
            done, todo = _expand(path, found, todo[cut:], entry)
            continue
        if final:
            return path, fd
        if fd is None and overlay:
            raise LowerLayerNeeded(entry, f"a symlink's '..' climbs out of {'/'.join(path)!r}, "
                                   "which is not in this layer")
        done, todo = path[:-1], todo[cut + 1:]  # the ".."; at the root it stays there


def _expand(path: tuple[str, ...], link: SymlinkInPath, rest: list[str],
            entry: str) -> tuple[tuple[str, ...], list[str]]:
    """Put the symlink at path[link.depth]'s target in its place: (the real directory to go
    on from, the components left to walk)."""
    start = () if link.target.startswith("/") else path[:link.depth]
    todo = [*link.target.split("/"), *path[link.depth + 1:], *rest]
    if len(todo) > MAX_COMPONENTS:
        raise LayerFormatError(f"layer entry {entry!r}: its path through symlinks is longer "
                               f"than {MAX_COMPONENTS} components")
    return start, todo
