"""The CRI gateway's metadata database in tests: as an earlier version left it, and open."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

from shoal_cri_gateway.store.metadata import MIGRATIONS, Metadata


def old_database(path: Path, version: int, *rows: tuple[str, tuple[object, ...]]) -> None:
    """`path` as the gateway left it at schema `version` (the first `version` migrations),
    holding `rows` (each an INSERT and its values)."""
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version={version}")
    for sql, values in rows:
        conn.execute(sql, values)
    conn.commit()
    conn.close()


def schema_version(path: Path) -> int:
    return int(sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0])


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Metadata]:
    """The gateway's Metadata of `path` (migrated as it opens), closed after the block."""
    meta = Metadata(path)
    await meta.open()
    try:
        yield meta
    finally:
        await meta.close()
