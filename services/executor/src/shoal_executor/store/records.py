"""What the executor must remember across restarts to tear down what it set up.

Every step is recorded before it is taken: a sandbox or container record names its owner
(the executor process making or removing it) until the operation ends, and a network
namespace is claimed (`netns` table, in the sandbox record's transaction) before `ip netns
add` and CNI ADD run and released only after CNI DEL and `ip netns delete`. So what a
killed executor left half done is known to the next one, and what it made on the host is
provably this node's."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal_common.errors import FailedPrecondition, Invalid
from shoal_common.sqlite import SqliteStore

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
""", """
ALTER TABLE sandboxes ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE containers ADD COLUMN owner TEXT NOT NULL DEFAULT '';
CREATE TABLE netns(
    name TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    path TEXT NOT NULL,
    runtime_config TEXT NOT NULL,
    attached INTEGER NOT NULL
);
INSERT INTO netns SELECT netns_name, id, netns_path, runtime_config, 1 FROM sandboxes
    WHERE netns_name != ''
""", """
ALTER TABLE sandboxes ADD COLUMN network TEXT NOT NULL DEFAULT '';
ALTER TABLE sandboxes ADD COLUMN joins TEXT NOT NULL DEFAULT '';
ALTER TABLE sandboxes ADD COLUMN pod TEXT NOT NULL DEFAULT '';
ALTER TABLE netns ADD COLUMN network TEXT NOT NULL DEFAULT '';
CREATE TABLE networks(
    name TEXT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL,
    driver TEXT NOT NULL,
    subnet TEXT NOT NULL,
    gateway TEXT NOT NULL,
    parent TEXT NOT NULL,
    bridge TEXT NOT NULL,
    created_at REAL NOT NULL
)
""", """
CREATE TABLE attachments(
    sandbox_id TEXT NOT NULL,
    network TEXT NOT NULL,
    ifname TEXT NOT NULL,
    netns_path TEXT NOT NULL,
    ips TEXT NOT NULL,
    attached INTEGER NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY(sandbox_id, ifname),
    UNIQUE(sandbox_id, network)
)
""", """
ALTER TABLE sandboxes ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0
"""]

# Sandbox states: `creating` and `removing` are operations under way (by `owner`); `ready`
# and `notready` are settled.
CREATING, READY, NOTREADY, REMOVING = "creating", "ready", "notready", "removing"
# A sandbox's `network`: "" = the default CNI network (every record before networks had
# one: with no netns it is a host-network pod), a network's name, or these.
NO_NETWORK, HOST_NETWORK = "none", "host"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with
    the pid it names one process for good, however pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return stat.rsplit(b")", 1)[-1].split()[19].decode()


def owner_token(pid: int | None = None) -> str:
    """`<pid>:<start time>` of this process (or `pid`): who holds an operation."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid)}"


def owner_alive(token: str) -> bool:
    """Whether the process that wrote `token` still runs (another replica mid-operation)."""
    pid, _, started = token.partition(":")
    return pid.isdigit() and bool(started) and _start_time(int(pid)) == started


@dataclass
class SandboxRecord:
    id: str
    netns_name: str = ""
    netns_path: str = ""
    ips: list[str] = field(default_factory=list)
    pid: int = 0
    state: str = CREATING
    created_at: float = 0.0
    dir: str = ""
    runtime_config: dict[str, Any] = field(default_factory=dict)  # CNI runtimeConfig
    cgroup_parent: str = ""
    owner: str = ""  # owner_token() of the process creating or removing it, "" once settled
    network: str = ""  # see NO_NETWORK; a joiner has the network of the pod it joins
    joins: str = ""  # the sandbox whose network namespace it shares (no CNI of its own)
    pod: str = ""  # "<namespace>/<name>" of its PodSandboxConfig, to name it to operators
    # No pause process: its namespaces pinned by bind mounts (domain/pinned.py); `pid` 0.
    pinned: bool = False

    def made(self) -> bool:
        """Its create finished (it may have been stopped since)."""
        return bool(self.pid) or (self.pinned and self.state in (READY, NOTREADY))

    def abandoned(self) -> bool:
        """An operation under way whose process is gone (killed mid-create or mid-remove);
        `ready` without a pid (and not pinned) is the intent as versions before `creating`
        wrote it."""
        return not owner_alive(self.owner) and (
            self.state in (CREATING, REMOVING) or (self.state == READY and not self.made()))


@dataclass
class ContainerRecord:
    id: str
    sandbox_id: str
    bundle: str
    stop_signal: int
    pid: int  # 0 until its task is made
    owner: str = ""  # owner_token() of the process creating it, "" once made

    def abandoned(self) -> bool:
        return not self.pid and not owner_alive(self.owner)


@dataclass
class NetnsClaim:
    """A network namespace this executor made (or is about to make) for a sandbox, and
    whether CNI may still hold an attachment (an IP lease, port mappings) in it."""

    name: str
    sandbox_id: str
    path: str
    runtime_config: dict[str, Any]
    attached: bool
    network: str = ""  # whose CNI config DEL must run with ("" = the default network)


@dataclass
class Attachment:
    """A network a sandbox was connected to after it was made (interface eth1, eth2...):
    recorded before CNI ADD runs (`attached` false until it has), kept until CNI DEL has
    run, even after the sandbox's record is gone (the start-up sweep finishes it)."""

    sandbox_id: str
    network: str
    ifname: str
    netns_path: str
    ips: list[str]
    attached: bool
    owner: str = ""  # owner_token() of the process connecting it

    def abandoned(self) -> bool:
        """A connect cut short: its process is gone before CNI ADD was recorded done."""
        return not self.attached and not owner_alive(self.owner)


