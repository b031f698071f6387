"""Bus edge of the puller: commands on shoal.v1.<node>.images.<verb>.

Owns: the content store, image records, registry access.
Every replica also answers the runner's built-in `health` and `ping`."""

from __future__ import annotations

from shoal_common.bus import RequestContext, Router
from shoal_common.errors import Invalid
from shoal_common.messages import images as m
from shoal_common.messages import namespaces as ns
from shoal_common.messages import push as p
from shoal_common.messages import transfer as t

from shoal_puller.app import PullerApp

router: Router[PullerApp] = Router()
Ctx = RequestContext[PullerApp]


@router.command("pull")
async def pull(ctx: Ctx, req: m.PullRequest) -> m.PullReply:
    return m.PullReply(image=await ctx.app.puller.pull(ctx.namespace, req))


@router.command("push")
async def push(ctx: Ctx, req: p.PushRequest) -> p.PushReply:
    return await ctx.app.pusher.push(ctx.namespace, req)


@router.command("get")
async def get(ctx: Ctx, req: m.ImageGetRequest) -> m.ImageInfo:
    return await ctx.app.catalog.get(ctx.namespace, req.ref, req.with_config)


@router.command("list")
async def list_images(ctx: Ctx, req: m.ImageListRequest) -> m.ImageListReply:
    return m.ImageListReply(images=await ctx.app.catalog.list_images(ctx.namespace, req.ref,
                                                                 req.with_config))


@router.command("remove")
async def remove(ctx: Ctx, req: m.ImageRemoveRequest) -> m.ImageRemoveReply:
    return await ctx.app.catalog.remove(ctx.namespace, req.ref)


@router.command("usage")
async def usage(ctx: Ctx, req: m.ContentUsageRequest) -> m.ContentUsageReply:
    return ctx.app.catalog.usage()


@router.command("content.info")
async def content_info(ctx: Ctx, req: m.ContentInfoRequest) -> m.ContentInfo:
    content = ctx.app.catalog.content
    if req.partial and not content.exists(req.digest):
        # Being downloaded (or about to be): where its ingest file is, and what it holds.
        return m.ContentInfo(digest=req.digest, size=content.ingest_size(req.digest),
                             path=str(content.ingest_path(req.digest)), committed=False)
    return m.ContentInfo(digest=req.digest, size=content.size(req.digest),
                         path=str(content.blob_path(req.digest)))


@router.command("content.read")
async def content_read(ctx: Ctx, req: m.ContentReadRequest) -> m.ContentReadReply:
    if req.offset < 0 or not 0 < req.size <= m.MAX_CONTENT_READ:
        raise Invalid(f"content.read: offset must be >= 0 and size in 1..{m.MAX_CONTENT_READ}")
    data, total = await ctx.app.catalog.content.read_range(req.digest, req.offset, req.size)
    return m.ContentReadReply(data=data, total=total)


@router.command("import.begin")
async def import_begin(ctx: Ctx, req: t.ImportBeginRequest) -> t.ImportBeginReply:
    return await ctx.app.importer.begin(req)


@router.command("import.write")
async def import_write(ctx: Ctx, req: t.ImportWriteRequest) -> t.ImportWriteReply:
    return await ctx.app.importer.write(req)


@router.command("import.commit")
async def import_commit(ctx: Ctx, req: t.ImportCommitRequest) -> t.ImportCommitReply:
    return await ctx.app.importer.commit(ctx.namespace, req)


@router.command("import.abort")
async def import_abort(ctx: Ctx, req: t.ImportAbortRequest) -> t.ImportAbortReply:
    return await ctx.app.importer.abort(ctx.namespace, req)


@router.command("namespaces.list")
async def namespaces_list(ctx: Ctx, req: ns.NamespaceListRequest) -> ns.NamespaceListReply:
    return await ctx.app.namespaces.list()


@router.command("namespaces.create")
async def namespaces_create(ctx: Ctx, req: ns.NamespaceCreateRequest) -> ns.NamespaceCreateReply:
    return await ctx.app.namespaces.create(req)


@router.command("namespaces.remove")
async def namespaces_remove(ctx: Ctx, req: ns.NamespaceRemoveRequest) -> ns.NamespaceRemoveReply:
    return await ctx.app.namespaces.remove(req.name)
