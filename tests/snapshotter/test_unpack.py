"""Layer unpacking: tar semantics, whiteouts, compression, and a hostile corpus of layers
that try to reach outside the snapshot root. Runs as root on a real filesystem."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shoal_snapshotter.unpack import (
    LayerFormatError,
    LowerLayerNeeded,
    UnsafeLayerError,
    Whiteouts,
    apply_layer,
    merge_lower_dirs,
)
from shoal_snapshotter.unpack.compression import ZstdFrameWalker
from shoal_snapshotter.unpack.safe_fs import CACHE_DEPTH, DirCache, remove_tree

pytestmark = pytest.mark.usefixtures("root")  # chown, mknod, xattrs

MTIME = 1_600_000_000
Entry = tuple[tarfile.TarInfo, bytes]
BOTH = pytest.mark.parametrize(
    "mode", [Whiteouts.NATIVE, Whiteouts.OVERLAY], ids=["native", "overlay"])


# --- building layers -------------------------------------------------------------------------

def _info(name: str, kind: bytes, *, mode: int, uid: int = 0, gid: int = 0,
          mtime: int = MTIME, xattrs: dict[str, str] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, mtime
    ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    return ti


def f(name: str, data: bytes = b"", *, mode: int = 0o644, **kw: Any) -> Entry:
    ti = _info(name, tarfile.REGTYPE, mode=mode, **kw)
    ti.size = len(data)
    return ti, data


def d(name: str, *, mode: int = 0o755, **kw: Any) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode=mode, **kw), b""


def sym(name: str, target: str, **kw: Any) -> Entry:
    ti = _info(name, tarfile.SYMTYPE, mode=0o777, **kw)
    ti.linkname = target
    return ti, b""


def hl(name: str, target: str) -> Entry:
    ti = _info(name, tarfile.LNKTYPE, mode=0o644)
    ti.linkname = target
    return ti, b""


def dev(name: str, kind: bytes, major: int, minor: int, *, mode: int = 0o666, **kw: Any) -> Entry:
    ti = _info(name, kind, mode=mode, **kw)
    ti.devmajor, ti.devminor = major, minor
    return ti, b""


def fifo(name: str, *, mode: int = 0o644, **kw: Any) -> Entry:
    return _info(name, tarfile.FIFOTYPE, mode=mode, **kw), b""


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


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sentinel tree next to root standing in for the host (/etc and friends)."""
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (out / "sub" / "keep").write_text("keep")
    os.utime(out / "sub", ns=(MTIME * 10**9, MTIME * 10**9))
    os.utime(out, ns=(MTIME * 10**9, MTIME * 10**9))
    return out


# --- the hostile corpus ----------------------------------------------------------------------

