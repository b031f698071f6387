"""Pod sandbox and container metadata, as the CRI reports it back to kubelet.

Runtime state (running, exit codes) is not stored here: it is asked of the supervisor,
which owns it, so a restarted gateway never reports stale state."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shoal_common.errors import AlreadyExists, NotFound
from shoal_common.sqlite import Database

MIGRATIONS = ["""
CREATE TABLE pods(
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    namespace TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at_ns INTEGER NOT NULL,
    config BLOB NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    ip TEXT NOT NULL,
    additional_ips TEXT NOT NULL,
    netns_path TEXT NOT NULL,
    runtime_handler TEXT NOT NULL,
    UNIQUE(name, namespace, uid, attempt)
);
CREATE TABLE containers(
    id TEXT PRIMARY KEY,
    pod_id TEXT NOT NULL REFERENCES pods(id),
    name TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    created_at_ns INTEGER NOT NULL,
    image TEXT NOT NULL,
    image_ref TEXT NOT NULL,
    image_id TEXT NOT NULL,
    config BLOB NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    log_path TEXT NOT NULL,
    UNIQUE(pod_id, name, attempt)
);
CREATE INDEX containers_by_pod ON containers(pod_id)
""",
    # v2: what successful UpdateContainerResources calls changed (a serialized CRI
    # LinuxContainerResources; NULL = nothing since create), so ContainerStatus reports the
    # current resources across gateway restarts.
    """
ALTER TABLE containers ADD COLUMN updated_resources BLOB
""",
    # v3: a container's create is recorded before it is made ("creating"), so a retry or a
    # restarted gateway finds it half made and finishes or undoes it.
    """
ALTER TABLE containers ADD COLUMN state TEXT NOT NULL DEFAULT 'created'
"""]


@dataclass
class PodRecord:
    id: str
    name: str
    uid: str
    namespace: str
    attempt: int
    state: str  # "creating" (recorded, not made yet), "ready", "notready"
    created_at_ns: int
    config: bytes
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    netns_path: str = ""
    runtime_handler: str = ""


@dataclass
class ContainerRecord:
    id: str
    pod_id: str
    name: str
    attempt: int
    created_at_ns: int
    image: str  # as the CRI asked for it
    image_ref: str  # repo digest kubelet shows as imageID
    image_id: str  # config digest
    config: bytes
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    updated_resources: bytes | None = None
    state: str = "created"  # or "creating": recorded, not made yet


_ID_PREFIX = re.compile(r"[0-9a-f]{1,64}")


def _shown(text: str) -> str:
    """An id as an error message may quote it: bounded, control characters escaped."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def _pod(row: sqlite3.Row) -> PodRecord:
    d = dict(row)
    for key in ("labels", "annotations", "additional_ips"):
        d[key] = json.loads(d[key])
    return PodRecord(**d)


def _ctr(row: sqlite3.Row) -> ContainerRecord:
    d = dict(row)
    for key in ("labels", "annotations"):
        d[key] = json.loads(d[key])
    return ContainerRecord(**d)


