"""Bus edge of the puller: commands on shoal.v1.<node>.images.<verb>.

Owns: the content store, image records, registry access.
Every replica also answers the runner's built-in `health` and `ping`."""

from __future__ import annotations

from shoal_common.bus import RequestContext, Router
from shoal_common.errors import Invalid
from shoal_common.messages.images import (
    MAX_CONTENT_READ,
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

from shoal_puller.app import PullerApp

router: Router[PullerApp] = Router()
Ctx = RequestContext[PullerApp]


@router.command("pull")
async def pull(ctx: Ctx, req: PullRequest) -> PullReply:
    return PullReply(image=await ctx.app.puller.pull(ctx.namespace, req))


@router.command("push")
async def push(ctx: Ctx, req: PushRequest) -> PushReply:
    return await ctx.app.pusher.push(ctx.namespace, req)


@router.command("get")
async def get(ctx: Ctx, req: ImageGetRequest) -> ImageInfo:
    return await ctx.app.catalog.get(ctx.namespace, req.ref, req.with_config)


@router.command("list")
async def list_images(ctx: Ctx, req: ImageListRequest) -> ImageListReply:
    return ImageListReply(images=await ctx.app.catalog.list_images(ctx.namespace, req.ref,
                                                               req.with_config))


@router.command("remove")
async def remove(ctx: Ctx, req: ImageRemoveRequest) -> ImageRemoveReply:
    return await ctx.app.catalog.remove(ctx.namespace, req.ref)


@router.command("usage")
async def usage(ctx: Ctx, req: ContentUsageRequest) -> ContentUsageReply:
    return ctx.app.catalog.usage()


@router.command("content.info")
async def content_info(ctx: Ctx, req: ContentInfoRequest) -> ContentInfo:
    content = ctx.app.catalog.content
    return ContentInfo(digest=req.digest, size=content.size(req.digest),
                       path=str(content.blob_path(req.digest)))


@router.command("content.read")
async def content_read(ctx: Ctx, req: ContentReadRequest) -> ContentReadReply:
    if req.offset < 0 or not 0 < req.size <= MAX_CONTENT_READ:
        raise Invalid(f"content.read: offset must be >= 0 and size in 1..{MAX_CONTENT_READ}")
    data, total = await ctx.app.catalog.content.read_range(req.digest, req.offset, req.size)
    return ContentReadReply(data=data, total=total)


@router.command("import.begin")
async def import_begin(ctx: Ctx, req: ImportBeginRequest) -> ImportBeginReply:
    return await ctx.app.importer.begin(req)


@router.command("import.write")
async def import_write(ctx: Ctx, req: ImportWriteRequest) -> ImportWriteReply:
    return await ctx.app.importer.write(req)


@router.command("import.commit")
async def import_commit(ctx: Ctx, req: ImportCommitRequest) -> ImportCommitReply:
    return await ctx.app.importer.commit(ctx.namespace, req)


@router.command("import.abort")
async def import_abort(ctx: Ctx, req: ImportAbortRequest) -> ImportAbortReply:
    return await ctx.app.importer.abort(ctx.namespace, req)


@router.command("namespaces.list")
async def namespaces_list(ctx: Ctx, req: NamespaceListRequest) -> NamespaceListReply:
    return await ctx.app.namespaces.list()


@router.command("namespaces.create")
async def namespaces_create(ctx: Ctx, req: NamespaceCreateRequest) -> NamespaceCreateReply:
    return await ctx.app.namespaces.create(req)


@router.command("namespaces.remove")
async def namespaces_remove(ctx: Ctx, req: NamespaceRemoveRequest) -> NamespaceRemoveReply:
    return await ctx.app.namespaces.remove(req.name)
