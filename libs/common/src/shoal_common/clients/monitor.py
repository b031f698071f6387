"""The supervisor (`monitor.*`): one conmon per task, exits, logs, stats, exec sessions."""

from __future__ import annotations

import asyncio
import contextlib

from shoal_common.clients.base import PROBE_TIMEOUT, ServiceClient, Verb
from shoal_common.errors import Internal, ShoalError
from shoal_common.messages import Empty, RuntimeStatusReply, RuntimeStatusRequest
from shoal_common.messages.monitor import (
    EXEC_OUTPUT_CAP,
    MAX_EXEC_OUTPUT_READ,
    ExecOutputChunk,
    ExecOutputIdRequest,
    ExecOutputRequest,
    ExecSyncReply,
    ExecSyncRequest,
    KillRequest,
    MonitorCreateRequest,
    OutputStream,
    StatsReply,
    StatsRequest,
    StopRequest,
    TaskIdRequest,
    TaskListReply,
    TaskListRequest,
    TaskState,
    UpdateRequest,
)
from shoal_common.messages.streams import (
    AttachInfo,
    ExecCreateRequest,
    ExecExit,
    ExecIdRequest,
    ExecSession,
    ExecStarted,
    ResizeRequest,
)

LIFECYCLE_TIMEOUT = 60.0  # runc create/start/delete under load, plus the bus
EXEC_START_TIMEOUT = 70.0  # the supervisor's own start bound plus the bus round trip
EXEC_WAIT_TIMEOUT = 30.0  # from the end of the output to conmon's exit record
EXEC_SYNC_MARGIN = 30.0  # beyond the exec's own timeout
EXEC_SYNC_DEFAULT = 3600.0  # an ExecSync without a timeout
EXEC_OUTPUT_TIMEOUT = 10.0  # one chunk read from a file on the node
EXEC_OUTPUT_READS_IN_FLIGHT = 4  # keeps the bus busy while each chunk is read and sent


class MonitorClient(ServiceClient):
    service = "monitor"

    status = Verb("status", RuntimeStatusRequest, RuntimeStatusReply,
                  attempt_timeout=PROBE_TIMEOUT, retries=1, wait_for_service=False)
    # Tasks are made and changed by the caller's task id: a repeat finds the first's work.
    create = Verb("create", MonitorCreateRequest, TaskState, attempt_timeout=LIFECYCLE_TIMEOUT,
                  retries=1)
    start = Verb("start", TaskIdRequest, TaskState, attempt_timeout=LIFECYCLE_TIMEOUT,
                 retries=1)
    # A stopped task run again in place (Docker's start of an exited container); a repeat
    # on a task that ran and exited again would run it once more.
    rerun = Verb("rerun", TaskIdRequest, TaskState, attempt_timeout=LIFECYCLE_TIMEOUT,
                 retries=0, idempotent=False)
    state = Verb("state", TaskIdRequest, TaskState)
    list_tasks = Verb("list", TaskListRequest, TaskListReply)
    kill = Verb("kill", KillRequest, TaskState)
    # Sent through `stop_task`, which adds the grace period to the attempt's budget.
    stop = Verb("stop", StopRequest, TaskState, attempt_timeout=LIFECYCLE_TIMEOUT, retries=1)
    delete = Verb("delete", TaskIdRequest, TaskState, attempt_timeout=LIFECYCLE_TIMEOUT,
                  retries=1)
    # Runs a command: a repeat would run it twice.
    exec_sync = Verb("exec_sync", ExecSyncRequest, ExecSyncReply, retries=0,
                     idempotent=False)
    # A large ExecSync output, read in chunks and then removed (both repeatable).
    exec_output = Verb("exec_output", ExecOutputRequest, ExecOutputChunk,
                       attempt_timeout=EXEC_OUTPUT_TIMEOUT)
    exec_output_remove = Verb("exec_output_remove", ExecOutputIdRequest, Empty)
    update = Verb("update", UpdateRequest, TaskState)
    stats = Verb("stats", StatsRequest, StatsReply)
    reopen_log = Verb("reopen_log", TaskIdRequest, TaskState)
    exec_create = Verb("exec_create", ExecCreateRequest, ExecSession)  # by exec id
    # Releases the exec's process once; a lost reply cannot be repeated.
    exec_start = Verb("exec_start", ExecIdRequest, ExecStarted,
                      attempt_timeout=EXEC_START_TIMEOUT, retries=0, idempotent=False)
    exec_wait = Verb("exec_wait", ExecIdRequest, ExecExit, attempt_timeout=EXEC_WAIT_TIMEOUT,
                     retries=0)
    exec_remove = Verb("exec_remove", ExecIdRequest, Empty)
    attach = Verb("attach", TaskIdRequest, AttachInfo)
    resize = Verb("resize", ResizeRequest, Empty)

    async def stop_task(self, req: StopRequest) -> TaskState:
        return await self.call(MonitorClient.stop, req,
                               attempt_timeout=LIFECYCLE_TIMEOUT + max(req.timeout, 0.0))

    async def exec_sync_within(self, req: ExecSyncRequest) -> ExecSyncReply:
        """The exec's own timeout (the supervisor enforces it) plus a margin for the bus;
        the whole output (up to EXEC_OUTPUT_CAP per stream), however large."""
        reply = await self.call(MonitorClient.exec_sync, req, timeout=(
            req.timeout or EXEC_SYNC_DEFAULT) + EXEC_SYNC_MARGIN)
        if not reply.output_id:
            return reply
        try:
            stdout = await self._rest_of(reply.output_id, "stdout", reply.stdout,
                                         reply.stdout_size)
            stderr = await self._rest_of(reply.output_id, "stderr", reply.stderr,
                                         reply.stderr_size)
        finally:
            # Not worth failing the exec for: the supervisor drops it after a while anyway.
            with contextlib.suppress(ShoalError):
                await self.exec_output_remove(ExecOutputIdRequest(output_id=reply.output_id))
        return ExecSyncReply(exit_code=reply.exit_code, stdout=stdout, stderr=stderr,
                             stdout_size=len(stdout), stderr_size=len(stderr),
                             truncated=reply.truncated)

    async def _rest_of(self, output_id: str, stream: OutputStream, first: bytes,
                       size: int) -> bytes:
        """`first` and the stream's bytes after it, read a few chunks at a time."""
        if not 0 <= size <= EXEC_OUTPUT_CAP:  # the supervisor's word, but bounded
            raise Internal(f"exec output {output_id} {stream}: {size} bytes is past the cap")
        offsets = range(len(first), size, MAX_EXEC_OUTPUT_READ)
        parts = [first]
        for i in range(0, len(offsets), EXEC_OUTPUT_READS_IN_FLIGHT):
            window = offsets[i:i + EXEC_OUTPUT_READS_IN_FLIGHT]
            chunks = await asyncio.gather(*(self.exec_output(ExecOutputRequest(
                output_id=output_id, stream=stream, offset=offset,
                size=min(MAX_EXEC_OUTPUT_READ, size - offset))) for offset in window))
            parts += [c.data for c in chunks]
        data = b"".join(parts)
        if len(data) != size:
            raise Internal(f"exec output {output_id} {stream}: read {len(data)} of {size} bytes")
        return data
