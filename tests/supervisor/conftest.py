"""Fixtures for the supervisor tests (helpers in supervisor_harness.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from shoal_common.bus import Bus
from supervisor_harness import Harness
from support.bundles import runc_spec
from support.processes import Node, ServiceSet


@pytest.fixture(scope="session")
def base_spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`runc spec`'s default config.json, adjusted per container by the harness."""
    if shutil.which("runc") is None or shutil.which("conmon") is None:
        # Never skip: these are end-to-end tests and CI has both (deploy/setup.sh).
        pytest.fail("runc and conmon are required (deploy/setup.sh installs them)",
                    pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("running containers needs root", pytrace=False)
    return runc_spec(tmp_path_factory.mktemp("spec"))


@pytest.fixture
async def sup(node: Node, services: ServiceSet, bus: Bus, base_spec: dict[str, Any],
              tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(node, services, bus, base_spec, tmp_path)
    try:
        yield harness
    finally:
        await harness.close_subscriptions()
        await asyncio.to_thread(services.stop_all)
        await asyncio.to_thread(harness.cleanup)


