"""Snapshot metadata in SQLite (shared by the snapshotter replicas of a node).

A snapshot's files live in `snapshots/<id>/`; `id` never changes, while `key` does on commit
(the active key becomes the committed name, usually a chain ID), so children point at their
parent by id and a commit is a single-row update. `id` is AUTOINCREMENT so a directory name
is never reused: a directory without a row is garbage, whatever another replica is doing.

Image references (`image_refs`, `image_chains`) record which image names (namespace + name)
use which chains, so that deleting the last name of an image can remove its layers; `seq`
(the events stream sequence of the last event applied to a name) keeps an older event that is
redelivered late from undoing a newer one.

Functions here take a connection and run inside the caller's transaction (domain code
composes them with `Database.transaction`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Literal, cast

Kind = Literal["active", "view", "committed"]
KINDS: tuple[Kind, ...] = ("active", "view", "committed")

MIGRATIONS = ["""
CREATE TABLE snapshots(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    source_key TEXT NOT NULL DEFAULT ''
);
CREATE INDEX snapshots_by_parent ON snapshots(parent_id);
CREATE INDEX snapshots_by_kind ON snapshots(kind);
CREATE TABLE settings(
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE image_refs(
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(namespace, name)
);
CREATE TABLE image_chains(
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    chain_id TEXT NOT NULL,
    PRIMARY KEY(namespace, name, position),
    FOREIGN KEY(namespace, name) REFERENCES image_refs(namespace, name) ON DELETE CASCADE
);
CREATE INDEX image_chains_by_chain ON image_chains(chain_id)
""", """
-- The boot (kernel boot ID) in which a committed layer's files were written and not yet
-- flushed to disk, or empty once flushed. Such a row from another boot may have lost its
-- files to a power loss: start-up removes it and everything on it. (No semicolons in here.)
ALTER TABLE snapshots ADD COLUMN unsynced_boot TEXT NOT NULL DEFAULT '';
CREATE INDEX snapshots_unsynced ON snapshots(unsynced_boot) WHERE unsynced_boot != ''
"""]


@dataclass(frozen=True)
class SnapshotRow:
    id: int
    key: str
    parent_id: int | None
    parent: str  # the parent's key, "" for none
    kind: Kind
    created: float
    updated: float
    labels: dict[str, str]
    source_key: str  # committed: the active key it was committed from (idempotent retries)


_SELECT = """
SELECT s.id, s.key, s.parent_id, COALESCE(p.key, '') AS parent, s.kind, s.created, s.updated,
       s.labels, s.source_key
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


def _row(r: sqlite3.Row) -> SnapshotRow:
    return SnapshotRow(id=r["id"], key=r["key"], parent_id=r["parent_id"], parent=r["parent"],
                       kind=cast(Kind, r["kind"]), created=r["created"], updated=r["updated"],
                       labels=json.loads(r["labels"]), source_key=r["source_key"])


def get(conn: sqlite3.Connection, key: str) -> SnapshotRow | None:
    r = conn.execute(f"{_SELECT} WHERE s.key = ?", (key,)).fetchone()
    return _row(r) if r else None


def get_by_id(conn: sqlite3.Connection, snap_id: int) -> SnapshotRow | None:
    r = conn.execute(f"{_SELECT} WHERE s.id = ?", (snap_id,)).fetchone()
    return _row(r) if r else None


def ancestors(conn: sqlite3.Connection, snap_id: int | None) -> list[SnapshotRow]:
    """`snap_id` and its ancestors, nearest first ([] for None)."""
    if snap_id is None:
        return []
    ids = [r[0] for r in conn.execute("""
        WITH RECURSIVE chain(id, parent_id, depth) AS (
            SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
            UNION ALL
            SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c
                ON s.id = c.parent_id
        ) SELECT id FROM chain ORDER BY depth""", (snap_id,))]
    rows = {r.id: r for r in (get_by_id(conn, i) for i in ids) if r is not None}
    return [rows[i] for i in ids if i in rows]


def insert(conn: sqlite3.Connection, *, key: str, parent_id: int | None, kind: Kind,
           labels: dict[str, str], now: float) -> int:
    cur = conn.execute(
        "INSERT INTO snapshots(key, parent_id, kind, created, updated, labels) "
        "VALUES (?, ?, ?, ?, ?, ?)", (key, parent_id, kind, now, now, json.dumps(labels)))
    return int(cur.lastrowid or 0)


def commit(conn: sqlite3.Connection, snap_id: int, *, name: str, source_key: str,
           labels: dict[str, str], now: float, parent_id: int | None,
           unsynced_boot: str = "") -> None:
    conn.execute("UPDATE snapshots SET key = ?, kind = 'committed', labels = ?, updated = ?, "
                 "source_key = ?, parent_id = ?, unsynced_boot = ? WHERE id = ?",
                 (name, json.dumps(labels), now, source_key, parent_id, unsynced_boot, snap_id))


# -- files not yet flushed --------------------------------------------------------------------

def unsynced(conn: sqlite3.Connection, boot: str) -> list[int]:
    """The committed snapshots whose files were written in `boot` and not flushed yet."""
    return [r[0] for r in conn.execute(
        "SELECT id FROM snapshots WHERE unsynced_boot = ? ORDER BY id", (boot,))]


def unsynced_elsewhere(conn: sqlite3.Connection, boot: str) -> list[int]:
    """Those written in another boot and never flushed: their files may be torn."""
    return [r[0] for r in conn.execute(
        "SELECT id FROM snapshots WHERE unsynced_boot != '' AND unsynced_boot != ? "
        "ORDER BY id", (boot,))]


def mark_synced(conn: sqlite3.Connection, snap_ids: list[int]) -> None:
    conn.executemany("UPDATE snapshots SET unsynced_boot = '' WHERE id = ?",
                     [(i,) for i in snap_ids])


def with_descendants(conn: sqlite3.Connection, snap_ids: list[int]) -> list[SnapshotRow]:
    """The snapshots `snap_ids` and every snapshot built on them, at any depth."""
    if not snap_ids:
        return []
    marks = ",".join("?" * len(snap_ids))
    found = [r[0] for r in conn.execute(f"""
        WITH RECURSIVE tree(id) AS (
            SELECT id FROM snapshots WHERE id IN ({marks})
            UNION
            SELECT s.id FROM snapshots s JOIN tree t ON s.parent_id = t.id
        ) SELECT id FROM tree""", snap_ids)]
    rows = (get_by_id(conn, i) for i in sorted(found))
    return [r for r in rows if r is not None]


def delete_many(conn: sqlite3.Connection, snap_ids: list[int]) -> None:
    """Delete rows that include every child of each (one statement: the parent references
    are checked at its end)."""
    marks = ",".join("?" * len(snap_ids))
    conn.execute(f"DELETE FROM snapshots WHERE id IN ({marks})", snap_ids)


def delete(conn: sqlite3.Connection, snap_id: int) -> None:
    conn.execute("DELETE FROM snapshots WHERE id = ?", (snap_id,))


def delete_active(conn: sqlite3.Connection, snap_id: int) -> bool:
    """Delete the snapshot if it is (still) active; whether it was."""
    cur = conn.execute("DELETE FROM snapshots WHERE id = ? AND kind = 'active'", (snap_id,))
    return cur.rowcount > 0


def has_children(conn: sqlite3.Connection, snap_id: int) -> bool:
    return conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1",
                        (snap_id,)).fetchone() is not None


