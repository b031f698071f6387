"""Images end to end: CRI ImageService and `shoal pull` against a real registry, through
real gateway and puller processes, real NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import msgspec
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from prometheus_client.parser import text_string_to_metric_families
from shoal_common import subjects
from shoal_common.bus import Bus
from shoal_common.messages.images import ImageCreate, ImageDelete
from support.faulty_registry import FaultyRegistry
from support.images import LayerBuilder, build_image, build_index, busybox_image, push
from support.processes import SHOAL, ServiceSet
from support.registry import Registry
from support.shoal import cri_client

pytestmark = pytest.mark.e2e


async def start(services: ServiceSet, *names: str) -> None:
    started = [services.start(name) for name in names]
    for sp in started:
        await asyncio.to_thread(services.wait_serving, sp)


def metric_total(addr: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


@contextlib.asynccontextmanager
async def image_service(services: ServiceSet) -> AsyncIterator[cri_grpc.ImageServiceStub]:
    """The node's CRI image service, for as long as the block runs."""
    async with cri_client(services) as api:
        yield api.images


async def pull_refused(services: ServiceSet, image: str) -> grpc.aio.AioRpcError:
    """The gateway's error for a PullImage of `image` (which must fail)."""
    async with image_service(services) as images:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    return err.value


async def test_cri_image_service_round_trip(services: ServiceSet, registry: Registry,
                                            bus: Bus) -> None:
    image = busybox_image(user="1000", cmd=["sh"])
    digest = push(registry.url, "e2e/busybox", "1.0", image)
    await start(services, "puller", "snapshotter", "cri-gateway")
    ref = f"{registry.host}/e2e/busybox:1.0"
    js = bus.nc.jetstream()
    events = await js.subscribe(subjects.event_filter(services.node.node_id, "k8s.io"),
                                ordered_consumer=True)
    async with image_service(services) as images:
        pulled = await images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)))
        assert pulled.image_ref == image.config_digest

        listed = await images.ListImages(cri.ListImagesRequest())
        [img] = [i for i in listed.images if i.id == image.config_digest]
        assert list(img.repo_tags) == [ref]
        assert list(img.repo_digests) == [f"{registry.host}/e2e/busybox@{digest}"]
        assert img.uid.value == 1000
        assert img.size == len(image.manifest_bytes) + len(image.config_bytes) + sum(
            layer.size for layer in image.layers)

        status = await images.ImageStatus(cri.ImageStatusRequest(
            image=cri.ImageSpec(image=image.config_digest[:19]), verbose=True))
        assert status.image.id == image.config_digest
        info = json.loads(status.info["info"])
        assert info["imageSpec"]["config"]["Cmd"] == ["sh"]
        assert info["layers"][0]["diffID"] == image.layers[0].diff_id

        filtered = await images.ListImages(cri.ListImagesRequest(
            filter=cri.ImageFilter(image=cri.ImageSpec(image=ref))))
        assert [i.id for i in filtered.images] == [image.config_digest]

        # The snapshotter unpacks on images.create; the image fs is its state dir.
        snapshots = services.node.state_root / "snapshotter"
        for _ in range(100):
            fs = await images.ImageFsInfo(cri.ImageFsInfoRequest())
            if fs.image_filesystems[0].used_bytes.value > 1_000_000:
                break
            await asyncio.sleep(0.1)
        assert fs.image_filesystems[0].used_bytes.value > 1_000_000  # busybox, unpacked
        assert fs.image_filesystems[0].fs_id.mountpoint == str(snapshots)

        missing = await images.ImageStatus(cri.ImageStatusRequest(
            image=cri.ImageSpec(image=f"{registry.host}/e2e/absent:1")))
        assert not missing.HasField("image")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await images.PullImage(cri.PullImageRequest(
                image=cri.ImageSpec(image=f"{registry.host}/e2e/absent:1")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="Bad//Ref")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        await images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)))
        await images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)))
        after = await images.ListImages(cri.ListImagesRequest())
        assert image.config_digest not in [i.id for i in after.images]

    blobs = services.node.state_root / "puller" / "content" / "blobs" / "sha256"
    assert list(blobs.iterdir()) == []  # garbage collected with the last reference
    seen = []
    while True:
        try:
            msg = await events.next_msg(timeout=2)
        except Exception:
            break
        seen.append(subjects.parse_event(msg.subject)[2])
        if seen[-1] == "images.create":
            created = msgspec.msgpack.decode(msg.data, type=ImageCreate)
            assert created.config_digest == image.config_digest
            assert created.layers[0].chain_id == image.layers[0].diff_id
        if seen[-1] == "images.delete":
            assert msgspec.msgpack.decode(msg.data, type=ImageDelete).name
    await events.unsubscribe()
    assert seen.count("images.create") == 2  # the tag name and the digest name
    assert seen.count("images.delete") == 2
    assert seen.count("content.delete") == 2 + len(image.layers)
    assert "images.pull.progress" in seen
    assert seen.index("images.create") < seen.index("images.delete")


