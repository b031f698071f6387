"""Supervisor commands (`shoal.v1.<node>.monitor.<verb>`) and task events.

One conmon per container runs the OCI runtime; the supervisor owns those monitors, the
exit codes they record, the CRI log files, and stats from the cgroups."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from shoal_common.messages.base import Event, Message
from shoal_common.messages.fields import (
    AbsPath,
    HandlerName,
    ObjectId,
    OptionalAbsPath,
    OptionalId,
    Seconds,
    Signal,
    Size,
)

# ExecSync output. NATS refuses a message over its max_payload (1 MiB by default), so a
# large output stays in a file on the supervisor's node and is read in chunks
# (`exec_output`); MonitorClient.exec_sync_within does that for its callers.
EXEC_OUTPUT_CAP = 32 << 20  # bytes kept per stream; the rest is dropped (`truncated`)
EXEC_OUTPUT_INLINE = 256 << 10  # per stream in the exec_sync reply itself
MAX_EXEC_OUTPUT_READ = 512 << 10  # per exec_output reply: well under the payload limit
# uuid4().hex: unguessable, and names a directory without any path trick.
OutputId = Annotated[str, Meta(pattern=r"\A[a-f0-9]{32}\Z")]
# A pattern, not a Literal: msgspec's error for a Literal echoes the value (1 MB, say).
OutputStream = Annotated[str, Meta(pattern=r"\A(stdout|stderr)\Z")]


# "" = none (the CRI's way: kubelet restarts containers, not the runtime).
RestartName = Annotated[str, Meta(pattern=r"\A(|no|always|on-failure|unless-stopped)\Z")]
RESTART_ANNOTATION = "io.shoal.restart-policy"  # "<name>[:<max retries>]" on a CRI container


class RestartPolicy(Message):
    """Docker's restart policies, kept by the supervisor so they hold while the edge that
    asked for them is down: after an exit the task is run again from its bundle (a new
    conmon, the same id and rootfs), with Docker's backoff; a stop or kill through the
    supervisor ends it (`always` resumes after a supervisor restart, as after a daemon
    restart; `unless-stopped` does not)."""

    name: RestartName = ""
    max_retries: Annotated[int, Meta(ge=0, le=1_000_000)] = 0  # on-failure; 0 = no limit


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
    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)


class TaskState(Message):
    id: str
    state: str  # "created", "running", "stopped", "unknown"
    pid: int = 0
    exit_code: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    oom_killed: bool = False
    restart_count: int = 0  # runs after the first, under its restart policy
    restarting: bool = False  # stopped, its next run waiting for the policy's delay
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
    stdout: bytes  # all of it, or its first EXEC_OUTPUT_INLINE bytes when output_id is set
    stderr: bytes
    # Set when a stream did not fit in this reply: read the rest with exec_output, then
    # exec_output_remove (files nobody removes are dropped after a few minutes).
    output_id: str = ""
    stdout_size: int = 0  # of the whole stream as kept (at most EXEC_OUTPUT_CAP)
    stderr_size: int = 0
    truncated: bool = False  # a stream passed EXEC_OUTPUT_CAP; its excess was dropped


class ExecOutputRequest(Message):
    """Read part of one stream of a large ExecSync output."""

    output_id: OutputId
    stream: OutputStream
    offset: Size = 0
    size: Annotated[int, Meta(ge=1, le=MAX_EXEC_OUTPUT_READ)] = MAX_EXEC_OUTPUT_READ


class ExecOutputChunk(Message):
    data: bytes
    total: int  # the stream's size


class ExecOutputIdRequest(Message):
    """For exec_output_remove (idempotent)."""

    output_id: OutputId


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
