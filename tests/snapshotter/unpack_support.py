"""Helpers for the layer applier tests: tar entries, applying them, listing trees, a real
overlay mount."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shoal_snapshotter.unpack import Whiteouts, apply_layer, merge_lower_dirs

MTIME = 1_600_000_000
Entry = tuple[tarfile.TarInfo, bytes]
BOTH = pytest.mark.parametrize(
    "mode", [Whiteouts.NATIVE, Whiteouts.OVERLAY], ids=["native", "overlay"])


# --- building layers -------------------------------------------------------------------------

def tar_info(name: str, kind: bytes, *, mode: int, uid: int = 0, gid: int = 0,
          mtime: int = MTIME, xattrs: dict[str, str] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, mtime
    ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    return ti


def f(name: str, data: bytes = b"", *, mode: int = 0o644, **kw: Any) -> Entry:
    ti = tar_info(name, tarfile.REGTYPE, mode=mode, **kw)
    ti.size = len(data)
    return ti, data


def d(name: str, *, mode: int = 0o755, **kw: Any) -> Entry:
    return tar_info(name, tarfile.DIRTYPE, mode=mode, **kw), b""


def sym(name: str, target: str, **kw: Any) -> Entry:
    ti = tar_info(name, tarfile.SYMTYPE, mode=0o777, **kw)
    ti.linkname = target
    return ti, b""


def hl(name: str, target: str) -> Entry:
    ti = tar_info(name, tarfile.LNKTYPE, mode=0o644)
    ti.linkname = target
    return ti, b""


def dev(name: str, kind: bytes, major: int, minor: int, *, mode: int = 0o666, **kw: Any) -> Entry:
    ti = tar_info(name, kind, mode=mode, **kw)
    ti.devmajor, ti.devminor = major, minor
    return ti, b""


def fifo(name: str, *, mode: int = 0o644, **kw: Any) -> Entry:
    return tar_info(name, tarfile.FIFOTYPE, mode=mode, **kw), b""


def wh(name: str) -> Entry:
    """A whiteout entry: `dir/.wh.name`, or `dir/.wh..wh..opq` for opaque."""
    return f(name)


def tar(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def apply(root: Path, *entries: Entry, mode: Whiteouts = Whiteouts.NATIVE, **kw: Any) -> Any:
    return apply_layer(io.BytesIO(tar(*entries)), root, whiteouts=mode, **kw)


# --- inspecting trees ------------------------------------------------------------------------

def describe(p: Path, *, mtime: bool = True) -> dict[str, Any]:
    st = os.lstat(p)
    rec: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                           "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISREG(st.st_mode):
        rec["size"] = st.st_size
        rec["sha"] = hashlib.sha256(p.read_bytes()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        rec["target"] = os.readlink(p)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if mtime:
        rec["mtime"] = st.st_mtime_ns
    if not stat.S_ISLNK(st.st_mode):
        rec["xattrs"] = {k: os.getxattr(p, k, follow_symlinks=False)
                         for k in sorted(os.listxattr(p, follow_symlinks=False))
                         if k.startswith("user.")}
    return rec


def listing(top: Path, *, mtime: bool = True, skip: str | None = None) -> dict[str, Any]:
    """Everything below `top` (never following symlinks), keyed by relative path."""
    out: dict[str, Any] = {".": describe(top, mtime=mtime)}
    for dirpath, dirnames, filenames in os.walk(top):
        if skip is not None and Path(dirpath) == top and skip in dirnames:
            dirnames.remove(skip)
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(top))] = describe(p, mtime=mtime)
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def overlay_mount(lowers: list[Path], work: Path) -> Iterator[Path]:
    upper, workdir, merged = work / "upper", work / "work", work / "merged"
    for p in (upper, workdir, merged):
        p.mkdir()
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={workdir}"
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount overlayfs here: {proc.stderr.strip()}", pytrace=False)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def alone_vs_native(tmp_path: Path, lower: list[Entry],
                    upper: list[Entry]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """`upper` applied alone (OVERLAY) and finished with merge_lower_dirs, then stacked on
    `lower` by real overlayfs, against both applied in place (NATIVE): (merged listing,
    native listing, directories merge_lower_dirs changed), mtimes and the roots left out."""
    l1, l2, native = tmp_path / "l1", tmp_path / "l2", tmp_path / "native"
    for p in (l1, l2, native):
        p.mkdir()
    apply(l1, *lower)  # a bottom layer has nothing to hide
    result = apply(l2, *upper, mode=Whiteouts.OVERLAY)
    changed = merge_lower_dirs(l2, l1, result.lower_dirs, result.implied_dirs)
    apply(native, *lower)
    apply(native, *upper)
    with overlay_mount([l2, l1], tmp_path) as merged:
        got = listing(merged, mtime=False)
    want = listing(native, mtime=False)
    del got["."], want["."]
    return got, want, changed

