"""Namespaces in a real puller process: images scoped by namespace over one content store
(a blob pulled in two namespaces is stored once and outlives an rmi in either), and the
`images.namespaces.*` verbs (list, idempotent create, remove refused while in use)."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path

import pytest
from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient
from shoal_common.errors import AlreadyExists, FailedPrecondition, Invalid, NotFound
from shoal_common.messages.images import (
    ContentReadRequest,
    ImageGetRequest,
    ImageListRequest,
    ImageRemoveRequest,
    PullRequest,
)
from shoal_common.messages.namespaces import (
    NamespaceCreateRequest,
    NamespaceListRequest,
    NamespaceRemoveRequest,
)
from support.images import LayerBuilder, build_image, push
from support.processes import ServiceSet
from support.registry import Registry

pytestmark = pytest.mark.e2e

LAYER_BYTES = 2 * 1024 * 1024


def content_bytes(services: ServiceSet) -> int:
    """Bytes of every file under the puller's content dir (blobs and ingests)."""
    root = services.node.state_root / "puller" / "content"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def pull(client: ImagesClient, ref: str) -> str:
    reply = await client.pull(PullRequest(ref=ref, pull_id=uuid.uuid4().hex), timeout=60)
    return reply.image.id


@pytest.fixture
async def puller(services: ServiceSet) -> ServiceSet:
    sp = services.start("puller")
    await asyncio.to_thread(services.wait_serving, sp)
    return services


def push_random(registry: Registry, repo: str) -> str:
    # Random, so its size on disk is what it is on the wire, whatever the compression.
    layer = LayerBuilder().file("data.bin", os.urandom(LAYER_BYTES)).build()
    push(registry.url, repo, "1", build_image([layer], cmd=["true"]))
    return f"{registry.host}/{repo}:1"


async def test_two_namespaces_share_blobs_and_rmi_in_one_keeps_the_other(
        puller: ServiceSet, registry: Registry, bus: Bus) -> None:
    ref = push_random(registry, "ns/shared")
    only_b = push_random(registry, "ns/only-b")
    a, b = ImagesClient(bus, namespace="team-a"), ImagesClient(bus, namespace="team-b")
    before = content_bytes(puller)
    image_id = await pull(a, ref)
    once = content_bytes(puller) - before
    assert once > LAYER_BYTES
    assert await pull(b, ref) == image_id
    assert content_bytes(puller) - before == once, "the second namespace stored it again"
    await pull(b, only_b)
    both = content_bytes(puller)

    tags_a = [t for i in (await a.list_images(ImageListRequest())).images for t in i.repo_tags]
    tags_b = [t for i in (await b.list_images(ImageListRequest())).images for t in i.repo_tags]
    assert tags_a == [ref]
    assert sorted(tags_b) == sorted([ref, only_b])
    with pytest.raises(NotFound):
        await a.get(ImageGetRequest(ref=only_b))

    removed = await a.remove(ImageRemoveRequest(ref=ref))
    assert ref in removed.removed_names and removed.deleted_blobs == []
    info = await b.get(ImageGetRequest(ref=ref))  # still whole in b, every blob readable
    for layer in info.layers:
        read = await b.content_read(ContentReadRequest(digest=layer.digest, offset=0,
                                                       size=4096))
        assert read.total == layer.size
    with pytest.raises(NotFound):
        await a.get(ImageGetRequest(ref=ref))

    removed = await b.remove(ImageRemoveRequest(ref=ref))
    assert len(removed.deleted_blobs) == 3  # manifest, config, layer: nobody names them now
    assert content_bytes(puller) == both - once  # only only-b's blobs are left


async def test_namespaces_list_create_and_remove(puller: ServiceSet, registry: Registry,
                                                 bus: Bus) -> None:
    admin = ImagesClient(bus)
    ref = push_random(registry, "ns/held")
    await pull(ImagesClient(bus, namespace="held"), ref)

    made = await admin.namespaces_create(NamespaceCreateRequest(
        name="team.x", labels={"owner": "alice"}))
    assert made.created and made.namespace.labels == {"owner": "alice"}
    again = await admin.namespaces_create(NamespaceCreateRequest(name="team.x",
                                                                 labels={"owner": "alice"}))
    assert not again.created and again.namespace.labels == {"owner": "alice"}
    same = await admin.namespaces_create(NamespaceCreateRequest(name="team.x"))
    assert not same.created
    with pytest.raises(AlreadyExists, match="other labels"):
        await admin.namespaces_create(NamespaceCreateRequest(name="team.x",
                                                             labels={"owner": "bob"}))

    listed = {n.name: n for n in (await admin.namespaces_list(NamespaceListRequest())
                                  ).namespaces}
    assert set(listed) == {"k8s.io", "held", "team.x"}
    assert listed["held"].images == 1 and not listed["held"].created
    assert listed["team.x"].created and listed["team.x"].images == 0

    with pytest.raises(FailedPrecondition, match=f"holds 1 image: .*{re.escape(ref)}"):
        await admin.namespaces_remove(NamespaceRemoveRequest(name="held"))
    with pytest.raises(FailedPrecondition, match=r"k8s\.io is the CRI's"):
        await admin.namespaces_remove(NamespaceRemoveRequest(name="k8s.io"))
    with pytest.raises(NotFound, match="'nope' not found"):
        await admin.namespaces_remove(NamespaceRemoveRequest(name="nope"))
    await admin.namespaces_remove(NamespaceRemoveRequest(name="team.x"))
    with pytest.raises(NotFound):
        await admin.namespaces_remove(NamespaceRemoveRequest(name="team.x"))

    await ImagesClient(bus, namespace="held").remove(ImageRemoveRequest(ref=ref))
    listed = {n.name for n in (await admin.namespaces_list(NamespaceListRequest())).namespaces}
    assert listed == {"k8s.io"}  # `held` existed only through its image


@pytest.mark.parametrize("name", ["", "-a", "a-", "a b", "A/b", "a" * 77, "é"])
async def test_bad_namespace_names_are_refused(puller: ServiceSet, bus: Bus,
                                               name: str) -> None:
    with pytest.raises(Invalid, match="name"):
        await ImagesClient(bus).namespaces_create(NamespaceCreateRequest(name=name))
    if name:  # an empty header is no header: the default namespace
        with pytest.raises(Invalid, match="Shoal-Namespace"):
            await ImagesClient(bus, namespace=name).list_images(ImageListRequest())


async def test_the_longest_namespace_name_is_taken(puller: ServiceSet, bus: Bus,
                                                   tmp_path: Path) -> None:
    name = "a" + "b" * 74 + "c"
    made = await ImagesClient(bus).namespaces_create(NamespaceCreateRequest(name=name))
    assert made.created and made.namespace.name == name
    assert (await ImagesClient(bus, namespace=name).list_images(ImageListRequest())
            ).images == []