def hostile_cases(outside: Path) -> dict[str, tuple[list[list[Entry]], str, dict[str, Any]]]:
    """name -> (layers, entry expected to be refused, apply_layer kwargs). All but the last
    layer apply cleanly; the last must raise UnsafeLayerError naming that entry."""
    o = str(outside)
    return {
        "dotdot": ([[f("../escaped", b"x")]], "../escaped", {}),
        "dotdot-inner": ([[d("a"), f("a/../../escaped", b"x")]], "a/../../escaped", {}),
        "dotdot-only": ([[d("..")]], "..", {}),
        "symlink-abs-then-write": ([[sym("a", o), f("a/passwd", b"owned")]], "a/passwd", {}),
        "symlink-rel-then-write": ([[sym("a", "../.."), f("a/escaped", b"x")]], "a/escaped", {}),
        "symlink-dotdot-then-write": ([[sym("a", ".."), f("a/escaped", b"x")]], "a/escaped", {}),
        "symlink-then-dir": ([[sym("a", o), d("a/newdir")]], "a/newdir", {}),
        "symlink-then-symlink": ([[sym("a", o), sym("a/l", "/x")]], "a/l", {}),
        "symlink-then-fifo": ([[sym("a", o), fifo("a/p")]], "a/p", {}),
        "symlink-then-device": ([[sym("a", o), dev("a/c", tarfile.CHRTYPE, 1, 3)]], "a/c", {}),
        "symlink-deep-then-write": ([[d("x"), sym("x/a", o), f("x/a/sub/keep", b"x")]],
                                    "x/a/sub/keep", {}),
        "earlier-layer-symlink": ([[sym("etc", o)], [f("etc/passwd", b"owned")]],
                                  "etc/passwd", {}),
        "symlink-swapped-for-dir": ([[d("d"), f("d/x")], [sym("d", o)], [f("d/passwd", b"x")]],
                                    "d/passwd", {}),
        "hardlink-abs-outside": ([[hl("h", f"{o}/passwd")]], "h", {}),
        "hardlink-etc-passwd-missing": ([[hl("h", "/etc/passwd")]], "h", {}),
        "hardlink-dotdot": ([[hl("h", "../outside/passwd")]], "h", {}),
        "hardlink-through-symlink": ([[sym("s", o), hl("h", "s/passwd")]], "h", {}),
        "hardlink-through-earlier-symlink": ([[sym("s", o)], [hl("h", "s/passwd")]], "h", {}),
        "hardlink-name-through-symlink": ([[sym("s", o), f("t"), hl("s/h", "t")]], "s/h", {}),
        "hardlink-to-root": ([[hl("h", "./")]], "h", {}),
        "whiteout-dotdot": ([[wh(".wh...")]], ".wh...", {}),
        "whiteout-dotdot-nested": ([[d("a"), wh("a/.wh...")]], "a/.wh...", {}),
        "whiteout-dot": ([[wh(".wh..")]], ".wh..", {}),
        "whiteout-through-symlink": ([[sym("link", o), wh("link/.wh.passwd")]],
                                     "link/.wh.passwd", {}),
        "whiteout-through-earlier-symlink": ([[sym("link", o)], [wh("link/.wh.sub")]],
                                             "link/.wh.sub", {}),
        "opaque-through-symlink": ([[sym("link", o), wh("link/.wh..wh..opq")]],
                                   "link/.wh..wh..opq", {}),
        "char-device-disallowed": ([[dev("dev/null", tarfile.CHRTYPE, 1, 3)]], "dev/null",
                                   {"allow_devices": False}),
        "block-device-disallowed": ([[dev("sda", tarfile.BLKTYPE, 8, 0)]], "sda",
                                    {"allow_devices": False}),
    }


HOSTILE = sorted(hostile_cases(Path("/x")))


@BOTH
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_layer_is_refused_and_nothing_outside_changes(
        case: str, mode: Whiteouts, root: Path, outside: Path, tmp_path: Path) -> None:
    layers, bad_entry, kwargs = hostile_cases(outside)[case]
    before = listing(tmp_path, skip="root")
    above = set(os.listdir(tmp_path.parent))
    fds = open_fds()
    for layer in layers[:-1]:
        apply(root, *layer, mode=mode, **kwargs)
    with pytest.raises(UnsafeLayerError) as info:
        apply(root, *layers[-1], mode=mode, **kwargs)
    assert info.value.entry == bad_entry
    assert repr(bad_entry) in str(info.value)
    assert listing(tmp_path, skip="root") == before
    assert set(os.listdir(tmp_path.parent)) == above
    assert os.stat(outside / "passwd").st_nlink == 1
    assert open_fds() == fds


def test_absolute_names_are_normalised_inside_root(root: Path, outside: Path) -> None:
    target = outside / "from-layer"
    apply(root, f("/etc/x", b"inside"), f(str(target), b"abs"), f("./a/./b", b"dot"),
          f("c/../d", b"lexical"), d("/"), d("./"))
    assert (root / "etc/x").read_bytes() == b"inside"
    assert (root / str(target).lstrip("/")).read_bytes() == b"abs"
    assert (root / "a/b").read_bytes() == b"dot"
    assert (root / "d").read_bytes() == b"lexical"
    assert not target.exists()
    assert not Path("/etc/x").exists() or Path("/etc/x").read_bytes() != b"inside"


def test_symlinks_pointing_outside_may_be_created(root: Path, outside: Path) -> None:
    apply(root, sym("abs", str(outside / "passwd"), uid=7, gid=8), sym("dangling", "/nope/x"),
          sym("climb", "../../../.."), d("dir"), sym("dir/rel", "../abs"))
    assert os.readlink(root / "abs") == str(outside / "passwd")
    assert os.readlink(root / "dangling") == "/nope/x"
    assert os.readlink(root / "climb") == "../../../.."
    assert os.readlink(root / "dir/rel") == "../abs"
    st = os.lstat(root / "abs")
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (7, 8, MTIME * 10**9)
    assert describe(outside / "passwd")["uid"] == 0


