"""The puller's application state, built at start and closed at stop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shoal_common.errors import FailedPrecondition
from shoal_common.messages import Event
from shoal_common.service import ServiceContext

from shoal_puller.domain import metrics
from shoal_puller.domain.builtin import BuiltinImages
from shoal_puller.domain.catalog import Catalog
from shoal_puller.domain.imports import Importer
from shoal_puller.domain.namespaces import Namespaces
from shoal_puller.domain.pull import Puller, PullSettings
from shoal_puller.domain.push import Pusher, PushSettings
from shoal_puller.registry import Platform, RegistryClient
from shoal_puller.registry.hosts_dir import HostsError
from shoal_puller.registry.hosts_tree import HostsDir
from shoal_puller.reserved import BUILTIN_HOST
from shoal_puller.store.content import ContentStore
from shoal_puller.store.images import ImageStore
from shoal_puller.store.namespaces import NamespaceStore


@dataclass
class PullerApp:
    puller: Puller
    catalog: Catalog
    pusher: Pusher
    importer: Importer
    namespaces: Namespaces


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[PullerApp]:
    cfg = ctx.config.services.puller
    hosts = _hosts_dir(cfg.config_path)  # first: a refusal leaves nothing open
    content = ContentStore(ctx.state_dir / "content")
    metrics.register_content(content.usage)
    images = ImageStore(ctx.state_dir / "metadata.db")
    await images.open()

    async def publish(event: Event, namespace: str, wait_ack: bool) -> None:
        await ctx.bus.publish_event(event, namespace=namespace, wait_ack=wait_ack)

    platform = Platform.parse(cfg.platform) if cfg.platform else Platform.host()
    settings = PullSettings(cfg.max_concurrent_downloads, cfg.min_progress_bytes,
                            cfg.progress_window, platform)
    client = RegistryClient(cfg.registries, max_attempts=cfg.max_attempts, hosts=hosts)
    builtins = BuiltinImages(content, images, publish)
    try:
        # Before serving: the first RunPodSandbox finds the pause image without a registry.
        # Made only for a node whose pods use it (the default): others keep an empty store.
        if ctx.config.cri.sandbox_image.split("/", 1)[0] == BUILTIN_HOST:
            await builtins.ensure()
        catalog = Catalog(content, images, publish)
        pusher = Pusher(content, images, catalog, client.uploads(cfg.push_chunk_size),
                        PushSettings(cfg.max_concurrent_uploads, cfg.min_progress_bytes,
                                     cfg.progress_window), publish)
        yield PullerApp(Puller(content, images, client, settings, publish, builtins),
                        catalog, pusher, Importer(catalog, publish, platform),
                        Namespaces(NamespaceStore(images.db)))
    finally:
        await client.close()
        await images.close()


def _hosts_dir(path: str) -> HostsDir | None:
    """containerd's host directories, every one read (TLS files too) before serving: a
    malformed one stops the start, naming its file and key."""
    if not path:
        return None
    hosts = HostsDir(path)
    try:
        hosts.load_all()
    except HostsError as exc:
        raise FailedPrecondition(f"config key services.puller.config_path: {exc}") from None
    return hosts
