"""Fixtures for the registry client tests: images pushed once to the session registry,
fault-injecting fronts for it, and clients with millisecond backoffs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from shoal_puller.config import RegistryHostConfig
from shoal_puller.registry import RegistryClient
from support.faulty_registry import FaultyRegistry, MakeClient, Pushed
from support.images import (
    Image,
    LayerBuilder,
    build_image,
    build_index,
    busybox_layer,
    push,
)
from support.registry import Registry


def _small(arch: str, variant: str | None = None, schema: Any = "oci") -> Image:
    layer = LayerBuilder().file("platform", f"{arch}{variant or ''}\n").build()
    return build_image([layer], architecture=arch, variant=variant, schema=schema)


@pytest.fixture(scope="session")
def pushed(registry: Registry) -> Pushed:
    layer = busybox_layer()
    busybox = build_image([layer], cmd=["sh"])
    busybox_docker = build_image([layer], cmd=["sh"], schema="docker")
    index = build_index([_small("amd64"), _small("arm64", "v8"), _small("arm", "v7")])
    manifest_list = build_index([_small("amd64", schema="docker"),
                                 _small("arm64", "v8", schema="docker")])
    small = _small("amd64")
    push(registry.url, "puller/busybox", "oci", busybox)
    push(registry.url, "puller/busybox", "docker", busybox_docker)
    push(registry.url, "puller/multi", "oci", index)
    push(registry.url, "puller/multi", "docker", manifest_list)
    push(registry.url, "puller/small", "v1", small)
    push(registry.url, "puller/private", "v1", small)
    return Pushed(busybox, busybox_docker, index, manifest_list, small)


@pytest.fixture
async def front(registry: Registry) -> AsyncIterator[FaultyRegistry]:
    """A FaultyRegistry in front of the session registry (no faults until a test adds)."""
    async with FaultyRegistry(registry.url) as server:
        yield server


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """RegistryClient factory with test-speed backoffs; every client is closed after."""
    clients: list[RegistryClient] = []

    def make(registries: dict[str, RegistryHostConfig] | None = None,
             **kwargs: Any) -> RegistryClient:
        kwargs.setdefault("backoff_base", 0.01)
        kwargs.setdefault("backoff_cap", 0.05)
        kwargs.setdefault("retry_after_cap", 0.05)
        kwargs.setdefault("read_timeout", 5.0)
        client = RegistryClient(registries or {}, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()

