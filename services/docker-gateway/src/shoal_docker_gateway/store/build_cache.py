"""The classic builder's layer cache: one row per step a build ran, keyed by sha256 of
(parent image id, the step's history text, its inputs), naming the image the step made
(in the build namespace). A row whose image is gone is a miss, dropped when found."""

from __future__ import annotations

import sqlite3
import time

from shoal_docker_gateway.store.records import Records


class BuildCache:
    """Queries on the `build_cache` table."""

    def __init__(self, records: Records) -> None:
        self.db = records.db

    async def get(self, key: str) -> str | None:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT image_id FROM build_cache WHERE key = ?", (key,)).fetchall())
        return str(rows[0][0]) if rows else None

    async def put(self, key: str, image_id: str) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR REPLACE INTO build_cache (key, image_id, created) "
                      "VALUES (?, ?, ?)", (key, image_id, time.time()))

        await self.db.transaction(q)

    async def delete(self, key: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "DELETE FROM build_cache WHERE key = ?", (key,)))

    async def clear(self) -> int:
        """Every row gone (`docker builder prune`); how many there were."""
        def q(c: sqlite3.Connection) -> int:
            return c.execute("DELETE FROM build_cache").rowcount

        return int(await self.db.transaction(q))
