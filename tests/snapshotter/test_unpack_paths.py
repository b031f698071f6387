"""Where layer entries land, and that nothing outside the root is ever touched.

Names are normalised inside the root; symlinks on the way to an entry's directory, made by
an earlier entry or an earlier layer, are followed inside the root, as containerd
(`fs.RootPath`) and moby (a chrooted unpack) do: usrmerge images have `lib -> usr/lib` in
a base layer and later layers writing `lib/...`. A symlink pointing outside (absolute, or
`..` past the root) leads to the same path inside the root. What would still reach outside
(a name or hardlink climbing out with `..`) is refused, and so are devices where not
allowed. Every case checks the sentinel tree next to the root. Runs as root.
"""

from __future__ import annotations

import os
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
    merge_lower_dirs,
)
from unpack_support import (
    BOTH,
    MTIME,
    Entry,
    alone_vs_native,
    apply,
    d,
    describe,
    dev,
    f,
    fifo,
    hl,
    listing,
    open_fds,
    sym,
    wh,
)

pytestmark = pytest.mark.usefixtures("root")  # chown, mknod, xattrs, mounts


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


class Sentinel:
    """What is next to the root (and above it) before a case, to compare with after."""

    def __init__(self, tmp_path: Path, outside: Path) -> None:
        self.tmp_path, self.outside = tmp_path, outside
        self.before = listing(tmp_path, skip="root")
        self.above = set(os.listdir(tmp_path.parent))
        self.fds = open_fds()

    def unchanged(self) -> None:
        assert listing(self.tmp_path, skip="root") == self.before
        assert set(os.listdir(self.tmp_path.parent)) == self.above
        assert os.stat(self.outside / "passwd").st_nlink == 1
        assert open_fds() == self.fds


# --- refused: climbing out by name, and policy ---------------------------------------------

def refused_cases(outside: Path) -> dict[str, tuple[list[list[Entry]], str, dict[str, Any]]]:
    """name -> (layers, entry expected to be refused, apply_layer kwargs). All but the last
    layer apply cleanly; the last must raise UnsafeLayerError naming that entry."""
    o = str(outside)
    return {
        "dotdot": ([[f("../escaped", b"x")]], "../escaped", {}),
        "dotdot-inner": ([[d("a"), f("a/../../escaped", b"x")]], "a/../../escaped", {}),
        "dotdot-only": ([[d("..")]], "..", {}),
        "dotdot-after-symlink": ([[sym("a", "x"), f("a/../../escaped", b"x")]],
                                 "a/../../escaped", {}),  # names are cleaned first
        "hardlink-abs-outside": ([[hl("h", f"{o}/passwd")]], "h", {}),
        "hardlink-etc-passwd-missing": ([[hl("h", "/etc/passwd")]], "h", {}),
        "hardlink-dotdot": ([[hl("h", "../outside/passwd")]], "h", {}),
        # the target's directory is followed inside the root, where there is no passwd
        "hardlink-through-symlink": ([[sym("s", o), hl("h", "s/passwd")]], "h", {}),
        "hardlink-through-earlier-symlink": ([[sym("s", o)], [hl("h", "s/passwd")]], "h", {}),
        "hardlink-through-dotdot-symlink": ([[sym("s", "../outside"), hl("h", "s/passwd")]],
                                            "h", {}),
        "hardlink-to-root": ([[hl("h", "./")]], "h", {}),
        "whiteout-dotdot": ([[wh(".wh...")]], ".wh...", {}),
        "whiteout-dotdot-nested": ([[d("a"), wh("a/.wh...")]], "a/.wh...", {}),
        "whiteout-dot": ([[wh(".wh..")]], ".wh..", {}),
        "char-device-disallowed": ([[dev("dev/null", tarfile.CHRTYPE, 1, 3)]], "dev/null",
                                   {"allow_devices": False}),
        "block-device-disallowed": ([[dev("sda", tarfile.BLKTYPE, 8, 0)]], "sda",
                                    {"allow_devices": False}),
        "device-through-symlink-disallowed": (
            [[sym("a", o), dev("a/null", tarfile.CHRTYPE, 1, 3)]], "a/null",
            {"allow_devices": False}),
    }


