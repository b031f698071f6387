"""Named network namespaces made in-process (unshare in a thread of their own, a bind
mount under /var/run/netns, lo up by ioctl), and the statx mount-point check they and the
rootfs mounts use: checked against iproute2 and /proc/self/mountinfo."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from shoal_common.errors import Internal, Invalid
from shoal_executor.domain import mounts, netns

pytestmark = pytest.mark.usefixtures("root")


def in_mountinfo(path: str) -> bool:
    wanted = os.path.realpath(path)
    return any(line.split()[4] == wanted
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


def ip_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


@pytest.fixture
def name() -> Iterator[str]:
    made = f"shoal-t{uuid.uuid4().hex[:12]}"
    yield made
    subprocess.run(["ip", "netns", "delete", made], capture_output=True, check=False)


def own_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


async def test_create_makes_a_named_namespace_with_lo_up(name: str) -> None:
    before = own_netns()
    path = await netns.create(name)
    assert path == f"{netns.NETNS_DIR}/{name}"
    assert name in {n["name"] for n in ip_json("netns", "list")}
    lo = ip_json("-n", name, "link", "show", "lo")[0]
    assert "UP" in lo["flags"]  # type: ignore[operator]
    assert os.stat(path).st_ino != before  # a namespace of its own
    assert own_netns() == before  # the process (every thread) stayed in the host's
    assert mounts.is_mountpoint(path) and in_mountinfo(path)
    # The directory is shared, as `ip netns add` leaves it.
    line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                if ln.split()[4] == os.path.realpath(netns.NETNS_DIR))
    assert "shared:" in line


async def test_create_is_idempotent_and_repairs_a_half_made_one(name: str) -> None:
    path = await netns.create(name)
    ino = os.stat(path).st_ino
    assert await netns.create(name) == path
    assert os.stat(path).st_ino == ino  # the same namespace, not a new one
    # lo taken down (a create that died before bringing it up): a retry brings it up.
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "down"], check=True)
    await netns.create(name)
    assert "UP" in ip_json("-n", name, "link", "show", "lo")[0]["flags"]  # type: ignore[operator]
    # A mount point file without its mount (a create that died before mounting).
    await netns.delete(name)
    Path(path).touch()
    await netns.create(name)
    assert mounts.is_mountpoint(path)
    assert "UP" in ip_json("-n", name, "link", "show", "lo")[0]["flags"]  # type: ignore[operator]


async def test_create_for_a_process_uses_its_namespace(name: str) -> None:
    holder = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        for _ in range(100):  # until unshare has exec'd sleep in its new namespace
            if os.stat(f"/proc/{holder.pid}/ns/net").st_ino != own_netns():
                break
            subprocess.run(["sleep", "0.02"], check=True)
        path = await netns.create(name, owner_pid=holder.pid)
        assert os.stat(path).st_ino == os.stat(f"/proc/{holder.pid}/ns/net").st_ino
        assert "UP" in ip_json("-n", name, "link", "show", "lo")[0]["flags"]  # type: ignore[operator]
    finally:
        holder.kill()
        holder.wait()


async def test_delete_unmounts_and_removes(name: str) -> None:
    path = await netns.create(name)
    await netns.delete(name)
    assert not os.path.exists(path) and not in_mountinfo(path)
    await netns.delete(name)  # gone already: a no-op


async def test_names_outside_the_pods_are_refused() -> None:
    for bad in ("../etc", "shoal-../x", "other", "shoal-a/b", "", "shoal-" + "x" * 80):
        with pytest.raises(Invalid):
            await netns.create(bad)
        with pytest.raises(Invalid):
            await netns.delete(bad)


async def test_a_process_that_is_gone_fails_clearly(name: str) -> None:
    with pytest.raises(Internal, match=name):
        await netns.create(name, owner_pid=2**22 + 1)
    assert not os.path.exists(netns.netns_path(name))


def test_is_mountpoint_agrees_with_mountinfo(tmp_path: Path) -> None:
    """statx's mount-root attribute against the mount table: a directory and a file bind
    mounted from the same filesystem (device numbers cannot tell), through a symlink, and
    paths that are not mount points or do not exist."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    fsrc, fdst = tmp_path / "f", tmp_path / "g"
    fsrc.touch()
    fdst.touch()
    (tmp_path / "link").symlink_to(dst)
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    subprocess.run(["mount", "--bind", str(fsrc), str(fdst)], check=True)
    try:
        for path in (src, dst, fsrc, fdst, tmp_path / "link", tmp_path / "none",
                     fsrc / "below-a-file", Path("/"), Path("/proc")):
            assert mounts.is_mountpoint(str(path)) == in_mountinfo(str(path)), path
        assert mounts.is_mountpoint(str(dst)) and mounts.is_mountpoint(str(fdst))
    finally:
        subprocess.run(["umount", str(dst)], check=False)
        subprocess.run(["umount", str(fdst)], check=False)
