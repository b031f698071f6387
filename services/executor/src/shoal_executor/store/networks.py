"""The networks the executor made (`networks` table of its database) and which sandboxes
are on each (the sandboxes' `network` column, and the netns claims CNI DEL is still owed
for). One database with the sandbox records, so that a network's removal and a pod's
joining it are transactions that see each other."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from shoal_common.errors import AlreadyExists, FailedPrecondition, NotFound
from shoal_common.sqlite import Database


@dataclass
class NetworkRecord:
    name: str
    id: str
    request_id: str  # the create's caller-chosen id: a retry finds its own network
    driver: str
    subnet: str
    gateway: str
    parent: str
    bridge: str  # "" unless driver is bridge
    created_at: float


@dataclass
class Member:
    """A sandbox on a network."""

    id: str
    pod: str
    ips: list[str]
    joins: str


_COLUMNS = ", ".join(f.name for f in fields(NetworkRecord))
_PLACES = ", ".join("?" for _ in fields(NetworkRecord))
# The default network's sandboxes: those of no other network that have a namespace of
# their own or join one (a record with neither is a host-network pod).
_DEFAULT = "network = '' AND (netns_name != '' OR joins != '')"


def _members(c: sqlite3.Connection, name: str) -> list[Member]:
    """The pods made on network `name`, then those connected to it later."""
    where, args = (_DEFAULT, ()) if not name else ("network = ?", (name,))
    rows = c.execute(f"SELECT id, pod, ips, joins FROM sandboxes WHERE {where} "
                     "ORDER BY created_at", args).fetchall()
    rows += c.execute("SELECT s.id, s.pod, a.ips, s.joins FROM attachments a JOIN sandboxes s "
                      "ON s.id = a.sandbox_id WHERE a.network = ? AND a.attached = 1 "
                      "ORDER BY s.created_at", (name,)).fetchall()
    return [Member(r["id"], r["pod"], json.loads(r["ips"]), r["joins"]) for r in rows]


class NetworkStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, rec: NetworkRecord,
                     check: Callable[[list[NetworkRecord]], None]) -> NetworkRecord:
        """Add `rec` unless its name is taken; `check(others)` refuses it (an overlapping
        subnet, a shared parent) inside the transaction, so two creates cannot both pass.
        A retry of the same create (its request id) returns the network it made."""
        def tx(c: sqlite3.Connection) -> NetworkRecord:
            rows = [NetworkRecord(**dict(r)) for r in c.execute("SELECT * FROM networks")]
            same = next((r for r in rows if r.name == rec.name), None)
            if same is not None:
                if same.request_id == rec.request_id:
                    return same
                raise AlreadyExists(f"network {rec.name!r} already exists")
            check(rows)
            c.execute(f"INSERT INTO networks({_COLUMNS}) VALUES ({_PLACES})",
                      tuple(asdict(rec).values()))
            return rec
        return await self.db.transaction(tx)

    async def get(self, name: str) -> NetworkRecord | None:
        row = await self.db.run(lambda c: c.execute(
            "SELECT * FROM networks WHERE name=?", (name,)).fetchone())
        return NetworkRecord(**dict(row)) if row else None

    async def all(self) -> list[NetworkRecord]:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM networks ORDER BY name").fetchall())
        return [NetworkRecord(**dict(r)) for r in rows]

    async def members(self, name: str) -> list[Member]:
        """The sandboxes on `name` ("" = the default network), oldest first."""
        return await self.db.run(lambda c: _members(c, name))

    async def remove(self, name: str) -> NetworkRecord:
        """Delete the record unless a sandbox is on it, or CNI DEL is still owed in a
        namespace of it (a removed pod's, kept for the pods that joined it)."""
        def tx(c: sqlite3.Connection) -> NetworkRecord:
            row = c.execute("SELECT * FROM networks WHERE name=?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no network {name!r}")
            users = [f"{m.id[:12]} ({m.pod})" if m.pod else m.id[:12]
                     for m in _members(c, name)]
            users += [f"{r['sandbox_id'][:12]} (removed; its network is still held)"
                      for r in c.execute("SELECT sandbox_id FROM netns WHERE network=? AND "
                                         "sandbox_id NOT IN (SELECT id FROM sandboxes)",
                                         (name,))]
            # Connecting now, or removed with CNI DEL of the interface still owed.
            users += [f"{r['sandbox_id'][:12]} ({r['ifname']} being connected or removed)"
                      for r in c.execute("SELECT sandbox_id, ifname FROM attachments WHERE "
                                         "network=? AND (attached=0 OR sandbox_id NOT IN "
                                         "(SELECT id FROM sandboxes))", (name,))]
            if users:
                raise FailedPrecondition(f"network {name!r} is in use by pod sandboxes "
                                         f"{', '.join(users)}: remove them first")
            c.execute("DELETE FROM networks WHERE name=?", (name,))
            return NetworkRecord(**dict(row))
        return await self.db.transaction(tx)