async def test_same_image_pulled_concurrently_by_two_replicas_downloads_once(
        services: ServiceSet, registry: Registry, bus: Bus) -> None:
    big = LayerBuilder().file("data/blob", bytes(range(256)) * 40_000).build()
    image = build_image([big], cmd=["true"])
    push(registry.url, "e2e/twice", "v1", image)
    await start(services, "puller", "puller", "cri-gateway")
    ref = f"{registry.host}/e2e/twice:v1"
    async with image_service(services) as images:
        results = await asyncio.gather(*(images.PullImage(cri.PullImageRequest(
            image=cri.ImageSpec(image=ref))) for _ in range(10)))
    assert {r.image_ref for r in results} == {image.config_digest}
    pullers = [sp for sp in services if sp.service == "puller"]
    fetched = sum(metric_total(sp.metrics_addr, "shoal_puller_layer_bytes_fetched_total")
                  for sp in pullers)
    assert fetched == big.size
    handled = [metric_total(sp.metrics_addr, "shoal_bus_requests_handled_total")
               for sp in pullers]
    assert all(h > 0 for h in handled), "both replicas should have taken work"


async def test_shared_layers_survive_until_the_last_image_goes(
        services: ServiceSet, registry: Registry, bus: Bus) -> None:
    base = LayerBuilder().file("base.txt", b"shared base").build()
    a = build_image([base, LayerBuilder().file("a.txt", b"a").build()], cmd=["a"])
    b = build_image([base, LayerBuilder().file("b.txt", b"b").build()], cmd=["b"])
    push(registry.url, "e2e/a", "1", a)
    push(registry.url, "e2e/b", "1", b)
    await start(services, "puller", "cri-gateway")
    blobs = services.node.state_root / "puller" / "content" / "blobs" / "sha256"
    base_blob = blobs / base.digest.removeprefix("sha256:")
    async with image_service(services) as images:
        for name in ("a", "b"):
            await images.PullImage(cri.PullImageRequest(
                image=cri.ImageSpec(image=f"{registry.host}/e2e/{name}:1")))
        await images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=a.config_digest)))
        assert base_blob.exists()
        assert not (blobs / a.layers[1].digest.removeprefix("sha256:")).exists()
        await images.RemoveImage(cri.RemoveImageRequest(
            image=cri.ImageSpec(image=f"{registry.host}/e2e/b:1")))
        assert not base_blob.exists()


async def test_index_platform_choice_and_docker_schema(
        services: ServiceSet, registry: Registry, bus: Bus) -> None:
    amd = build_image([LayerBuilder().file("arch", b"amd64").build()], architecture="amd64")
    arm = build_image([LayerBuilder().file("arch", b"arm64").build()], architecture="arm64",
                      variant="v8")
    push(registry.url, "e2e/multi", "1", build_index([amd, arm]))
    docker = build_image([LayerBuilder().file("d", b"docker").build()], schema="docker")
    push(registry.url, "e2e/docker", "1", docker)
    await start(services, "puller", "cri-gateway")
    async with image_service(services) as images:
        got = await images.PullImage(cri.PullImageRequest(
            image=cri.ImageSpec(image=f"{registry.host}/e2e/multi:1")))
        assert got.image_ref == amd.config_digest  # this machine is amd64
        got = await images.PullImage(cri.PullImageRequest(
            image=cri.ImageSpec(image=f"{registry.host}/e2e/docker:1")))
        assert got.image_ref == docker.config_digest
    arm_only = build_index([arm])
    push(registry.url, "e2e/armonly", "1", arm_only)
    err = await pull_refused(services, f"{registry.host}/e2e/armonly:1")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "linux/arm64" in (err.details() or "")


