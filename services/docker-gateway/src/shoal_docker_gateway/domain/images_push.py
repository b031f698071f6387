"""`docker push` (POST /images/{name}/push?tag=): the puller's push of a name in the store
to its registry, and its per-layer progress events as the JSON lines the docker CLI draws
(`Preparing`, `Pushing [==>  ]`, `Pushed` / `Layer already exists`, then
`TAG: digest: sha256:... size: N` and the `aux` message the CLI reads the digest from)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from shoal_common.errors import ErrorCode, ShoalError
from shoal_common.messages.images import ContentInfoRequest, LayerProgress, RegistryAuth
from shoal_common.messages.push import PushProgress, PushReply, PushRequest

from shoal_docker_gateway.domain import events
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.images import find, list_all
from shoal_docker_gateway.domain.images_progress import Followed, bar, follow, short_id
from shoal_docker_gateway.domain.images_refs import Ref, familiar, split_name
from shoal_docker_gateway.errors import NotFound

PUSH_TIMEOUT = 3600.0
_STATUS = {"exists": "Layer already exists", "done": "Pushed"}


async def tags_to_push(backend: Backend, ref: Ref) -> list[Ref]:
    """`ref` itself, or with no tag (`docker push --all-tags`) every tag of its repository
    in the store; 404 in Docker's words when there is none."""
    if ref.tag or ref.digest:
        names = {n for i in await list_all(backend, with_config=False) for n in i.names}
        if str(ref) in names:
            return [ref]
        raise NotFound(f"An image does not exist locally with the tag: {familiar(str(ref))}")
    tags = sorted({split_name(n)[1] for i in await list_all(backend, with_config=False)
                   for n in i.repo_tags if split_name(n)[0] == ref.repository})
    if not tags:
        raise NotFound(f"An image does not exist locally with the tag: "
                       f"{familiar(ref.repository)}")
    return [Ref(ref.repository, t) for t in tags]


class _View:
    def __init__(self) -> None:
        self.said: dict[str, str] = {}

    def layer(self, p: LayerProgress) -> list[dict[str, Any]]:
        short = short_id(p.digest)
        before = self.said.get(short)
        self.said[short] = p.state
        out: list[dict[str, Any]] = []
        if before is None:
            out.append({"status": "Preparing", "progressDetail": {}, "id": short})
        if p.state == "pushing":
            out.append({"status": "Pushing",
                        "progressDetail": {"current": p.done, "total": p.total},
                        "progress": bar(p.done, p.total), "id": short})
        elif p.state == "mounted" and before != p.state:
            out.append({"status": "Mounted from another repository", "progressDetail": {},
                        "id": short})
        elif p.state in _STATUS and before != p.state:
            out.append({"status": _STATUS[p.state], "progressDetail": {}, "id": short})
        return out


async def push(backend: Backend, ref: Ref, auth: RegistryAuth | None
               ) -> AsyncIterator[dict[str, Any]]:
    """The JSON messages of a push of `ref` (a name in the store) to its registry."""
    push_id = uuid.uuid4().hex
    request = PushRequest(ref=str(ref), push_id=push_id, auth=auth)
    async with follow(backend, PushProgress, PushProgress.TOPIC,
                      lambda e: e.push_id == push_id,
                      lambda: backend.clients.images.push(request, timeout=PUSH_TIMEOUT)
                      ) as followed:
        async for message in _messages(backend, ref, followed):
            yield message
    await events.emit(backend, "image", "push", familiar(str(ref)),
                      {"name": familiar(str(ref))})


async def _messages(backend: Backend, ref: Ref,
                    followed: Followed) -> AsyncIterator[dict[str, Any]]:
    yield {"status": f"The push refers to repository [{familiar(ref.repository)}]"}
    view = _View()
    async for event in followed.events():
        for message in [m for p in event.layers for m in view.layer(p)]:
            yield message
    try:
        reply: PushReply = followed.task.result()
    except ShoalError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            raise NotFound(exc.message) from None
        raise
    layers = {layer.digest for layer in (await find(backend, str(ref))).layers}
    for blob in reply.blobs:  # layers no event told of (a push quicker than the reports)
        if blob.digest in layers and short_id(blob.digest) not in view.said:
            state = {"uploaded": "done"}.get(blob.outcome, blob.outcome)
            for message in view.layer(LayerProgress(digest=blob.digest, done=blob.size,
                                                    total=blob.size, state=state)):
                yield message
    size = (await backend.clients.images.content_info(
        ContentInfoRequest(digest=reply.digest))).size
    name = ref.tag or ref.digest
    yield {"status": f"{name}: digest: {reply.digest} size: {size}"}
    yield {"progressDetail": {}, "aux": {"Tag": name, "Digest": reply.digest, "Size": size}}
