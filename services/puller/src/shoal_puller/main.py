"""Entry point: `shoal-puller` (or `python -m shoal_puller`)."""

from __future__ import annotations

from shoal_common.service import ServiceSpec, run_service

from shoal_puller.app import lifespan
from shoal_puller.handlers import router


def main() -> None:
    run_service(ServiceSpec(name="puller", router=router, lifespan=lifespan))
