"""Supervisor commands (`shoal.v1.<node>.monitor.<verb>`) and task events.

One conmon per container runs the OCI runtime; the supervisor owns those monitors, the
exit codes they record, the CRI log files, and stats from the cgroups."""

from __future__ import annotations

from shoal_common.messages.base import Event, Message
from shoal_common.messages.fields import (
    AbsPath,
    HandlerName,
    ObjectId,
    OptionalAbsPath,
    OptionalId,
    Seconds,
    Signal,
)


class MonitorCreateRequest(Message):
    """Create (not start) a container from a prepared OCI bundle, under its own conmon."""

    id: ObjectId  # caller-chosen container id; a retry with the same id is answered, not redone
    bundle: AbsPath  # directory holding config.json (and the rootfs it names)
    log_path: OptionalAbsPath = ""  # CRI log file (the format kubelet reads); empty = no log
    # The CRI runtime handler; the supervisor maps it to a binary with its own config.
    runtime_handler: HandlerName = ""
    runtime_root: OptionalAbsPath = ""  # --root of the runtime (state dir); empty = default
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False
    sandbox_id: OptionalId = ""  # the pod this container belongs to ("" for its own pause)
    cgroup_path: OptionalAbsPath = ""  # as written in config.json linux.cgroupsPath
    labels: dict[str, str] = {}


class TaskState(Message):
    id: str
    state: str  # "created", "running", "stopped", "unknown"
    pid: int = 0
    exit_code: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    oom_killed: bool = False
    # "Completed" (exit 0), "Error", "OOMKilled" once stopped
    reason: str = ""
    message: str = ""
    bundle: str = ""
    log_path: str = ""
    sandbox_id: str = ""


class TaskIdRequest(Message):
    """For start, state, delete and reopen_log."""

    id: ObjectId


class TaskListRequest(Message):
    sandbox_id: OptionalId = ""


class TaskListReply(Message):
    tasks: list[TaskState]


class KillRequest(Message):
    id: ObjectId
    signal: Signal = 15
    all: bool = False  # signal every process of the container


class StopRequest(Message):
    """Signal, wait up to `timeout` seconds for the exit, then SIGKILL (CRI StopContainer)."""

    id: ObjectId
    signal: Signal = 15
    timeout: Seconds = 10.0


class ExecSyncRequest(Message):
    id: ObjectId
    cmd: list[str]
    timeout: Seconds = 0.0  # 0 = no timeout
    env: list[str] = []
    tty: bool = False


class ExecSyncReply(Message):
    exit_code: int
    stdout: bytes
    stderr: bytes


class Resources(Message):
    """The linux resources a CRI UpdateContainerResources may change (OCI names)."""

    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    memory_limit: int = 0
    pids_limit: int = 0


class UpdateRequest(Message):
    id: ObjectId
    resources: Resources


class StatsRequest(Message):
    ids: list[ObjectId] = []  # empty = every container this node monitors


class TaskStats(Message):
    id: str
    timestamp_ns: int
    cpu_usage_ns: int  # cumulative CPU time
    memory_working_set_bytes: int
    memory_usage_bytes: int
    pids: int = 0


class StatsReply(Message):
    stats: list[TaskStats]


# -- events ------------------------------------------------------------------------------


class TaskCreated(Event):
    TOPIC = "tasks.create"
    id: str
    pid: int
    sandbox_id: str = ""


class TaskStarted(Event):
    TOPIC = "tasks.start"
    id: str
    pid: int
    sandbox_id: str = ""


class TaskExited(Event):
    TOPIC = "tasks.exit"
    id: str
    pid: int
    exit_code: int
    exited_at: float
    reason: str  # Completed, Error, OOMKilled
    sandbox_id: str = ""


class TaskOOM(Event):
    TOPIC = "tasks.oom"
    id: str
    sandbox_id: str = ""


class TaskDeleted(Event):
    TOPIC = "tasks.delete"
    id: str
    exit_code: int = 0
    sandbox_id: str = ""
