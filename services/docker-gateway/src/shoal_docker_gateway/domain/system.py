"""Node-wide numbers for `docker info` and `docker system df`."""

from __future__ import annotations

from dataclasses import dataclass

from cri_api.v1 import api_pb2 as cri
from shoal_common.messages.images import ImageListRequest

from shoal_docker_gateway.domain.backend import Backend


@dataclass
class Counts:
    containers: int
    running: int
    images: int


async def counts(backend: Backend) -> Counts:
    containers = (await backend.cri.runtime.ListContainers(cri.ListContainersRequest())).containers
    images = await backend.clients.images.list_images(ImageListRequest())
    return Counts(containers=len(containers),
                  running=sum(c.state == cri.CONTAINER_RUNNING for c in containers),
                  images=len({i.id for i in images.images}))
