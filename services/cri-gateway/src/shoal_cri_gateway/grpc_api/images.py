"""CRI ImageService, served from the puller over the bus, in the caller's Shoal namespace
(k8s.io unless the `shoal-namespace` metadata names another)."""

from __future__ import annotations

import json

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_common.errors import Invalid
from shoal_common.messages.images import ImageInfo, RegistryAuth
from shoal_common.messages.snapshots import FsUsageReply

from shoal_cri_gateway.domain.images import Images
from shoal_cri_gateway.grpc_api.rpc import namespace_of, rpc


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


def fs_usage(usage: FsUsageReply) -> cri.FilesystemUsage:
    fs = cri.FilesystemUsage(timestamp=usage.timestamp_ns,
                             fs_id=cri.FilesystemIdentifier(mountpoint=usage.mountpoint))
    fs.used_bytes.value = usage.used_bytes
    fs.inodes_used.value = usage.inodes_used
    return fs


class ImageService(cri_grpc.ImageServiceServicer):
    def __init__(self, images: Images) -> None:
        self.images = images

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
        image_id = await self.images.pull(namespace_of(context), request.image.image, auth,
                                          context.time_remaining())
        return cri.PullImageResponse(image_ref=image_id)

    @rpc
    async def ListImages(self, request: cri.ListImagesRequest,
                         context: grpc.aio.ServicerContext) -> cri.ListImagesResponse:
        ref = request.filter.image.image if request.HasField("filter") else ""
        return cri.ListImagesResponse(images=[
            to_cri(i) for i in await self.images.list(namespace_of(context), ref)])

    @rpc
    async def ImageStatus(self, request: cri.ImageStatusRequest,
                          context: grpc.aio.ServicerContext) -> cri.ImageStatusResponse:
        if not request.image.image:
            raise Invalid("ImageStatus: image reference is empty")
        info = await self.images.get(namespace_of(context), request.image.image)
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
        await self.images.remove(namespace_of(context), request.image.image)
        return cri.RemoveImageResponse()

    @rpc
    async def ImageFsInfo(self, request: cri.ImageFsInfoRequest,
                          context: grpc.aio.ServicerContext) -> cri.ImageFsInfoResponse:
        images, containers = await self.images.fs_usage()
        response = cri.ImageFsInfoResponse(image_filesystems=[fs_usage(images)])
        if containers is not None:  # KEP-4191: writable layers on a filesystem of their own
            response.container_filesystems.append(fs_usage(containers))
        return response