class Metadata:
    def __init__(self, path: Path) -> None:
        self.db = Database(path, MIGRATIONS)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def add_pod(self, p: PodRecord) -> None:
        def tx(c: sqlite3.Connection) -> None:
            try:
                c.execute("INSERT INTO pods VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
                    p.id, p.name, p.uid, p.namespace, p.attempt, p.state, p.created_at_ns,
                    p.config, json.dumps(p.labels), json.dumps(p.annotations), p.ip,
                    json.dumps(p.additional_ips), p.netns_path, p.runtime_handler))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"pod sandbox {p.namespace}/{p.name} (uid {p.uid}, attempt "
                                    f"{p.attempt}) already exists") from None
        await self.db.transaction(tx)

    async def set_pod_config(self, pod_id: str, config: bytes) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE pods SET config=? WHERE id=?", (config, pod_id)))

    async def update_pod(self, p: PodRecord) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE pods SET state=?, ip=?, additional_ips=?, netns_path=? WHERE id=?",
            (p.state, p.ip, json.dumps(p.additional_ips), p.netns_path, p.id)))

    async def pod(self, pod_id: str) -> PodRecord:
        """By full id or unique prefix (crictl passes short ids)."""
        rows = await self._by_prefix("pods", pod_id)
        if len(rows) != 1:
            raise NotFound(f"pod sandbox {_shown(pod_id)} not found")
        return _pod(rows[0])

    async def _by_prefix(self, table: str, prefix: str) -> list[sqlite3.Row]:
        """At most two rows whose id starts with `prefix`. Ids are 64 hex characters: any
        other prefix names nothing (and a LIKE pattern would read `%`/`_` as wildcards)."""
        if not _ID_PREFIX.fullmatch(prefix):
            return []
        return await self.db.run(lambda c: c.execute(
            f"SELECT * FROM {table} WHERE substr(id, 1, ?) = ? LIMIT 2",
            (len(prefix), prefix)).fetchall())

    async def pod_named(self, namespace: str, name: str, uid: str, attempt: int
                        ) -> PodRecord | None:
        """The pod a RunPodSandbox with this metadata made (or is making)."""
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM pods WHERE namespace=? AND name=? AND uid=? AND attempt=?",
            (namespace, name, uid, attempt)).fetchall())
        return _pod(rows[0]) if rows else None

    async def container_named(self, pod_id: str, name: str, attempt: int
                              ) -> ContainerRecord | None:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM containers WHERE pod_id=? AND name=? AND attempt=?",
            (pod_id, name, attempt)).fetchall())
        return _ctr(rows[0]) if rows else None

    async def set_container_state(self, container_id: str, state: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE containers SET state=? WHERE id=?", (state, container_id)))

    async def pods(self) -> list[PodRecord]:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM pods ORDER BY created_at_ns").fetchall())
        return [_pod(r) for r in rows]

    async def delete_pod(self, pod_id: str) -> None:
        await self.db.transaction(lambda c: c.execute("DELETE FROM pods WHERE id=?", (pod_id,)))

    async def add_container(self, r: ContainerRecord) -> None:
        def tx(c: sqlite3.Connection) -> None:
            try:
                c.execute(
                    "INSERT INTO containers(id, pod_id, name, attempt, created_at_ns, image, "
                    "image_ref, image_id, config, labels, annotations, log_path, "
                    "updated_resources, state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
                        r.id, r.pod_id, r.name, r.attempt, r.created_at_ns, r.image,
                        r.image_ref, r.image_id, r.config, json.dumps(r.labels),
                        json.dumps(r.annotations), r.log_path, r.updated_resources, r.state))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"container {r.name} (attempt {r.attempt}) already exists "
                                    f"in pod {r.pod_id}") from None
        await self.db.transaction(tx)

    async def update_resources(self, container_id: str,
                               change: Callable[[bytes | None], bytes | None]) -> None:
        """Replace the container's updated resources with `change(current)` (None = keep),
        read and written in one transaction so concurrent updates (other replicas too)
        each build on the last. A container removed meanwhile is left alone."""
        def tx(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT updated_resources FROM containers WHERE id=?",
                            (container_id,)).fetchone()
            if row is None:
                return
            new = change(row[0])
            if new is not None:
                c.execute("UPDATE containers SET updated_resources=? WHERE id=?",
                          (new, container_id))
        await self.db.transaction(tx)

    async def container(self, container_id: str) -> ContainerRecord:
        rows = await self._by_prefix("containers", container_id)
        if len(rows) != 1:
            raise NotFound(f"container {_shown(container_id)} not found")
        return _ctr(rows[0])

    async def containers(self, pod_id: str | None = None) -> list[ContainerRecord]:
        if pod_id is None:
            rows = await self.db.run(lambda c: c.execute(
                "SELECT * FROM containers ORDER BY created_at_ns").fetchall())
        else:
            rows = await self.db.run(lambda c: c.execute(
                "SELECT * FROM containers WHERE pod_id=? ORDER BY created_at_ns",
                (pod_id,)).fetchall())
        return [_ctr(r) for r in rows]

    async def delete_container(self, container_id: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "DELETE FROM containers WHERE id=?", (container_id,)))
