"""`docker cp` through Debian's docker CLI and the docker SDK: files and directories out of
running, exited and created containers, into them, tar streams both ways, symlinks a
container plants to climb out of its root (they resolve inside it), and Docker's errors."""

from __future__ import annotations

import io
import os
import tarfile
import time
import uuid
from pathlib import Path

import docker.errors
import pytest
from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("archive")


def _gone(dnode, *names: str) -> None:
    for name in names:
        dnode.docker("rm", "-f", name, check=False)


def _wait_file(dnode, name: str, path: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while dnode.docker("cp", f"{name}:{path}", "-", check=False).returncode != 0:
        assert time.monotonic() < end, f"{path} never appeared in {name}"
        time.sleep(0.2)


def _members(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            out[m.name] = (m, f.read() if f else b"")
    return out


def _tar(*entries: tuple[str, bytes | str | None, int]) -> bytes:
    """(name, data | symlink target | None for a directory, mode) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, what, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1_600_000_000
            if what is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(what, str):
                info.type, info.linkname = tarfile.SYMTYPE, what
                tar.addfile(info)
            else:
                info.size, info.uid, info.gid = len(what), 1234, 5678
                tar.addfile(info, io.BytesIO(what))
    return buf.getvalue()


def test_cp_out_of_running_then_exited_container(dnode, images, tmp_path: Path) -> None:
    name = "cp-out"
    dnode.docker("run", "-d", "--name", name, images["busybox"], "sh", "-c",
                 "echo running-data > /data.txt; mkdir -p /d/sub; echo deep > /d/sub/y; "
                 "ln -s sub/y /d/link; touch /ready; exec sleep 300")
    try:
        _wait_file(dnode, name, "/ready")
        dnode.docker("cp", f"{name}:/data.txt", str(tmp_path / "out.txt"))
        assert (tmp_path / "out.txt").read_text() == "running-data\n"
        dnode.docker("cp", f"{name}:/d", str(tmp_path / "dcopy"))
        assert (tmp_path / "dcopy" / "sub" / "y").read_text() == "deep\n"
        assert os.readlink(tmp_path / "dcopy" / "link") == "sub/y"
        dnode.docker("cp", f"{name}:/d/.", str(tmp_path / "contents"))  # contents only
        assert sorted(os.listdir(tmp_path / "contents")) == ["link", "sub"]
        dnode.docker("stop", "-t", "1", name)
        assert dnode.out("inspect", "-f", "{{.State.Status}}", name) == "exited"
        got = _members(dnode.docker("cp", f"{name}:/data.txt", "-").stdout)
        assert list(got) == ["data.txt"] and got["data.txt"][1] == b"running-data\n"
        tree = _members(dnode.docker("cp", f"{name}:/d", "-").stdout)
        assert {"d", "d/sub", "d/sub/y", "d/link"} <= set(tree), sorted(tree)
        assert tree["d/link"][0].issym() and tree["d/link"][0].linkname == "sub/y"
    finally:
        _gone(dnode, name)


def test_cp_into_created_and_running_containers(dnode, images, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    (src / "inner").mkdir(parents=True)
    (src / "inner" / "f.txt").write_text("copied in\n")
    dnode.docker("create", "--name", "cp-new", images["busybox"], "cat", "/in/inner/f.txt")
    dnode.docker("run", "-d", "--name", "cp-live", images["busybox"], "sh", "-c",
                 "while [ ! -f /tmp/late.txt ]; do sleep 0.1; done; cat /tmp/late.txt; "
                 "exec sleep 300")
    try:
        dnode.docker("cp", str(src), "cp-new:/in")  # /in is made: the directory renamed
        assert dnode.docker("start", "-a", "cp-new").stdout == b"copied in\n"
        (tmp_path / "late.txt").write_text("seen by the process\n")
        dnode.docker("cp", str(tmp_path / "late.txt"), "cp-live:/tmp/")
        end = time.monotonic() + 20
        while b"seen by the process" not in dnode.docker("logs", "cp-live").stdout:
            assert time.monotonic() < end, dnode.docker("logs", "cp-live")
            time.sleep(0.2)
    finally:
        _gone(dnode, "cp-new", "cp-live")


def test_cp_tar_streams_keep_modes_and_owners(dnode, images) -> None:
    name = "cp-stream"
    dnode.docker("create", "--name", name, images["busybox"], "true")
    dnode.docker("create", "--name", "cp-user", "--user", "app", images["busybox"], "true")
    try:
        archive = _tar(("streamed", None, 0o750), ("streamed/tool", b"#!/bin/sh\n", 0o4755),
                       ("streamed/ln", "tool", 0o777))
        dnode.docker("cp", "-", f"{name}:/tmp", input=archive)
        got = _members(dnode.docker("cp", f"{name}:/tmp/streamed", "-").stdout)
        tool = got["streamed/tool"][0]
        assert got["streamed/tool"][1] == b"#!/bin/sh\n"
        assert (tool.mode, tool.uid, tool.gid) == (0o4755, 1234, 5678)
        assert got["streamed"][0].isdir() and got["streamed"][0].mode == 0o750
        assert got["streamed/ln"][0].linkname == "tool"
        # A file where a directory is (and back) is refused: the CLI asks for it.
        clash = dnode.docker("cp", "-", f"{name}:/tmp", input=_tar(("streamed", b"x", 0o644)),
                             check=False)
        assert clash.returncode != 0 and b"cannot overwrite directory" in clash.stderr
        refused = dnode.docker("cp", "-", f"{name}:/tmp", input=_tar(("../up", b"x", 0o644)),
                               check=False)
        assert refused.returncode != 0 and b"outside the destination" in refused.stderr
        # -a: owned by the container's user (app, its ids from the passwd file).
        dnode.docker("cp", "-a", "-", "cp-user:/tmp", input=_tar(("owned", b"o", 0o640)))
        owned = _members(dnode.docker("cp", "cp-user:/tmp/owned", "-").stdout)["owned"][0]
        assert (owned.uid, owned.gid, owned.mode) == (1000, 1000, 0o640)
    finally:
        _gone(dnode, name, "cp-user")


def test_planted_symlinks_resolve_inside_the_container(dnode, images, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:12]
    probe = f"shoal-cp-probe-{tag}"
    host_probe = Path("/tmp") / probe
    host_probe.write_text("host\n")
    name = "cp-hostile"
    dnode.docker("run", "-d", "--name", name, images["busybox"], "sh", "-c",
                 f"ln -s / /escape; ln -s ../../../../../../.. /up; ln -s /etc /etc2; "
                 f"echo container > /tmp/{probe}; touch /ready; exec sleep 300")
    written = [Path("/tmp") / f"shoal-cp-{kind}-{tag}" for kind in ("in", "tar1", "tar2")]
    try:
        _wait_file(dnode, name, "/ready")
        for via in ("/escape/tmp", "/up/tmp", "/escape/../../tmp"):
            got = _members(dnode.docker("cp", f"{name}:{via}/{probe}", "-").stdout)
            assert got[probe][1] == b"container\n", via
        host_name = Path("/etc/hostname").read_bytes() if Path("/etc/hostname").exists() \
            else b""
        got = _members(dnode.docker("cp", f"{name}:/escape/etc2/hostname", "-").stdout)
        if host_name:
            assert got["hostname"][1] != host_name
        link = _members(dnode.docker("cp", f"{name}:/escape", "-").stdout)
        assert link["escape"][0].issym() and link["escape"][0].linkname == "/"
        # Into the container through the same links: nothing lands on the host.
        (tmp_path / written[0].name).write_text("in\n")
        dnode.docker("cp", str(tmp_path / written[0].name), f"{name}:/escape/tmp/")
        hostile = _tar(("lnk", "/", 0o777), (f"lnk/tmp/{written[1].name}", b"t1", 0o644),
                       ("up2", "../../../../../../../tmp", 0o777),
                       (f"up2/{written[2].name}", b"t2", 0o644))
        dnode.docker("cp", "-", f"{name}:/up/tmp", input=hostile)
        for path in written:
            assert not path.exists(), f"{path} was written on the host"
            inside = _members(dnode.docker("cp", f"{name}:/tmp/{path.name}", "-").stdout)
            assert path.name in inside
        assert host_probe.read_text() == "host\n"
    finally:
        host_probe.unlink()
        for path in written:
            if path.exists():
                path.unlink()
        _gone(dnode, name)


def test_errors_and_sdk(dnode, images) -> None:
    name = "cp-errs"
    dnode.docker("create", "--name", name, images["busybox"], "true")
    dnode.docker("create", "--name", "cp-ro", "--read-only", images["busybox"], "true")
    try:
        missing = dnode.docker("cp", f"{name}:/nosuch", "-", check=False)
        assert missing.returncode != 0
        assert f"No such container:path: {name}:/nosuch".encode() in missing.stderr
        nobody = dnode.docker("cp", "nosuchctr:/etc/passwd", "-", check=False)
        assert nobody.returncode != 0 and b"No such container" in nobody.stderr
        container = dnode.sdk().containers.get(name)
        with pytest.raises(docker.errors.NotFound) as err:
            container.get_archive("/nosuch/file")
        assert f"Could not find the file /nosuch/file in container {container.id}" in \
            str(err.value)
        bits, st = container.get_archive("/etc/passwd")
        assert st["name"] == "passwd" and st["size"] > 0 and st["mode"] & 0o777 == 0o644
        assert b"root:" in _members(b"".join(bits))["passwd"][1]
        _, st = container.get_archive("/tmp")
        assert st["mode"] & (1 << 31)  # Go's ModeDir
        _, st = container.get_archive("/bin/sh")
        assert st["mode"] & (1 << 27) and st["linkTarget"] == "/bin/busybox"
        assert container.put_archive("/tmp", _tar(("sdk.txt", b"sdk", 0o600))) is True
        assert _members(b"".join(container.get_archive("/tmp/sdk.txt")[0]))["sdk.txt"][1] == \
            b"sdk"
        with pytest.raises(docker.errors.APIError) as err:
            container.put_archive("/etc/passwd", _tar(("x", b"x", 0o600)))
        assert "extraction point is not a directory" in str(err.value)
        with pytest.raises(docker.errors.APIError) as err:
            dnode.sdk().containers.get("cp-ro").put_archive("/tmp", _tar(("x", b"x", 0o600)))
        assert err.value.status_code == 403 and "read-only" in str(err.value)
    finally:
        _gone(dnode, name, "cp-ro")
