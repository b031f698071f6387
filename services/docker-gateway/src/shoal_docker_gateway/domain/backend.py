"""What every endpoint works with: the CRI gateway (containers, through its socket, in the
Docker namespace), the typed bus clients of the services (images, networks, tasks), the
gateway's own records, and the node's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from aiohttp import web
from shoal_cli.cri_client import Cri
from shoal_common.bus import Bus
from shoal_common.clients import Clients
from shoal_common.config import Config

from shoal_docker_gateway.domain.dns import DnsService
from shoal_docker_gateway.domain.events import Gone, Seen
from shoal_docker_gateway.domain.execs import ExecRegistry
from shoal_docker_gateway.store.records import Records


@dataclass
class Backend:
    config: Config
    namespace: str  # the Shoal namespace of Docker's containers and image names (moby)
    bus: Bus
    clients: Clients  # commands carrying `namespace`
    channel: grpc.aio.Channel  # to the CRI socket, every call carrying `namespace`
    cri: Cri
    records: Records
    execs: ExecRegistry = field(default_factory=ExecRegistry)  # in memory, as dockerd's
    dns: DnsService | None = None  # started by networks.dns_of
    gone: Gone = field(default_factory=Gone)  # removed containers, for their `die`
    seen: Seen = field(default_factory=Seen)  # start/die events, for Docker's order

    @property
    def node_id(self) -> str:
        return self.config.node_id


BACKEND = web.AppKey("backend", Backend)


def backend_of(request: web.Request) -> Backend:
    return request.app[BACKEND]
