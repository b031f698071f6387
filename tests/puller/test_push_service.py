"""`images.push` through a real puller process to real registries (`docker-registry`),
checked with another tool (skopeo) reading what was pushed: digests, layers, mounts and
skips, chunked uploads, resumed uploads after broken connections and a killed registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient
from shoal_common.errors import FailedPrecondition, Invalid, NotFound, Unavailable
from shoal_common.messages.images import ImageInfo, PullRequest, RegistryAuth
from shoal_common.messages.push import PushReply, PushRequest
from support.faulty_registry import FaultyRegistry
from support.images import Image, LayerBuilder, build_image, build_index, push
from support.processes import ServiceSet
from support.registry import Registry

pytestmark = pytest.mark.e2e

CHUNK = 1 << 20  # services.puller.push_chunk_size in these tests: big layers go in chunks


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def big_image(name: str, size: int = 3 * CHUNK + 12345) -> Image:
    # Random, so gzip cannot shrink it below the chunk size; a small second layer and the
    # config go in one PUT each.
    return build_image([LayerBuilder().file(f"{name}.bin", os.urandom(size)).build(),
                        LayerBuilder().file(f"{name}.txt", name.encode()).build()],
                       cmd=[name])


async def start_puller(services: ServiceSet, *sets: str) -> None:
    extra = [a for s in (f"services.puller.push_chunk_size={CHUNK}", *sets)
             for a in ("--set", s)]
    sp = services.start("puller", extra=extra)
    await asyncio.to_thread(services.wait_serving, sp)


async def pulled_big_image(services: ServiceSet, registry: Registry, bus: Bus, name: str,
                           *sets: str, size: int = 3 * CHUNK + 12345) -> tuple[Image, str]:
    """A big_image pushed to `registry` as push/<name>:1, then pulled by a puller started
    with `sets`: the image and its reference there."""
    image = big_image(name, size)
    push(registry.url, f"push/{name}", "1", image)
    await start_puller(services, *sets)
    source = f"{registry.host}/push/{name}:1"
    await pull(bus, source)
    return image, source


def images(bus: Bus) -> ImagesClient:
    return ImagesClient(bus, namespace="k8s.io")


async def pull(bus: Bus, ref: str, platform: str = "") -> ImageInfo:
    reply = await images(bus).pull(PullRequest(ref=ref, pull_id=uuid.uuid4().hex,
                                               platform=platform), timeout=120)
    return reply.image


async def push_image(bus: Bus, ref: str, target: str = "", *, push_id: str = "",
                     auth: RegistryAuth | None = None) -> PushReply:
    return await images(bus).push(PushRequest(ref=ref, target=target, auth=auth,
                                              push_id=push_id or uuid.uuid4().hex),
                                  timeout=120)


def skopeo(*args: str) -> str:
    done = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def inspect_raw(ref: str) -> bytes:
    out = await asyncio.to_thread(subprocess.run, [
        "skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
        capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def inspect(ref: str) -> dict[str, Any]:
    return json.loads(await asyncio.to_thread(skopeo, "inspect", "--tls-verify=false",
                                              f"docker://{ref}"))


async def copy_to_dir(ref: str, dest: Path, *, all_platforms: bool = False) -> dict[str, bytes]:
    """skopeo's own pull of `ref` into a directory: its files by name."""
    await asyncio.to_thread(skopeo, "copy", "--src-tls-verify=false",
                            *(["--all"] if all_platforms else []), f"docker://{ref}",
                            f"dir:{dest}")
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def outcomes(reply: PushReply) -> dict[str, str]:
    return {b.digest: b.outcome for b in reply.blobs}