def test_file_over_symlink_replaces_the_link_not_its_target(root: Path, outside: Path) -> None:
    apply(root, sym("passwd", str(outside / "passwd")), sym("dir", str(outside / "sub")))
    before = listing(outside)
    apply(root, f("passwd", b"mine", mode=0o600, uid=5), d("dir", mode=0o700))
    assert (root / "passwd").read_bytes() == b"mine"
    assert (root / "dir").is_dir() and not (root / "dir").is_symlink()
    assert listing(outside) == before


def test_earlier_symlink_removed_by_whiteout_not_followed(root: Path, outside: Path) -> None:
    apply(root, sym("link", str(outside)))
    before = listing(outside)
    apply(root, wh(".wh.link"))
    assert not os.path.lexists(root / "link")
    assert listing(outside) == before


def test_whiteout_of_directory_containing_symlinks_out(root: Path, outside: Path) -> None:
    apply(root, d("var"), d("var/lib"), sym("var/lib/out", str(outside)),
          sym("var/lib/outdir", str(outside / "sub")), f("var/lib/f", b"x"))
    before = listing(outside)
    apply(root, wh("var/.wh.lib"))
    assert os.listdir(root / "var") == []
    assert listing(outside) == before


# --- metadata ---------------------------------------------------------------------------------

BINARY = b"\x00\xff\x80"


