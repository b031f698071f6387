"""A usrmerge image through every unpack path, against the tree containerd's rule gives.

The base layer has `bin -> usr/bin`, `lib -> usr/lib`, `lib64 -> /usr/lib64` (absolute),
`sbin -> ../usr/sbin` (`..` past the root) and `evil -> ../../../../tmp` (pointing out of
the snapshot); the next layer writes through them, and through symlinks of its own. Each
entry lands where its parent path resolves with symlinks followed inside the root
(containerd's `fs.RootPath` in `archive.applyNaive`): `evil/pwned` lands at `tmp/pwned`
inside the root, as containerd puts it, rather than being refused (moby would refuse the
`evil` symlink itself). The expected tree is written out here from that rule; overlayfs
applied in parallel (each layer alone, falling back to the sequential way for the layer
that goes through a lower layer's symlink), overlayfs sequential and native must give
exactly it, and so must umoci (an independent unpacker: filepath-securejoin) when it is
installed. Nothing may appear outside the snapshots: `../../../../tmp` from a snapshot's
`fs/` is the sentinel directory `tmp_path/tmp`, and `escape` points at it absolutely.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from shoal_snapshotter.domain import metrics
from snapshotter_support import UNPACK_PATHS, open_domain, tree
from support.images import Image, Layer, LayerBuilder, build_image

pytestmark = pytest.mark.usefixtures("root")  # mounts, chown

# Host paths the absolute symlinks would reach if they were followed outside the root.
HOST_PATHS = ("/usr/lib64/ld.so", "/usr/local/shoal-share")


def usrmerge_layers(sentinel: Path) -> list[Layer]:
    base = (LayerBuilder(sort=False)
            .dir("etc").file("etc/os-release", "ID=shoal\n")
            .dir("usr").dir("usr/bin").dir("usr/lib").dir("usr/lib/x86_64-linux-gnu")
            .dir("usr/lib64").file("usr/bin/sh", "sh", mode=0o755)
            .file("usr/lib/libc.so.6", "libc").file("usr/lib/libold.so", "old")
            .symlink("bin", "usr/bin").symlink("lib", "usr/lib").symlink("lib64", "/usr/lib64")
            .symlink("sbin", "../usr/sbin").symlink("evil", "../../../../tmp"))
    top = (LayerBuilder(sort=False)
           # through the base layer's symlinks
           .file("lib/libfoo.so", "foo").file("lib/x86_64-linux-gnu/libbar.so.1", "bar")
           .hardlink("lib/libfoo.so.1", "lib/libfoo.so").whiteout("lib/libold.so")
           .file("bin/tool", "tool", mode=0o755).file("lib64/ld.so", "ld", mode=0o755)
           .file("sbin/init", "init", mode=0o755).file("evil/pwned", "clamped")
           # through this layer's own symlinks
           .symlink("libexec", "usr/libexec").file("libexec/helper", "h", mode=0o755)
           .symlink("local", "/usr/local").dir("local/shoal-share", mode=0o750)
           .symlink("escape", str(sentinel)).file("escape/pwned", "clamped too"))
    plain = LayerBuilder().file("etc/motd", "hi").file("usr/bin/tool3", "t3", mode=0o755)
    return [base.build(), top.build(), plain.build(compression=None)]


def _rec(kind: int, mode: int, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "mode": oct(mode), "uid": 0, "gid": 0, "xattrs": {}, **extra}


def expected_tree(sentinel: Path) -> dict[str, dict[str, Any]]:
    """What containerd gives for usrmerge_layers, in snapshotter_support.tree's form (root
    itself left out): every entry at its parent path resolved inside the root; directories
    made on the way are 0755 root:root."""
    def d(mode: int = 0o755) -> dict[str, Any]:
        return _rec(stat.S_IFDIR, mode)

    def f(content: str, mode: int = 0o644) -> dict[str, Any]:
        return _rec(stat.S_IFREG, mode, sha256=hashlib.sha256(content.encode()).hexdigest())

    def ln(target: str) -> dict[str, Any]:
        return _rec(stat.S_IFLNK, 0o777, target=target)

    want = {
        "bin": ln("usr/bin"), "lib": ln("usr/lib"), "lib64": ln("/usr/lib64"),
        "sbin": ln("../usr/sbin"), "evil": ln("../../../../tmp"), "libexec": ln("usr/libexec"),
        "local": ln("/usr/local"), "escape": ln(str(sentinel)),
        "etc": d(), "etc/os-release": f("ID=shoal\n"), "etc/motd": f("hi"),
        "usr": d(), "usr/bin": d(), "usr/bin/sh": f("sh", 0o755),
        "usr/bin/tool": f("tool", 0o755), "usr/bin/tool3": f("t3", 0o755),
        "usr/lib": d(), "usr/lib/libc.so.6": f("libc"), "usr/lib/libfoo.so": f("foo"),
        "usr/lib/libfoo.so.1": f("foo"),  # usr/lib/libold.so: whited out through `lib`
        "usr/lib/x86_64-linux-gnu": d(), "usr/lib/x86_64-linux-gnu/libbar.so.1": f("bar"),
        "usr/lib64": d(), "usr/lib64/ld.so": f("ld", 0o755),
        "usr/sbin": d(), "usr/sbin/init": f("init", 0o755),
        "usr/libexec": d(), "usr/libexec/helper": f("h", 0o755),
        "usr/local": d(), "usr/local/shoal-share": d(0o750),
        "tmp": d(), "tmp/pwned": f("clamped"),
    }
    inside = Path(str(sentinel).lstrip("/"))
    for parent in inside.parents[:-1]:
        want[str(parent)] = d()
    want[str(inside)] = d()
    want[str(inside / "pwned")] = f("clamped too")
    for path, rec in want.items():
        if rec["type"] != stat.S_IFDIR:
            rec["link_of"] = path
    want["usr/lib/libfoo.so.1"]["link_of"] = "usr/lib/libfoo.so"
    return want


def _host_state() -> dict[str, tuple[int, int, int] | None]:
    out: dict[str, tuple[int, int, int] | None] = {}
    for path in HOST_PATHS:
        try:
            st = os.lstat(path)
            out[path] = (st.st_ino, st.st_mode, st.st_mtime_ns)
        except FileNotFoundError:
            out[path] = None
    return out


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """Where `../../../../tmp` from a snapshot's fs/ (tmp_path/state-*/snapshots/<id>/fs)
    would lead if followed outside the root."""
    path = tmp_path / "tmp"
    path.mkdir()
    (path / "keep").write_text("keep")
    return path


async def test_usrmerge_image_gives_containerds_tree_on_every_path(
        tmp_path: Path, sentinel: Path) -> None:
    layers = usrmerge_layers(sentinel)
    want = expected_tree(sentinel)
    host = _host_state()
    for name, driver, workers, process_min in UNPACK_PATHS:
        reapplied = metrics.LAYERS_REAPPLIED._value.get()  # type: ignore[attr-defined]
        async with open_domain(tmp_path / f"state-{name}", driver, workers=workers,
                               process_min_bytes=process_min) as d:
            reply = await d.unpack("usrmerge", layers)
            assert reply.unpacked == 3, name
            got = await d.tree_of(reply.chain_id)
            assert await d.snapshots.list_snapshots(kind="active") == []
        del got["."]
        assert got == want, name
        # Parallel: the top layer goes through the base layer's symlinks, so it is applied
        # again onto its parents; the others are applied alone.
        again = metrics.LAYERS_REAPPLIED._value.get() - reapplied  # type: ignore[attr-defined]
        assert again == (1 if name == "parallel" else 0), name
    assert sorted(os.listdir(sentinel)) == ["keep"]
    assert _host_state() == host


def write_oci_layout(image: Image, layout: Path, tag: str) -> None:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for digest, data in [*image.blobs(), (image.digest, image.manifest_bytes)]:
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    manifest = image.descriptor() | {
        "annotations": {"org.opencontainers.image.ref.name": tag}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                   "manifests": [manifest]}))


def test_umoci_unpacks_the_usrmerge_image_to_the_same_tree(
        tmp_path: Path, sentinel: Path) -> None:
    """An independent unpacker agrees with the expected tree (so with the drivers, above)."""
    umoci = shutil.which("umoci")
    if umoci is None:
        pytest.skip("umoci is not installed (Debian package umoci): the comparison with an "
                    "independent unpacker is skipped; the drivers' test above still runs")
    layout = tmp_path / "layout"
    write_oci_layout(build_image(usrmerge_layers(sentinel)), layout, "latest")
    # rootfs at the same depth below tmp_path as a snapshot's fs/, so `../../../../tmp`
    # would reach the same sentinel.
    bundle = tmp_path / "umoci" / "unpack" / "bundle"
    bundle.parent.mkdir(parents=True)
    host = _host_state()
    proc = subprocess.run([umoci, "unpack", "--image", f"{layout}:latest", str(bundle)],
                          capture_output=True, text=True, umask=0o022, check=False)
    assert proc.returncode == 0, proc.stderr
    got = tree(bundle / "rootfs")
    del got["."]
    assert got == expected_tree(sentinel)
    assert sorted(os.listdir(sentinel)) == ["keep"]
    assert _host_state() == host
