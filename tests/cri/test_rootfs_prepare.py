"""The gateway prepares a container's snapshot on its image's top chain directly, and goes
through the snapshotter's unpack only when that chain is not there (yet)."""

from __future__ import annotations

from typing import Any

import pytest
from shoal_common.errors import Invalid, NotFound
from shoal_common.messages.images import ImageInfo, LayerInfo
from shoal_common.messages.snapshots import (
    Mount,
    MountsReply,
    PrepareRequest,
    UnpackReply,
    UnpackRequest,
)
from shoal_common.oci import chain_ids
from shoal_cri_gateway.domain.pods import Pods

DIFFS = ["sha256:" + c * 64 for c in "abc"]


def image(chains: list[str] | None = None) -> ImageInfo:
    chains = chains or chain_ids(DIFFS)
    return ImageInfo(id="sha256:" + "9" * 64, names=[], repo_tags=[], repo_digests=[],
                     size=1, target_digest="", manifest_digest="", created=0.0, layers=[
                         LayerInfo(digest="sha256:" + "d" * 64, diff_id=d, chain_id=c,
                                   size=1, media_type="") for d, c in zip(DIFFS, chains,
                                                                          strict=True)])


class FakeSnapshots:
    """The snapshotter's answers: a parent not committed is NOT_FOUND, an unpack commits."""

    def __init__(self, committed: set[str]) -> None:
        self.committed = committed
        self.calls: list[tuple[str, str]] = []

    async def prepare(self, req: PrepareRequest) -> MountsReply:
        self.calls.append(("prepare", req.parent))
        if req.parent not in self.committed:
            raise NotFound(f"parent snapshot {req.parent} not found")
        return MountsReply(mounts=[Mount(type="overlay", source="overlay", options=[])])

    async def unpack(self, req: UnpackRequest) -> UnpackReply:
        self.calls.append(("unpack", req.image))
        chains = chain_ids([layer.diff_id for layer in req.layers])
        if [layer.chain_id for layer in req.layers] != chains:
            raise Invalid("chain IDs do not follow from the diff IDs")
        self.committed.update(chains)
        return UnpackReply(chain_id=chains[-1], unpacked=len(chains))


class FakeClients:
    def __init__(self, snapshots: FakeSnapshots) -> None:
        self.snapshots = snapshots

    def __call__(self, ns: str) -> FakeClients:
        return self


def pods(snapshots: FakeSnapshots) -> Pods:
    fake: Any = FakeClients(snapshots)
    return Pods(fake, metadata=None, sandbox_image="pause")  # type: ignore[arg-type]


async def test_an_unpacked_image_costs_one_hop() -> None:
    top = chain_ids(DIFFS)[-1]
    snaps = FakeSnapshots({*chain_ids(DIFFS)})
    await pods(snaps).rootfs("k8s.io", "c1", image(), "busybox")
    assert snaps.calls == [("prepare", top)]


async def test_an_image_not_unpacked_yet_goes_through_the_unpack() -> None:
    top = chain_ids(DIFFS)[-1]
    snaps = FakeSnapshots(set())
    await pods(snaps).rootfs("k8s.io", "c1", image(), "busybox")
    assert snaps.calls == [("prepare", top), ("unpack", "busybox"), ("prepare", top)]


async def test_chain_ids_that_do_not_add_up_are_not_used() -> None:
    """A puller's list whose chain IDs are not its diff IDs' is never used as a parent (a
    snapshot key is shared by every image with those layers): the unpack refuses it."""
    wrong = [*chain_ids(DIFFS)[:2], "sha256:" + "e" * 64]
    snaps = FakeSnapshots({*chain_ids(DIFFS), wrong[-1]})
    with pytest.raises(Invalid):
        await pods(snaps).rootfs("k8s.io", "c1", image(wrong), "busybox")
    assert snaps.calls == [("unpack", "busybox")]
