"""A RUN's filesystem changes as a layer.

overlayfs (the snapshotter's usual driver): the container's upper directory holds exactly
what the step changed; a deletion is a whiteout (a 0/0 character device) and a directory
made anew over a lower one is opaque (`trusted.overlay.opaque=y`, or `user.overlay.` with
userxattr). Those become OCI's `.wh.<name>` and `.wh..wh..opq` entries. A metacopy file
(metadata copied up, data still below) is read from the lower layer that has it; a
redirected directory (redirect_dir=on) is refused: its contents live under another name.

native driver: the container's tree is a full copy, so it is compared with its parent's
tree (a view): anything new or whose type, mode, owner, size, time or link target differs
is in the layer, anything gone is a whiteout (what containerd's naive diff does).

Both leave out what runc made only to mount over (/proc, /sys, /dev, /etc/hosts,
/etc/hostname, /etc/resolv.conf, where the image had none), and a directory that is in
the upper dir only because such a mount point was made in it."""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shoal_docker_gateway.domain.build.context import walk
from shoal_docker_gateway.domain.build.errors import BuildError
from shoal_docker_gateway.domain.build.layers import (
    OPAQUE,
    LayerWriter,
    add_file,
    tar_entry,
    whiteout_entry,
)

MOUNTPOINTS = frozenset({"proc", "sys", "dev", "etc/hosts", "etc/hostname",
                         "etc/resolv.conf"})
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")


@dataclass
class _Item:
    rel: str
    st: os.stat_result | None  # None: a whiteout
    host: Path  # where its data is read
    keep: bool  # in the layer for its own sake (a directory may also be kept for a child)
    opaque: bool = False
    xattrs: dict[str, bytes] | None = None


def _xattrs(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with contextlib.suppress(OSError):
        for name in os.listxattr(path, follow_symlinks=False):
            with contextlib.suppress(OSError):
                out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _lstat_within(base: Path, rel: str) -> os.stat_result | None:
    """`rel` under `base` without following a symlink on the way (None: not there)."""
    cur = base
    parts = rel.split("/")
    for part in parts[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
    try:
        st = os.lstat(cur / parts[-1])
    except OSError:
        return None
    return None if _is_whiteout(st) else st


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _in_lowers(lowers: list[Path], rel: str) -> tuple[os.stat_result, Path] | None:
    for lower in lowers:
        st = _lstat_within(lower, rel)
        if st is not None:
            return st, lower / rel
        with contextlib.suppress(OSError):
            if _is_whiteout(os.lstat(lower / rel)):
                return None
    return None


def _same_meta(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_mode, a.st_uid, a.st_gid) == (b.st_mode, b.st_uid, b.st_gid)


def _skipped(rel: str, skipped: list[str]) -> bool:
    return any(rel == s or rel.startswith(s + "/") for s in skipped)


def _overlay_item(upper: Path, lowers: list[Path], rel: str, st: os.stat_result) -> _Item:
    host = upper / rel
    if _is_whiteout(st):
        return _Item(rel, None, host, keep=True)
    attrs = _xattrs(host)
    if any(n.endswith("overlay.redirect") for n in attrs):
        raise BuildError(f"/{rel} is a redirected overlay directory (redirect_dir=on), "
                         "which the build cannot read as a layer")
    opaque = any(n.endswith("overlay.opaque") and v == b"y" for n, v in attrs.items())
    lower = _in_lowers(lowers, rel)
    if any(n.endswith("overlay.metacopy") for n in attrs):
        if lower is None:
            raise BuildError(f"/{rel}: a metacopy file whose data no lower layer has")
        host = lower[1]
    own = {n: v for n, v in attrs.items() if not n.startswith(_OVERLAY_XATTRS)}
    keep = True
    if stat.S_ISDIR(st.st_mode):
        keep = lower is None or opaque or not _same_meta(st, lower[0])
    return _Item(rel, st, host, keep, opaque, own)


def _overlay_items(upper: Path, lowers: list[Path]) -> list[_Item]:
    items: list[_Item] = []
    skipped: list[str] = []
    for rel, st in walk(upper):
        if _skipped(rel, skipped):
            continue
        if rel in MOUNTPOINTS and _in_lowers(lowers, rel) is None:
            skipped.append(rel)
            continue
        items.append(_overlay_item(upper, lowers, rel, st))
    return items


def _changed(new: os.stat_result, old: os.stat_result, new_path: Path, old_path: Path) -> bool:
    if stat.S_IFMT(new.st_mode) != stat.S_IFMT(old.st_mode) or not _same_meta(new, old):
        return True
    if stat.S_ISDIR(new.st_mode):
        return False
    if (new.st_size, new.st_mtime_ns, new.st_rdev) != (old.st_size, old.st_mtime_ns,
                                                        old.st_rdev):
        return True
    return stat.S_ISLNK(new.st_mode) and os.readlink(new_path) != os.readlink(old_path)


def _listing(path: Path | None) -> dict[str, os.stat_result]:
    if path is None:
        return {}
    try:
        return {e.name: e.stat(follow_symlinks=False) for e in os.scandir(path)}
    except OSError:
        return {}


def _tree_items(new: Path, old: Path | None, prefix: str, items: list[_Item]) -> None:
    now, before = _listing(new), _listing(old)
    for name in sorted(before.keys() - now.keys()):
        items.append(_Item(f"{prefix}{name}", None, new / name, keep=True))
    for name in sorted(now):
        rel, st = f"{prefix}{name}", now[name]
        old_st = before.get(name)
        if old_st is None and rel in MOUNTPOINTS:
            continue
        changed = old_st is None or _changed(st, old_st, new / name,
                                             old / name if old else new / name)
        items.append(_Item(rel, st, new / name, keep=changed, xattrs=_xattrs(new / name)))
        if stat.S_ISDIR(st.st_mode):
            below = old / name if old is not None and old_st is not None and \
                stat.S_ISDIR(old_st.st_mode) else None
            _tree_items(new / name, below, f"{rel}/", items)


def _emit(writer: LayerWriter, items: list[_Item]) -> None:
    wanted = {i.rel for i in items if i.keep}
    for rel in list(wanted):  # a kept entry keeps the directories above it
        parts = rel.split("/")
        wanted.update("/".join(parts[:n]) for n in range(1, len(parts)))
    links: dict[tuple[int, int], str] = {}
    for item in items:
        if item.rel not in wanted:
            continue
        if item.st is None:
            writer.add(whiteout_entry(item.rel))
            continue
        first = ""
        if stat.S_ISREG(item.st.st_mode) and item.st.st_nlink > 1:
            first = links.setdefault((item.st.st_dev, item.st.st_ino), item.rel)
            first = "" if first == item.rel else first
        link = os.readlink(item.host) if stat.S_ISLNK(item.st.st_mode) else first
        info = tar_entry(item.rel, item.st, linkname=link)
        info.pax_headers = {f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
                            for name, value in (item.xattrs or {}).items()}
        add_file(writer, info, item.host)
        if item.opaque:
            marker = tarfile.TarInfo(f"{item.rel}/{OPAQUE}")
            marker.uname = marker.gname = ""
            writer.add(marker)


def overlay_diff(writer: LayerWriter, upper: Path, lowers: list[Path]) -> None:
    """The layer of overlay upper dir `upper` over `lowers` (top first)."""
    _emit(writer, _overlay_items(upper, lowers))


def tree_diff(writer: LayerWriter, new: Path, old: Path | None) -> None:
    """The layer that turns tree `old` (None: empty) into tree `new`."""
    items: list[_Item] = []
    _tree_items(new, old, "", items)
    _emit(writer, items)
