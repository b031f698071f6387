"""Snapshotter commands (`shoal.v1.<node>.snapshots.<verb>`) and snapshot events, in
containerd's terms: committed snapshots are keyed by chain ID; active ones are writable."""

from __future__ import annotations

from shoal_common.messages.base import Event, Message
from shoal_common.messages.fields import Printable, SnapshotKey
from shoal_common.messages.images import LayerInfo


class Mount(Message):
    """What the executor mounts: `mount -t <type> -o <options> <source> <target>`."""

    type: str  # "overlay" or "bind"
    source: str
    options: list[str] = []


class SnapshotInfo(Message):
    key: str
    kind: str  # "active", "view" or "committed"
    created: float
    updated: float
    parent: str = ""
    labels: dict[str, str] = {}


class PrepareRequest(Message):
    key: SnapshotKey  # caller-chosen: a retry with the same key and parent returns the same
    parent: Printable = ""  # a committed snapshot (chain ID), or "" for an empty one
    labels: dict[str, str] = {}


class ViewRequest(Message):
    key: SnapshotKey
    parent: Printable
    labels: dict[str, str] = {}


class MountsReply(Message):
    mounts: list[Mount]


class CommitRequest(Message):
    name: SnapshotKey
    key: SnapshotKey
    labels: dict[str, str] = {}


class SnapshotKeyRequest(Message):
    """For remove, mounts, stat and usage."""

    key: SnapshotKey


class SnapshotUsage(Message):
    size: int  # bytes of this snapshot's own files (not its parents')
    inodes: int


class SnapshotListRequest(Message):
    parent: str = ""  # only the children of this snapshot
    kind: str = ""  # only this kind


class SnapshotListReply(Message):
    snapshots: list[SnapshotInfo]


class UnpackRequest(Message):
    """Make sure every layer of an image is a committed snapshot (idempotent)."""

    image: Printable  # the image name, for messages and logs
    layers: list[LayerInfo]


class UnpackReply(Message):
    chain_id: str  # the top layer's snapshot: the parent of a container's rootfs
    unpacked: int  # layers unpacked by this call (0 when all existed)


class FsUsageRequest(Message):
    pass


class FsUsageReply(Message):
    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


class SnapshotCommitted(Event):
    TOPIC = "snapshots.commit"
    key: str
    parent: str = ""


class SnapshotRemoved(Event):
    TOPIC = "snapshots.remove"
    key: str
