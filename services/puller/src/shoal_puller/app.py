"""The puller's application state, built at start and closed at stop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shoal_common.messages import Event
from shoal_common.service import ServiceContext

from shoal_puller.domain import metrics
from shoal_puller.domain.builtin import BuiltinImages
from shoal_puller.domain.catalog import Catalog
from shoal_puller.domain.pull import Puller, PullSettings
from shoal_puller.registry import Platform, RegistryClient
from shoal_puller.reserved import BUILTIN_HOST
from shoal_puller.store.content import ContentStore
from shoal_puller.store.images import ImageStore


@dataclass
class PullerApp:
    puller: Puller
    catalog: Catalog


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[PullerApp]:
    cfg = ctx.config.services.puller
    content = ContentStore(ctx.state_dir / "content")
    metrics.register_content(content.usage)
    images = ImageStore(ctx.state_dir / "metadata.db")
    await images.open()

    async def publish(event: Event, namespace: str, wait_ack: bool) -> None:
        await ctx.bus.publish_event(event, namespace=namespace, wait_ack=wait_ack)

    platform = Platform.parse(cfg.platform) if cfg.platform else Platform.host()
    settings = PullSettings(cfg.max_concurrent_downloads, cfg.min_progress_bytes,
                            cfg.progress_window, platform)
    client = RegistryClient(cfg.registries, max_attempts=cfg.max_attempts)
    builtins = BuiltinImages(content, images, publish)
    try:
        # Before serving: the first RunPodSandbox finds the pause image without a registry.
        # Made only for a node whose pods use it (the default): others keep an empty store.
        if ctx.config.cri.sandbox_image.split("/", 1)[0] == BUILTIN_HOST:
            await builtins.ensure()
        yield PullerApp(Puller(content, images, client, settings, publish, builtins),
                        Catalog(content, images, publish))
    finally:
        await client.close()
        await images.close()
