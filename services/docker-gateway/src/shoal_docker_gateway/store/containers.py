"""Docker's container records: one row per container, found by full id, name or id prefix.

The row is written before the CRI is asked for anything (state `creating`), so a gateway
killed mid-create finds the half-made container at start and finishes or removes it."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field, replace
from typing import Any

from shoal_docker_gateway.store.records import Records

COLUMNS = ("id", "name", "pod_id", "cri_id", "image", "image_id", "config", "state", "created",
           "started_at", "finished_at", "exit_code", "restart_count", "labels")
STATES = ("creating", "created", "running", "exited", "removing")


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    name: str  # without the leading /
    image: str
    config: dict[str, Any]  # the create body as the client sent it
    state: str = "creating"
    pod_id: str = ""
    cri_id: str = ""
    image_id: str = ""
    created: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    exit_code: int = 0
    restart_count: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def host_config(self) -> dict[str, Any]:
        hc = self.config.get("HostConfig")
        return hc if isinstance(hc, dict) else {}


def _row(r: sqlite3.Row | tuple[Any, ...]) -> ContainerRecord:
    d = dict(zip(COLUMNS, r, strict=True))
    d["config"] = json.loads(d["config"])
    d["labels"] = json.loads(d["labels"])
    return ContainerRecord(**d)


def _values(rec: ContainerRecord) -> tuple[Any, ...]:
    d = {c: getattr(rec, c) for c in COLUMNS}
    d["config"] = json.dumps(rec.config)
    d["labels"] = json.dumps(rec.labels)
    return tuple(d[c] for c in COLUMNS)


class Containers:
    """Queries on the `containers` table."""

    def __init__(self, records: Records) -> None:
        self.db = records.db

    async def insert(self, rec: ContainerRecord) -> None:
        """Raises sqlite3.IntegrityError when the id or the name is taken."""
        marks = ", ".join("?" * len(COLUMNS))
        await self.db.transaction(lambda c: c.execute(
            f"INSERT INTO containers ({', '.join(COLUMNS)}) VALUES ({marks})", _values(rec)))

    async def save(self, rec: ContainerRecord) -> None:
        """Writes every field of an existing row (by id)."""
        sets = ", ".join(f"{c} = ?" for c in COLUMNS[1:])
        await self.db.transaction(lambda c: c.execute(
            f"UPDATE containers SET {sets} WHERE id = ?", (*_values(rec)[1:], rec.id)))

    async def update(self, rec: ContainerRecord, **changes: Any) -> ContainerRecord:
        new = replace(rec, **changes)
        await self.save(new)
        return new

    async def by_id(self, cid: str) -> ContainerRecord | None:
        rows = await self.db.run(lambda c: c.execute(
            f"SELECT {', '.join(COLUMNS)} FROM containers WHERE id = ?", (cid,)).fetchall())
        return _row(rows[0]) if rows else None

    async def by_cri_id(self, cri_id: str) -> ContainerRecord | None:
        """The container whose current CRI container is `cri_id`."""
        rows = await self.db.run(lambda c: c.execute(
            f"SELECT {', '.join(COLUMNS)} FROM containers WHERE cri_id = ?",
            (cri_id,)).fetchall())
        return _row(rows[0]) if rows else None

    async def find(self, ref: str) -> list[ContainerRecord]:
        """Docker's lookup: the full id, else the exact name (a leading / allowed), else
        every container whose id starts with `ref`."""
        name = ref.removeprefix("/")

        def q(c: sqlite3.Connection) -> list[Any]:
            cols = ", ".join(COLUMNS)
            for sql, arg in ((f"SELECT {cols} FROM containers WHERE id = ?", ref),
                             (f"SELECT {cols} FROM containers WHERE name = ?", name)):
                rows = c.execute(sql, (arg,)).fetchall()
                if rows:
                    return rows
            if not ref or not all(ch in "0123456789abcdef" for ch in ref):
                return []
            return c.execute(f"SELECT {cols} FROM containers WHERE substr(id, 1, ?) = ?",
                             (len(ref), ref)).fetchall()

        return [_row(r) for r in await self.db.run(q)]

    async def all(self) -> list[ContainerRecord]:
        rows = await self.db.run(lambda c: c.execute(
            f"SELECT {', '.join(COLUMNS)} FROM containers ORDER BY created DESC").fetchall())
        return [_row(r) for r in rows]

    async def rename(self, cid: str, name: str) -> None:
        """Raises sqlite3.IntegrityError when `name` is taken."""
        await self.db.transaction(lambda c: c.execute(
            "UPDATE containers SET name = ? WHERE id = ?", (name, cid)))

    async def delete(self, cid: str) -> None:
        await self.db.transaction(lambda c: c.execute("DELETE FROM containers WHERE id = ?",
                                                      (cid,)))