async def test_shoal_pull_images_rmi_cli(services: ServiceSet, registry: Registry) -> None:
    image = busybox_image()
    push(registry.url, "e2e/cli", "latest", image)
    await start(services, "puller")
    node = services.node
    flags = ["--node-id", node.node_id, "--nats-url", node.nats_url,
             "--state-root", str(node.state_root), "--run-root", str(node.run_root)]

    def shoal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SHOAL, *args, *flags], capture_output=True, text=True,
                              timeout=120)

    out = await asyncio.to_thread(shoal, "pull", f"{registry.host}/e2e/cli")
    assert out.returncode == 0, out.stderr
    short = image.layers[0].digest.removeprefix("sha256:")[:12]
    assert f"{short}: Pull complete" in out.stdout
    assert f"Image:  {image.config_digest}" in out.stdout
    listed = await asyncio.to_thread(shoal, "images")
    assert f"{registry.host}/e2e/cli" in listed.stdout and "latest" in listed.stdout
    again = await asyncio.to_thread(shoal, "pull", f"{registry.host}/e2e/cli")
    assert f"{short}: Already exists" in again.stdout
    removed = await asyncio.to_thread(shoal, "rmi", f"{registry.host}/e2e/cli")
    assert removed.returncode == 0 and "Untagged:" in removed.stdout
    missing = await asyncio.to_thread(shoal, "rmi", f"{registry.host}/e2e/cli")
    assert missing.returncode == 1 and "not found" in missing.stderr


async def test_gzip_zstd_and_uncompressed_layers(services: ServiceSet, registry: Registry,
                                                 bus: Bus) -> None:
    layers = [LayerBuilder().file(f"{kind}.txt", str(kind).encode() * 1000).build(
        compression=kind) for kind in ("gzip", "zstd", None)]
    image = build_image(layers, cmd=["true"])
    push(registry.url, "e2e/compressions", "1", image)
    await start(services, "puller", "cri-gateway")
    async with image_service(services) as images:
        got = await images.PullImage(cri.PullImageRequest(
            image=cri.ImageSpec(image=f"{registry.host}/e2e/compressions:1")))
        status = await images.ImageStatus(cri.ImageStatusRequest(
            image=cri.ImageSpec(image=got.image_ref), verbose=True))
    media = [layer["mediaType"] for layer in json.loads(status.info["info"])["layers"]]
    assert media == [layer.media_type for layer in layers]
    assert media[1].endswith("+zstd") and media[2].endswith(".tar")


async def test_basic_auth_htpasswd_registry(services: ServiceSet, tmp_path: Path) -> None:
    import base64
    import crypt  # bcrypt through libxcrypt: what the registry's htpasswd needs

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    creds = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    with Registry(tmp_path / "storage", auth={"htpasswd": {
            "realm": "shoal-test", "path": str(htpasswd)}}) as private:
        image = build_image([LayerBuilder().file("secret", b"private").build()], cmd=["x"])
        push(private.url, "private/img", "1", image, headers=creds)
        await start(services, "puller", "cri-gateway")
        ref = cri.ImageSpec(image=f"{private.host}/private/img:1")
        async with image_service(services) as images:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await images.PullImage(cri.PullImageRequest(image=ref))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await images.PullImage(cri.PullImageRequest(image=ref, auth=cri.AuthConfig(
                    username="alice", password="wrong")))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            got = await images.PullImage(cri.PullImageRequest(image=ref, auth=cri.AuthConfig(
                username="alice", password="s3cret")))
            assert got.image_ref == image.config_digest
            auth_field = base64.b64encode(b"alice:s3cret").decode()
            await images.RemoveImage(cri.RemoveImageRequest(image=ref))
            got = await images.PullImage(cri.PullImageRequest(image=ref, auth=cri.AuthConfig(
                auth=auth_field)))
            assert got.image_ref == image.config_digest


async def test_corrupted_blob_is_rejected(services: ServiceSet, registry: Registry,
                                          bus: Bus) -> None:

    image = build_image([LayerBuilder().file("x", b"original content" * 100).build()])
    push(registry.url, "e2e/corrupt", "1", image)
    async with FaultyRegistry(registry.url) as front:
        front.tamper(r"/blobs/" + image.layers[0].digest,
                     lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]))
        await start(services, "puller", "cri-gateway")
        err = await pull_refused(services, f"{front.host}/e2e/corrupt:1")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad content" in (err.details() or "")
    blobs = services.node.state_root / "puller" / "content" / "blobs" / "sha256"
    assert not (blobs / image.layers[0].digest.removeprefix("sha256:")).exists()
