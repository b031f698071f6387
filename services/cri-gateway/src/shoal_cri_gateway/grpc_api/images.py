"""CRI ImageService, served from the puller over the bus (namespace k8s.io)."""

from __future__ import annotations

import json
import uuid

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_common.bus import Bus
from shoal_common.errors import Invalid, NotFound
from shoal_common.messages.images import (
    ImageGetRequest,
    ImageInfo,
    ImageListReply,
    ImageListRequest,
    ImageRemoveReply,
    ImageRemoveRequest,
    PullReply,
    PullRequest,
    RegistryAuth,
)
from shoal_common.messages.snapshots import FsUsageReply, FsUsageRequest

from shoal_cri_gateway.grpc_api.rpc import rpc

NAMESPACE = "k8s.io"
# A pull without a client deadline may take this long (large images, slow registries);
# the puller itself fails a pull that stops making progress long before.
DEFAULT_PULL_TIMEOUT = 3600.0


def image_user(config: bytes) -> tuple[int | None, str]:
    """(uid, username) of the image config's User, as kubelet wants them."""
    try:
        user = str(json.loads(config).get("config", {}).get("User", "") or "")
    except ValueError:
        return None, ""
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    return (int(name), "") if name.isdigit() else (None, name)


def to_cri(info: ImageInfo) -> cri.Image:
    uid, username = image_user(info.config)
    image = cri.Image(id=info.id, repo_tags=info.repo_tags, repo_digests=info.repo_digests,
                      size=info.size, username=username,
                      spec=cri.ImageSpec(image=info.id))
    if uid is not None:
        image.uid.value = uid
    return image


class ImageService(cri_grpc.ImageServiceServicer):
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def _get(self, ref: str) -> ImageInfo | None:
        try:
            return await self.bus.request("images", "get",
                                          ImageGetRequest(ref=ref, with_config=True),
                                          ImageInfo, namespace=NAMESPACE)
        except NotFound:
            return None

    @rpc
    async def PullImage(self, request: cri.PullImageRequest,
                        context: grpc.aio.ServicerContext) -> cri.PullImageResponse:
        if not request.image.image:
            raise Invalid("PullImage: image reference is empty")
        auth = None
        if request.HasField("auth"):
            a = request.auth
            auth = RegistryAuth(username=a.username, password=a.password, auth=a.auth,
                                server_address=a.server_address,
                                identity_token=a.identity_token,
                                registry_token=a.registry_token)
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None else DEFAULT_PULL_TIMEOUT
        reply = await self.bus.request(
            "images", "pull", PullRequest(ref=request.image.image, pull_id=uuid.uuid4().hex,
                                          auth=auth),
            PullReply, namespace=NAMESPACE, timeout=timeout, attempt_timeout=timeout,
            retries=0)
        return cri.PullImageResponse(image_ref=reply.image.id)

    @rpc
    async def ListImages(self, request: cri.ListImagesRequest,
                         context: grpc.aio.ServicerContext) -> cri.ListImagesResponse:
        ref = request.filter.image.image if request.HasField("filter") else ""
        reply = await self.bus.request("images", "list",
                                       ImageListRequest(ref=ref, with_config=True),
                                       ImageListReply, namespace=NAMESPACE)
        return cri.ListImagesResponse(images=[to_cri(info) for info in reply.images])

    @rpc
    async def ImageStatus(self, request: cri.ImageStatusRequest,
                          context: grpc.aio.ServicerContext) -> cri.ImageStatusResponse:
        if not request.image.image:
            raise Invalid("ImageStatus: image reference is empty")
        info = await self._get(request.image.image)
        if info is None:
            return cri.ImageStatusResponse()  # kubelet reads "no image" as not present
        response = cri.ImageStatusResponse(image=to_cri(info))
        if request.verbose:
            response.info["info"] = json.dumps({
                "imageSpec": json.loads(info.config),
                "chainID": info.layers[-1].chain_id if info.layers else "",
                "manifestDigest": info.manifest_digest,
                "targetDigest": info.target_digest,
                "names": info.names,
                "layers": [{"digest": layer.digest, "diffID": layer.diff_id,
                            "chainID": layer.chain_id, "size": layer.size,
                            "mediaType": layer.media_type} for layer in info.layers],
            })
        return response

    @rpc
    async def RemoveImage(self, request: cri.RemoveImageRequest,
                          context: grpc.aio.ServicerContext) -> cri.RemoveImageResponse:
        if not request.image.image:
            raise Invalid("RemoveImage: image reference is empty")
        try:
            await self.bus.request("images", "remove", ImageRemoveRequest(
                ref=request.image.image), ImageRemoveReply, namespace=NAMESPACE)
        except NotFound:
            pass  # the CRI makes removal idempotent
        return cri.RemoveImageResponse()

    @rpc
    async def ImageFsInfo(self, request: cri.ImageFsInfoRequest,
                          context: grpc.aio.ServicerContext) -> cri.ImageFsInfoResponse:
        # Like containerd: the image filesystem is where the snapshotter keeps the
        # unpacked layers (the compressed blobs are a cache of the registry).
        usage = await self.bus.request("snapshots", "fsusage", FsUsageRequest(), FsUsageReply)
        fs = cri.FilesystemUsage(timestamp=usage.timestamp_ns,
                                 fs_id=cri.FilesystemIdentifier(mountpoint=usage.mountpoint))
        fs.used_bytes.value = usage.used_bytes
        fs.inodes_used.value = usage.inodes_used
        return cri.ImageFsInfoResponse(image_filesystems=[fs])
