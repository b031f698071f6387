"""Layer unpacking: tar semantics, metadata, whiteouts, hardlinks, compression, OVERLAY
mode under real overlayfs. Where entries land (symlinks on the way, what is refused):
test_unpack_paths.py. Runs as root on a real filesystem."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from shoal_snapshotter.unpack import (
    LayerFormatError,
    LowerLayerNeeded,
    UnsafeLayerError,
    Whiteouts,
    apply_layer,
)
from shoal_snapshotter.unpack.compression import ZstdFrameWalker
from shoal_snapshotter.unpack.safe_fs import CACHE_DEPTH, DirCache, remove_tree
from unpack_support import (
    MTIME,
    Entry,
    alone_vs_native,
    apply,
    d,
    dev,
    f,
    fifo,
    hl,
    listing,
    open_fds,
    overlay_mount,
    sym,
    tar,
    tar_info,
    wh,
)

pytestmark = pytest.mark.usefixtures("root")  # chown, mknod, xattrs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


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
    ti = tar_info("vol", b"V", mode=0o644)
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
    got, want, changed = alone_vs_native(tmp_path, lower, upper)
    assert changed == 3  # srv, srv/sub, etc
    assert got == want
    assert want["srv/sub"]["uid"] == 7 and want["etc"]["xattrs"] == {"user.a": b"1",
                                                                     "user.b": b"up"}
