"""Tests for tests/support/critest_images.py: the stand-ins for critest's images hold what
the critest specs check (docs/conformance.md)."""

from __future__ import annotations

import io
import os
import platform
import subprocess
import tarfile
from pathlib import Path

import pytest
from support.critest_images import CRI_TOOLS, E2E, PAUSE, Target, nnp_elf, publish, targets
from support.images import DOCKER_MANIFEST_LIST, fetch_manifest
from support.registry import Registry


@pytest.fixture(scope="module")
def images() -> dict[str, Target]:
    return {ref: t for t in targets() for ref in t.refs}


def members(target: Target, layer: int) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(target.image.layers[layer].tar)) as tf:
        return {m.name: m for m in tf.getmembers()}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="nnp is an x86-64 program")
def test_nnp_prints_its_effective_uid(tmp_path: Path) -> None:
    program = tmp_path / "nnp"
    program.write_bytes(nnp_elf())
    program.chmod(0o755)
    out = subprocess.run([str(program)], capture_output=True, check=True)
    assert out.stdout == f"Effective uid: {os.geteuid()}\n".encode()
    assert out.stderr == b""


def test_every_reference_critest_pulls_is_built(images: dict[str, Target]) -> None:
    wanted = [f"{E2E}/busybox:1.29-2", f"{E2E}/nginx:1.14-2", f"{E2E}/httpd:2.4.39-4",
              f"{E2E}/nonewprivs:1.3", f"{CRI_TOOLS}/hostnet-nginx-amd64:latest", PAUSE,
              *(f"{CRI_TOOLS}/test-image-{n}:latest" for n in (
                  "user-uid", "user-username", "user-uid-group", "user-username-group",
                  "predefined-group", "1", "2", "3", "latest", "digest")),
              *(f"{CRI_TOOLS}/test-image-tags:{t}" for t in "123"),
              f"{CRI_TOOLS}/test-image-tag:test", f"{CRI_TOOLS}/test-image-tag:all"]
    assert sorted(images) == sorted(wanted)
    # The image-list specs: one image under three tags; three (and two) distinct images.
    assert len({images[f"{CRI_TOOLS}/test-image-tags:{t}"].image.digest for t in "123"}) == 1
    assert len({images[f"{CRI_TOOLS}/test-image-{n}:latest"].image.config_digest
                for n in "123"}) == 3
    assert (images[f"{CRI_TOOLS}/test-image-tag:test"].image.config_digest
            != images[f"{CRI_TOOLS}/test-image-tag:all"].image.config_digest)
    users = {n: images[f"{CRI_TOOLS}/test-image-{n}:latest"].image.config["config"]["User"]
             for n in ("user-uid", "user-username", "user-uid-group", "user-username-group")}
    assert users == {"user-uid": "1002", "user-username": "www-data",
                     "user-uid-group": "1003:1004", "user-username-group": "www-data:1004"}


def test_busybox_applets_are_hard_links_after_busybox(images: dict[str, Target]) -> None:
    busybox = images[f"{E2E}/busybox:1.29-2"]
    with tarfile.open(fileobj=io.BytesIO(busybox.image.layers[0].tar)) as tf:
        names = [m.name for m in tf.getmembers()]
        entries = {m.name: m for m in tf.getmembers()}
        passwd = tf.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
    for applet in ("bin/ls", "bin/sh", "bin/id", "bin/ping", "bin/httpd", "bin/pidof"):
        assert entries[applet].islnk() and entries[applet].linkname == "bin/busybox", applet
        assert names.index("bin/busybox") < names.index(applet)
    for program in ("usr/bin/pgrep", "usr/bin/ipcs"):
        assert entries[program].isreg()
    assert "www-data:x:33:33:" in passwd and "nobody:x:65534:65534:" in passwd


def test_nonewprivs_and_predefined_group(images: dict[str, Target]) -> None:
    nnp = members(images[f"{E2E}/nonewprivs:1.3"], 1)["usr/local/bin/nnp"]
    assert nnp.mode == 0o4755 and nnp.uid == 0
    group = images[f"{CRI_TOOLS}/test-image-predefined-group:latest"]
    assert group.image.config["config"]["User"] == "1000"
    with tarfile.open(fileobj=io.BytesIO(group.image.layers[1].tar)) as tf:
        text = tf.extractfile("etc/group").read().decode()  # type: ignore[union-attr]
    assert "group-defined-in-image:x:50000:default-user" in text


def test_published_as_manifest_lists(registry: Registry, images: dict[str, Target]) -> None:
    some = [images[f"{E2E}/busybox:1.29-2"], images[f"{CRI_TOOLS}/test-image-tags:1"]]
    pushed = publish(registry.url, some)
    assert set(pushed) == {*some[0].refs, *some[1].refs}
    fetched = fetch_manifest(registry.url, "k8s-staging-cri-tools/test-image-tags", "3")
    assert fetched.media_type == DOCKER_MANIFEST_LIST
    assert fetched.digest == pushed[f"{CRI_TOOLS}/test-image-tags:3"]