def test_modes_owners_times_and_xattrs(root: Path) -> None:
    old_umask = os.umask(0o077)  # must not leak into created modes
    try:
        result = apply(
            root,
            d("bin", mode=0o755, mtime=1000),
            f("bin/su", b"#!", mode=0o4755, uid=0, gid=0),
            f("bin/wall", b"wall", mode=0o2755, uid=1000, gid=5, mtime=2000),
            d("tmp", mode=0o1777, mtime=3000),
            d("srv", mode=0o2750, uid=33, gid=33, mtime=4000),
            f("srv/data", b"12345", mode=0o640, uid=33, gid=33,
              xattrs={"user.note": "hello", "user.bin": BINARY.decode("utf-8", "surrogateescape")}),
            f("implicit/parents/file", b"p", mode=0o600, uid=1, gid=2),
        )
    finally:
        os.umask(old_umask)
    assert (result.entries, result.bytes_written) == (7, 2 + 4 + 5 + 1)
    got = listing(root)
    assert got["bin/su"]["mode"] == "0o4755"
    assert [got["bin/wall"][k] for k in ("mode", "uid", "gid")] == ["0o2755", 1000, 5]
    assert got["tmp"]["mode"] == "0o1777"
    assert (got["srv"]["mode"], got["srv"]["uid"]) == ("0o2750", 33)
    assert got["srv/data"]["xattrs"] == {"user.bin": BINARY, "user.note": b"hello"}
    assert [got["srv/data"][k] for k in ("mode", "uid", "gid")] == ["0o640", 33, 33]
    # Directory times survive the files written into them afterwards.
    times = [got[p]["mtime"] // 10**9 for p in ("bin", "bin/wall", "tmp", "srv")]
    assert times == [1000, 2000, 3000, 4000]
    assert got["bin/su"]["mtime"] == MTIME * 10**9
    for p in ("implicit", "implicit/parents"):
        assert (got[p]["mode"], got[p]["uid"], got[p]["gid"]) == ("0o755", 0, 0)
    assert [got["implicit/parents/file"][k] for k in ("mode", "uid")] == ["0o600", 1]


def test_nanosecond_pax_times(root: Path) -> None:
    ti, data = f("f", b"x")
    ti.pax_headers.update(mtime="1600000000.123456789", atime="1500000000.5")
    dti, _ = d("dir")
    dti.pax_headers["mtime"] = "1234567890.000000001"
    apply(root, (dti, b""), (ti, data))
    st = os.stat(root / "f")
    assert (st.st_mtime_ns, st.st_atime_ns) == (1600000000123456789, 1500000000500000000)
    assert os.stat(root / "dir").st_mtime_ns == 1234567890000000001


def test_overlay_control_xattrs_from_the_layer_are_ignored(root: Path) -> None:
    apply(root, d("d", xattrs={"trusted.overlay.opaque": "y", "trusted.overlay.redirect": "/x",
                               "user.ok": "1"}), mode=Whiteouts.OVERLAY)
    names = os.listxattr(root / "d")
    assert "user.ok" in names and not [n for n in names if n.startswith("trusted.overlay.")]


def test_trusted_xattr_on_symlink_and_device(root: Path) -> None:
    apply(root, sym("l", "/t", xattrs={"trusted.label": "a"}),
          fifo("p", xattrs={"trusted.label": "b"}))
    assert os.getxattr(root / "l", "trusted.label", follow_symlinks=False) == b"a"
    assert os.getxattr(root / "p", "trusted.label", follow_symlinks=False) == b"b"


def test_devices_and_fifos(root: Path) -> None:
    apply(root, d("dev"), dev("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
          dev("dev/loop0", tarfile.BLKTYPE, 7, 0, mode=0o660, gid=6),
          fifo("dev/initctl", mode=0o600, uid=4))
    got = listing(root)
    assert (got["dev/null"]["type"], got["dev/null"]["rdev"], got["dev/null"]["mode"]) == (
        stat.S_IFCHR, (1, 3), "0o666")
    assert (got["dev/loop0"]["type"], got["dev/loop0"]["rdev"], got["dev/loop0"]["gid"]) == (
        stat.S_IFBLK, (7, 0), 6)
    assert (got["dev/initctl"]["type"], got["dev/initctl"]["mode"], got["dev/initctl"]["uid"]) == (
        stat.S_IFIFO, "0o600", 4)


def test_fifo_allowed_without_devices(root: Path) -> None:
    apply(root, fifo("p"), allow_devices=False)
    assert stat.S_ISFIFO(os.lstat(root / "p").st_mode)


# --- replacement semantics ---------------------------------------------------------------------

def test_entries_replace_existing_paths(root: Path) -> None:
    apply(root, d("a"), f("a/inner", b"1"), f("b", b"file"), d("c", mode=0o700),
          f("c/kept", b"kept"), d("e"), d("e/sub"), f("e/sub/x"))
    apply(root, f("a", b"now a file"), d("b", mode=0o750), f("b/x", b"x"),
          d("c", mode=0o755, uid=9), sym("e", "elsewhere"))
    assert (root / "a").read_bytes() == b"now a file"
    assert (root / "b/x").read_bytes() == b"x"
    assert stat.S_IMODE(os.stat(root / "b").st_mode) == 0o750
    # A directory over a directory keeps its contents and takes the new metadata.
    assert (root / "c/kept").read_bytes() == b"kept"
    st = os.stat(root / "c")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 9)
    assert os.readlink(root / "e") == "elsewhere"


def test_same_layer_replacement_invalidates_cached_directories(root: Path, outside: Path) -> None:
    # d/x is walked (and cached), then replaced by a symlink out, then written through.
    with pytest.raises(UnsafeLayerError) as info:
        apply(root, d("d"), d("d/x"), f("d/x/f"), sym("d/x", str(outside)), f("d/x/g"))
    assert info.value.entry == "d/x/g"
    assert sorted(os.listdir(outside)) == ["passwd", "sub"]


def test_whiteout_then_recreate_in_same_layer(root: Path) -> None:
    apply(root, d("d"), d("d/x"), f("d/x/old"))
    apply(root, f("d/x/f"), wh(".wh.d"), f("d/x/g", b"g"))
    assert os.listdir(root / "d/x") == ["g"]


def test_deep_paths_beyond_fd_cache(root: Path) -> None:
    deep = "/".join(f"l{i}" for i in range(CACHE_DEPTH + 40))
    fds = open_fds()
    apply(root, f(f"{deep}/a", b"a"), f(f"{deep}/b", b"b"), f("top", b"t"), f(f"{deep}/c", b"c"))
    assert sorted(os.listdir(root / deep)) == ["a", "b", "c"]
    apply(root, wh(".wh.l0"))
    assert os.listdir(root) == ["top"]
    assert open_fds() == fds


def test_dir_cache_forgets_removed_directories(root: Path) -> None:
    deep = tuple(f"l{i}" for i in range(CACHE_DEPTH + 5))
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    cache = DirCache(root_fd)
    try:
        for comps in (("a", "b"), deep):
            assert cache.get(comps, create=True, entry="x") is not None
            remove_tree(root_fd, comps[0])
            cache.invalidate(comps[:1])
            fd = cache.get(comps, create=True, entry="x")
            assert fd is not None
            os.mknod("marker", stat.S_IFIFO | 0o600, dir_fd=fd)
            assert (root.joinpath(*comps) / "marker").exists()  # not in the removed directory
        assert cache.get(("missing", "x"), create=False, entry="x") is None
    finally:
        cache.close()
        os.close(root_fd)


def test_many_files_are_fast_enough(root: Path) -> None:
    entries: list[Entry] = []
    for i in range(200):
        entries.append(d(f"pkg{i}"))
        entries.extend(f(f"pkg{i}/sub/file{j}", b"x" * j) for j in range(20))
    blob = tar(*entries)
    start = time.monotonic()
    result = apply_layer(io.BytesIO(blob), root, whiteouts=Whiteouts.NATIVE)
    assert result.entries == 200 * 21
    assert time.monotonic() - start < 20


# --- whiteouts ----------------------------------------------------------------------------------

def lower_tree() -> list[Entry]:
    return [d("etc"), f("etc/hosts", b"h"), f("etc/passwd", b"p"), d("opt"), f("opt/a", b"a"),
            d("opt/keep"), f("opt/keep/old", b"o"), d("opt/gone"), f("opt/gone/x"), d("var"),
            d("var/lib"), d("var/lib/apt"), f("var/lib/apt/lists", b"l")]


def test_native_whiteouts_delete_files_and_directories(root: Path) -> None:
    apply(root, *lower_tree())
    apply(root, wh("etc/.wh.hosts"), wh("var/.wh.lib"), wh("etc/.wh.never-existed"))
    assert sorted(os.listdir(root / "etc")) == ["passwd"]
    assert os.listdir(root / "var") == []


def test_overlay_whiteouts_are_0_0_char_devices(root: Path) -> None:
    apply(root, wh("etc/.wh.hosts"), d("var"), wh("var/.wh.lib"), mode=Whiteouts.OVERLAY)
    for p in ("etc/hosts", "var/lib"):
        st = os.lstat(root / p)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


@pytest.mark.parametrize("opq_first", [False, True], ids=["opq-last", "opq-first"])
def test_native_opaque_keeps_only_this_layers_entries(root: Path, opq_first: bool) -> None:
    apply(root, *lower_tree())
    opq = [wh("opt/.wh..wh..opq")]
    upper = [d("opt", mode=0o750), f("opt/new", b"n"), f("opt/keep/fresh", b"f")]
    apply(root, *(opq + upper if opq_first else upper + opq))
    assert sorted(os.listdir(root / "opt")) == ["keep", "new"]
    # Under an opaque directory nothing from below shows, at any depth.
    assert os.listdir(root / "opt/keep") == ["fresh"]
    assert stat.S_IMODE(os.stat(root / "opt").st_mode) == 0o750
    assert sorted(os.listdir(root / "etc")) == ["hosts", "passwd"]


def test_overlay_opaque_sets_xattr(root: Path) -> None:
    apply(root, d("opt"), f("opt/new"), wh("opt/.wh..wh..opq"), wh("implicit/.wh..wh..opq"),
          mode=Whiteouts.OVERLAY)
    assert os.getxattr(root / "opt", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(root / "implicit", "trusted.overlay.opaque") == b"y"
    assert os.listdir(root / "opt") == ["new"]


def test_aufs_metadata_is_skipped(root: Path) -> None:
    apply(root, d(".wh..wh.plnk"), f(".wh..wh.plnk/123.456", b"x"), d("a"), f("a/.wh..wh.aufs"),
          f("b"))
    assert sorted(os.listdir(root)) == ["a", "b"]
    assert os.listdir(root / "a") == []


# --- hardlinks -----------------------------------------------------------------------------------

def test_hardlinks_within_and_across_layers(root: Path, outside: Path) -> None:
    apply(root, d("bin"), f("bin/busybox", b"bb", mode=0o755), hl("bin/sh", "bin/busybox"),
          d("etc"), f("etc/passwd", b"inner"))
    assert os.stat(root / "bin/sh").st_ino == os.stat(root / "bin/busybox").st_ino
    apply(root, hl("bin/ls", "bin/busybox"), f("bin/cat", b"old"), hl("bin/cat", "/bin/busybox"),
          hl("passwd-link", "/etc/passwd"), hl("bin/self", "bin/busybox"),
          hl("bin/self", "bin/self"))
    ino = os.stat(root / "bin/busybox").st_ino
    assert {os.stat(root / p).st_ino for p in ("bin/ls", "bin/cat", "bin/self")} == {ino}
    assert os.stat(root / "bin/busybox").st_nlink == 5
    # An absolute target names the file inside root, never the host's.
    assert os.stat(root / "passwd-link").st_ino == os.stat(root / "etc/passwd").st_ino
    assert os.stat(outside / "passwd").st_nlink == 1


def test_hardlink_to_symlink_links_the_symlink(root: Path) -> None:
    apply(root, sym("s", "/etc/shadow"), hl("h", "s"))
    assert os.readlink(root / "h") == "/etc/shadow"
    assert os.lstat(root / "h").st_ino == os.lstat(root / "s").st_ino


def test_hardlink_to_directory_is_refused(root: Path) -> None:
    with pytest.raises(UnsafeLayerError):
        apply(root, d("dir"), hl("h", "dir"))


# --- compression and format ----------------------------------------------------------------------

def layer_blob() -> bytes:
    return tar(d("a"), f("a/file", b"hello" * 1000), sym("a/link", "file"))


def zstd_compress(data: bytes, frames: int = 1) -> bytes:
    import zstandard  # a dependency of the snapshotter

    step = -(-len(data) // frames)
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    return b"".join(cctx.compress(data[i:i + step]) for i in range(0, len(data), step))


@pytest.mark.parametrize("kind", ["plain", "gzip", "zstd", "zstd-multiframe"])
@pytest.mark.parametrize("explicit", [False, True], ids=["sniffed", "explicit"])
def test_compressions(root: Path, kind: str, explicit: bool) -> None:
    raw = layer_blob()
    blob = {"plain": lambda: raw, "gzip": lambda: gzip.compress(raw),
            "zstd": lambda: zstd_compress(raw),
            "zstd-multiframe": lambda: zstd_compress(raw, 3)}[kind]()
    compression = {"plain": "none", "gzip": "gzip"}.get(kind, "zstd") if explicit else None
    stream = io.BytesIO(blob)
    result = apply_layer(stream, root, whiteouts=Whiteouts.NATIVE, compression=compression)
    assert (root / "a/file").read_bytes() == b"hello" * 1000
    assert (result.entries, result.bytes_written) == (3, 5000)
    assert stream.read() == b""  # consumed to the end, e.g. for a digesting wrapper
    assert not stream.closed


def corrupt_gzip() -> bytes:
    blob = bytearray(gzip.compress(layer_blob()))
    blob[len(blob) // 2] ^= 0xFF
    return bytes(blob)


def corrupt_tar_header() -> bytes:
    blob = bytearray(layer_blob())
    at = blob.index(b"a/link\0")  # a header after the first: tarfile would stop quietly there
    blob[at + 148:at + 156] = b"0000000\0"
    return bytes(blob)


@pytest.mark.parametrize(("make", "compression"), [
    (corrupt_gzip, None),
    (lambda: gzip.compress(layer_blob())[:-20], None),
    (lambda: gzip.compress(layer_blob())[:40], None),
    (lambda: zstd_compress(layer_blob())[:-7], None),
    (lambda: zstd_compress(layer_blob(), 3)[:-1], None),
    (lambda: b"\x28\xb5\x2f\xfd" + b"\x00" * 50, None),
    (lambda: b"this is not a tar archive at all" * 40, None),
    (lambda: b"", None),
    (corrupt_tar_header, None),
    (lambda: layer_blob()[:1536 + 100], None),
    (lambda: b"\xfd7zXZ\x00" + b"\x00" * 600, None),
    (lambda: layer_blob(), "gzip"),
    (lambda: gzip.compress(layer_blob()), "lz4"),
], ids=["gzip-corrupt", "gzip-truncated", "gzip-cut-early", "zstd-truncated",
        "zstd-multiframe-truncated", "zstd-garbage", "garbage", "empty", "tar-bad-checksum",
        "tar-truncated-data", "xz", "plain-declared-gzip", "unknown-compression"])
def test_format_errors(root: Path, make: Any, compression: str | None) -> None:
    fds = open_fds()
    with pytest.raises(LayerFormatError):
        apply_layer(io.BytesIO(make()), root, whiteouts=Whiteouts.NATIVE, compression=compression)
    assert open_fds() == fds


def test_zstd_frame_walker_accepts_skippable_frames() -> None:
    body = zstd_compress(b"payload" * 100)
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    walker = ZstdFrameWalker()
    stream = skippable + body + body
    for i in range(0, len(stream), 7):  # header fields split across reads
        walker.feed(stream[i:i + 7])
    walker.finish()
    assert walker.frames == 2


def test_unsupported_entry_type(root: Path) -> None:
    ti = _info("vol", b"V", mode=0o644)
    with pytest.raises(LayerFormatError):
        apply(root, (ti, b""))


def test_write_below_a_regular_file_is_a_format_error(root: Path) -> None:
    with pytest.raises(LayerFormatError):
        apply(root, f("file"), f("file/child"))


# --- real overlayfs: OVERLAY layers stacked by the kernel == NATIVE layers applied in place ------

def overlay_layers() -> tuple[list[Entry], list[Entry]]:
    lower = [
        d("etc", mtime=100), f("etc/passwd", b"root\n", mtime=101),
        f("etc/hosts", b"127.0.0.1\n", xattrs={"user.origin": "base"}),
        d("usr", mtime=102), d("usr/bin", mtime=103),
        f("usr/bin/tool", b"\x7fELF", mode=0o4755, uid=1000),
        hl("usr/bin/tool2", "usr/bin/tool"), sym("usr/bin/sh", "tool"),
        d("opt", mtime=104), f("opt/a", b"a"), d("opt/keep", mtime=105), f("opt/keep/old", b"old"),
        d("opt/sub"), f("opt/sub/c", b"c"),
        d("var", mtime=106), d("var/lib"), f("var/lib/db", b"db"),
        d("x", mtime=107), f("x/y", b"y"), f("z", b"z"),
        d("dev", mtime=108), dev("dev/null", tarfile.CHRTYPE, 1, 3), fifo("dev/fifo"),
    ]
    upper = [
        d("etc", mtime=200), wh("etc/.wh.hosts"),
        f("etc/passwd", b"root\nuser\n", mode=0o600, mtime=201),
        d("opt", mode=0o750, mtime=202), f("opt/new", b"new"), d("opt/keep", mtime=203),
        f("opt/keep/fresh", b"f"), wh("opt/.wh..wh..opq"),
        d("var", mtime=204), wh("var/.wh.lib"),
        d("usr", mtime=205), d("usr/bin", mtime=206), sym("usr/bin/sh", "tool2"),
        f("usr/bin/new", b"n", xattrs={"user.v": "2"}), hl("usr/bin/new2", "usr/bin/new"),
        f("x", b"x is a file now"), d("z", mode=0o700, mtime=207), f("z/w", b"w"),
        d("newdir", uid=5, gid=5, mtime=208), f("newdir/file", b"nf", uid=5),
        d("dev", mtime=209), wh("dev/.wh.fifo"),
    ]
    return lower, upper


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


def test_overlay_mode_matches_native_under_real_overlayfs(tmp_path: Path) -> None:
    lower, upper = overlay_layers()
    l1, l2, native = tmp_path / "l1", tmp_path / "l2", tmp_path / "native"
    for p in (l1, l2, native):
        p.mkdir()
    apply(l1, *lower, mode=Whiteouts.OVERLAY)
    apply(l2, *upper, mode=Whiteouts.OVERLAY)
    apply(native, *lower)
    apply(native, *upper)
    with overlay_mount([l2, l1], tmp_path) as merged:
        got = listing(merged)
    want = listing(native)
    del got["."], want["."]  # the mount points themselves
    assert got == want
    assert "etc/hosts" not in want and "var/lib" not in want and "dev/fifo" not in want
    assert sorted(p for p in want if p.startswith("opt/")) == [
        "opt/keep", "opt/keep/fresh", "opt/new"]


# --- OVERLAY mode on a layer's own: what it defers to the lower layers -------------------------

def test_overlay_mode_defers_what_needs_lower_layers(root: Path, outside: Path) -> None:
    cases = {
        "hardlink to a file of a lower layer": [hl("h", "etc/passwd")],
        "hardlink through a directory of a lower layer": [d("x"), hl("x/h", "usr/bin/sh")],
        "hardlink to a name this layer whited out": [f("t"), wh(".wh.t"), hl("h", "t")],
        "opaque root": [wh(".wh..wh..opq"), f("kept")],
    }
    for what, entries in cases.items():
        layer = root / what.replace(" ", "-")
        layer.mkdir()
        with pytest.raises(LowerLayerNeeded) as info:
            apply(layer, *entries, mode=Whiteouts.OVERLAY)
        assert info.value.entry == entries[-1][0].name or what == "opaque root", what
        assert isinstance(info.value, UnsafeLayerError)  # refused by callers that don't retry
    # Onto the merged tree the same hardlink is plainly unsafe, or fine.
    (root / "native").mkdir()
    with pytest.raises(UnsafeLayerError) as unsafe:
        apply(root / "native", hl("h", "etc/passwd"), mode=Whiteouts.NATIVE)
    assert not isinstance(unsafe.value, LowerLayerNeeded)
    assert os.stat(outside / "passwd").st_nlink == 1


def test_overlay_mode_tracks_directories_that_keep_lower_metadata(root: Path) -> None:
    result = apply(root, f("a/b/f"), d("c", mode=0o700), f("c/x"), d("a"),
                   f("gone/x"), wh(".wh.gone"), f("gone/y"),
                   f("opq/sub/z"), wh("opq/.wh..wh..opq"), f("opq/late/z"),
                   wh(".wh.re"), d("re"), f("file"), d("file"), mode=Whiteouts.OVERLAY)
    # True: implied (owner, mode, xattrs from below); False: listed (xattrs from below).
    assert result.lower_dirs == {("a",): False, ("a", "b"): True, ("c",): False,
                                 ("opq",): True, ("opq", "sub"): True}
    # Made where this layer deleted something: opaque, like the kernel's mkdir over a whiteout.
    for opaque in ("gone", "re", "file", "opq"):
        assert os.getxattr(root / opaque, "trusted.overlay.opaque") == b"y", opaque
    for plain in ("a", "a/b", "c", "opq/sub", "opq/late"):
        assert "trusted.overlay.opaque" not in os.listxattr(root / plain), plain


def test_layer_alone_plus_lower_metadata_matches_native_under_real_overlayfs(
        tmp_path: Path) -> None:
    lower = [d("srv", mode=0o750, uid=5, gid=6, xattrs={"user.t": "low"}), f("srv/old"),
             d("srv/sub", mode=0o700, uid=7), f("srv/sub/x"),
             d("etc", xattrs={"user.a": "1", "user.b": "2"}), f("etc/conf"),
             d("gone", mode=0o711), f("gone/f"), d("re", mode=0o700), f("re/lower"),
             f("file"), sym("link", "srv")]
    upper = [f("srv/sub/new"), d("etc", xattrs={"user.b": "up"}), f("etc/more"),
             wh(".wh.gone"), f("gone/again"), wh(".wh.re"), d("re", mode=0o755),
             f("re/new"), d("file", mode=0o700), f("file/in"), d("link"), f("link/in")]
    l1, l2, native = tmp_path / "l1", tmp_path / "l2", tmp_path / "native"
    for p in (l1, l2, native):
        p.mkdir()
    apply(l1, *lower, mode=Whiteouts.NATIVE)  # a bottom layer has nothing to hide
    result = apply(l2, *upper, mode=Whiteouts.OVERLAY)
    assert merge_lower_dirs(l2, l1, result.lower_dirs) == 3  # srv, srv/sub, etc
    apply(native, *lower)
    apply(native, *upper)
    with overlay_mount([l2, l1], tmp_path) as merged:
        got = listing(merged, mtime=False)
    want = listing(native, mtime=False)
    del got["."], want["."]
    assert got == want
    assert want["srv/sub"]["uid"] == 7 and want["etc"]["xattrs"] == {"user.a": b"1",
                                                                     "user.b": b"up"}


def test_implied_directory_over_a_lower_file_needs_the_lower_layers(tmp_path: Path) -> None:
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    l1.mkdir()
    l2.mkdir()
    apply(l1, f("etc"), sym("usr", "/usr"))
    for entry in ("etc/x", "usr/lib/x"):
        result = apply(l2, f(entry), mode=Whiteouts.OVERLAY)
        with pytest.raises(LowerLayerNeeded) as info:
            merge_lower_dirs(l2, l1, result.lower_dirs)
        assert info.value.entry == entry.split("/")[0]
