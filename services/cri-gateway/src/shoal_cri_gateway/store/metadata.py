"""Pod sandbox and container metadata, as the CRI reports it back to kubelet.

Runtime state (running, exit codes) is not stored here: it is asked of the supervisor,
which owns it, so a restarted gateway never reports stale state.

Every pod and container belongs to one Shoal namespace (`shoal_namespace`, containerd's:
`k8s.io` for kubelet; not the CRI's `namespace`, a Kubernetes namespace inside the pod's
identity). A lookup by id sees only its caller's namespace: another's id is not found."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

from shoal_common.errors import AlreadyExists, NotFound
from shoal_common.sqlite import SqliteStore

# The columns each table had first; v4 copies both with the namespace (and v2, v3's) added.
_POD_COLUMNS = """
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
    runtime_handler TEXT NOT NULL,"""


def _container_columns(pods: str) -> str:
    return f"""
    id TEXT PRIMARY KEY,
    pod_id TEXT NOT NULL REFERENCES {pods}(id),
    name TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    created_at_ns INTEGER NOT NULL,
    image TEXT NOT NULL,
    image_ref TEXT NOT NULL,
    image_id TEXT NOT NULL,
    config BLOB NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    log_path TEXT NOT NULL,"""


MIGRATIONS = [f"""
CREATE TABLE pods({_POD_COLUMNS}
    UNIQUE(name, namespace, uid, attempt)
);
CREATE TABLE containers({_container_columns("pods")}
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
""",
    # v4: the Shoal namespace of each pod and container (every earlier one is the CRI's,
    # k8s.io), part of a pod's identity. SQLite cannot change a UNIQUE constraint, so both
    # tables are copied: containers go to a table referencing the new pods, the old tables
    # are dropped (containers first: nothing references it), and the renames carry the
    # reference over (SQLite >= 3.26 rewrites foreign keys on RENAME).
    f"""
CREATE TABLE pods_v4({_POD_COLUMNS}
    shoal_namespace TEXT NOT NULL,
    UNIQUE(shoal_namespace, namespace, name, uid, attempt)
);
INSERT INTO pods_v4 SELECT id, name, uid, namespace, attempt, state, created_at_ns, config,
    labels, annotations, ip, additional_ips, netns_path, runtime_handler, 'k8s.io' FROM pods;
CREATE TABLE containers_v4({_container_columns("pods_v4")}
    updated_resources BLOB,
    state TEXT NOT NULL DEFAULT 'created',
    shoal_namespace TEXT NOT NULL,
    UNIQUE(pod_id, name, attempt)
);
INSERT INTO containers_v4 SELECT id, pod_id, name, attempt, created_at_ns, image, image_ref,
    image_id, config, labels, annotations, log_path, updated_resources, state, 'k8s.io'
    FROM containers;
DROP TABLE containers;
DROP TABLE pods;
ALTER TABLE pods_v4 RENAME TO pods;
ALTER TABLE containers_v4 RENAME TO containers;
CREATE INDEX containers_by_pod ON containers(pod_id);
CREATE INDEX pods_by_namespace ON pods(shoal_namespace);
CREATE INDEX containers_by_namespace ON containers(shoal_namespace)
""",
    # v5: whether the pod has no pause process (the executor pinned its namespaces), so
    # its state is its record's, with no pause task to ask about.
    """
ALTER TABLE pods ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0
"""]

CRI_NAMESPACE = "k8s.io"  # what every record made before namespaces belongs to


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
    shoal_namespace: str = CRI_NAMESPACE
    pinned: bool = False  # no pause process (its namespaces pinned by the executor)


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
    shoal_namespace: str = CRI_NAMESPACE  # its pod's


class PodIdentity(Protocol):
    """A pod's CRI identity: PodSandboxMetadata, or a PodRecord."""

    name: str
    uid: str
    namespace: str
    attempt: int


_ID_PREFIX = re.compile(r"[0-9a-f]{1,64}")


def _shown(text: str) -> str:
    """An id as an error message may quote it: bounded, control characters escaped."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def _in(namespace: str) -> str:
    """Where a lookup looked, for its error message (said only outside k8s.io)."""
    return "" if namespace == CRI_NAMESPACE else f" in namespace {namespace}"


# The fields stored as JSON text; every other field is its own column as it is.
_POD_JSON = ("labels", "annotations", "additional_ips")
_CTR_JSON = ("labels", "annotations")


def _pod(row: sqlite3.Row) -> PodRecord:
    d = dict(row)
    for key in _POD_JSON:
        d[key] = json.loads(d[key])
    d["pinned"] = bool(d["pinned"])
    return PodRecord(**d)


def _ctr(row: sqlite3.Row) -> ContainerRecord:
    d = dict(row)
    for key in _CTR_JSON:
        d[key] = json.loads(d[key])
    return ContainerRecord(**d)


def _columns(record: PodRecord | ContainerRecord, json_fields: tuple[str, ...]
             ) -> dict[str, object]:
    """A record as its table's columns (a dataclass field each, in order)."""
    out = {f.name: getattr(record, f.name) for f in fields(record)}
    for key in json_fields:
        out[key] = json.dumps(out[key])
    return out


class Metadata(SqliteStore):
    migrations = MIGRATIONS

    async def _insert(self, table: str, columns: dict[str, object], exists: str) -> None:
        """One new row; a row it clashes with (or a missing pod it names) is AlreadyExists."""
        # The table and column names are this module's constants; values are bound.
        sql = (f"INSERT INTO {table}({', '.join(columns)}) "
               f"VALUES ({','.join('?' * len(columns))})")

        def tx(c: sqlite3.Connection) -> None:
            try:
                c.execute(sql, tuple(columns.values()))
            except sqlite3.IntegrityError:
                raise AlreadyExists(exists) from None
        await self.db.transaction(tx)

    async def add_pod(self, p: PodRecord) -> None:
        await self._insert("pods", _columns(p, _POD_JSON),
                           f"pod sandbox {p.namespace}/{p.name} (uid {p.uid}, attempt "
                           f"{p.attempt}) already exists{_in(p.shoal_namespace)}")

    async def set_pod_config(self, pod_id: str, config: bytes) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE pods SET config=? WHERE id=?", (config, pod_id)))

    async def update_pod(self, p: PodRecord, *, durable: bool = True) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE pods SET state=?, ip=?, additional_ips=?, netns_path=?, pinned=? WHERE id=?",
            (p.state, p.ip, json.dumps(p.additional_ips), p.netns_path, int(p.pinned), p.id)),
            durable=durable)

    async def pod(self, pod_id: str, namespace: str) -> PodRecord:
        """By full id or unique prefix (crictl passes short ids), in `namespace` only."""
        rows = await self._by_prefix("pods", pod_id, namespace)
        if len(rows) != 1:
            raise NotFound(f"pod sandbox {_shown(pod_id)} not found{_in(namespace)}")
        return _pod(rows[0])

    async def _by_prefix(self, table: str, prefix: str, namespace: str) -> list[sqlite3.Row]:
        """At most two rows of `namespace` whose id starts with `prefix`. Ids are 64 hex
        characters: any other prefix names nothing (and a LIKE pattern would read `%`/`_`
        as wildcards)."""
        if not _ID_PREFIX.fullmatch(prefix):
            return []
        return await self.db.run(lambda c: c.execute(
            f"SELECT * FROM {table} WHERE shoal_namespace = ? AND substr(id, 1, ?) = ? "
            "LIMIT 2", (namespace, len(prefix), prefix)).fetchall())

    async def pod_named(self, shoal_namespace: str, md: PodIdentity) -> PodRecord | None:
        """The pod a RunPodSandbox with this metadata made (or is making) in the Shoal
        namespace `shoal_namespace`."""
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM pods WHERE shoal_namespace=? AND namespace=? AND name=? AND uid=? "
            "AND attempt=?", (shoal_namespace, md.namespace, md.name, md.uid, md.attempt)
        ).fetchall())
        return _pod(rows[0]) if rows else None

    async def container_named(self, pod_id: str, name: str, attempt: int
                              ) -> ContainerRecord | None:
        rows = await self.db.run(lambda c: c.execute(
            "SELECT * FROM containers WHERE pod_id=? AND name=? AND attempt=?",
            (pod_id, name, attempt)).fetchall())
        return _ctr(rows[0]) if rows else None

    async def set_container_state(self, container_id: str, state: str, *,
                                  durable: bool = True) -> None:
        await self.db.transaction(lambda c: c.execute(
            "UPDATE containers SET state=? WHERE id=?", (state, container_id)),
            durable=durable)

    async def pods(self, namespace: str | None) -> list[PodRecord]:
        """The pods of `namespace` (None: of every namespace, for the gateway's own
        reconcile)."""
        if namespace is None:
            rows = await self.db.run(lambda c: c.execute(
                "SELECT * FROM pods ORDER BY created_at_ns").fetchall())
        else:
            rows = await self.db.run(lambda c: c.execute(
                "SELECT * FROM pods WHERE shoal_namespace=? ORDER BY created_at_ns",
                (namespace,)).fetchall())
        return [_pod(r) for r in rows]

    async def delete_pod(self, pod_id: str) -> None:
        await self.db.transaction(lambda c: c.execute("DELETE FROM pods WHERE id=?", (pod_id,)))

    async def add_container(self, r: ContainerRecord) -> None:
        await self._insert("containers", _columns(r, _CTR_JSON),
                           f"container {r.name} (attempt {r.attempt}) already exists "
                           f"in pod {r.pod_id}")

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

    async def container(self, container_id: str, namespace: str) -> ContainerRecord:
        """By full id or unique prefix, in `namespace` only."""
        rows = await self._by_prefix("containers", container_id, namespace)
        if len(rows) != 1:
            raise NotFound(f"container {_shown(container_id)} not found{_in(namespace)}")
        return _ctr(rows[0])

    async def containers(self, namespace: str | None, pod_id: str | None = None
                         ) -> list[ContainerRecord]:
        """The containers of `namespace` (None: every namespace's), or of one of its pods."""
        where, args = [], []
        if namespace is not None:
            where.append("shoal_namespace=?")
            args.append(namespace)
        if pod_id is not None:
            where.append("pod_id=?")
            args.append(pod_id)
        # The clauses are this function's constants; values are bound.
        sql = ("SELECT * FROM containers" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created_at_ns")
        rows = await self.db.run(lambda c: c.execute(sql, args).fetchall())
        return [_ctr(r) for r in rows]

    async def delete_container(self, container_id: str) -> None:
        await self.db.transaction(lambda c: c.execute(
            "DELETE FROM containers WHERE id=?", (container_id,)))
