"""Entry point: `shoal-docker-gateway` (or `python -m shoal_docker_gateway`)."""

from __future__ import annotations

from shoal_common.service import ServiceSpec, run_service

from shoal_docker_gateway.app import lifespan
from shoal_docker_gateway.handlers import router


def main() -> None:
    run_service(ServiceSpec(name="docker-gateway", router=router, lifespan=lifespan))