class Records(SqliteStore):
    migrations = MIGRATIONS

    async def put_sandbox(self, s: SandboxRecord, *, claim_netns: bool = False,
                          durable: bool = True) -> None:
        """`claim_netns`: also claim its netns (attached), in the same transaction, before
        the namespace is made and CNI ADD runs. `durable`: see Database.transaction."""
        def tx(c: sqlite3.Connection) -> None:
            _check_network(c, s)
            c.execute("INSERT OR REPLACE INTO sandboxes(id, netns_name, netns_path, ips, pid, "
                      "state, created_at, dir, runtime_config, cgroup_parent, owner, network, "
                      "joins, pod, pinned) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (s.id, s.netns_name, s.netns_path, json.dumps(s.ips), s.pid, s.state,
                       s.created_at, s.dir, json.dumps(s.runtime_config), s.cgroup_parent,
                       s.owner, s.network, s.joins, s.pod, int(s.pinned)))
            if claim_netns and s.netns_name:
                # A pod without a network has nothing of CNI to give back.
                c.execute("INSERT OR REPLACE INTO netns(name, sandbox_id, path, runtime_config, "
                          "attached, network) VALUES (?,?,?,?,?,?)",
                          (s.netns_name, s.id, s.netns_path, json.dumps(s.runtime_config),
                           int(s.network != NO_NETWORK), s.network))
        await self.db.transaction(tx, durable=durable)

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

    async def put_container(self, r: ContainerRecord, *, durable: bool = True) -> None:
        """`durable`: see Database.transaction."""
        await self.db.transaction(lambda c: c.execute(
            "INSERT OR REPLACE INTO containers VALUES (?,?,?,?,?,?)",
            (r.id, r.sandbox_id, r.bundle, r.stop_signal, r.pid, r.owner)), durable=durable)

    async def containers(self) -> list[ContainerRecord]:
        rows = await self.db.run(lambda c: c.execute("SELECT * FROM containers").fetchall())
        return [ContainerRecord(**dict(r)) for r in rows]

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


    # -- network namespace claims ---------------------------------------------------------

    async def netns_claims(self, sandbox_id: str | None = None) -> list[NetnsClaim]:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM netns" if sandbox_id is None else
            "SELECT * FROM netns WHERE sandbox_id=?",
            () if sandbox_id is None else (sandbox_id,)).fetchall())
        return [NetnsClaim(r["name"], r["sandbox_id"], r["path"],
                           json.loads(r["runtime_config"]), bool(r["attached"]), r["network"])
                for r in rows]

    async def netns_detached(self, name: str) -> None:
        """CNI DEL succeeded: nothing of CNI is left for this namespace."""
        await self.db.transaction(lambda c: c.execute(
            "UPDATE netns SET attached=0 WHERE name=?", (name,)))

    async def release_netns(self, name: str) -> None:
        """The namespace is deleted; the claim goes unless CNI DEL is still owed."""
        await self.db.transaction(lambda c: c.execute(
            "DELETE FROM netns WHERE name=? AND attached=0", (name,)))

    # -- networks connected after the sandbox was made ----------------------------------------

    async def attachments(self, sandbox_id: str | None = None) -> list[Attachment]:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM attachments" + ("" if sandbox_id is None else
                                           " WHERE sandbox_id=?") + " ORDER BY ifname",
            () if sandbox_id is None else (sandbox_id,)).fetchall())
        return [_attachment(r) for r in rows]

    async def begin_attachment(self, sandbox_id: str, network: str
                               ) -> tuple[Attachment, bool]:
        """The intent to connect the (ready) sandbox to `network`, on its next free
        interface, held by this process: (the row that says so, whether it is new; an old
        one is a previous try's). One transaction, so a network's removal and this see each
        other."""
        owner = owner_token()

        def tx(c: sqlite3.Connection) -> tuple[Attachment, bool]:
            row = c.execute("SELECT * FROM attachments WHERE sandbox_id=? AND network=?",
                            (sandbox_id, network)).fetchone()
            if row is not None:
                found = _attachment(row)
                if found.attached or not owner_alive(found.owner):
                    c.execute("UPDATE attachments SET owner=? WHERE sandbox_id=? AND "
                              "network=?", (owner, sandbox_id, network))
                    return found, False
                raise FailedPrecondition(f"pod sandbox {sandbox_id} is being connected to "
                                         f"network {network or '(default)'!r} by another "
                                         "executor; try again")
            sandbox = c.execute("SELECT state, netns_path FROM sandboxes WHERE id=?",
                                (sandbox_id,)).fetchone()
            if sandbox is None or sandbox["state"] != READY:
                raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready")
            if network and c.execute("SELECT 1 FROM networks WHERE name=?",
                                     (network,)).fetchone() is None:
                raise Invalid(f"unknown network {network!r}")
            used = {r["ifname"] for r in c.execute(
                "SELECT ifname FROM attachments WHERE sandbox_id=?", (sandbox_id,))}
            ifname = next(f"eth{i}" for i in range(1, len(used) + 2) if f"eth{i}" not in used)
            att = Attachment(sandbox_id, network, ifname, sandbox["netns_path"], [], False,
                             owner)
            c.execute("INSERT INTO attachments VALUES (?,?,?,?,?,?,?)",
                      (sandbox_id, network, ifname, att.netns_path, "[]", 0, owner))
            return att, True
        return await self.db.transaction(tx)

    async def attached(self, att: Attachment, ips: list[str]) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE attachments SET ips=?, attached=1 WHERE sandbox_id=? AND ifname=?",
            (json.dumps(ips), att.sandbox_id, att.ifname)))

    async def drop_attachment(self, att: Attachment) -> None:
        """CNI DEL has run (or ADD undid itself): nothing of it is left."""
        await self.db.transaction(lambda c: c.execute(
            "DELETE FROM attachments WHERE sandbox_id=? AND ifname=?",
            (att.sandbox_id, att.ifname)))

    async def drop_netns_claim(self, name: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "DELETE FROM netns WHERE name=?", (name,)))


