"""`docker build` with the classic builder (DOCKER_BUILDKIT=0) through Debian's docker CLI
and the docker SDK: a multi-stage build run afterwards, the cache, a failing RUN, ARG and
--build-arg, whiteouts and opaque directories from RUN, .dockerignore, ADD of a local
archive, `docker history`, and a hostile context that must not reach host files."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import textwrap
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as cri
from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("build")
BUILD_NS = "moby-build"


def _context(tmp: Path, files: dict[str, str | bytes]) -> Path:
    for name, data in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return tmp


def _build(dnode, ctx: Path, *args: str, check: bool = True):
    return dnode.docker("build", *args, str(ctx), check=check, timeout=180)


def _inspect(dnode, ref: str) -> dict:
    return json.loads(dnode.out("image", "inspect", ref))[0]


def _rmi(dnode, *refs: str) -> None:
    for ref in refs:
        dnode.docker("rmi", "-f", ref, check=False)


async def _build_pods(dnode) -> list:
    md = (("shoal-namespace", BUILD_NS),)
    pods = await dnode.shoal.api.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), metadata=md)
    return list(pods.items)


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_multi_stage_build_runs_and_is_cached(dnode, images, tmp_path) -> None:
    busybox = images["busybox"]
    ctx = _context(tmp_path, {
        "Dockerfile": textwrap.dedent(f"""\
            # a comment, then a two-stage build
            FROM {busybox} AS maker
            RUN mkdir -p /out \\
             && echo "made in stage one" > /out/greeting.txt
            FROM {busybox}
            ENV GREETING=hello APPDIR=/app
            WORKDIR $APPDIR
            COPY --from=maker /out/greeting.txt ./
            COPY --chown=app:app data/ data/
            ADD bundle.tar.gz /opt/bundle/
            COPY --from={busybox} /etc/group /opt/group-of-base
            USER app
            LABEL org.example.team=build "with space"="yes"
            EXPOSE 8080/tcp 53/udp
            VOLUME /cache
            CMD ["sh", "-c", \\
                 "echo $GREETING $(id -u) $(pwd); cat greeting.txt data/one.txt; \\
            cat /opt/bundle/inside.txt; stat -c %u:%g data/one.txt; head -1 /opt/group-of-base"]
            """),
        "data/one.txt": "one\n",
        "bundle.tar.gz": _tgz({"inside.txt": b"unpacked\n"}),
    })
    tag = "shoal-build-test:1"
    try:
        proc = _build(dnode, ctx, "-t", tag)
        out = proc.stdout.decode()
        assert f"Step 1/14 : FROM {busybox} AS maker" in out, out
        assert re.search(r"^ ---> Running in [0-9a-f]{12}$", out, re.M), out
        assert "Step 14/14 : CMD" in out
        built = re.search(r"^Successfully built ([0-9a-f]{12})$", out, re.M)
        assert built, out
        assert f"Successfully tagged {tag}" in out
        assert not await _build_pods(dnode)  # the RUN's pod is gone

        run = dnode.docker("run", "--rm", tag)
        assert run.stdout.decode().splitlines() == [
            "hello 1000 /app", "made in stage one", "one", "unpacked", "1000:1000",
            "root:x:0:"], run

        info = _inspect(dnode, tag)
        assert info["Id"][7:19] == built.group(1)
        config = info["Config"]
        assert "GREETING=hello" in config["Env"] and "APPDIR=/app" in config["Env"]
        assert config["WorkingDir"] == "/app" and config["User"] == "app"
        assert config["Labels"] == {"org.example.team": "build", "with space": "yes"}
        assert set(config["ExposedPorts"]) == {"8080/tcp", "53/udp"}
        assert config["Volumes"] == {"/cache": {}}
        assert config["Cmd"][:2] == ["sh", "-c"]

        history = dnode.out("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag)
        steps = history.splitlines()
        assert "CMD [\"sh\" \"-c\"" in steps[0], steps
        assert any("WORKDIR /app" in s for s in steps), steps
        assert any("USER app" in s for s in steps), steps
        assert any(re.search(r"COPY file:[0-9a-f]{64} in /app/", s) for s in steps), steps
        assert any(re.search(r"COPY dir:[0-9a-f]{64} in /app/data/", s) for s in steps), steps
        assert any("ENV GREETING=hello APPDIR=/app" in s for s in steps), steps

        again = _build(dnode, ctx, "-t", tag).stdout.decode()
        assert again.count(" ---> Using cache") == 12, again  # all but the two FROMs
        assert f"Successfully built {built.group(1)}" in again

        fresh = _build(dnode, ctx, "--no-cache", "-t", tag).stdout.decode()
        assert "Using cache" not in fresh
        listed = dnode.out("images", "--format", "{{.Repository}}:{{.Tag}}")
        assert "shoal-build-test:1" in listed and "shoal-build" not in listed.replace(
            "shoal-build-test", ""), listed  # the steps' images are not Docker's
    finally:
        _rmi(dnode, tag)


def test_failing_run_reports_its_exit_code(dnode, images, tmp_path) -> None:
    ctx = _context(tmp_path, {"Dockerfile": f"FROM {images['busybox']}\n"
                                            "RUN echo before the failure; exit 3\n"})
    failed = _build(dnode, ctx, "-t", "shoal-build-fails", check=False)
    out = failed.stdout.decode() + failed.stderr.decode()
    assert failed.returncode == 3, out
    assert "before the failure" in out
    assert "The command '/bin/sh -c echo before the failure; exit 3' returned a non-zero " \
           "code: 3" in out
    assert dnode.docker("image", "inspect", "shoal-build-fails", check=False).returncode != 0

    bad = _context(tmp_path / "bad", {"Dockerfile": f"FROM {images['busybox']}\nFOO bar\n"})
    parse = _build(dnode, bad, check=False)
    assert parse.returncode == 1
    assert b"unknown instruction: FOO" in parse.stderr, parse
    url = _context(tmp_path / "url", {"Dockerfile": f"FROM {images['busybox']}\n"
                                                    "ADD https://example.com/x /x\n"})
    refused = _build(dnode, url, check=False)
    assert refused.returncode == 1 and b"ADD from a URL is not supported" in \
        refused.stdout + refused.stderr, refused


async def test_build_args_and_run_deletions(dnode, images, tmp_path) -> None:
    ctx = _context(tmp_path, {"Dockerfile": textwrap.dedent(f"""\
        ARG BASE={images['busybox']}
        FROM $BASE
        ARG FLAVOR=plain
        ARG SIZE=small
        RUN echo "$FLAVOR/$SIZE" > /flavor && rm /etc/group \\
         && mkdir -p /opt/dir && echo x > /opt/dir/old
        RUN ["sh", "-c", "rm -r /opt/dir && mkdir /opt/dir && echo y > /opt/dir/new"]
        CMD ["sh", "-c", "cat /flavor; ls /opt/dir; test -e /etc/group || echo no-group; \\
        echo \\"[$FLAVOR]\\""]
        """)})
    tag = "shoal-build-args:1"
    try:
        out = _build(dnode, ctx, "--build-arg", "FLAVOR=spicy", "--build-arg", "NOPE=1",
                     "-t", tag).stdout.decode()
        assert "[Warning] One or more build-args [NOPE] were not consumed" in out, out
        run = dnode.docker("run", "--rm", tag).stdout.decode().splitlines()
        assert run == ["spicy/small", "new", "no-group", "[]"], run  # ARGs are not Env
        history = dnode.out("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag)
        assert "|2 FLAVOR=spicy SIZE=small /bin/sh -c echo" in history, history
        first, second = _layer_names(dnode, tag)[-2:]
        # Only what the steps changed: no mount point runc made (/etc/hosts, /proc, ...).
        assert first == ["etc/", "etc/.wh.group", "flavor", "opt/", "opt/dir/",
                         "opt/dir/old"], first
        assert second == ["opt/", "opt/dir/", "opt/dir/.wh..wh..opq", "opt/dir/new"], second
        # Another value of the arg is another step: no cache for it.
        other = _build(dnode, ctx, "--build-arg", "FLAVOR=mild", "-t", tag).stdout.decode()
        assert other.count("Using cache") == 2, other  # the two ARG steps only
        assert dnode.docker("run", "--rm", tag).stdout.decode().startswith("mild/small\n")
    finally:
        _rmi(dnode, tag)
    assert not await _build_pods(dnode)


def _layer_names(dnode, ref: str) -> list[list[str]]:
    """The entry names of each layer of `ref`, from `docker save`."""
    saved = tarfile.open(fileobj=io.BytesIO(dnode.docker("save", ref).stdout))
    manifest = json.load(saved.extractfile("manifest.json"))
    out = []
    for layer in manifest[0]["Layers"]:
        with tarfile.open(fileobj=saved.extractfile(layer), mode="r:*") as inner:
            out.append(sorted(m.name + ("/" if m.isdir() else "") for m in inner))
    return out


def _tar(entries: list[tuple[str, bytes | None, str]]) -> bytes:
    """(name, data, link target): a file, or a symlink when data is None."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, target in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_sdk_build_honours_dockerignore_and_keeps_symlinks(dnode, images) -> None:
    client = dnode.sdk()
    dockerfile = textwrap.dedent(f"""\
        FROM {images['busybox']}
        COPY . /ctx/
        CMD ["sh", "-c", "ls -A /ctx/ /ctx/sub; readlink /ctx/sub/link"]
        """).encode()
    context = _tar([("Dockerfile", dockerfile, ""),
                    (".dockerignore", b"secret.txt\n*.log\n!keep.log\n", ""),
                    ("secret.txt", b"s3cret", ""), ("a.log", b"log", ""),
                    ("keep.log", b"kept", ""), ("sub/file", b"f", ""),
                    ("sub/link", None, "/etc/passwd")])
    tag = "shoal-build-sdk:1"
    try:
        image, logs = client.images.build(fileobj=io.BytesIO(context), custom_context=True,
                                          tag=tag, rm=True)
        lines = [m["stream"] for m in logs if "stream" in m]
        assert any(line.startswith("Successfully built ") for line in lines), lines
        assert image.id.startswith("sha256:") and tag in image.tags
        out = dnode.docker("run", "--rm", tag).stdout.decode().split()
        assert "secret.txt" not in out and "a.log" not in out, out
        assert "keep.log" in out and "file" in out and "link" in out, out
        assert out[-1] == "/etc/passwd", out  # copied as a symlink, never followed
    finally:
        _rmi(dnode, tag)
        client.close()


@pytest.mark.parametrize(("entries", "dockerfile", "message"), [
    # A symlink in the context names a host file: resolved inside the context, not found.
    ([("hostfile", None, "/etc/passwd")], "COPY hostfile /got\n", "file not found"),
    ([("up", None, "../../../../")], "COPY up/etc/passwd /got\n", "file not found"),
    ([("../escape", b"x", "")], "COPY . /\n", "leaves the context"),
    ([("d", None, "/tmp"), ("d/planted", b"x", "")], "COPY . /\n", "under a symlink"),
    ([("f", b"x", "")], "COPY ../f /f\n", "outside the build context"),
])
def test_hostile_context_reaches_no_host_file(dnode, images, entries, dockerfile,
                                              message) -> None:
    client = dnode.sdk()
    context = _tar([("Dockerfile", f"FROM {images['busybox']}\n{dockerfile}".encode(), ""),
                    *entries])
    try:
        with pytest.raises(Exception, match=message):
            client.images.build(fileobj=io.BytesIO(context), custom_context=True)
    finally:
        client.close()
    assert not Path("/tmp/planted").exists()


def test_quiet_untagged_target_onbuild_and_builder_prune(dnode, images) -> None:
    busybox = images["busybox"]
    base = f"FROM {busybox}\nONBUILD ENV TRIGGERED=yes\nENTRYPOINT [\"echo\"]\n"
    child = textwrap.dedent("""\
        FROM shoal-build-base:1 AS first
        LABEL stage=first
        FROM first
        LABEL stage=second
        """)
    try:
        quiet = dnode.out("build", "-q", "-t", "shoal-build-base:1", "-", input=base.encode())
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", quiet), quiet
        info = _inspect(dnode, "shoal-build-base:1")
        assert info["Id"] == quiet and info["Config"]["OnBuild"] == ["ENV TRIGGERED=yes"]
        assert info["Config"]["Cmd"] is None  # a new ENTRYPOINT drops the base image's CMD
        assert dnode.out("run", "--rm", "shoal-build-base:1", "said") == "said"

        out = dnode.out("build", "--target", "first", "--label", "built.by=test", "-",
                        input=child.encode())
        assert "Step 3/3 : LABEL \"built.by\"=\"test\"" in out, out
        assert "# Executing 1 build trigger" in out, out
        untagged = re.search(r"^Successfully built ([0-9a-f]{12})$", out, re.M)
        assert untagged, out
        first = _inspect(dnode, untagged.group(1))
        assert first["Config"]["Labels"] == {"stage": "first", "built.by": "test"}
        assert "TRIGGERED=yes" in first["Config"]["Env"] and not first["Config"]["OnBuild"]
        assert dnode.out("run", "--rm", untagged.group(1), "untagged") == "untagged"

        cached = dnode.out("build", "-t", "shoal-build-base:1", "-", input=base.encode())
        assert cached.count("Using cache") == 2, cached
        pruned = dnode.out("builder", "prune", "-f")
        assert "Total reclaimed space" in pruned, pruned
        after = dnode.out("build", "-t", "shoal-build-base:1", "-", input=base.encode())
        assert "Using cache" not in after, after
    finally:
        _rmi(dnode, "shoal-build-base:1")
        dnode.docker("image", "prune", "-f", check=False)


def _layer(tmp: Path, fill) -> list[str]:
    from shoal_docker_gateway.domain.build.layers import write_layer

    layer = write_layer(tmp / "layer.tar.gz", fill)
    with tarfile.open(layer.path) as tar:
        return [m.name + ("/" if m.isdir() else "") for m in tar]


def test_native_diff_compares_trees(tmp_path) -> None:
    from shoal_docker_gateway.domain.build.diff import tree_diff

    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        _context(root, {"etc/passwd": "root\n", "keep/same": "s", "gone/file": "g"})
        (root / "dev").mkdir()
    for path in (old / "keep/same", new / "keep/same"):
        os.utime(path, (1_600_000_000, 1_600_000_000))
    shutil.rmtree(new / "gone")
    _context(new, {"etc/passwd": "root\napp\n", "etc/hosts": "", "added": "a"})
    names = _layer(tmp_path, lambda w: tree_diff(w, new, old))
    assert names == [".wh.gone", "added", "etc/", "etc/passwd"], names


def test_overlay_diff_turns_whiteouts_into_oci_entries(tmp_path) -> None:
    from shoal_docker_gateway.domain.build.diff import overlay_diff

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    _context(lower, {"etc/group": "g", "opt/dir/old": "o", "bin/sh": "#!"})
    _context(upper, {"etc/hostname": "", "opt/dir/new": "n", "run.txt": "r"})
    os.mknod(upper / "etc" / "group", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(upper / "opt" / "dir", "trusted.overlay.opaque", b"y")
    os.chmod(upper / "etc", os.stat(lower / "etc").st_mode)
    os.chmod(upper / "opt", os.stat(lower / "opt").st_mode)
    names = _layer(tmp_path, lambda w: overlay_diff(w, upper, [lower]))
    assert names == ["etc/", "etc/.wh.group", "opt/", "opt/dir/", "opt/dir/.wh..wh..opq",
                     "opt/dir/new", "run.txt"], names
