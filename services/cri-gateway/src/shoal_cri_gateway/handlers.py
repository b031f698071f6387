"""Bus edge of the CRI gateway: commands on shoal.v1.<node>.cri.<verb>.

The gateway's real edge is gRPC (see grpc_api/); on the bus it only answers the runner's
built-in `health` and `ping` for now."""

from __future__ import annotations

from typing import Any

from shoal_common.bus import Router

router: Router[Any] = Router()