async def test_push_to_a_fresh_registry_then_skopeo_sees_the_same_digests(
        services: ServiceSet, registry: Registry, bus: Bus, tmp_path: Path) -> None:
    image = big_image("fresh")
    push(registry.url, "push/fresh", "1", image)
    await start_puller(services)
    info = await pull(bus, f"{registry.host}/push/fresh:1")
    with Registry(tmp_path / "target") as target:
        async with FaultyRegistry(target.url) as front:
            reply = await push_image(bus, f"{registry.host}/push/fresh:1",
                                     f"{front.host}/team/app:v1")
            assert reply.target == f"{front.host}/team/app:v1"
            assert reply.digest == info.target_digest == image.digest
            assert reply.manifests == [image.digest]
            assert outcomes(reply) == {digest: "uploaded" for digest, _ in image.blobs()}
            # The big layer went in chunks, each saying where it starts; the small blobs in
            # one PUT with their digest.
            patches = [r for r in front.requests if r.method == "PATCH"]
            assert [r.headers["Content-Range"] for r in patches] == [
                f"{i * CHUNK}-{min((i + 1) * CHUNK, image.layers[0].size) - 1}"
                for i in range(4)]
            puts = [r for r in front.requests if r.method == "PUT" and "/blobs/" in r.path]
            assert sorted(p.query.rsplit("digest=", 1)[1] for p in puts) == sorted(
                d for d, _ in image.blobs())

            again = await push_image(bus, f"{registry.host}/push/fresh:1",
                                     f"{front.host}/team/app:v1")
            assert set(outcomes(again).values()) == {"exists"}
            # A second repository of the same registry: every blob mounted from the first.
            other = await push_image(bus, f"{registry.host}/push/fresh:1",
                                     f"{front.host}/team/other:v2")
            assert set(outcomes(other).values()) == {"mounted"}
            assert {b.mounted_from for b in other.blobs} == {"team/app"}

        ref = f"{target.host}/team/app:v1"
        assert sha256(await inspect_raw(ref)) == image.digest
        seen = await inspect(ref)
        assert seen["Digest"] == image.digest
        assert seen["Layers"] == [layer.digest for layer in image.layers]
        files = await copy_to_dir(ref, tmp_path / "copy")
        assert sha256(files["manifest.json"]) == image.digest
        blobs = {f"sha256:{name}": data for name, data in files.items()
                 if len(name) == 64}
        assert set(blobs) == {d for d, _ in image.blobs()}
        assert all(sha256(data) == digest for digest, data in blobs.items())
        assert sha256(await inspect_raw(f"{target.host}/team/other:v2")) == image.digest


async def test_a_pulled_image_pushed_to_another_repository_of_its_registry_mounts(
        services: ServiceSet, registry: Registry, bus: Bus) -> None:
    image = build_image([LayerBuilder().file("m", b"mount me").build()], cmd=["m"])
    push(registry.url, "push/mount-src", "1", image)
    await start_puller(services)
    await pull(bus, f"{registry.host}/push/mount-src:1")
    reply = await push_image(bus, f"{registry.host}/push/mount-src:1",
                             f"{registry.host}/push/mount-dst:1")
    assert set(outcomes(reply).values()) == {"mounted"}
    assert {b.mounted_from for b in reply.blobs} == {"push/mount-src"}
    assert sha256(await inspect_raw(f"{registry.host}/push/mount-dst:1")) == image.digest


async def test_a_multi_platform_image_pushes_what_the_store_holds(
        services: ServiceSet, registry: Registry, bus: Bus, tmp_path: Path) -> None:
    amd = build_image([LayerBuilder().file("arch", b"amd64").build()], architecture="amd64")
    arm = build_image([LayerBuilder().file("arch", b"arm64").build()], architecture="arm64",
                      variant="v8")
    index = build_index([amd, arm])
    push(registry.url, "push/multi", "1", index)
    await start_puller(services, "services.puller.platform=linux/amd64")
    source = f"{registry.host}/push/multi:1"
    await pull(bus, source)
    with Registry(tmp_path / "target") as target:
        # One platform in the store: its manifest alone, said so.
        partial = await push_image(bus, source, f"{target.host}/multi:partial")
        assert partial.digest == amd.digest and partial.manifests == [amd.digest]
        assert "1 of the 2 manifests" in partial.note
        assert sha256(await inspect_raw(f"{target.host}/multi:partial")) == amd.digest
        with pytest.raises(FailedPrecondition, match="1 of the 2 manifests"):
            await push_image(bus, source, f"{target.host}/multi@{index.digest}")

        # Both platforms in the store: the index itself, after both manifests.
        await pull(bus, source, platform="linux/arm64/v8")
        full = await push_image(bus, source, f"{target.host}/multi:full")
        assert full.digest == index.digest and not full.note
        assert full.manifests == [amd.digest, arm.digest, index.digest]
        ref = f"{target.host}/multi:full"
        assert sha256(await inspect_raw(ref)) == index.digest
        files = await copy_to_dir(ref, tmp_path / "copy", all_platforms=True)
        assert sha256(files["manifest.json"]) == index.digest
        for child in (amd, arm):
            [name] = [n for n in files if n.endswith(".manifest.json")
                      and sha256(files[n]) == child.digest]
            assert child.layers[0].digest.removeprefix("sha256:") in files, name


