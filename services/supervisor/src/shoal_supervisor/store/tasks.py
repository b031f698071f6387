"""Task records and the event outbox in SQLite (`<state_root>/supervisor/tasks.db`, WAL).

A state change and the event that reports it are written in one transaction (the outbox);
events are published afterwards and removed once JetStream acknowledged them. A supervisor
killed in between publishes them on its next start, with the same event id, so JetStream's
duplicate window drops a second copy: each fact reaches the stream once."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal_common import codec
from shoal_common.messages import Event
from shoal_common.messages.monitor import (
    TaskCreated,
    TaskDeleted,
    TaskExited,
    TaskOOM,
    TaskStarted,
    TaskState,
)
from shoal_common.sqlite import SqliteStore

MIGRATIONS = ["""
CREATE TABLE tasks(
    id TEXT PRIMARY KEY,
    uid TEXT NOT NULL,
    namespace TEXT NOT NULL,
    state TEXT NOT NULL,
    bundle TEXT NOT NULL,
    runtime TEXT NOT NULL,
    runtime_root TEXT NOT NULL,
    log_path TEXT NOT NULL,
    tty INTEGER NOT NULL,
    stdin INTEGER NOT NULL,
    stdin_once INTEGER NOT NULL,
    sandbox_id TEXT NOT NULL,
    cgroup_path TEXT NOT NULL,
    labels TEXT NOT NULL,
    pid INTEGER NOT NULL DEFAULT 0,
    conmon_pid INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL DEFAULT 0,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    oom_kills INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    owner_pid INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_by_sandbox ON tasks(sandbox_id);
CREATE TABLE outbox(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    topic TEXT NOT NULL,
    body BLOB NOT NULL
)
""", """
ALTER TABLE tasks ADD COLUMN restart_name TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN restart_max INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN restart_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN manual_stop INTEGER NOT NULL DEFAULT 0
""", """
ALTER TABLE tasks ADD COLUMN resources TEXT NOT NULL DEFAULT '{}'
"""]

# Task states as stored. `creating` is written before conmon runs, so a create that a crash
# interrupted is found (and adopted or cleaned up) on the next start.
CREATING, CREATED, RUNNING, STOPPED = "creating", "created", "running", "stopped"
LIVE = (CREATED, RUNNING)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.TOPIC: cls for cls in (TaskCreated, TaskStarted, TaskExited, TaskOOM, TaskDeleted)}


@dataclass
class TaskRecord:
    id: str
    uid: str  # unique per incarnation of an id: the stem of its event ids
    namespace: str
    state: str
    bundle: str
    runtime: str  # resolved path of the OCI runtime binary
    runtime_root: str
    log_path: str
    tty: bool
    stdin: bool
    stdin_once: bool
    sandbox_id: str
    cgroup_path: str
    labels: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    conmon_pid: int = 0
    exit_code: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    oom_kills: int = 0
    reason: str = ""
    message: str = ""
    owner_pid: int = 0  # the supervisor process running the create, while `creating`
    restart_name: str = ""  # Docker's restart policy ("" / no: never)
    restart_max: int = 0  # on-failure's maximum retry count; 0 = no limit
    restart_count: int = 0  # runs after the first (each a new uid)
    manual_stop: bool = False  # stopped or killed through us: no more restarts
    # What `update` changed (the runtime's --resources JSON), applied again to each rerun:
    # the bundle's config.json still has the limits of the create.
    resources: dict[str, Any] = field(default_factory=dict)

    def to_state(self) -> TaskState:
        return TaskState(
            id=self.id, state=self.state if self.state != CREATING else "unknown", pid=self.pid,
            exit_code=self.exit_code, created_at=self.created_at, started_at=self.started_at,
            finished_at=self.finished_at, oom_killed=self.oom_kills > 0, reason=self.reason,
            message=self.message or ("being created" if self.state == CREATING else ""),
            bundle=self.bundle, log_path=self.log_path, sandbox_id=self.sandbox_id,
            restart_count=self.restart_count)


@dataclass
class OutboxEntry:
    seq: int
    event_id: str
    namespace: str
    event: Event


_COLUMNS = [f for f in TaskRecord.__dataclass_fields__]


def _row_to_task(row: sqlite3.Row) -> TaskRecord:
    values = dict(row)
    values["labels"] = json.loads(values["labels"])
    values["resources"] = json.loads(values["resources"])
    for flag in ("tty", "stdin", "stdin_once", "manual_stop"):
        values[flag] = bool(values[flag])
    return TaskRecord(**values)


def _add_event(conn: sqlite3.Connection, event_id: str, namespace: str, event: Event) -> None:
    # OR IGNORE: the same fact recorded twice (a retried transaction) is one event.
    conn.execute("INSERT OR IGNORE INTO outbox(event_id, namespace, topic, body) "
                 "VALUES (?,?,?,?)", (event_id, namespace, type(event).TOPIC,
                                      codec.encode(event)))


class TaskStore(SqliteStore):
    migrations = MIGRATIONS

    # -- reads -----------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        def q(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
            return _row_to_task(row) if row else None

        return await self.db.run(q)

    async def list_tasks(self, sandbox_id: str = "") -> list[TaskRecord]:
        def q(conn: sqlite3.Connection) -> list[TaskRecord]:
            if sandbox_id:
                rows = conn.execute("SELECT * FROM tasks WHERE sandbox_id=? ORDER BY created_at, "
                                    "id", (sandbox_id,))
            else:
                rows = conn.execute("SELECT * FROM tasks ORDER BY created_at, id")
            return [_row_to_task(r) for r in rows]

        return await self.db.run(q)

    async def count_by_state(self) -> dict[str, int]:
        def q(conn: sqlite3.Connection) -> dict[str, int]:
            return {r[0]: r[1] for r in conn.execute(
                "SELECT state, COUNT(*) FROM tasks GROUP BY state")}

        return await self.db.run(q)

    async def pending_events(self, limit: int = 256) -> list[OutboxEntry]:
        def q(conn: sqlite3.Connection) -> list[OutboxEntry]:
            rows = conn.execute("SELECT seq, event_id, namespace, topic, body FROM outbox "
                                "ORDER BY seq LIMIT ?", (limit,)).fetchall()
            return [OutboxEntry(r[0], r[1], r[2], codec.decode(r[4], EVENT_TYPES[r[3]]))
                    for r in rows]

        return await self.db.run(q)

    # -- writes ----------------------------------------------------------------------------

    async def insert_creating(self, task: TaskRecord) -> bool:
        """False when the id is taken (another replica's create won the race)."""

        def tx(conn: sqlite3.Connection) -> bool:
            values = dict(task.__dict__)
            values["labels"] = json.dumps(task.labels, sort_keys=True)
            values["resources"] = json.dumps(task.resources, sort_keys=True)
            cur = conn.execute(f"INSERT OR IGNORE INTO tasks({','.join(_COLUMNS)}) VALUES "
                               f"({','.join('?' * len(_COLUMNS))})",
                               [values[c] for c in _COLUMNS])
            return cur.rowcount == 1

        return await self.db.transaction(tx)

    async def mark_created(self, task: TaskRecord, pid: int, conmon_pid: int,
                           cgroup_path: str) -> TaskRecord | None:
        """`creating` → `created`, with the task.create event."""
        now = time.time()

        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE tasks SET state=?, pid=?, conmon_pid=?, cgroup_path=?, created_at=? "
                "WHERE id=? AND uid=? AND state=?",
                (CREATED, pid, conmon_pid, cgroup_path, now, task.id, task.uid, CREATING))
            if cur.rowcount != 1:
                return False
            _add_event(conn, f"{task.uid}:create", task.namespace,
                       TaskCreated(id=task.id, pid=pid, sandbox_id=task.sandbox_id))
            return True

        return await self._changed(tx, task.id, durable=False)  # a completion mark

    async def mark_starting(self, task: TaskRecord, started_at: float) -> None:
        """The intent to start a `created` task (its start time), recorded before the
        runtime runs it: a replica killed after that start leaves it here, so its exit is
        known as a run's and a retried start as done. 0: the start did not happen."""

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE tasks SET started_at=? WHERE id=? AND uid=? AND state=?",
                         (started_at, task.id, task.uid, CREATED))

        await self.db.transaction(tx)

    async def mark_started(self, task: TaskRecord, started_at: float) -> TaskRecord | None:
        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE tasks SET state=?, started_at=? WHERE id=? AND uid=? "
                               "AND state=?", (RUNNING, started_at, task.id, task.uid, CREATED))
            if cur.rowcount != 1:
                return False
            _add_event(conn, f"{task.uid}:start", task.namespace,
                       TaskStarted(id=task.id, pid=task.pid, sandbox_id=task.sandbox_id))
            return True

        return await self._changed(tx, task.id, durable=False)  # a completion mark

    async def mark_exited(self, task: TaskRecord, exit_code: int, finished_at: float,
                          reason: str, message: str) -> TaskRecord | None:
        """A live task → `stopped`, with tasks.exit; None when it was already recorded (by a
        watcher, a poll, another replica), which is what makes the exit event happen once."""

        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE tasks SET state=?, exit_code=?, finished_at=?, reason=?, message=? "
                "WHERE id=? AND uid=? AND state IN (?,?)",
                (STOPPED, exit_code, finished_at, reason, message, task.id, task.uid, *LIVE))
            if cur.rowcount != 1:
                return False
            _add_event(conn, f"{task.uid}:exit", task.namespace, TaskExited(
                id=task.id, pid=task.pid, exit_code=exit_code, exited_at=finished_at,
                reason=reason, sandbox_id=task.sandbox_id))
            return True

        return await self._changed(tx, task.id)

    async def record_oom(self, task: TaskRecord, kills: int) -> TaskRecord | None:
        """Raise the task's OOM kill count to `kills`, with one tasks.oom per increase."""

        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE tasks SET oom_kills=? WHERE id=? AND uid=? AND "
                               "oom_kills<?", (kills, task.id, task.uid, kills))
            if cur.rowcount != 1:
                return False
            _add_event(conn, f"{task.uid}:oom:{kills}", task.namespace,
                       TaskOOM(id=task.id, sandbox_id=task.sandbox_id))
            return True

        return await self._changed(tx, task.id)

    async def set_manual_stop(self, task_id: str, manual: bool = True) -> None:
        """A stop or kill asked for: the restart policy no longer applies (Docker's rule);
        an explicit run again makes it apply again."""
        await self.db.transaction(lambda conn: conn.execute(
            "UPDATE tasks SET manual_stop=? WHERE id=?", (int(manual), task_id)))

    async def set_resources(self, task_id: str, resources: dict[str, Any]) -> None:
        await self.db.transaction(lambda conn: conn.execute(
            "UPDATE tasks SET resources=? WHERE id=?",
            (json.dumps(resources, sort_keys=True), task_id)))

    async def mark_rerun(self, task: TaskRecord, uid: str, owner_pid: int) -> TaskRecord | None:
        """`stopped` → `creating` for a run under the restart policy: a new incarnation (uid,
        so its events are new facts), the last exit kept until the new run starts."""

        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE tasks SET state=?, uid=?, owner_pid=?, pid=0, conmon_pid=0, "
                "started_at=0, oom_kills=0, restart_count=restart_count+1, message='' "
                "WHERE id=? AND uid=? AND state=? AND manual_stop=0",
                (CREATING, uid, owner_pid, task.id, task.uid, STOPPED))
            return cur.rowcount == 1

        return await self._changed(tx, task.id)

    async def mark_rerun_failed(self, task: TaskRecord, message: str) -> None:
        """A run under the restart policy that could not be made: `stopped` again, kept."""
        await self.db.transaction(lambda conn: conn.execute(
            "UPDATE tasks SET state=?, pid=0, conmon_pid=0, owner_pid=0, reason='Error', "
            "message=? WHERE id=? AND uid=? AND state=?",
            (STOPPED, message, task.id, task.uid, CREATING)))

    async def set_message(self, task_id: str, message: str) -> None:
        await self.db.transaction(lambda conn: conn.execute(
            "UPDATE tasks SET message=? WHERE id=?", (message, task_id)))

    async def delete(self, task: TaskRecord, *, publish: bool) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute("DELETE FROM tasks WHERE id=? AND uid=?", (task.id, task.uid))
            if cur.rowcount == 1 and publish:
                _add_event(conn, f"{task.uid}:delete", task.namespace, TaskDeleted(
                    id=task.id, exit_code=task.exit_code, sandbox_id=task.sandbox_id))

        await self.db.transaction(tx)

    async def event_published(self, seq: int) -> None:
        # Not durable: lost with a power loss, the event goes out again under its id (JetStream
        # drops a repeat within its duplicate window; consumers take events at least once
        # anyway). An fsync here would queue the next command's behind it.
        await self.db.transaction(lambda conn: conn.execute(
            "DELETE FROM outbox WHERE seq=?", (seq,)), durable=False)

    async def _changed(self, tx: Callable[[sqlite3.Connection], bool], task_id: str, *,
                       durable: bool = True) -> TaskRecord | None:
        """`durable`: see Database.transaction."""
        def run(conn: sqlite3.Connection) -> TaskRecord | None:
            if not tx(conn):
                return None
            row = conn.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
            return _row_to_task(row)

        return await self.db.transaction(run, durable=durable)