def _check_network(c: sqlite3.Connection, s: SandboxRecord) -> None:
    """A new sandbox's network must exist, and the namespace it joins still be claimed, as
    this transaction sees them: `network.remove` and a namespace's release look at the
    sandboxes in transactions too."""
    row = c.execute("SELECT network, joins FROM sandboxes WHERE id=?", (s.id,)).fetchone()
    if row is not None and (row["network"], row["joins"]) == (s.network, s.joins):
        return
    if s.network not in ("", NO_NETWORK, HOST_NETWORK) and c.execute(
            "SELECT 1 FROM networks WHERE name=?", (s.network,)).fetchone() is None:
        raise Invalid(f"unknown network {s.network!r}")
    if s.joins and c.execute("SELECT 1 FROM netns WHERE sandbox_id=?",
                             (s.joins,)).fetchone() is None:
        raise FailedPrecondition(f"the network namespace of pod sandbox {s.joins} is gone: "
                                 "it cannot be joined")


def _attachment(row: sqlite3.Row) -> Attachment:
    return Attachment(row["sandbox_id"], row["network"], row["ifname"], row["netns_path"],
                      json.loads(row["ips"]), bool(row["attached"]), row["owner"])


def _sandbox(row: sqlite3.Row) -> SandboxRecord:
    d = dict(row)
    d["ips"] = json.loads(d["ips"])
    d["runtime_config"] = json.loads(d["runtime_config"])
    d["pinned"] = bool(d["pinned"])
    return SandboxRecord(**d)
