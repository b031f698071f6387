"""Bus edge of the Docker gateway: commands on shoal.v1.<node>.docker.<verb>.

Its real edge is HTTP on the Docker socket (api/); on the bus it serves only the runner's
built-in `health` and `ping`, declared in shoal_common.clients.docker."""

from __future__ import annotations

from typing import Any

from shoal_common.bus import Router

router: Router[Any] = Router()