REFUSED = sorted(refused_cases(Path("/x")))


@BOTH
@pytest.mark.parametrize("case", REFUSED)
def test_what_climbs_out_is_refused_and_nothing_outside_changes(
        case: str, mode: Whiteouts, root: Path, outside: Path, tmp_path: Path) -> None:
    layers, bad_entry, kwargs = refused_cases(outside)[case]
    sentinel = Sentinel(tmp_path, outside)
    for layer in layers[:-1]:
        apply(root, *layer, mode=mode, **kwargs)
    with pytest.raises(UnsafeLayerError) as info:
        apply(root, *layers[-1], mode=mode, **kwargs)
    assert info.value.entry == bad_entry
    assert repr(bad_entry) in str(info.value)
    sentinel.unchanged()


# --- followed inside the root: symlinks on the way, wherever they point ----------------------

def followed_cases(outside: Path) -> dict[str, tuple[list[list[Entry]], str]]:
    """name -> (layers, where the last entry lands below root). An absolute target starts
    again at the root; `..` at the root stays there."""
    o = str(outside)
    inside = o.lstrip("/")
    return {
        "symlink-abs-then-write": ([[sym("a", o), f("a/passwd", b"owned")]], f"{inside}/passwd"),
        "symlink-rel-then-write": ([[sym("a", "../.."), f("a/escaped", b"x")]], "escaped"),
        "symlink-dotdot-then-write": ([[sym("a", ".."), f("a/escaped", b"x")]], "escaped"),
        "symlink-abs-dotdot": ([[sym("a", f"/../..{o}"), f("a/passwd", b"x")]],
                               f"{inside}/passwd"),
        "symlink-deep-rel-escape": (
            [[d("x"), d("x/y"), sym("x/y/up", "../../../../../../tmp"), f("x/y/up/pwned")]],
            "tmp/pwned"),
        "symlink-then-dir": ([[sym("a", o), d("a/newdir")]], f"{inside}/newdir"),
        "symlink-then-symlink": ([[sym("a", o), sym("a/l", "/x")]], f"{inside}/l"),
        "symlink-then-fifo": ([[sym("a", o), fifo("a/p")]], f"{inside}/p"),
        "symlink-then-device": ([[sym("a", o), dev("a/c", tarfile.CHRTYPE, 1, 3)]],
                                f"{inside}/c"),
        "symlink-deep-then-write": ([[d("x"), sym("x/a", o), f("x/a/sub/keep", b"x")]],
                                    f"{inside}/sub/keep"),
        "symlink-chain": ([[sym("a", "b/c"), sym("b", o), f("a/f", b"x")]], f"{inside}/c/f"),
        "earlier-layer-symlink": ([[sym("etc", o)], [f("etc/passwd", b"owned")]],
                                  f"{inside}/passwd"),
        "symlink-swapped-for-dir": ([[d("d"), f("d/x")], [sym("d", o)], [f("d/passwd", b"x")]],
                                    f"{inside}/passwd"),
        "hardlink-name-through-symlink": ([[sym("s", o), f("t"), hl("s/h", "t")]],
                                          f"{inside}/h"),
        "whiteout-through-symlink": ([[sym("link", o), wh("link/.wh.passwd")]], inside),
        "whiteout-through-earlier-symlink": ([[sym("link", o)], [wh("link/.wh.sub")]], inside),
        "opaque-through-symlink": ([[sym("link", o), wh("link/.wh..wh..opq")]], inside),
    }


FOLLOWED = sorted(followed_cases(Path("/x")))


@BOTH
@pytest.mark.parametrize("case", FOLLOWED)
def test_symlinks_on_the_way_are_followed_inside_the_root(
        case: str, mode: Whiteouts, root: Path, outside: Path, tmp_path: Path) -> None:
    layers, lands = followed_cases(outside)[case]
    sentinel = Sentinel(tmp_path, outside)
    for layer in layers:
        apply(root, *layer, mode=mode)
    assert os.path.lexists(root / lands)
    sentinel.unchanged()


