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
from shoal_common.messages.namespaces import (
    NamespaceCreateReply,
    NamespaceCreateRequest,
    NamespaceListReply,
    NamespaceListRequest,
    NamespaceRemoveReply,
    NamespaceRemoveRequest,
)
from shoal_common.messages.push import PushReply, PushRequest
from shoal_common.messages.transfer import (
    ImportAbortReply,
    ImportAbortRequest,
    ImportBeginReply,
    ImportBeginRequest,
    ImportCommitReply,
    ImportCommitRequest,
    ImportWriteReply,
    ImportWriteRequest,
)

# A pull may take minutes; it is idempotent by `pull_id` (a repeat joins the pull in flight).
PULL_TIMEOUT = 300.0


class ImagesClient(ServiceClient):
    service = "images"

    pull = Verb("pull", PullRequest, PullReply, attempt_timeout=PULL_TIMEOUT,
                timeout=PULL_TIMEOUT, retries=0)
    # Idempotent by `push_id` like a pull; uploads resume where the registry allows.
    push = Verb("push", PushRequest, PushReply, attempt_timeout=PULL_TIMEOUT,
                timeout=PULL_TIMEOUT, retries=0)
    get = Verb("get", ImageGetRequest, ImageInfo)
    list_images = Verb("list", ImageListRequest, ImageListReply)
    # Removing what is already gone answers not_found: a repeat changes nothing more.
    remove = Verb("remove", ImageRemoveRequest, ImageRemoveReply)
    usage = Verb("usage", ContentUsageRequest, ContentUsageReply)
    content_info = Verb("content.info", ContentInfoRequest, ContentInfo)
    # Up to 512 KiB per read; a read that waits this long has lost its replica.
    content_read = Verb("content.read", ContentReadRequest, ContentReadReply, timeout=30.0)
    # `shoal image import` (messages.transfer), keyed by the caller's import id. A write is
    # keyed by offset too (a resent chunk changes nothing); the one completing a blob hashes
    # all of it. A commit checks every layer's diff ID, decompressing it: minutes, maybe.
    import_begin = Verb("import.begin", ImportBeginRequest, ImportBeginReply)
    import_write = Verb("import.write", ImportWriteRequest, ImportWriteReply,
                        attempt_timeout=60.0, timeout=180.0)
    import_commit = Verb("import.commit", ImportCommitRequest, ImportCommitReply,
                         attempt_timeout=PULL_TIMEOUT, timeout=PULL_TIMEOUT, retries=0)
    import_abort = Verb("import.abort", ImportAbortRequest, ImportAbortReply, timeout=60.0)
    # The node's namespaces (messages.namespaces): keyed by name, so a repeat changes nothing
    # more (a create of what exists answers it; a remove of what is gone, not_found).
    namespaces_list = Verb("namespaces.list", NamespaceListRequest, NamespaceListReply)
    namespaces_create = Verb("namespaces.create", NamespaceCreateRequest, NamespaceCreateReply)
    namespaces_remove = Verb("namespaces.remove", NamespaceRemoveRequest, NamespaceRemoveReply)
