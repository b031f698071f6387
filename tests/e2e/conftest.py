"""Fixtures for every end-to-end module (a module's own fixture of the same name wins):
`images` (pause and busybox in the session registry) and `shoal`, a node of the test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from support.processes import ServiceSet
from support.shoal import Cri, cri_client, images_fixture, remove_all_pods, start_shoal  # noqa: F401


@pytest.fixture
async def shoal(services: ServiceSet, images: dict[str, str]) -> AsyncIterator[Cri]:
    """The five services started with start_shoal, as a CRI client; its pods are removed at
    the end."""
    await start_shoal(services, images)
    async with cri_client(services) as api:
        yield api
        await remove_all_pods(api)
