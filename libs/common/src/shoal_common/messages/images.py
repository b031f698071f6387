"""Puller commands (`shoal.v1.<node>.images.<verb>`) and image/content events."""

from __future__ import annotations

import msgspec

from shoal_common.messages.base import Event, Message
from shoal_common.messages.fields import ImageRef, Printable


class RegistryAuth(Message):
    """The credentials a CRI AuthConfig carries."""

    username: str = ""
    password: str = ""
    auth: str = ""  # base64 "username:password"
    server_address: str = ""
    identity_token: str = ""
    registry_token: str = ""


class LayerInfo(Message):
    digest: str  # of the blob as stored (compressed)
    diff_id: str  # of the uncompressed tar
    chain_id: str  # identity of the layer stack up to this one (snapshot key)
    size: int
    media_type: str


class ImageInfo(Message):
    id: str  # the config digest, as containerd's CRI reports it
    names: list[str]  # every reference naming this image (canonical form)
    repo_tags: list[str]
    repo_digests: list[str]
    size: int  # bytes of the content (manifest, config, layers) as stored
    target_digest: str  # what the name resolved to (an index or a manifest)
    manifest_digest: str  # the platform's manifest
    layers: list[LayerInfo]
    created: float
    config: bytes = b""  # the image config JSON (only when asked for)


class PullRequest(Message):
    ref: ImageRef
    # Caller-chosen id: a retried pull with the same id joins the one in flight, and progress
    # events carry it.
    pull_id: str
    auth: RegistryAuth | None = None
    platform: str = ""  # os/arch[/variant]; empty = the configured/host platform


class PullReply(Message):
    image: ImageInfo


class ImageGetRequest(Message):
    ref: ImageRef  # a name, an id (config digest), a repo digest, or an unambiguous id prefix
    with_config: bool = False


class ImageListRequest(Message):
    ref: ImageRef = ""  # only images this reference names (CRI ImageFilter)
    with_config: bool = False


class ImageListReply(Message):
    images: list[ImageInfo]


class ImageRemoveRequest(Message):
    ref: ImageRef


class ImageRemoveReply(Message):
    removed_names: list[str]
    deleted_blobs: list[str]


class ContentUsageRequest(Message):
    pass


class ContentUsageReply(Message):
    mountpoint: str  # the content store's directory
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


# -- events ------------------------------------------------------------------------------


class ImageCreate(Event):
    TOPIC = "images.create"
    name: str
    target_digest: str
    manifest_digest: str
    config_digest: str
    layers: list[LayerInfo]


class ImageFetching(Event):
    """A pull is about to download these layers (the puller publishes it without waiting for
    the stream): the snapshotter may apply each while its blob streams in. Only a hint, and
    from a peer: the snapshotter checks each blob's digest itself and commits nothing it did
    not verify; `images.create` still follows a pull that succeeds."""

    TOPIC = "images.fetching"
    pull_id: Printable
    ref: ImageRef
    layers: list[LayerInfo]


class ImageUpdate(Event):
    TOPIC = "images.update"
    name: str
    target_digest: str
    manifest_digest: str
    config_digest: str
    layers: list[LayerInfo]


class ImageDelete(Event):
    TOPIC = "images.delete"
    name: str
    config_digest: str


class ContentDelete(Event):
    TOPIC = "content.delete"
    digest: str


class LayerProgress(Message):
    digest: str
    done: int
    total: int
    # waiting, downloading, exists (already in the store), done
    state: str


class TransferProgress(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The fields of PullProgress and PushProgress (not an event itself): each layer's
    progress; the last event is `finished` (with the `error` that ended it, if one did)."""

    layers: list[LayerProgress]
    finished: bool = False
    error: str = ""


class PullProgress(TransferProgress, Event, kw_only=True):
    TOPIC = "images.pull.progress"
    pull_id: str
    ref: ImageRef


class ContentInfoRequest(Message):
    digest: str
    # Also answer for a blob that is still being downloaded (not found only if neither).
    partial: bool = False


class ContentInfo(Message):
    digest: str
    size: int
    # Where the committed blob lies on this node, for a reader on the same machine that can
    # open it (the snapshotter then reads the file instead of `content.read` chunks); ""
    # when unknown. Opening it is optional: the bus read is always there.
    path: str = ""
    # False: not committed yet (a `partial` request); `path` is then the ingest file the
    # download writes (which may not exist yet), `size` the bytes it holds so far, and the
    # blob is not readable over the bus.
    committed: bool = True


class ContentReadRequest(Message):
    """Read part of a committed blob (other services stream blobs this way)."""

    digest: str
    offset: int = 0
    # At most MAX_CONTENT_READ bytes per request: replies stay well under NATS' 1 MiB payload.
    size: int = 512 * 1024


class ContentReadReply(Message):
    data: bytes
    total: int  # the blob's size


MAX_CONTENT_READ = 512 * 1024
