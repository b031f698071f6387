"""Entry point: `shoal-cri-gateway` (or `python -m shoal_cri_gateway`)."""

from __future__ import annotations

from shoal_common.service import ServiceSpec, run_service

from shoal_cri_gateway.app import lifespan
from shoal_cri_gateway.handlers import router


def main() -> None:
    run_service(ServiceSpec(name="cri-gateway", router=router, lifespan=lifespan))
