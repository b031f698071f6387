"""Typed clients, one per service: the only callers of `Bus.request` (see `base`)."""

from shoal_common.bus import Bus
from shoal_common.clients.base import PROBE_TIMEOUT, ServiceClient, Verb, check_router
from shoal_common.clients.cri import CriClient
from shoal_common.clients.docker import DockerClient
from shoal_common.clients.images import ImagesClient
from shoal_common.clients.monitor import MonitorClient
from shoal_common.clients.snapshots import SnapshotsClient
from shoal_common.clients.tasks import TasksClient


class Clients:
    """A caller's clients of the four services on the container path, in one namespace."""

    def __init__(self, bus: Bus, namespace: str | None = None) -> None:
        self.images = ImagesClient(bus, namespace=namespace)
        self.snapshots = SnapshotsClient(bus, namespace=namespace)
        self.tasks = TasksClient(bus, namespace=namespace)
        self.monitor = MonitorClient(bus, namespace=namespace)


# By subject token (shoal_common.catalog's `subject`).
CLIENTS: dict[str, type[ServiceClient]] = {
    c.service: c for c in (ImagesClient, SnapshotsClient, TasksClient, MonitorClient, CriClient,
                                                    DockerClient)}

__all__ = [
    "CLIENTS",
    "PROBE_TIMEOUT",
    "Clients",
    "CriClient",
    "DockerClient",
    "ImagesClient",
    "MonitorClient",
    "ServiceClient",
    "SnapshotsClient",
    "TasksClient",
    "Verb",
    "check_router",
]
