"""Entry point: `shoal-supervisor` (or `python -m shoal_supervisor`)."""

from __future__ import annotations

from shoal_common.service import ServiceSpec, run_service

from shoal_supervisor.app import lifespan
from shoal_supervisor.handlers import router


def main() -> None:
    run_service(ServiceSpec(name="supervisor", router=router, lifespan=lifespan))
