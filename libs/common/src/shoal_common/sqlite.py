"""SQLite the way every service keeps metadata: WAL, a busy timeout (replicas of a service
share one database file on a node), schema migrations by `user_version`, and every call run
on one dedicated thread so the event loop never blocks on a lock held by another replica."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, TypeVar

from shoal_common.fs import PRIVATE_FILE, private_dir

T = TypeVar("T")

LOCK_WAIT_SECONDS = 30.0


def _is_busy(error: sqlite3.OperationalError) -> bool:
    # Extended codes (SQLITE_BUSY_RECOVERY, ...) keep the primary code in the low byte.
    return error.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """`fn(conn)` inside BEGIN IMMEDIATE ... COMMIT (rolled back if it raises)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class Database:
    def __init__(self, path: Path, migrations: Sequence[str]) -> None:
        """`migrations[i]` is the SQL script that takes the schema from version i to i+1."""
        self.path = path
        self._migrations = migrations
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        self._conn: sqlite3.Connection | None = None

    def _open(self) -> None:
        if not self.path.parent.exists():
            private_dir(self.path.parent)
        # Owner-only from the first byte: SQLite gives the -wal and -shm files the database
        # file's mode, and they hold every row (container environments included).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
        if self.path.stat().st_mode & 0o077:
            os.chmod(self.path, PRIVATE_FILE)  # made by an older version
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.chmod(side, PRIVATE_FILE)
        # SQLite answers "database is locked" at once, without calling the busy handler,
        # where waiting could deadlock: switching to WAL while another replica holds a write
        # lock on the fresh file is such a case. Retry the whole open (it is idempotent).
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                self._conn = self._connect_and_migrate()
                return
            except sqlite3.OperationalError as error:
                if not _is_busy(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _connect_and_migrate(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=LOCK_WAIT_SECONDS, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a reply promises durability
            conn.execute("PRAGMA foreign_keys=ON")
            # One replica migrates; the others wait for its lock, then see it done.
            _in_transaction(conn, self._migrate)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for i, script in enumerate(self._migrations[version:], start=version):
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={i + 1}")

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the database thread."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"database {self.path} is not open")

        def call(c: sqlite3.Connection) -> T:
            result = fn(c)
            if isinstance(result, sqlite3.Cursor):
                # A cursor must not outlive the call: finalised later on another thread it
                # races the next statement ("bad parameter or other API misuse").
                result.close()
                return None  # type: ignore[return-value]
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, call, conn)

    async def transaction(self, fn: Callable[[sqlite3.Connection], T], *,
                          durable: bool = True) -> T:
        """Run `fn(conn)` inside BEGIN IMMEDIATE ... COMMIT (rolled back if it raises).

        `durable=False`: the commit does not wait for the disk (no fsync of the WAL). It
        still survives the crash of any process, since it is in the kernel's page cache;
        a power loss can take it (and no commit before it: the next durable commit's fsync
        covers the WAL up to it). Only for writes whose loss on a power loss is harmless:
        marking an outbox event sent (it is sent again under the same id), or marking done
        a step whose intent was committed durably before it ran (the record then reads as
        that intent, which the next start finishes or undoes as after a kill -9 just before
        the mark; and what the runtime's steps make, processes, mounts, namespaces, does not
        outlive a power loss anyway). A fact about such a change is published only after
        `sync()`."""
        if durable:
            return await self.run(lambda conn: _in_transaction(conn, fn))

        def relaxed(conn: sqlite3.Connection) -> T:
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                return _in_transaction(conn, fn)
            finally:
                conn.execute("PRAGMA synchronous=FULL")
        return await self.run(relaxed)

    async def sync(self) -> None:
        """Make every commit so far durable, those that did not wait for the disk too: one
        fdatasync of the WAL (where SQLite appends every commit until a checkpoint, which
        itself syncs it first)."""
        def sync() -> None:
            try:
                fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        await asyncio.get_running_loop().run_in_executor(self._executor, sync)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)


class SqliteStore:
    """A service's store kept in one SQLite file: a subclass names its schema (`migrations`,
    as Database takes them) and runs its queries on `self.db`."""

    migrations: ClassVar[Sequence[str]]

    def __init__(self, path: Path) -> None:
        self.db = Database(path, self.migrations)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()
