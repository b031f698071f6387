"""Entry point: `shoal-executor` (or `python -m shoal_executor`)."""

from __future__ import annotations

from shoal_common.service import ServiceSpec, run_service

from shoal_executor.app import lifespan
from shoal_executor.handlers import router


def main() -> None:
    run_service(ServiceSpec(name="executor", router=router, lifespan=lifespan))
