"""`images.push`: an image from the puller's store to a registry, and its progress events."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from shoal_common.messages.base import Event, Message
from shoal_common.messages.fields import ImageRef
from shoal_common.messages.images import RegistryAuth, TransferProgress

# Caller-chosen: a retry with the same id joins the push in flight; progress events carry it.
PushId = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_-]{1,64}\Z")]
BlobOutcome = Literal["exists", "mounted", "uploaded"]


class PushRequest(Message):
    # The image in the store: a name, an image id (config digest), or an unambiguous id
    # prefix, as `images.get` takes it.
    ref: ImageRef
    push_id: PushId
    # Where to: a reference (`host/repo[:tag][@digest]`); "" = `ref`, which must then be a
    # name. A digest in it must be the digest that is pushed.
    target: ImageRef = ""
    auth: RegistryAuth | None = None


class PushedBlob(Message):
    digest: str
    size: int
    outcome: BlobOutcome
    mounted_from: str = ""  # the repository a mounted blob came from
    resumed_from: int = 0  # an upload continued at this byte of an earlier upload session


class PushReply(Message):
    target: str  # the reference pushed to, normalised (`docker.io/library/x:latest`)
    digest: str  # what the target now names: the index, or the manifest
    media_type: str
    manifests: list[str]  # every manifest pushed, in order (platform manifests first)
    blobs: list[PushedBlob]
    # Set when the store holds only some platforms of an index: what was pushed instead.
    note: str = ""


class PushProgress(TransferProgress, Event, kw_only=True):
    """`layers`: one per layer (config blobs are small and not shown); state: waiting,
    pushing, exists (already in the repository), mounted (from another repository), done."""

    TOPIC = "images.push.progress"
    push_id: str
    target: ImageRef