class PatchFaults:
    """A rule for a FaultyRegistry in front of `upstream`: PATCHes (upload chunks) pass
    until `after` of them did, then `left` of them break: dropped before they reach the
    registry, or with `half` of the chunk forwarded first, or the registry killed."""

    def __init__(self, front: FaultyRegistry, upstream: Registry) -> None:
        self.front, self.upstream = front, upstream
        self.after, self.left = 0, 0
        self.half = self.kill = False
        front.add(r"/blobs/uploads/.", self.action, times=None)

    def arm(self, *, after: int, left: int, half: bool = False, kill: bool = False) -> None:
        self.after, self.left, self.half, self.kill = after, left, half, kill

    def ranges(self) -> list[str]:
        return [r.headers["Content-Range"] for r in self.front.requests if r.method == "PATCH"]

    async def action(self, request: web.Request, path: str) -> web.StreamResponse:
        if request.method != "PATCH" or not self.left:
            return await self.front.proxy(request, path)
        if self.after:
            self.after -= 1
            return await self.front.proxy(request, path)
        self.left -= 1
        body = await request.read()
        if self.kill:
            await asyncio.to_thread(self.upstream.stop)
        elif self.half:
            start = int(request.headers["Content-Range"].split("-")[0])
            half = body[: len(body) // 2]
            async with aiohttp.ClientSession() as session:
                url = f"{self.upstream.url}{path}?{request.rel_url.raw_query_string}"
                async with session.patch(url, data=half, headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{start + len(half) - 1}"}) as resp:
                    assert resp.status == 202, await resp.text()
        assert request.transport is not None
        request.transport.abort()  # as a connection that broke mid-request
        return web.Response(status=500)


async def test_broken_chunks_are_resent_from_what_the_registry_says_it_has(
        services: ServiceSet, registry: Registry, bus: Bus, tmp_path: Path) -> None:
    image, source = await pulled_big_image(services, registry, bus, "broken")
    layer = image.layers[0]
    with Registry(tmp_path / "target") as target:
        async with FaultyRegistry(target.url) as front:
            faults = PatchFaults(front, target)
            # The third chunk never reaches the registry: its session's status (GET, Range)
            # says where it stands, and the chunk is sent again from there.
            faults.arm(after=2, left=1)
            reply = await push_image(bus, source, f"{front.host}/broken/one:1")
            assert outcomes(reply)[layer.digest] == "uploaded"
            ranges = faults.ranges()
            assert ranges[2] == ranges[3] == f"{2 * CHUNK}-{3 * CHUNK - 1}", ranges
            statuses = [r for r in front.requests if r.method == "GET" and "/uploads/" in r.path]
            assert len(statuses) == 1
            assert sha256(await inspect_raw(f"{target.host}/broken/one:1")) == image.digest

    with Registry(tmp_path / "second") as target:
        async with FaultyRegistry(target.url) as front:
            # Half of it reaches the registry, whose session then no longer matches what
            # Shoal sent (distribution drops such a session): a new session from byte 0.
            faults = PatchFaults(front, target)
            faults.arm(after=2, left=1, half=True)
            reply = await push_image(bus, source, f"{front.host}/broken/two:1")
            assert outcomes(reply)[layer.digest] == "uploaded"
            assert faults.ranges()[3].startswith("0-")
        files = await copy_to_dir(f"{target.host}/broken/two:1", tmp_path / "copy")
        assert sha256(files[layer.digest.removeprefix("sha256:")]) == layer.digest
        assert sha256(files["manifest.json"]) == image.digest


async def test_a_retried_push_resumes_the_upload_an_earlier_one_left(
        services: ServiceSet, registry: Registry, bus: Bus, tmp_path: Path) -> None:
    """Chunks break until the push gives up; the retry asks the registry what the upload
    session holds and sends only the rest."""
    image, source = await pulled_big_image(
        services, registry, bus, "retried", "services.puller.max_attempts=2")
    layer = image.layers[0]
    with Registry(tmp_path / "target") as target:
        async with FaultyRegistry(target.url) as front:
            faults = PatchFaults(front, target)
            faults.arm(after=1, left=100)
            with pytest.raises(Unavailable, match="giving up"):
                await push_image(bus, source, f"{front.host}/retried/app:1")
            faults.arm(after=0, left=0)
            before = len(front.requests)
            retried = await push_image(bus, source, f"{front.host}/retried/app:1")
            [big] = [b for b in retried.blobs if b.digest == layer.digest]
            assert big.outcome == "uploaded" and big.resumed_from == CHUNK
            later = front.requests[before:]
            patches = [r.headers["Content-Range"] for r in later if r.method == "PATCH"]
            assert patches[0].startswith(f"{CHUNK}-"), patches
            assert not [r for r in later if r.method == "POST"
                        and r.path.endswith("/uploads/") and not r.query]  # no new session
        assert sha256(await inspect_raw(f"{target.host}/retried/app:1")) == image.digest
        seen = await inspect(f"{target.host}/retried/app:1")
        assert seen["Layers"] == [x.digest for x in image.layers]


async def test_a_push_cut_off_by_a_killed_registry_resumes_after_its_restart(
        services: ServiceSet, registry: Registry, bus: Bus, tmp_path: Path) -> None:
    """The registry dies in the middle of a layer: the push fails; once it is back (its
    upload sessions are on disk), the retry skips the blobs already in and resumes the
    layer at the last chunk the registry took."""
    image, source = await pulled_big_image(services, registry, bus, "killed",
                                           "services.puller.max_attempts=2",
                                           "services.puller.max_concurrent_uploads=1")
    storage = tmp_path / "target"
    target = Registry(storage).start()
    try:
        async with FaultyRegistry(target.url) as front:
            faults = PatchFaults(front, target)
            faults.arm(after=2, left=1, kill=True)
            with pytest.raises(Unavailable):
                await push_image(bus, source, f"{front.host}/killed/app:1")
            target = Registry(storage, port=target.port).start()
            retried = await push_image(bus, source, f"{front.host}/killed/app:1")
            [big] = [b for b in retried.blobs if b.digest == image.layers[0].digest]
            assert big.outcome == "uploaded" and big.resumed_from == 2 * CHUNK
            # One blob at a time, largest first: the others were not begun.
            assert {b.outcome for b in retried.blobs if b is not big} == {"uploaded"}
        assert sha256(await inspect_raw(f"{target.host}/killed/app:1")) == image.digest
    finally:
        target.stop()


async def test_a_push_cut_off_before_its_manifest_is_retried_skipping_every_blob(
        services: ServiceSet, registry: Registry, bus: Bus, tmp_path: Path) -> None:
    image, source = await pulled_big_image(
        services, registry, bus, "manifest", "services.puller.max_attempts=2", size=CHUNK // 2)
    storage = tmp_path / "target"
    target = Registry(storage).start()
    try:
        async with FaultyRegistry(target.url) as front:
            first = target

            async def kill_registry(request: web.Request, path: str) -> web.StreamResponse:
                if request.method == "PUT":
                    await asyncio.to_thread(first.stop)  # the blobs are in, the tag not
                return await front.proxy(request, path)

            front.add(r"/manifests/", kill_registry, times=None)
            with pytest.raises(Unavailable):
                await push_image(bus, source, f"{front.host}/killed/app:1")
            assert [r for r in front.requests if r.method == "PUT" and "/blobs/" in r.path]
            target = Registry(storage, port=target.port).start()
            front.rules.clear()
            before = len(front.requests)
            retried = await push_image(bus, source, f"{front.host}/killed/app:1")
            assert set(outcomes(retried).values()) == {"exists"}
            assert {r.method for r in front.requests[before:]} == {"HEAD", "PUT"}
        assert sha256(await inspect_raw(f"{target.host}/killed/app:1")) == image.digest
    finally:
        target.stop()


async def test_bad_input_and_refusals_are_clear_errors(
        services: ServiceSet, registry: Registry, bus: Bus, tmp_path: Path) -> None:
    image = build_image([LayerBuilder().file("bad", b"bad input").build()], cmd=["b"])
    push(registry.url, "push/bad", "1", image)
    await start_puller(services)
    source = f"{registry.host}/push/bad:1"
    info = await pull(bus, source)
    with pytest.raises(NotFound, match="not found"):
        await push_image(bus, f"{registry.host}/push/absent:1")
    with pytest.raises(Invalid, match="push target: invalid image reference 'Bad//Ref'"):
        await push_image(bus, source, "Bad//Ref")
    with pytest.raises(Invalid, match="built-in image host"):
        await push_image(bus, source, "shoal.local/pause:1")
    with pytest.raises(Invalid, match="not an image name but an image id"):
        await push_image(bus, info.id[:19])
    with pytest.raises(Invalid, match="names digest"):
        await push_image(bus, source, f"{registry.host}/push/bad@sha256:{'0' * 64}")
    with pytest.raises(Invalid, match="push_id"):
        await push_image(bus, source, push_id="../../etc")
    with pytest.raises(Invalid, match="target"):
        await push_image(bus, source, f"{registry.host}/push/x:1\n")
    # By id, to a named target, is fine.
    reply = await push_image(bus, info.id, f"{registry.host}/push/by-id:1")
    assert reply.digest == image.digest


    # Refusals name the registry's status and error code.
    readonly = {"storage": {"filesystem": {"rootdirectory": str(tmp_path / "ro")},
                            "maintenance": {"readonly": {"enabled": True}}}}
    with Registry(tmp_path / "ro", extra_config=readonly) as frozen:
        with pytest.raises(FailedPrecondition,
                           match="registry refused: HTTP 405 Method not allowed") as err:
            await push_image(bus, source, f"{frozen.host}/push/ro:1")
    assert err.value.details.get("http_status") == "405"
    async with FaultyRegistry(registry.url) as liar:
        # Says it has the layer, so Shoal sends none: the manifest is refused for it.
        liar.respond(r"/blobs/" + image.layers[0].digest, 200, times=None)
        with pytest.raises(Invalid, match="HTTP 400 MANIFEST_BLOB_UNKNOWN") as bad:
            await push_image(bus, source, f"{liar.host}/push/lied:1")
    assert bad.value.details == {"http_status": "400", "registry_code": "MANIFEST_BLOB_UNKNOWN"}


async def test_a_registry_asking_for_credentials(services: ServiceSet, registry: Registry,
                                                 bus: Bus, tmp_path: Path) -> None:
    import crypt  # bcrypt through libxcrypt: what the registry's htpasswd needs

    image = build_image([LayerBuilder().file("auth", b"secret").build()], cmd=["a"])
    push(registry.url, "push/auth", "1", image)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    await start_puller(services)
    source = f"{registry.host}/push/auth:1"
    await pull(bus, source)
    with Registry(tmp_path / "private", auth={"htpasswd": {
            "realm": "shoal-test", "path": str(htpasswd)}}) as private:
        target = f"{private.host}/private/app:1"
        with pytest.raises(FailedPrecondition,
                           match=r"push access denied.*requires a username and password"):
            await push_image(bus, source, target)
        with pytest.raises(FailedPrecondition,
                           match=r"push access denied.*HTTP 401 Unauthorized") as err:
            await push_image(bus, source, target,
                             auth=RegistryAuth(username="alice", password="wrong"))
        assert err.value.details.get("http_status") == "401"
        reply = await push_image(bus, source, target,
                                 auth=RegistryAuth(username="alice", password="s3cret"))
        assert reply.digest == image.digest
        assert set(outcomes(reply).values()) == {"uploaded"}
