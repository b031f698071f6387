"""The Shoal namespace of a CRI call, and the typed clients that carry it.

The CRI socket is owner-only, so every caller is the node's root; a caller may name a
namespace in the gRPC metadata key `shoal-namespace` (`shoal -n NAME ps`), and kubelet and
crictl, which never do, are in `k8s.io`. Everything a call touches is in its namespace: the
records it finds by id, the images it resolves, and the namespace header of the commands it
sends (the supervisor publishes a task's events in its create's namespace)."""

from __future__ import annotations

from collections import OrderedDict

from shoal_common.bus import Bus
from shoal_common.clients import Clients
from shoal_common.messages.namespaces import CRI_NAMESPACE, check_namespace

METADATA_KEY = "shoal-namespace"
MAX_CACHED = 64  # namespaces whose clients are kept; more are made again when used


def namespace_from(value: str | bytes | None) -> str:
    """The namespace a call's metadata names: `k8s.io` without one; Invalid (the CRI's
    INVALID_ARGUMENT) for a name containerd would refuse."""
    if value is None:
        return CRI_NAMESPACE
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    return check_namespace(text, f"gRPC metadata {METADATA_KEY}")


class NamespacedClients:
    """`clients(namespace)`: the typed clients whose commands carry `namespace`, kept for
    the most recently used namespaces (they hold nothing but the bus and the name)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._cache: OrderedDict[str, Clients] = OrderedDict()

    def __call__(self, namespace: str) -> Clients:
        clients = self._cache.get(namespace)
        if clients is None:
            clients = Clients(self.bus, namespace=check_namespace(namespace))
            self._cache[namespace] = clients
            if len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(namespace)
        return clients

    @property
    def cri(self) -> Clients:
        """kubelet's namespace, for what is not any caller's (status, the reconcile's
        sweep of tasks no record names)."""
        return self(CRI_NAMESPACE)
