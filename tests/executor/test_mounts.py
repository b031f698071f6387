"""Rootfs mounts through mount(2): overlay and read-only bind, errors, unmount."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from shoal_common.errors import Internal, Invalid
from shoal_common.messages.snapshots import Mount
from shoal_executor.domain import mounts

pytestmark = pytest.mark.usefixtures("root")


async def test_overlay_rootfs_mounts_and_unmounts(tmp_path: Path) -> None:
    lower, upper, work, target = (tmp_path / n for n in ("lower", "upper", "work", "rootfs"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "from-lower").write_text("l")
    await mounts.mount_all([Mount(type="overlay", source="overlay", options=[
        f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"])], str(target))
    assert mounts.is_mountpoint(str(target))
    (target / "written").write_text("w")
    assert (upper / "written").read_text() == "w"
    assert (target / "from-lower").read_text() == "l"
    # Idempotent: a retried create keeps the existing mount.
    await mounts.mount_all([Mount(type="overlay", source="overlay", options=[])], str(target))
    await mounts.unmount(str(target))
    assert not mounts.is_mountpoint(str(target))
    await mounts.unmount(str(target))  # nothing mounted: a no-op


def mounted_at(path: Path) -> int:
    return sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split()[4] == str(path).replace(" ", "\\040"))


async def test_read_only_bind_rootfs(tmp_path: Path) -> None:
    """A bind mount from the same filesystem (the native driver's rootfs), in a path with a
    space: seen as mounted, mounted once, unmounted."""
    source, target = tmp_path / "snap", tmp_path / "root fs"
    source.mkdir()
    (source / "f").write_text("x")
    bind = [Mount(type="bind", source=str(source), options=["rbind", "ro"])]
    await mounts.mount_all(bind, str(target))
    try:
        assert mounts.is_mountpoint(str(target))
        await mounts.mount_all(bind, str(target))  # a retried create does not stack another
        assert mounted_at(target) == 1
        assert (target / "f").read_text() == "x"
        with pytest.raises(OSError) as err:
            (target / "g").write_text("y")
        assert err.value.errno == errno.EROFS
    finally:
        await mounts.unmount(str(target))
    assert mounted_at(target) == 0
    assert not mounts.is_mountpoint(str(target))


async def test_bad_mounts_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(Invalid, match="unsupported rootfs mount type 'nfs'"):
        await mounts.mount_all([Mount(type="nfs", source="x", options=[])],
                               str(tmp_path / "a"))
    with pytest.raises(Internal, match=r"mounting the rootfs at .*/b: mount overlay"):
        await mounts.mount_all([Mount(type="overlay", source="overlay", options=[
            f"lowerdir={tmp_path}/missing"])], str(tmp_path / "b"))
    assert not mounts.is_mountpoint(str(tmp_path / "b"))
    # The pod's /dev/shm.
    shm = tmp_path / "shm"
    shm.mkdir()
    mounts.mount_tmpfs(str(shm), ["nosuid", "nodev", "noexec", "mode=1777", "size=1m"])
    try:
        assert oct(shm.stat().st_mode & 0o7777) == "0o1777"
        opts = next(line.split()[3] for line in Path("/proc/self/mounts").read_text()
                    .splitlines() if line.split()[1] == str(shm))
        assert {"nosuid", "nodev", "noexec"} <= set(opts.split(","))
    finally:
        await mounts.unmount(str(shm))
