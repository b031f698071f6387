"""The puller (`images.*`): image records, pulls, and the content store."""

from __future__ import annotations

from shoal_common.clients.base import ServiceClient, Verb
from shoal_common.messages import images as m
from shoal_common.messages import namespaces as ns
from shoal_common.messages import push as p
from shoal_common.messages import transfer as t

# A pull may take minutes; it is idempotent by `pull_id` (a repeat joins the pull in flight).
PULL_TIMEOUT = 300.0


class ImagesClient(ServiceClient):
    service = "images"

    pull = Verb("pull", m.PullRequest, m.PullReply, attempt_timeout=PULL_TIMEOUT,
                timeout=PULL_TIMEOUT, retries=0)
    # Idempotent by `push_id` like a pull; uploads resume where the registry allows.
    push = Verb("push", p.PushRequest, p.PushReply, attempt_timeout=PULL_TIMEOUT,
                timeout=PULL_TIMEOUT, retries=0)
    get = Verb("get", m.ImageGetRequest, m.ImageInfo)
    list_images = Verb("list", m.ImageListRequest, m.ImageListReply)
    # Removing what is already gone answers not_found: a repeat changes nothing more.
    remove = Verb("remove", m.ImageRemoveRequest, m.ImageRemoveReply)
    usage = Verb("usage", m.ContentUsageRequest, m.ContentUsageReply)
    content_info = Verb("content.info", m.ContentInfoRequest, m.ContentInfo)
    # Up to 512 KiB per read; a read that waits this long has lost its replica.
    content_read = Verb("content.read", m.ContentReadRequest, m.ContentReadReply, timeout=30.0)
    # `shoal image import` (messages.transfer), keyed by the caller's import id. A write is
    # keyed by offset too (a resent chunk changes nothing); the one completing a blob hashes
    # all of it. A commit checks every layer's diff ID, decompressing it: minutes, maybe.
    import_begin = Verb("import.begin", t.ImportBeginRequest, t.ImportBeginReply)
    import_write = Verb("import.write", t.ImportWriteRequest, t.ImportWriteReply,
                        attempt_timeout=60.0, timeout=180.0)
    import_commit = Verb("import.commit", t.ImportCommitRequest, t.ImportCommitReply,
                         attempt_timeout=PULL_TIMEOUT, timeout=PULL_TIMEOUT, retries=0)
    import_abort = Verb("import.abort", t.ImportAbortRequest, t.ImportAbortReply, timeout=60.0)
    # The node's namespaces (messages.namespaces): keyed by name, so a repeat changes nothing
    # more (a create of what exists answers it; a remove of what is gone, not_found).
    namespaces_list = Verb("namespaces.list", ns.NamespaceListRequest, ns.NamespaceListReply)
    namespaces_create = Verb("namespaces.create", ns.NamespaceCreateRequest,
                             ns.NamespaceCreateReply)
    namespaces_remove = Verb("namespaces.remove", ns.NamespaceRemoveRequest,
                             ns.NamespaceRemoveReply)
