"""Docker's named volumes: one row per volume (its data lives under paths.volumes_dir).

The row is the volume: a directory without a row is a leftover of a create or remove that
was cut short, made again or removed by the next call that names it."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from shoal_docker_gateway.store.records import Records

COLUMNS = ("name", "driver", "labels", "options", "created")


@dataclass(frozen=True)
class VolumeRecord:
    name: str
    driver: str = "local"
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


def _row(r: sqlite3.Row | tuple[Any, ...]) -> VolumeRecord:
    d = dict(zip(COLUMNS, r, strict=True))
    return VolumeRecord(name=d["name"], driver=d["driver"], labels=json.loads(d["labels"]),
                        options=json.loads(d["options"]), created=d["created"])


class Volumes:
    """Queries on the `volumes` table."""

    def __init__(self, records: Records) -> None:
        self.db = records.db

    async def insert_or_get(self, rec: VolumeRecord) -> tuple[VolumeRecord, bool]:
        """The volume named `rec.name`: the stored one if it exists (False), else `rec`
        (True). One transaction, so two creates of a name agree on one row."""

        def q(c: sqlite3.Connection) -> tuple[VolumeRecord, bool]:
            rows = c.execute(f"SELECT {', '.join(COLUMNS)} FROM volumes WHERE name = ?",
                             (rec.name,)).fetchall()
            if rows:
                return _row(rows[0]), False
            c.execute(f"INSERT INTO volumes ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?)",
                      (rec.name, rec.driver, json.dumps(rec.labels), json.dumps(rec.options),
                       rec.created))
            return rec, True

        return await self.db.transaction(q)

    async def get(self, name: str) -> VolumeRecord | None:
        rows = await self.db.run(lambda c: c.execute(
            f"SELECT {', '.join(COLUMNS)} FROM volumes WHERE name = ?", (name,)).fetchall())
        return _row(rows[0]) if rows else None

    async def all(self) -> list[VolumeRecord]:
        rows = await self.db.run(lambda c: c.execute(
            f"SELECT {', '.join(COLUMNS)} FROM volumes ORDER BY name").fetchall())
        return [_row(r) for r in rows]

    async def delete(self, name: str) -> None:
        await self.db.transaction(lambda c: c.execute("DELETE FROM volumes WHERE name = ?",
                                                      (name,)))
