"""Image archives with other tools, both ways, on a whole node: what `shoal image export`
writes, skopeo reads as an oci-archive and as a docker-archive with the same digests; what
skopeo copies from the registry into either kind of archive (and what umoci builds),
`shoal image import` stores with the same digests, and a container of it runs."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as cri
from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient
from shoal_common.messages.images import ImageGetRequest, ImageInfo, PullRequest
from support.images import busybox_image
from support.processes import SHOAL, ServiceSet
from support.shoal import Cri, exited, pod_config, start_main

pytestmark = pytest.mark.e2e

NS = "k8s.io"


def run(*argv: str) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def skopeo(*args: str) -> str:
    return run("skopeo", "--insecure-policy", *args)


def shoal_cli(services: ServiceSet, *args: str) -> str:
    return run(SHOAL, *args, *services.node.flags())


def dir_image(path: Path) -> tuple[str, dict[str, object]]:
    """(manifest digest, manifest) of what skopeo wrote to a `dir:` destination."""
    raw = (path / "manifest.json").read_bytes()
    return "sha256:" + hashlib.sha256(raw).hexdigest(), json.loads(raw)


async def get(bus: Bus, ref: str) -> ImageInfo:
    return await ImagesClient(bus, namespace=NS).get(ImageGetRequest(ref=ref))


async def run_container(api: Cri, tmp: Path, name: str, image: str,
                        command: list[str]) -> list[str]:
    """Run `command` in a new pod from `image` (already in the store): its log lines."""
    config = pod_config(tmp, name)
    pod = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
           ).pod_sandbox_id
    status = await exited(api, await start_main(api, pod, config, image, command))
    assert (status.state, status.exit_code) == (cri.CONTAINER_EXITED, 0), status
    return (Path(config.log_directory) / "main.log").read_text().splitlines()


async def test_skopeo_reads_an_export_as_an_oci_and_as_a_docker_archive(
        shoal: Cri, services: ServiceSet, images: dict[str, str], bus: Bus,
        tmp_path: Path) -> None:
    image = busybox_image()  # what the `images` fixture pushed as images["busybox"]
    await ImagesClient(bus, namespace=NS).pull(PullRequest(ref=images["busybox"],
                                                           pull_id="export-1"))
    archive = tmp_path / "export.tar"
    shoal_cli(services, "image", "export", str(archive), images["busybox"])

    skopeo("copy", f"oci-archive:{archive}", f"dir:{tmp_path / 'oci'}")
    digest, manifest = dir_image(tmp_path / "oci")
    assert digest == image.digest  # the very manifest, byte for byte
    assert manifest["config"]["digest"] == image.config_digest  # type: ignore[index]

    skopeo("copy", f"docker-archive:{archive}", f"dir:{tmp_path / 'docker'}")
    _, manifest = dir_image(tmp_path / "docker")
    # A docker archive has no manifest: skopeo makes one for the same config and layers
    # (as uncompressed tars, their digests are the diff IDs).
    assert manifest["config"]["digest"] == image.config_digest  # type: ignore[index]
    assert [layer["digest"] for layer in manifest["layers"]] == [  # type: ignore[index]
        layer.diff_id for layer in image.layers]
    # manifest.json's RepoTags name it: skopeo finds it by that name.
    skopeo("copy", f"docker-archive:{archive}:{images['busybox']}", f"dir:{tmp_path / 'named'}")
    assert dir_image(tmp_path / "named") == dir_image(tmp_path / "docker")


async def test_skopeo_archives_from_the_registry_are_imported_and_run(
        shoal: Cri, services: ServiceSet, images: dict[str, str], bus: Bus,
        tmp_path: Path) -> None:
    image = busybox_image()
    source = f"docker://{images['busybox']}"
    oci, docker = tmp_path / "oci.tar", tmp_path / "docker.tar"
    skopeo("copy", "--src-tls-verify=false", source, f"oci-archive:{oci}:import.test/oci:1")
    skopeo("copy", "--src-tls-verify=false", source,
           f"docker-archive:{docker}:import.test/docker:1")

    out = shoal_cli(services, "image", "import", str(oci))
    assert "Loaded image: import.test/oci:1" in out
    info = await get(bus, "import.test/oci:1")
    assert (info.id, info.manifest_digest) == (image.config_digest, image.digest)
    out = shoal_cli(services, "image", "import", str(docker))
    assert "Loaded image: import.test/docker:1" in out
    info = await get(bus, "import.test/docker:1")
    assert info.id == image.config_digest
    assert [layer.diff_id for layer in info.layers] == [layer.diff_id for layer in image.layers]

    for name in ("import.test/oci:1", "import.test/docker:1"):
        lines = await run_container(shoal, tmp_path, name.split("/")[1].replace(":", "-"),
                                    name, ["sh", "-c", "echo imported runs"])
        assert any(line.endswith(" stdout F imported runs") for line in lines), lines


async def test_an_image_umoci_built_is_imported_and_runs(
        shoal: Cri, services: ServiceSet, bus: Bus, tmp_path: Path) -> None:
    if shutil.which("umoci") is None:
        pytest.fail("umoci is not installed (deploy/setup.sh --test installs it)")
    layout = tmp_path / "layout"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:v1")
    # unpack, add, repack (umoci 0.4.7's `insert` writes a layer tar without its end).
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    (bundle / "rootfs" / "bin").mkdir()
    shutil.copy("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
    run("umoci", "repack", "--image", f"{layout}:v1", str(bundle))
    run("umoci", "config", "--image", f"{layout}:v1", "--config.cmd", "/bin/busybox")
    archive = tmp_path / "umoci.tar"
    # As people tar a layout: from inside it, every name starting "./".
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    out = shoal_cli(services, "image", "import", str(archive), "--base-name", "import.test/umoci")
    assert "Loaded image: import.test/umoci:v1" in out
    index = json.loads((layout / "index.json").read_text())
    info = await get(bus, "import.test/umoci:v1")
    assert info.target_digest == index["manifests"][0]["digest"]
    lines = await run_container(shoal, tmp_path, "umoci", "import.test/umoci:v1",
                                ["/bin/busybox", "echo", "built by umoci"])
    assert any(line.endswith(" stdout F built by umoci") for line in lines), lines
