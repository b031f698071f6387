"""What the executor must remember across restarts to tear down what it set up."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal_common.sqlite import Database

MIGRATIONS = ["""
CREATE TABLE sandboxes(
    id TEXT PRIMARY KEY,
    netns_name TEXT NOT NULL,
    netns_path TEXT NOT NULL,
    ips TEXT NOT NULL,
    pid INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    dir TEXT NOT NULL,
    runtime_config TEXT NOT NULL,
    cgroup_parent TEXT NOT NULL
);
CREATE TABLE containers(
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    bundle TEXT NOT NULL,
    stop_signal INTEGER NOT NULL,
    pid INTEGER NOT NULL
)
"""]


@dataclass
class SandboxRecord:
    id: str
    netns_name: str = ""
    netns_path: str = ""
    ips: list[str] = field(default_factory=list)
    pid: int = 0
    state: str = "ready"
    created_at: float = 0.0
    dir: str = ""
    runtime_config: dict[str, Any] = field(default_factory=dict)  # CNI runtimeConfig
    cgroup_parent: str = ""


@dataclass
class ContainerRecord:
    id: str
    sandbox_id: str
    bundle: str
    stop_signal: int
    pid: int


class Records:
    def __init__(self, path: Path) -> None:
        self.db = Database(path, MIGRATIONS)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def put_sandbox(self, s: SandboxRecord) -> None:
        await self.db.transaction(lambda c: c.execute(
            "INSERT OR REPLACE INTO sandboxes VALUES (?,?,?,?,?,?,?,?,?,?)",
            (s.id, s.netns_name, s.netns_path, json.dumps(s.ips), s.pid, s.state,
             s.created_at, s.dir, json.dumps(s.runtime_config), s.cgroup_parent)))

    async def sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        row = await self.db.run(lambda c: c.execute(
            "SELECT * FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone())
        return _sandbox(row) if row else None

    async def sandboxes(self) -> list[SandboxRecord]:
        rows = await self.db.run(lambda c: c.execute("SELECT * FROM sandboxes").fetchall())
        return [_sandbox(r) for r in rows]

    async def delete_sandbox(self, sandbox_id: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "DELETE FROM sandboxes WHERE id=?", (sandbox_id,)))

    async def put_container(self, r: ContainerRecord) -> None:
        await self.db.transaction(lambda c: c.execute(
            "INSERT OR REPLACE INTO containers VALUES (?,?,?,?,?)",
            (r.id, r.sandbox_id, r.bundle, r.stop_signal, r.pid)))

    async def container(self, container_id: str) -> ContainerRecord | None:
        row = await self.db.run(lambda c: c.execute(
            "SELECT * FROM containers WHERE id=?", (container_id,)).fetchone())
        return ContainerRecord(**dict(row)) if row else None

    async def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM containers WHERE sandbox_id=?", (sandbox_id,)).fetchall())
        return [ContainerRecord(**dict(r)) for r in rows]

    async def delete_container(self, container_id: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "DELETE FROM containers WHERE id=?", (container_id,)))


def _sandbox(row: sqlite3.Row) -> SandboxRecord:
    d = dict(row)
    d["ips"] = json.loads(d["ips"])
    d["runtime_config"] = json.loads(d["runtime_config"])
    return SandboxRecord(**d)
