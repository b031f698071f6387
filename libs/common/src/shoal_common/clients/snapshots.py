"""The snapshotter (`snapshots.*`): snapshots by key, and unpacking images into them."""

from __future__ import annotations

from shoal_common.clients.base import ServiceClient, Verb
from shoal_common.messages import Empty
from shoal_common.messages.snapshots import (
    CommitRequest,
    FsUsageReply,
    FsUsageRequest,
    MountsReply,
    PrepareRequest,
    SnapshotInfo,
    SnapshotKeyRequest,
    SnapshotListReply,
    SnapshotListRequest,
    SnapshotUsage,
    UnpackReply,
    UnpackRequest,
    ViewRequest,
)

UNPACK_TIMEOUT = 300.0  # a large image's layers


class SnapshotsClient(ServiceClient):
    service = "snapshots"

    # Snapshots are made by a caller-chosen key: a repeat finds the one the first made.
    prepare = Verb("prepare", PrepareRequest, MountsReply)
    view = Verb("view", ViewRequest, MountsReply)
    commit = Verb("commit", CommitRequest, SnapshotInfo)
    remove = Verb("remove", SnapshotKeyRequest, Empty)
    mounts = Verb("mounts", SnapshotKeyRequest, MountsReply)
    stat = Verb("stat", SnapshotKeyRequest, SnapshotInfo)
    usage = Verb("usage", SnapshotKeyRequest, SnapshotUsage)
    list_snapshots = Verb("list", SnapshotListRequest, SnapshotListReply)
    # Idempotent by chain ID (a repeat joins or skips committed layers); not resent, since a
    # timeout here means the whole budget is spent.
    unpack = Verb("unpack", UnpackRequest, UnpackReply, attempt_timeout=UNPACK_TIMEOUT,
                  timeout=UNPACK_TIMEOUT, retries=0)
    fsusage = Verb("fsusage", FsUsageRequest, FsUsageReply)
