"""Finding a container the way Docker does: by id, name, or a unique id prefix."""

from __future__ import annotations

from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.errors import NotFound, no_such_container
from shoal_docker_gateway.store.containers import ContainerRecord, Containers


async def resolve(backend: Backend, ref: str) -> ContainerRecord:
    """The one container `ref` names; 404 "No such container" (or an ambiguous prefix)."""
    found = await Containers(backend.records).find(ref)
    if not found:
        raise no_such_container(ref)
    if len(found) > 1:
        raise NotFound(f"multiple IDs found with provided prefix: {ref}")
    return found[0]