def list_rows(conn: sqlite3.Connection, *, parent: str = "", kind: str = "") -> list[SnapshotRow]:
    where, args = [], []
    if parent:
        where.append("p.key = ?")
        args.append(parent)
    if kind:
        where.append("s.kind = ?")
        args.append(kind)
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY s.id"
    return [_row(r) for r in conn.execute(sql, args)]


def ids(conn: sqlite3.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT id FROM snapshots")}


def count_by_kind(conn: sqlite3.Connection) -> dict[str, int]:
    counts: dict[str, int] = dict.fromkeys(KINDS, 0)
    for kind, n in conn.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind"):
        counts[kind] = n
    return counts


# -- settings ---------------------------------------------------------------------------------

def get_setting(conn: sqlite3.Connection, name: str) -> str | None:
    r = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
    return str(r[0]) if r else None


def set_setting(conn: sqlite3.Connection, name: str, value: str) -> None:
    conn.execute("INSERT INTO settings(name, value) VALUES (?, ?) "
                 "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, value))


# -- image references -------------------------------------------------------------------------

def image_chains(conn: sqlite3.Connection, namespace: str, name: str) -> list[str]:
    """The chains of `name`, bottom layer first."""
    return [r[0] for r in conn.execute(
        "SELECT chain_id FROM image_chains WHERE namespace = ? AND name = ? ORDER BY position",
        (namespace, name))]


def _ref_seq(conn: sqlite3.Connection, namespace: str, name: str) -> int | None:
    r = conn.execute("SELECT seq FROM image_refs WHERE namespace = ? AND name = ?",
                     (namespace, name)).fetchone()
    return None if r is None else int(r[0])


def set_image_ref(conn: sqlite3.Connection, namespace: str, name: str, chains: list[str],
                  seq: int | None) -> tuple[bool, list[str]]:
    """Point `name` at `chains`. With an event `seq` older than the last one applied to this
    name, nothing changes: (False, []). Otherwise (True, the chains it used before)."""
    stored = _ref_seq(conn, namespace, name)
    if seq is not None and stored is not None and seq < stored:
        return False, []
    before = image_chains(conn, namespace, name)
    new_seq = max(seq or 0, stored or 0)
    conn.execute("INSERT INTO image_refs(namespace, name, seq, deleted) VALUES (?, ?, ?, 0) "
                 "ON CONFLICT(namespace, name) DO UPDATE SET seq = excluded.seq, deleted = 0",
                 (namespace, name, new_seq))
    conn.execute("DELETE FROM image_chains WHERE namespace = ? AND name = ?", (namespace, name))
    conn.executemany("INSERT INTO image_chains(namespace, name, position, chain_id) "
                     "VALUES (?, ?, ?, ?)", [(namespace, name, i, c) for i, c in enumerate(chains)])
    return True, before


def delete_image_ref(conn: sqlite3.Connection, namespace: str, name: str,
                     seq: int | None) -> tuple[bool, list[str]]:
    """Forget `name`, leaving a tombstone with `seq` so an older create redelivered later is
    ignored. Returns (applied, the chains it used)."""
    stored = _ref_seq(conn, namespace, name)
    if seq is not None and stored is not None and seq < stored:
        return False, []
    before = image_chains(conn, namespace, name)
    conn.execute("DELETE FROM image_chains WHERE namespace = ? AND name = ?", (namespace, name))
    conn.execute("INSERT INTO image_refs(namespace, name, seq, deleted) VALUES (?, ?, ?, 1) "
                 "ON CONFLICT(namespace, name) DO UPDATE SET seq = excluded.seq, deleted = 1",
                 (namespace, name, max(seq or 0, stored or 0)))
    return True, before


def forget_image_refs(conn: sqlite3.Connection, namespace: str | None,
                      prefix: str) -> None:
    """Drop the references whose name starts with `prefix` (in `namespace`, or in every
    namespace with None), leaving no tombstone: for provisional names, which no event
    orders."""
    where = "name >= ? AND name < ?" + ("" if namespace is None else " AND namespace = ?")
    args: tuple[str, ...] = (prefix, prefix + "\U0010ffff")
    if namespace is not None:
        args += (namespace,)
    conn.execute(f"DELETE FROM image_chains WHERE {where}", args)
    conn.execute(f"DELETE FROM image_refs WHERE {where}", args)


def chain_referenced(conn: sqlite3.Connection, chain_id: str) -> bool:
    return conn.execute("SELECT 1 FROM image_chains WHERE chain_id = ? LIMIT 1",
                        (chain_id,)).fetchone() is not None


def unreferenced_leaves(conn: sqlite3.Connection, label: str) -> list[str]:
    """Committed snapshots carrying `label` with no children and no image naming them."""
    return [r[0] for r in conn.execute("""
        SELECT s.key FROM snapshots s
        WHERE s.kind = 'committed'
          AND json_extract(s.labels, '$."' || ? || '"') IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM snapshots c WHERE c.parent_id = s.id)
          AND NOT EXISTS (SELECT 1 FROM image_chains i WHERE i.chain_id = s.key)
        ORDER BY s.id DESC""", (label,))]
