"""The supervisor's application state, built at start and closed at stop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from shoal_common.messages import Event
from shoal_common.service import ServiceContext

from shoal_supervisor.domain.confine import Roots
from shoal_supervisor.domain.execs import ExecSessions
from shoal_supervisor.domain.layout import Layout
from shoal_supervisor.domain.tasks import TaskManager
from shoal_supervisor.store.tasks import TaskStore


@dataclass
class SupervisorApp:
    tasks: TaskManager
    execs: ExecSessions


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[SupervisorApp]:
    layout = Layout(ctx.state_dir, ctx.run_dir)
    layout.make()  # before the database file goes in it
    store = TaskStore(layout.db)
    await store.open()

    async def publish(event: Event, namespace: str, event_id: str) -> None:
        await ctx.bus.publish_event(event, namespace=namespace, event_id=event_id)

    # Bundles are the executor's (the same config names its run dir). Shoal's own roots
    # hold every database and credential, so no CRI log may be written in them, but in
    # <run_root>/cli-logs, where `shoal run` keeps its pods' logs.
    run_root = Path(ctx.config.run_root)
    roots = Roots(bundles=ctx.config.run_dir("executor") / "bundles", run_dir=ctx.run_dir,
                  private=(Path(ctx.config.state_root), run_root),
                  log_dirs=(run_root / "cli-logs",))
    manager = TaskManager(store, layout, ctx.config.services.supervisor.conmon_path, publish,
                          roots, runtimes=ctx.config.runtime)
    try:
        # Reconciles before the first command is served: exits that happened while no
        # supervisor ran are recorded (and published) now.
        await manager.open()
        conmon_path = ctx.config.services.supervisor.conmon_path
        yield SupervisorApp(manager, ExecSessions(manager.record, layout, conmon_path))
    finally:
        # Containers and their conmons keep running; only our watches stop.
        await manager.close()
        await store.close()
