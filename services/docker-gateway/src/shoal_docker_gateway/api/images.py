"""`docker pull/push/images/inspect/tag/rmi/history/save/load/image prune`: the endpoints
over the puller (domain/images*.py). Names may hold slashes (`host:port/repo:tag`), so the
routes take the rest of the path up to the endpoint's last component."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import structlog
from aiohttp import web
from shoal_common.errors import ShoalError

from shoal_docker_gateway.api.routes import (
    JSON_TYPE,
    Routes,
    json_response,
    query_bool,
    query_json,
)
from shoal_docker_gateway.domain import images as domain
from shoal_docker_gateway.domain import images_archive, images_names, images_pull, images_push
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.images_refs import Ref, is_tag, parse
from shoal_docker_gateway.errors import BadParameter, Unsupported, from_exception

routes = Routes()
log = structlog.get_logger("shoal.docker")

_PLATFORM_RE = re.compile(r"\A[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_]+)?\Z")
_NAME = "{name:.+}"


class JsonLines:
    """Docker's streamed JSON messages, one per line; the response starts with the first
    message, so an error before it is an ordinary HTTP error."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None

    async def send(self, message: dict[str, Any]) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers=JSON_TYPE)
            await self.response.prepare(self.request)
        await self.response.write(json.dumps(message).encode() + b"\r\n")

    async def fail(self, exc: BaseException) -> None:
        """The error as the stream's last message (`docker` prints it and exits 1); a
        client that has gone hears nothing."""
        if isinstance(exc, ConnectionResetError):
            return
        message = exc.message if isinstance(exc, ShoalError) else from_exception(exc)[1]
        with contextlib.suppress(ConnectionResetError):
            await self.send({"errorDetail": {"message": message}, "error": message})

    async def finish(self) -> web.StreamResponse:
        assert self.response is not None
        with contextlib.suppress(ConnectionResetError):
            await self.response.write_eof()
        return self.response


def _pull_ref(image: str, tag: str) -> Ref:
    ref = parse(image, "fromImage", default_tag=False)
    if tag:
        if tag.startswith("sha256:"):
            ref = parse(f"{ref.repository}@{tag}", "tag")
        elif is_tag(tag):
            ref = Ref(ref.repository, tag, ref.digest)
        else:
            raise BadParameter(f"invalid tag {tag[:130]!r}")
    if not ref.tag and not ref.digest:
        # `docker pull -a` (every tag) is not served: the puller pulls one reference.
        ref = Ref(ref.repository, "latest")
    return ref


@routes.post("/images/create")
async def create(request: web.Request) -> web.StreamResponse:
    query = request.query
    if query.get("fromSrc"):
        raise Unsupported("docker import (fromSrc) is not supported by Shoal: use docker "
                          "load with an image archive")
    image = query.get("fromImage", "")
    if not image:
        raise BadParameter("fromImage is required")
    ref = _pull_ref(image, query.get("tag", ""))
    platform = query.get("platform", "")
    if platform and not _PLATFORM_RE.match(platform):
        raise BadParameter(f"invalid platform {platform[:100]!r}: expected os/arch[/variant]")
    auth = images_pull.registry_auth(request.headers.get("X-Registry-Auth", ""))
    stream = JsonLines(request)
    try:
        async for message in images_pull.pull(backend_of(request), ref, auth, platform):
            await stream.send(message)
    except Exception as exc:
        if not stream.started:
            raise
        await stream.fail(exc)
    return await stream.finish()


@routes.post(f"/images/{_NAME}/push")
async def push(request: web.Request) -> web.StreamResponse:
    name, tag = request.match_info["name"], request.query.get("tag", "")
    ref = parse(name, "image name", default_tag=False)
    if tag:
        if not is_tag(tag) or ref.tag or ref.digest:
            raise BadParameter(f"invalid tag {tag[:130]!r} for {name[:200]!r}")
        ref = Ref(ref.repository, tag)
    backend = backend_of(request)
    refs = await images_push.tags_to_push(backend, ref)  # a 404 before the stream
    auth = images_pull.registry_auth(request.headers.get("X-Registry-Auth", ""))
    stream = JsonLines(request)
    try:
        for one in refs:
            async for message in images_push.push(backend, one, auth):
                await stream.send(message)
    except Exception as exc:
        if not stream.started:
            raise
        await stream.fail(exc)
    return await stream.finish()


