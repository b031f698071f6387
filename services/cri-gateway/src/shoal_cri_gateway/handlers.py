"""Bus edge of the CRI gateway: commands on shoal.v1.<node>.cri.<verb>.

The gateway's real edge is gRPC (grpc_api/); on the bus it serves only the runner's
built-in `health` and `ping`, declared with the others in shoal_common.clients.cri."""

from __future__ import annotations

from shoal_common.bus import Router

from shoal_cri_gateway.app import GatewayApp

router: Router[GatewayApp] = Router()
