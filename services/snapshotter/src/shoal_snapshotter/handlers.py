"""Bus edge of the snapshotter: the commands it serves on shoal.v1.<node>.snapshots.<verb>.

Owns: snapshots and layer unpack.
Domain commands arrive with their issues; every replica already
answers the runner's built-in `health` and `ping`."""

from __future__ import annotations

from typing import Any

from shoal_common.bus import Router

router: Router[Any] = Router()
