"""`images.namespaces.*`: the node's namespaces, as containerd keeps them. The puller owns
them because it owns what most often fills one (image names); pods and containers are the
CRI gateway's, which `shoal namespaces rm` asks first (checked, not locked: a pod made
between that check and this remove still runs, in a namespace no longer listed as made).

Blobs are shared by digest and unpacked layers by chain ID across namespaces, so removing
a namespace, like removing an image in one, never frees what another still names."""

from __future__ import annotations

import structlog
from shoal_common.errors import FailedPrecondition
from shoal_common.messages.namespaces import (
    CRI_NAMESPACE,
    NamespaceCreateReply,
    NamespaceCreateRequest,
    NamespaceListReply,
    NamespaceRemoveReply,
    check_namespace,
)

from shoal_puller.store.namespaces import NamespaceStore

log = structlog.get_logger("shoal.puller.namespaces")


class Namespaces:
    def __init__(self, store: NamespaceStore) -> None:
        self.store = store

    async def list(self) -> NamespaceListReply:
        """The recorded ones, those holding images, and k8s.io (the CRI's) always."""
        return NamespaceListReply(namespaces=await self.store.list(always=(CRI_NAMESPACE,)))

    async def create(self, req: NamespaceCreateRequest) -> NamespaceCreateReply:
        name = check_namespace(req.name)
        info, created = await self.store.create(name, dict(req.labels))
        if created:
            log.info("namespace created", namespace=name, labels=info.labels)
        return NamespaceCreateReply(namespace=info, created=created)

    async def remove(self, name: str) -> NamespaceRemoveReply:
        check_namespace(name)
        if name == CRI_NAMESPACE:
            raise FailedPrecondition(f"namespace {CRI_NAMESPACE} is the CRI's (kubelet's "
                                     "pods and images): it cannot be removed")
        await self.store.remove(name)
        log.info("namespace removed", namespace=name)
        return NamespaceRemoveReply(name=name)
