"""Docker's user networks: one row per network, found by full id, name or id prefix.

The row is written before the executor is asked for the Shoal network, and the executor's
create is idempotent by the row's id: a gateway killed between the two leaves a row whose
network the next use makes (domain/networks.py `ensure_shoal`)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from shoal_docker_gateway.store.records import Records

COLUMNS = ("id", "name", "shoal_name", "driver", "attachable", "labels", "options", "ipam",
           "created")
_COLS = ", ".join(COLUMNS)


@dataclass(frozen=True)
class NetworkRecord:
    id: str
    name: str  # Docker's
    shoal_name: str  # the executor's (a DNS label)
    driver: str = "bridge"
    attachable: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    ipam: dict[str, Any] = field(default_factory=dict)  # {"Subnet": ..., "Gateway": ...}
    created: float = field(default_factory=time.time)


def _row(r: sqlite3.Row | tuple[Any, ...]) -> NetworkRecord:
    d = dict(zip(COLUMNS, r, strict=True))
    return NetworkRecord(id=d["id"], name=d["name"], shoal_name=d["shoal_name"],
                         driver=d["driver"], attachable=bool(d["attachable"]),
                         labels=json.loads(d["labels"]), options=json.loads(d["options"]),
                         ipam=json.loads(d["ipam"]), created=d["created"])


class Networks:
    """Queries on the `networks` table."""

    def __init__(self, records: Records) -> None:
        self.db = records.db

    async def insert(self, rec: NetworkRecord) -> None:
        """Raises sqlite3.IntegrityError when the id, name or Shoal name is taken."""
        values = (rec.id, rec.name, rec.shoal_name, rec.driver, int(rec.attachable),
                  json.dumps(rec.labels), json.dumps(rec.options), json.dumps(rec.ipam),
                  rec.created)
        await self.db.transaction(lambda c: c.execute(
            f"INSERT INTO networks ({_COLS}) VALUES ({', '.join('?' * len(COLUMNS))})",
            values))

    async def find(self, ref: str) -> list[NetworkRecord]:
        """Docker's lookup: the full id, else the exact name, else every network whose id
        starts with `ref`."""

        def q(c: sqlite3.Connection) -> list[Any]:
            for sql in (f"SELECT {_COLS} FROM networks WHERE id = ?",
                        f"SELECT {_COLS} FROM networks WHERE name = ?"):
                rows = c.execute(sql, (ref,)).fetchall()
                if rows:
                    return rows
            if not ref or not all(ch in "0123456789abcdef" for ch in ref):
                return []
            return c.execute(f"SELECT {_COLS} FROM networks WHERE substr(id, 1, ?) = ?",
                             (len(ref), ref)).fetchall()

        return [_row(r) for r in await self.db.run(q)]

    async def by_id(self, net_id: str) -> NetworkRecord | None:
        rows = await self.db.run(lambda c: c.execute(
            f"SELECT {_COLS} FROM networks WHERE id = ?", (net_id,)).fetchall())
        return _row(rows[0]) if rows else None

    async def all(self) -> list[NetworkRecord]:
        rows = await self.db.run(lambda c: c.execute(
            f"SELECT {_COLS} FROM networks ORDER BY created").fetchall())
        return [_row(r) for r in rows]

    async def delete(self, net_id: str) -> None:
        await self.db.transaction(lambda c: c.execute("DELETE FROM networks WHERE id = ?",
                                                      (net_id,)))
