"""What the executor makes, mounts, reads and removes stays inside its roots: rootfs mounts
only of the snapshots' own directories, run directories made and removed only under the
run dir (never through a mount or a symlink), and files named by a request read safely."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from shoal_common.errors import Internal, Invalid
from shoal_common.messages.snapshots import Mount
from shoal_common.rootfs_users import resolve_user
from shoal_executor.domain import mounts
from shoal_executor.domain.checks import confine_rootfs
from shoal_executor.domain.paths import RunDirs, write_public
from shoal_executor.domain.seccomp import load_profile
from shoal_executor.domain.spec import parse_signal


@pytest.fixture
def snapshots(tmp_path: Path) -> Path:
    root = tmp_path / "snapshotter" / "snapshots"
    for n in ("1", "2", "3"):
        (root / n / "fs").mkdir(parents=True)
        (root / n / "work").mkdir()
    (root / "1" / "fs" / "escape").symlink_to("/")  # what a container may write
    (root / "4").symlink_to(tmp_path)  # a snapshot directory that leads out
    return root


def bind(source: str, *options: str) -> list[Mount]:
    return [Mount(type="bind", source=source, options=list(options or ["rbind", "rw"]))]


def overlay(*options: str) -> list[Mount]:
    return [Mount(type="overlay", source="overlay", options=list(options))]


def test_what_the_snapshotter_hands_out_is_accepted_as_resolved(snapshots: Path) -> None:
    s = snapshots
    assert confine_rootfs(bind(f"{s}/1/fs", "rbind", "ro"), s) == bind(f"{s}/1/fs", "rbind",
                                                                        "ro")
    layers = overlay("index=off", f"lowerdir={s}/2/fs:{s}/1/fs", f"upperdir={s}/3/fs",
                     f"workdir={s}/3/work")
    assert confine_rootfs(layers, s) == layers
    # Through a link to the snapshots (a state root that is a symlink): resolved.
    link = snapshots.parent / "link"
    link.symlink_to(snapshots)
    assert confine_rootfs(bind(f"{link}/2/fs"), s) == bind(f"{s}/2/fs")


@pytest.mark.parametrize(("mounts_of", "field"), [
    (lambda s: bind("/"), "rootfs[0].source"),
    (lambda s: bind(f"{s}/1/fs/escape"), "rootfs[0].source"),
    (lambda s: bind(f"{s}/1/fs/escape/etc"), "rootfs[0].source"),
    (lambda s: bind(f"{s}/4/fs"), "rootfs[0].source"),
    (lambda s: bind(f"{s}/1/fs/../../../.."), "rootfs[0].source"),
    (lambda s: bind(f"{s}/1"), "rootfs[0].source"),
    (lambda s: bind(str(s)), "rootfs[0].source"),
    (lambda s: bind(f"{s}/9/fs"), "rootfs[0].source"),
    (lambda s: bind("relative/fs"), "rootfs[0].source"),
    (lambda s: bind(f"{s}/1/fs", "rbind", "suid"), "rootfs[0].options[1]"),
    (lambda s: bind(f"{s}/1/fs", "rbind", "lowerdir=/etc"), "rootfs[0].options[1]"),
    (lambda s: overlay("lowerdir=/etc"), "rootfs[0].options[0]"),
    (lambda s: overlay(f"lowerdir={s}/1/fs:/etc"), "rootfs[0].options[0]"),
    (lambda s: overlay(f"lowerdir={s}/1/fs", "upperdir=/tmp", "workdir=/tmp"),
     "rootfs[0].options[1]"),
    (lambda s: overlay(f"lowerdir={s}/1/fs,upperdir=/tmp"), "rootfs[0].options[0]"),
    (lambda s: overlay(f"lowerdir={s}/1/fs\\:/etc"), "rootfs[0].options[0]"),
    (lambda s: overlay(f"lowerdir={s}/1/fs", "uuid=on"), "rootfs[0].options[1]"),
    (lambda s: overlay(f"lowerdir={s}/1/fs", "index=maybe"), "rootfs[0].options[1]"),
    (lambda s: overlay(f"lowerdir={s}/1/fs", f"lowerdir={s}/2/fs"), "rootfs[0].options[1]"),
    (lambda s: overlay(f"upperdir={s}/1/fs", f"workdir={s}/1/work"), "rootfs[0].options"),
    (lambda s: overlay(f"lowerdir={s}/1/fs", f"upperdir={s}/2/fs"), "rootfs[0].options"),
    (lambda s: [Mount(type="overlay", source="/etc", options=[f"lowerdir={s}/1/fs"])],
     "rootfs[0].source"),
    (lambda s: [Mount(type="tmpfs", source="tmpfs")], "rootfs[0].type"),
    (lambda s: [], "rootfs"),
    (lambda s: bind(f"{s}/1/fs") * 9, "rootfs"),
    (lambda s: bind(f"{s}/1/fs", "rbind\n"), "rootfs[0].options[0]"),
])
def test_a_rootfs_mount_outside_the_snapshots_is_refused(snapshots: Path, mounts_of: object,
                                                         field: str) -> None:
    with pytest.raises(Invalid) as err:
        confine_rootfs(mounts_of(snapshots), snapshots)  # type: ignore[operator]
    assert err.value.message.startswith(f"{field}"), err.value.message
    assert err.value.message[len(field)] in ": ", err.value.message


@pytest.mark.usefixtures("root")
async def test_run_dirs_are_made_and_removed_only_inside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    dirs = RunDirs(run)
    made = dirs.make("bundles", "abc")
    assert stat.S_IMODE(made.stat().st_mode) == stat.S_IMODE(made.parent.stat().st_mode) \
        == 0o711
    for bad in ("..", ".", "a/b", "../../etc", "", "\n", ".hidden"):
        with pytest.raises(Invalid):
            dirs.path("bundles", bad)
    outside = tmp_path / "outside"
    (outside / "kept").mkdir(parents=True)
    (run / "bundles" / "link").symlink_to(outside)
    with pytest.raises(Invalid, match="leads outside"):
        dirs.path("bundles", "link")
    dirs.remove(run / "bundles" / "link")  # the link goes, never what it points to
    assert (outside / "kept").is_dir() and not (run / "bundles" / "link").exists()
    dirs.remove(outside)  # not under the run dir: left alone
    dirs.remove(run)  # the run dir itself neither
    assert outside.is_dir() and run.is_dir()
    # A tree with a mount below it is not removed through the mount.
    (made / "rootfs").mkdir()
    mounts.mount_tmpfs(str(made / "rootfs"), ["size=1m"])
    (made / "rootfs" / "precious").write_text("x")
    try:
        with pytest.raises(Internal, match="still has mounts"):
            dirs.remove(made)
        assert (made / "rootfs" / "precious").exists()
    finally:
        await mounts.unmount(str(made / "rootfs"))
    dirs.remove(made)
    assert not made.exists()


def test_pod_files_are_world_readable_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_public(tmp_path / "hosts", "127.0.0.1\tlocalhost\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hosts").stat().st_mode) == 0o644
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        write_public(tmp_path / "link", "x")  # never through a symlink
    assert not (tmp_path / "elsewhere").exists()


def test_a_seccomp_profile_must_be_a_small_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20) + "{}")
    for path, why in (("/dev/zero", "not a regular file"), (str(fifo), "not a regular file"),
                      (str(big), "larger than"), (str(tmp_path), "not a regular file"),
                      ("/a\0b", "absolute path")):
        with pytest.raises(Invalid, match=why):
            load_profile(path)


def test_image_users_and_signals_out_of_range_are_refused(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nodd:x:²:0::/:/bin/sh\nbig:x:99999999999:0::/:/bin/sh\n"
        "app:x:1000:1000::/home/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("app:x:1000:\nodd:x:x:app\n")
    assert resolve_user(str(tmp_path), "app").uid == 1000
    for user in ("odd", "big"):  # malformed lines are skipped, as libc skips them
        with pytest.raises(Invalid, match="not found"):
            resolve_user(str(tmp_path), user)
    with pytest.raises(Invalid, match="out of range"):
        resolve_user(str(tmp_path), "4294967295")
    for name in ("99", "65", "0", "9" * 5000):
        with pytest.raises(Invalid):
            parse_signal(name)
    assert parse_signal("SIGTERM") == parse_signal("15") == 15
