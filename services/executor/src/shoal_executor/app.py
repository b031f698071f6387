"""The executor's application state, built at start and closed at stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from shoal_common.fs import TRAVERSE_DIR
from shoal_common.locks import KeyedLocks
from shoal_common.service import ServiceContext

from shoal_executor.domain import reconcile
from shoal_executor.domain.cni import DEFAULT_CONFLIST_NAME, Cni, default_conflist
from shoal_executor.domain.networks import Networks
from shoal_executor.domain.runtime import Runtime, RuntimeSettings
from shoal_executor.store.records import Records

log = structlog.get_logger("shoal.executor")


@dataclass
class ExecutorApp:
    runtime: Runtime
    cni: Cni
    networks: Networks
    # One command at a time per sandbox or container id: a create the bus resends after a
    # silent attempt waits for the first and finds it done (each step is idempotent by id).
    locks: KeyedLocks = field(default_factory=KeyedLocks)


def install_default_network(conf_dir: Path, subnet: str, bridge: str) -> None:
    """Only into Shoal's own conf dir, and only when it holds no config: an operator's
    CNI config is always honoured."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    if any(conf_dir.glob("*.conf*")) or any(conf_dir.glob("*.json")):
        return
    path = conf_dir / DEFAULT_CONFLIST_NAME
    path.write_text(json.dumps(default_conflist(subnet, bridge), indent=2) + "\n")
    log.info("installed the default CNI network", path=str(path), subnet=subnet)


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[ExecutorApp]:
    cfg = ctx.config.services.executor
    conf_dir = Path(cfg.cni_conf_dir) if cfg.cni_conf_dir else ctx.state_dir / "cni" / "net.d"
    if not cfg.cni_conf_dir:
        install_default_network(conf_dir, cfg.pod_subnet, cfg.cni_bridge)
    cni = Cni(conf_dir, cfg.cni_bin_dirs)
    records = Records(ctx.state_dir / "executor.db")
    await records.open()
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    # Traversable, not listable (as its bundles and sandboxes dirs): the root of a pod with
    # a user namespace is an unprivileged host uid, and runc sets its rootfs up as that uid.
    os.chmod(ctx.run_dir, TRAVERSE_DIR)
    snapshots = Path(ctx.config.state_root) / "snapshotter" / "snapshots"
    runtime = Runtime(RuntimeSettings(ctx.run_dir, ctx.config.runtime, cni, snapshots,
                                      cgroup_roots=tuple(cfg.pod_cgroup_roots),
                                      drop_infra=cfg.drop_infra),
                      records, ctx.bus)
    networks = Networks(cni, runtime.net.store, ctx.state_dir / "cni" / "ipam", cfg.pod_subnet)
    sweep: asyncio.Task[None] | None = None
    try:
        # What a killed executor left half done is finished or undone before any command
        # is served (a retried create then starts clean), and what no record claims goes.
        await networks.reconcile()
        await reconcile.before_serving(runtime)
        sweep = asyncio.create_task(reconcile.sweep_tasks(runtime))
        yield ExecutorApp(runtime, cni, networks)
    finally:
        if sweep is not None:
            sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweep
        # While the records are open: a network's masquerade stays only while pods use it.
        await networks.close()
        await records.close()