@BOTH
@pytest.mark.parametrize("target", ["usr/lib", "/usr/lib", "../usr/lib", "./usr/../usr/lib/"])
def test_usrmerge_symlink_of_the_same_layer(root: Path, mode: Whiteouts, target: str) -> None:
    result = apply(root, d("usr"), d("usr/lib", mode=0o700), sym("lib", target),
                   f("lib/x86_64-linux-gnu/libfoo.so", b"foo"),
                   hl("lib/libfoo.so.1", "lib/x86_64-linux-gnu/libfoo.so"), mode=mode)
    assert sorted(os.listdir(root)) == ["lib", "usr"]
    assert os.readlink(root / "lib") == target
    libfoo = root / "usr/lib/x86_64-linux-gnu/libfoo.so"
    assert libfoo.read_bytes() == b"foo"
    assert os.stat(root / "usr/lib/libfoo.so.1").st_ino == os.stat(libfoo).st_ino
    # Made for the entry where the symlink leads, as containerd's mkparent does.
    assert describe(libfoo.parent)["mode"] == "0o755" and describe(libfoo.parent)["uid"] == 0
    assert describe(root / "usr/lib")["mode"] == "0o700"  # listed: written into, not remade
    if mode is Whiteouts.OVERLAY:
        assert ("usr", "lib", "x86_64-linux-gnu") in result.implied_dirs


def test_usrmerge_directory_entry_replaces_the_symlink(root: Path) -> None:
    # `lib/` names the symlink itself, which is never followed: a directory replaces it,
    # as in containerd and moby (an image doing this breaks its own usrmerge).
    apply(root, d("usr"), d("usr/lib"), sym("lib", "usr/lib"), d("lib/", mode=0o750),
          f("lib/libfoo.so", b"foo"))
    assert (root / "lib").is_dir() and not (root / "lib").is_symlink()
    assert (root / "lib/libfoo.so").read_bytes() == b"foo"
    assert os.listdir(root / "usr/lib") == []


@BOTH
def test_dotdot_in_a_target_climbs_from_the_real_directory(root: Path, mode: Whiteouts) -> None:
    # s/f resolves as the kernel (so the container) resolves it: a = x/y, `..` of that is x.
    apply(root, d("x"), d("x/y"), sym("a", "x/y"), sym("s", "a/../z"), f("s/f", b"f"),
          mode=mode)
    assert (root / "x/z/f").read_bytes() == b"f"
    assert not (root / "z").exists()


def test_dotdot_out_of_a_missing_directory(tmp_path: Path) -> None:
    entries = [sym("s", "gone/../z"), f("s/f", b"f")]
    native, overlay = tmp_path / "native", tmp_path / "overlay"
    native.mkdir()
    overlay.mkdir()
    apply(native, *entries)
    # Nothing is there, so nothing can be a symlink: taken as a directory, not made.
    assert (native / "z/f").read_bytes() == b"f"
    assert not (native / "gone").exists()
    # Alone in an upper dir, a lower layer may have a symlink at `gone`: that decides.
    with pytest.raises(LowerLayerNeeded) as info:
        apply(overlay, *entries, mode=Whiteouts.OVERLAY)
    assert info.value.entry == "s/f"


@BOTH
def test_symlink_loops_and_blowups_are_format_errors(root: Path, mode: Whiteouts) -> None:
    cases = {
        "loop": [sym("a", "b"), sym("b", "a"), f("a/f")],
        "self": [sym("a", "a/x"), f("a/f")],
        "growing": [sym("a", "/".join(["a"] * 1000)), f("a/f")],
    }
    for name, entries in cases.items():
        layer = root / name
        layer.mkdir()
        started = time.monotonic()
        with pytest.raises(LayerFormatError, match="'a/f'"):
            apply(layer, *entries, mode=mode)
        assert time.monotonic() - started < 2, name


