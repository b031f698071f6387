"""Tests for tests/support: image building and the real local registry."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Image,
    LayerBuilder,
    RegistryHTTPError,
    add_host_binary,
    build_image,
    build_index,
    busybox_image,
    busybox_layer,
    elf_interpreter,
    fetch_blob,
    fetch_manifest,
    pause_image,
    push,
    push_blob,
    push_manifest,
)
from support.ports import free_port
from support.registry import Registry, RegistryError

pytestmark = pytest.mark.e2e

CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
needs_root = pytest.mark.usefixtures("root")  # chroot


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry") / "storage") as reg:
        yield reg
    assert not reg.running


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def extract(tar_bytes: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        tf.extractall(dest, filter="tar")
    return dest


def check_image_in_registry(registry: Registry, repo: str, ref: str, image: Image) -> None:
    """Read manifest, config and layers back over HTTP and verify every digest."""
    got = fetch_manifest(registry.url, repo, ref, accept=[image.media_type])
    assert got.media_type == image.media_type
    assert got.digest == image.digest == sha(got.body)
    manifest = json.loads(got.body)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == image.media_type

    config_bytes = fetch_blob(registry.url, repo, manifest["config"]["digest"])
    assert sha(config_bytes) == manifest["config"]["digest"] == image.config_digest
    assert manifest["config"]["mediaType"] == image.config_media_type
    config = json.loads(config_bytes)
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    assert len(config["history"]) == len(manifest["layers"])

    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = fetch_blob(registry.url, repo, desc["digest"])
        assert sha(blob) == desc["digest"] and len(blob) == desc["size"]
        tar = gzip.decompress(blob) if desc["mediaType"].endswith("gzip") else blob
        assert sha(tar) == diff_id


def test_busybox_push_and_read_back(registry: Registry, tmp_path: Path) -> None:
    image = busybox_image(cmd=["sleep", "3600"], labels={"a": "b"})
    digest = push(registry.url, "test/busybox", "latest", image)
    assert digest == image.digest
    check_image_in_registry(registry, "test/busybox", "latest", image)
    check_image_in_registry(registry, "test/busybox", digest, image)

    config = json.loads(fetch_blob(registry.url, "test/busybox", image.config_digest))
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["config"]["Cmd"] == ["sleep", "3600"]
    assert config["config"]["Labels"] == {"a": "b"}
    assert config["config"]["Env"][0].startswith("PATH=")

    assert image.manifest["config"]["mediaType"] == OCI_CONFIG
    layer = image.layers[0]
    assert layer.media_type == OCI_LAYER_GZIP
    blob = fetch_blob(registry.url, "test/busybox", layer.digest)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        bb = tf.getmember("bin/busybox")
        assert bb.isreg() and bb.mode == 0o755
        sh = tf.getmember("bin/sh")
        assert sh.issym() and sh.linkname == "busybox"
        assert tf.getmember("tmp").mode == 0o1777
        passwd = tf.extractfile("etc/passwd")
        assert passwd is not None and b"nobody:x:65534:65534" in passwd.read()


def test_push_again_and_by_digest(registry: Registry) -> None:
    image = busybox_image()
    assert push(registry.url, "test/again", "v1", image) == image.digest
    # Second push: blobs already exist (HEAD short-circuits), manifest re-PUT is fine.
    assert push(registry.url, "test/again", "v1", image) == image.digest
    assert push(registry.url, "test/bydigest", None, image) == image.digest
    check_image_in_registry(registry, "test/bydigest", image.digest, image)
    with pytest.raises(RegistryHTTPError) as err:
        fetch_manifest(registry.url, "test/bydigest", "latest")
    assert err.value.status == 404


def test_pause_image(registry: Registry) -> None:
    image = pause_image()
    push(registry.url, "test/pause", "3.9", image)
    check_image_in_registry(registry, "test/pause", "3.9", image)
    config = json.loads(fetch_blob(registry.url, "test/pause", image.config_digest))
    assert config["config"]["Entrypoint"] == ["/catatonit", "-P"]
    assert "catatonit" in image.layers[0].names()


def test_oci_index_two_platforms(registry: Registry) -> None:
    amd64 = busybox_image()
    arm64 = busybox_image(architecture="arm64", variant="v8")
    assert amd64.digest != arm64.digest
    index = build_index([amd64, (arm64, {"architecture": "arm64", "os": "linux"})])
    assert index.media_type == OCI_INDEX
    digest = push(registry.url, "test/multi", "latest", index)
    assert digest == index.digest

    got = fetch_manifest(registry.url, "test/multi", "latest", accept=[OCI_INDEX, OCI_MANIFEST])
    assert got.media_type == OCI_INDEX and got.digest == index.digest == sha(got.body)
    body = json.loads(got.body)
    platforms = [m["platform"] for m in body["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]
    for desc, image in zip(body["manifests"], [amd64, arm64], strict=True):
        assert desc["mediaType"] == OCI_MANIFEST and desc["digest"] == image.digest
        check_image_in_registry(registry, "test/multi", desc["digest"], image)
    # Platform defaults to the image's own config, variant included.
    assert build_index([arm64]).manifest["manifests"][0]["platform"] == {
        "architecture": "arm64",
        "os": "linux",
        "variant": "v8",
    }


def test_docker_schema2_and_manifest_list(registry: Registry) -> None:
    amd64 = busybox_image(schema="docker")
    arm = busybox_image(schema="docker", architecture="arm", variant="v7")
    assert amd64.media_type == DOCKER_MANIFEST
    assert amd64.manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert amd64.manifest["layers"][0]["mediaType"] == DOCKER_LAYER_GZIP
    push(registry.url, "test/docker", "single", amd64)
    check_image_in_registry(registry, "test/docker", "single", amd64)

    mlist = build_index([amd64, arm])
    assert mlist.media_type == DOCKER_MANIFEST_LIST
    push(registry.url, "test/docker", "list", mlist)
    got = fetch_manifest(registry.url, "test/docker", "list", accept=[DOCKER_MANIFEST_LIST])
    assert got.media_type == DOCKER_MANIFEST_LIST and got.digest == mlist.digest
    children = json.loads(got.body)["manifests"]
    assert [c["mediaType"] for c in children] == [DOCKER_MANIFEST, DOCKER_MANIFEST]
    assert children[1]["platform"] == {"architecture": "arm", "os": "linux", "variant": "v7"}
    check_image_in_registry(registry, "test/docker", arm.digest, arm)


def test_uncompressed_layer(registry: Registry) -> None:
    layer = LayerBuilder().file("hello.txt", "hello\n").build(compression=None)
    assert layer.media_type == OCI_LAYER_TAR and layer.blob == layer.tar
    assert layer.digest == layer.diff_id
    image = build_image([busybox_layer(), layer], cmd=["cat", "/hello.txt"])
    push(registry.url, "test/plain", "latest", image)
    check_image_in_registry(registry, "test/plain", "latest", image)


def test_push_errors_show_status_and_body(registry: Registry) -> None:
    image = busybox_image(labels={"missing": "blobs"})
    with pytest.raises(RegistryHTTPError) as err:
        push_manifest(registry.url, "test/broken", "x", image.manifest_bytes, image.media_type)
    assert err.value.status == 400
    assert "BLOB_UNKNOWN" in str(err.value)
    with pytest.raises(RegistryHTTPError) as err:
        push_blob(registry.url, "test/broken", sha(b"other"), b"data")
    assert err.value.status == 400 and "DIGEST_INVALID" in str(err.value)


def test_builds_are_deterministic() -> None:
    assert busybox_image().digest == busybox_image().digest
    assert pause_image().digest == pause_image().digest
    a = build_image([busybox_layer()], env=["A=1"], exposed_ports=[80, "53/udp"], user="1000")
    b = build_image([busybox_layer()], env={"A": "1"}, exposed_ports=[80, "53/udp"], user="1000")
    assert a.digest == b.digest
    assert a.config["config"]["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert a.config["config"]["User"] == "1000"


def test_layer_builder_entry_kinds_and_hostile_entries() -> None:
    evil_abs = tarfile.TarInfo("/etc/evil")
    evil_up = tarfile.TarInfo("../../escape")
    layer = (
        LayerBuilder(sort=False)
        .dir("/data", mode=0o750, uid=5, gid=6)
        .file("data/f", b"x", mode=0o4755, xattrs={"user.foo": "bar"}, mtime=42)
        .hardlink("data/h", "data/f")
        .symlink("data/s", "/etc/passwd")
        .char_device("dev/null", 1, 3)
        .block_device("dev/sda", 8, 0)
        .fifo("data/p")
        .whiteout("/data/gone")
        .opaque("/data")
        .raw(evil_abs, b"abs")
        .raw(evil_up, b"up")
        .build()
    )
    members = {m.name: m for m in layer.members()}
    assert list(members) == [
        "data",
        "data/f",
        "data/h",
        "data/s",
        "dev/null",
        "dev/sda",
        "data/p",
        "data/.wh.gone",
        "data/.wh..wh..opq",
        "/etc/evil",
        "../../escape",
    ]
    assert members["data"].isdir() and members["data"].mode == 0o750
    assert (members["data"].uid, members["data"].gid) == (5, 6)
    f = members["data/f"]
    assert f.mode == 0o4755 and f.mtime == 42
    assert f.pax_headers["SCHILY.xattr.user.foo"] == "bar"
    assert members["data/h"].islnk() and members["data/h"].linkname == "data/f"
    assert members["data/s"].issym() and members["data/s"].linkname == "/etc/passwd"
    assert members["dev/null"].ischr() and members["dev/null"].devmajor == 1
    assert members["dev/sda"].isblk() and members["dev/sda"].devmajor == 8
    assert members["data/p"].isfifo()
    assert members["/etc/evil"].size == 3
    # Sorted by default, whatever the insertion order.
    names = LayerBuilder().file("b").file("a/x").dir("a").build().names()
    assert names == ["a", "a/x", "b"]


def test_busybox_binary_runs_from_extracted_layer(tmp_path: Path) -> None:
    root = extract(busybox_layer().tar, tmp_path / "rootfs")
    assert elf_interpreter(root / "bin/busybox") is None  # static: runs anywhere
    out = subprocess.run(
        [str(root / "bin/busybox"), "echo", "hi"], capture_output=True, check=True, timeout=10
    )
    assert out.stdout == b"hi\n"
    # Applet symlinks dispatch on argv[0].
    out = subprocess.run([str(root / "bin/echo"), "yo"], capture_output=True, check=True)
    assert out.stdout == b"yo\n"


@needs_root
def test_busybox_and_pause_run_in_chroot(tmp_path: Path) -> None:
    bb = extract(busybox_layer().tar, tmp_path / "bb")
    out = subprocess.run(
        [CHROOT, str(bb), "/bin/sh", "-c", "id -u; ls /bin/busybox"],
        capture_output=True,
        check=True,
        timeout=10,
        env={"PATH": "/bin"},
    )
    assert out.stdout == b"0\n/bin/busybox\n"
    pause = extract(pause_image().layers[0].tar, tmp_path / "pause")
    out = subprocess.run(
        [CHROOT, str(pause), "/catatonit", "--version"], capture_output=True, timeout=10
    )
    assert out.returncode == 0, out.stderr
    assert b"catatonit" in out.stdout + out.stderr


@needs_root
def test_dynamic_binary_brings_its_libraries(tmp_path: Path) -> None:
    true_bin = shutil.which("true") or "/bin/true"
    if elf_interpreter(true_bin) is None:
        pytest.skip("host `true` is static")
    layer = add_host_binary(LayerBuilder(), true_bin, "bin/true").build()
    names = layer.names()
    assert any(n.startswith("lib") and ".so" in n for n in names)
    root = extract(layer.tar, tmp_path / "rootfs")
    subprocess.run([CHROOT, str(root), "/bin/true"], check=True, timeout=10)


def test_push_handles_relative_location_with_query() -> None:
    """The real registry answers absolute Locations; others answer relative ones."""
    seen: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, headers: dict[str, str] | None = None) -> None:
            seen.append((self.command, self.path))
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._reply(404)

        def do_POST(self) -> None:
            self._reply(202, {"Location": "/v2/r/blobs/uploads/u1?_state=abc"})

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self._reply(201)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        digest = sha(b"blob")
        push_blob(url, "r", digest, b"blob")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [
        ("HEAD", f"/v2/r/blobs/{digest}"),
        ("POST", "/v2/r/blobs/uploads/"),
        ("PUT", f"/v2/r/blobs/uploads/u1?_state=abc&digest={digest.replace(':', '%3A')}"),
    ]


def test_registry_start_failure_is_reported(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "s", binary="/bin/false", start_timeout=5)
    with pytest.raises(RegistryError, match="exited with code 1"):
        reg.start()
    assert not reg.running


def test_registry_stop_ends_process(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "s").start()
    proc = reg._proc
    assert proc is not None and reg.running
    assert reg.url == f"http://{reg.host}" and reg.host == f"127.0.0.1:{reg.port}"
    reg.stop()
    assert proc.returncode is not None and not reg.running
    assert (tmp_path / "s").is_dir()
