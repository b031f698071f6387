"""The puller (`images.*`): image records, pulls, and the content store."""

from __future__ import annotations

from shoal_common.clients.base import ServiceClient, Verb
from shoal_common.messages.images import (
    ContentInfo,
    ContentInfoRequest,
    ContentReadReply,
    ContentReadRequest,
    ContentUsageReply,
    ContentUsageRequest,
    ImageGetRequest,
    ImageInfo,
    ImageListReply,
    ImageListRequest,
    ImageRemoveReply,
    ImageRemoveRequest,
    PullReply,
    PullRequest,
)

# A pull may take minutes; it is idempotent by `pull_id` (a repeat joins the pull in flight).
PULL_TIMEOUT = 300.0


class ImagesClient(ServiceClient):
    service = "images"

    pull = Verb("pull", PullRequest, PullReply, attempt_timeout=PULL_TIMEOUT,
                timeout=PULL_TIMEOUT, retries=0)
    get = Verb("get", ImageGetRequest, ImageInfo)
    list_images = Verb("list", ImageListRequest, ImageListReply)
    # Removing what is already gone answers not_found: a repeat changes nothing more.
    remove = Verb("remove", ImageRemoveRequest, ImageRemoveReply)
    usage = Verb("usage", ContentUsageRequest, ContentUsageReply)
    content_info = Verb("content.info", ContentInfoRequest, ContentInfo)
    # Up to 512 KiB per read; a read that waits this long has lost its replica.
    content_read = Verb("content.read", ContentReadRequest, ContentReadReply, timeout=30.0)
