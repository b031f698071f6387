"""The shared SQLite helper against a real database file."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from shoal_common.sqlite import Database, SqliteStore


async def test_open_waits_for_another_replica_writing_the_fresh_file(tmp_path: Path) -> None:
    # Another replica mid-write on a database not yet in WAL mode: SQLite refuses the switch
    # to WAL at once ("database is locked", no busy handler), which once made a second
    # puller replica exit at start.
    path = tmp_path / "meta.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE other(x)")
    other.execute("BEGIN")
    other.execute("INSERT INTO other VALUES (1)")
    committer = threading.Timer(0.3, other.execute, args=("COMMIT",))
    committer.start()
    db = Database(path, ["CREATE TABLE t(x INTEGER)"])
    started = time.monotonic()
    try:
        await db.open()
        assert time.monotonic() - started >= 0.25  # it waited for the writer, then opened
        await db.transaction(lambda c: c.execute("INSERT INTO t VALUES (7)"))
        assert await db.run(lambda c: [tuple(r) for r in c.execute("SELECT x FROM t")]) == [(7,)]
        assert await db.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        assert other.execute("SELECT x FROM other").fetchall() == [(1,)]  # nothing lost
    finally:
        committer.join()
        other.close()
        await db.close()


async def test_a_broken_migration_is_refused_and_leaves_the_schema_unchanged(
        tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    db = Database(path, ["CREATE TABLE t(x INTEGER)"])
    await db.open()
    await db.close()
    broken = Database(path, ["CREATE TABLE t(x INTEGER)",
                             "CREATE TABLE u(x INTEGER); INSERT INTO nowhere VALUES (1)"])
    try:
        await broken.open()
    except sqlite3.OperationalError as error:
        assert "no such table: nowhere" in str(error)
    else:
        raise AssertionError("a broken migration opened")
    finally:
        await broken.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == 1
    # The half-run migration's first statement was rolled back with it.
    assert check.execute("SELECT name FROM sqlite_master WHERE name='u'").fetchall() == []
    check.close()


async def test_a_store_opens_its_own_schema_and_reopens_it(tmp_path: Path) -> None:
    class Notes(SqliteStore):
        migrations = ["CREATE TABLE notes(text TEXT)"]

    path = tmp_path / "notes.db"
    first = Notes(path)
    await first.open()
    await first.db.transaction(lambda c: c.execute("INSERT INTO notes VALUES ('kept')"))
    await first.close()
    again = Notes(path)
    await again.open()
    try:
        rows = await again.db.run(lambda c: [r[0] for r in c.execute("SELECT text FROM notes")])
        assert rows == ["kept"]
        assert await again.db.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == 1
    finally:
        await again.close()


async def test_a_commit_that_need_not_wait_for_the_disk_is_still_a_commit(
        tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    db = Database(path, ["CREATE TABLE t(x INTEGER)"])
    await db.open()

    def synchronous() -> int:
        return int(db._conn.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[union-attr]

    try:
        assert await db.run(lambda c: synchronous()) == 2  # FULL
        await db.transaction(lambda c: c.execute("INSERT INTO t VALUES (1)"), durable=False)
        other = sqlite3.connect(path)
        assert other.execute("SELECT x FROM t").fetchall() == [(1,)]  # committed
        other.close()
        assert await db.run(lambda c: synchronous()) == 2  # the next commit waits again

        def fails(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO t VALUES (2)")
            raise ValueError("no")
        try:
            await db.transaction(fails, durable=False)
        except ValueError:
            pass
        assert await db.run(lambda c: [r[0] for r in c.execute("SELECT x FROM t")]) == [1]
        assert await db.run(lambda c: synchronous()) == 2
    finally:
        await db.close()


async def test_sync_makes_the_wal_durable_and_needs_no_wal(tmp_path: Path) -> None:
    db = Database(tmp_path / "meta.db", ["CREATE TABLE t(x INTEGER)"])
    await db.open()
    try:
        await db.sync()
        await db.transaction(lambda c: c.execute("INSERT INTO t VALUES (1)"), durable=False)
        assert (tmp_path / "meta.db-wal").stat().st_size > 0
        await db.sync()
        await db.run(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        assert (tmp_path / "meta.db-wal").stat().st_size == 0
        await db.sync()
        assert await db.run(lambda c: [r[0] for r in c.execute("SELECT x FROM t")]) == [1]
    finally:
        await db.close()
