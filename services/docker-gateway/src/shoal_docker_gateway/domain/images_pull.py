"""`docker pull` (POST /images/create?fromImage=): the puller's pull, and its per-layer
progress events (`images.pull.progress`, images_progress.py) as the JSON lines the docker
CLI draws.

Nothing is yielded before the puller reports progress or finishes, so a pull that fails
at once (no such image, a registry refusing) is an HTTP error, as dockerd answers it; a
failure later is the stream's last line (`errorDetail`), which makes the CLI exit 1."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from shoal_common.errors import ErrorCode, ShoalError
from shoal_common.messages.images import (
    ImageGetRequest,
    ImageInfo,
    LayerProgress,
    PullProgress,
    PullReply,
    PullRequest,
    RegistryAuth,
)

from shoal_docker_gateway.domain import events
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.images_progress import Followed, bar, follow, short_id
from shoal_docker_gateway.domain.images_refs import Ref, familiar
from shoal_docker_gateway.errors import BadParameter, NotFound

PULL_TIMEOUT = 3600.0
_AUTH_FIELDS = {"username": "username", "password": "password", "auth": "auth",
                "serveraddress": "server_address", "identitytoken": "identity_token",
                "registrytoken": "registry_token"}
MAX_AUTH_HEADER = 64 * 1024


def registry_auth(header: str) -> RegistryAuth | None:
    """X-Registry-Auth (base64url JSON of Docker's AuthConfig) as the pull's credentials.
    Like dockerd, an undecodable header means no credentials; a field of the wrong type or
    size is a 400."""
    if not header or header in ("e30=", "e30"):  # "{}"
        return None
    if len(header) > MAX_AUTH_HEADER:
        raise BadParameter("X-Registry-Auth header too large")
    try:
        text = header.strip()
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    fields: dict[str, str] = {}
    for key, value in doc.items():
        name = _AUTH_FIELDS.get(key.lower()) if isinstance(key, str) else None
        if name is None or value in (None, ""):
            continue
        if not isinstance(value, str) or len(value) > 16384 or \
                any(ord(c) < 32 for c in value):
            raise BadParameter(f"X-Registry-Auth: field {key!r} is not a string")
        fields[name] = value
    return RegistryAuth(**fields) if fields else None


class _View:
    """What has been said about each layer, so each state change is said once."""

    def __init__(self) -> None:
        self.said: dict[str, str] = {}

    def layer(self, p: LayerProgress) -> list[dict[str, Any]]:
        short = short_id(p.digest)
        before = self.said.get(short)
        out: list[dict[str, Any]] = []
        if before is None and p.state != "exists":
            out.append({"status": "Pulling fs layer", "progressDetail": {}, "id": short})
        if p.state == "exists" and before is None:
            out.append({"status": "Already exists", "progressDetail": {}, "id": short})
        elif p.state == "downloading":
            out.append({"status": "Downloading",
                        "progressDetail": {"current": p.done, "total": p.total},
                        "progress": bar(p.done, p.total), "id": short})
        elif p.state == "done" and before != "done":
            out += [{"status": "Download complete", "progressDetail": {}, "id": short},
                    {"status": "Pull complete", "progressDetail": {}, "id": short}]
        self.said[short] = p.state if p.state != "waiting" or before is None else before
        return out

    def event(self, event: PullProgress) -> list[dict[str, Any]]:
        return [m for p in event.layers for m in self.layer(p)]

    def finish(self, info: ImageInfo, fresh: bool) -> list[dict[str, Any]]:
        """Layers no event told of (the pull was quicker than the puller's reports): in the
        store now; `fresh` says whether this pull fetched them."""
        out = []
        for layer in info.layers:
            short = short_id(layer.digest)
            if self.said.get(short) in ("done", "exists"):
                continue
            status = "Pull complete" if fresh else "Already exists"
            out.append({"status": status, "progressDetail": {}, "id": short})
            self.said[short] = "done"
        return out


async def _before(backend: Backend, ref: Ref) -> str:
    """The image id the name points at before the pull ("" if none)."""
    try:
        return (await backend.clients.images.get(ImageGetRequest(ref=str(ref)))).id
    except ShoalError:
        return ""


async def pull(backend: Backend, ref: Ref, auth: RegistryAuth | None,
               platform: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON messages of a pull of `ref`, ending with its Digest and Status lines."""
    previous = await _before(backend, ref)
    pull_id = uuid.uuid4().hex
    request = PullRequest(ref=str(ref), pull_id=pull_id, auth=auth, platform=platform)
    async with follow(backend, PullProgress, PullProgress.TOPIC,
                      lambda e: e.pull_id == pull_id,
                      lambda: backend.clients.images.pull(request, timeout=PULL_TIMEOUT)
                      ) as followed:
        async for message in _messages(ref, followed, previous):
            yield message
    await events.emit(backend, "image", "pull", familiar(str(ref)),
                      {"name": familiar(str(ref)).rsplit(":", 1)[0].split("@")[0]})


async def _messages(ref: Ref, followed: Followed,
                    previous: str) -> AsyncIterator[dict[str, Any]]:
    view, started = _View(), False
    # dockerd names the repository's path, without its registry (`library/busybox`).
    path = ref.repository.split("/", 1)[1]
    head = {"status": f"Pulling from {path}", "id": ref.tag or ref.digest}
    async for event in followed.events():
        if not event.layers:
            continue  # nothing to tell yet (or a failure: the reply says it)
        if not started:
            started = True
            yield head
        for message in view.event(event):
            yield message
    try:
        reply: PullReply = followed.task.result()
    except ShoalError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            raise NotFound(f"manifest for {familiar(str(ref))} not found: "
                           f"{exc.message}") from None
        raise
    if not started:
        yield head
    info = reply.image
    fresh = info.id != previous
    for message in view.finish(info, fresh):
        yield message
    yield {"status": f"Digest: {info.target_digest}"}
    verdict = "Downloaded newer image for" if fresh else "Image is up to date for"
    yield {"status": f"Status: {verdict} {familiar(str(ref))}"}