def test_same_layer_replacement_invalidates_cached_directories(root: Path, outside: Path) -> None:
    # d/x is walked (and cached), then replaced by a symlink out, then written through: the
    # write follows the new symlink, inside the root, not the directory cached before.
    apply(root, d("d"), d("d/x"), f("d/x/f"), sym("d/x", str(outside)), f("d/x/g", b"g"))
    assert os.readlink(root / "d/x") == str(outside)
    assert (root / str(outside).lstrip("/") / "g").read_bytes() == b"g"
    assert sorted(os.listdir(outside)) == ["passwd", "sub"]


# --- OVERLAY mode alone: what the lower layers decide ------------------------------------------

def test_a_path_through_a_lower_non_directory_needs_the_lower_layers(tmp_path: Path) -> None:
    """Onto the merged tree the entry goes through the lower symlink (or is refused by the
    lower file); a directory the layer implies there must not hide that, even if a later
    entry lists or replaces it."""
    lower = tmp_path / "lower"
    lower.mkdir()
    apply(lower, d("usr"), d("usr/lib"), sym("lib", "usr/lib"), f("etc"), sym("opt", "/usr"))
    cases = {
        "implied": ([f("lib/libfoo.so")], "lib"),
        "listed-after": ([f("lib/libfoo.so"), d("lib")], "lib"),
        "replaced-after": ([f("lib/libfoo.so"), sym("lib", "usr/lib64")], "lib"),
        "whited-out-after": ([f("lib/libfoo.so"), wh(".wh.lib")], "lib"),
        "under-a-lower-file": ([f("etc/x")], "etc"),
        "deeper": ([f("opt/lib/x")], "opt"),
    }
    for name, (entries, where) in cases.items():
        upper = tmp_path / name
        upper.mkdir()
        result = apply(upper, *entries, mode=Whiteouts.OVERLAY)
        with pytest.raises(LowerLayerNeeded) as info:
            merge_lower_dirs(upper, lower, result.lower_dirs, result.implied_dirs)
        assert info.value.entry == where, name
    # Applied onto the merged tree instead: written through the symlink, which the
    # directory entry then replaces (as containerd does).
    native = tmp_path / "native"
    native.mkdir()
    apply(native, d("usr"), d("usr/lib"), sym("lib", "usr/lib"))
    apply(native, f("lib/libfoo.so", b"foo"), d("lib"))
    assert (native / "usr/lib/libfoo.so").read_bytes() == b"foo"
    assert (native / "lib").is_dir() and os.listdir(native / "lib") == []


def test_same_layer_symlinks_alone_match_native_under_real_overlayfs(tmp_path: Path) -> None:
    lower = [d("usr", mode=0o750, uid=3), d("usr/lib", xattrs={"user.l": "low"}),
             f("usr/lib/libc.so", b"c"), d("var")]
    upper = [sym("lib", "usr/lib"), sym("lib64", "/usr/lib64"), sym("sbin", "../usr/sbin"),
             f("lib/libfoo.so", b"foo"), f("lib64/ld.so", b"ld", mode=0o755),
             f("sbin/init", b"init", mode=0o755), hl("lib/libfoo.so.1", "lib/libfoo.so"),
             sym("run", "/../../var/run"), d("run/lock", mode=0o1777), wh("lib/.wh.libc.so")]
    got, want, _ = alone_vs_native(tmp_path, lower, upper)  # no LowerLayerNeeded
    assert got == want
    assert sorted(p for p in want if p.startswith("usr/lib/")) == [
        "usr/lib/libfoo.so", "usr/lib/libfoo.so.1"]
    assert (want["usr"]["mode"], want["usr"]["uid"]) == ("0o750", 3)  # kept from below
    assert want["usr/lib"]["xattrs"] == {"user.l": b"low"}
    assert want["var/run/lock"]["mode"] == "0o1777"


# --- names and the symlinks themselves -------------------------------------------------------

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
