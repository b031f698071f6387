"""Entry point: `shoal-snapshotter` (or `python -m shoal_snapshotter`)."""

from __future__ import annotations

from shoal_common.service import ServiceSpec, run_service

from shoal_snapshotter.app import lifespan
from shoal_snapshotter.handlers import router


def main() -> None:
    run_service(ServiceSpec(name="snapshotter", router=router, lifespan=lifespan))