_LIST_FILTERS = ("reference", "dangling", "label", "before", "since")


@routes.get("/images/json")
async def list_images(request: web.Request) -> web.Response:
    filters = domain.parse_filters(query_json(request, "filters"), _LIST_FILTERS)
    if request.query.get("filter"):  # before API 1.25: a reference pattern
        filters.setdefault("reference", []).append(request.query["filter"])
    query_bool(request, "all")  # no intermediate images here: all or not, the same list
    query_bool(request, "digests")
    return json_response(await domain.select(backend_of(request), filters))


@routes.get(f"/images/{_NAME}/json")
async def inspect(request: web.Request) -> web.Response:
    info = await domain.find(backend_of(request), request.match_info["name"], with_config=True)
    return json_response(domain.inspect(info))


@routes.get(f"/images/{_NAME}/history")
async def history(request: web.Request) -> web.Response:
    info = await domain.find(backend_of(request), request.match_info["name"], with_config=True)
    return json_response(domain.history(info))


@routes.post(f"/images/{_NAME}/tag")
async def tag(request: web.Request) -> web.Response:
    repo = request.query.get("repo", "")
    if not repo:
        raise BadParameter("repo is required")
    new_tag = request.query.get("tag", "")
    target = parse(repo, "repo", default_tag=not new_tag)
    if target.digest:
        raise BadParameter(f"refusing to create a tag with a digest reference: {repo!r}")
    if new_tag:
        if not is_tag(new_tag):
            raise BadParameter(f"invalid tag format: {new_tag[:130]!r}")
        if target.tag:
            raise BadParameter(f"repo {repo!r} has a tag and tag {new_tag!r} is given too")
        target = Ref(target.repository, new_tag)
    await images_names.tag(backend_of(request), request.match_info["name"], target)
    return web.Response(status=201)


@routes.delete(f"/images/{_NAME}")
async def remove(request: web.Request) -> web.Response:
    force = query_bool(request, "force")
    query_bool(request, "noprune")  # untagged parents do not exist here
    items = await images_names.remove(backend_of(request), request.match_info["name"], force)
    return json_response(items)


@routes.post("/images/prune")
async def prune(request: web.Request) -> web.Response:
    filters = domain.parse_filters(query_json(request, "filters"),
                                   ("dangling", "until", "label", "label!"))
    return json_response(await images_names.prune(backend_of(request), filters))


async def _save(request: web.Request, names: list[str]) -> web.StreamResponse:
    if not names:
        raise BadParameter("names is required: the images to save")
    write_all = await images_archive.save(backend_of(request), names)
    response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    await response.prepare(request)
    try:
        await write_all(response.write)
    except Exception as exc:
        # Past the headers an error can only cut the archive short: the connection is
        # dropped before the chunked body's end, so the client sees a broken transfer,
        # never a clean end of a truncated tar.
        log.warning("docker save failed mid-archive", names=names,
                    error=from_exception(exc)[1])
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


@routes.get("/images/get")
async def save_many(request: web.Request) -> web.StreamResponse:
    return await _save(request, request.query.getall("names", []))


@routes.get(f"/images/{_NAME}/get")
async def save_one(request: web.Request) -> web.StreamResponse:
    return await _save(request, [request.match_info["name"]])


@routes.post("/images/load")
async def load(request: web.Request) -> web.StreamResponse:
    query_bool(request, "quiet")  # hides progress only; the loaded names always show
    stream = JsonLines(request)
    async for line in images_archive.load(backend_of(request), request.content):
        await stream.send({"stream": line})
    return await stream.finish()
