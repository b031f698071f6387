"""ExecSync output larger than a NATS message (1 MiB), through the supervisor's bus edge:
kept in owner-only files, read in chunks by MonitorClient.exec_sync_within, removed after,
capped per stream; outputs nobody fetched are swept at start."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from shoal_common.clients.monitor import MonitorClient
from shoal_common.errors import NotFound
from shoal_common.messages import Empty
from shoal_common.messages.monitor import (
    EXEC_OUTPUT_CAP,
    EXEC_OUTPUT_INLINE,
    ExecOutputChunk,
    ExecOutputIdRequest,
    ExecOutputRequest,
    ExecSyncReply,
    ExecSyncRequest,
)
from supervisor_harness import Harness

pytestmark = pytest.mark.e2e

MiB = 1 << 20


async def test_exec_sync_returns_16_mib_of_each_stream(sup: Harness) -> None:
    sp = await sup.start_supervisor()
    task = await sup.create(["sleep", "1000"])
    rootfs = sup.bundle_root / task.id / "rootfs"
    # Random bytes: every byte value, newlines (so CRI log lines) anywhere, \r, NUL.
    out, err = os.urandom(16 * MiB), os.urandom(16 * MiB)
    (rootfs / "out").write_bytes(out)
    (rootfs / "err").write_bytes(err)
    client = MonitorClient(sup.bus)
    request = ExecSyncRequest(id=task.id, cmd=["sh", "-c", "cat /out; cat /err >&2; exit 3"])

    begin = time.monotonic()
    reply = await client.exec_sync_within(request)
    elapsed = time.monotonic() - begin
    assert (reply.exit_code, reply.truncated) == (3, False)
    assert reply.stdout == out and reply.stderr == err
    print(f"ExecSync of 16 MiB stdout + 16 MiB stderr: {elapsed:.2f}s")
    output_dir = sup.node.run_root / "supervisor" / "exec-output"
    assert list(output_dir.iterdir()) == []  # the client removed what it read

    # The bus edge itself: the reply fits a NATS message; the rest is read in chunks.
    raw = await sup.call("exec_sync", request, ExecSyncReply)
    assert len(raw.stdout) == len(raw.stderr) == EXEC_OUTPUT_INLINE
    assert (raw.stdout_size, raw.stderr_size) == (16 * MiB, 16 * MiB) and raw.output_id
    assert raw.stdout == out[:EXEC_OUTPUT_INLINE]
    chunk = await sup.call("exec_output", ExecOutputRequest(
        output_id=raw.output_id, stream="stderr", offset=5 * MiB + 3, size=1000),
        ExecOutputChunk)
    assert (chunk.data, chunk.total) == (err[5 * MiB + 3:5 * MiB + 1003], 16 * MiB)
    files = sorted((output_dir / raw.output_id).iterdir())
    assert [f.name for f in files] == ["stderr", "stdout"]
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
    assert (output_dir / raw.output_id).stat().st_mode & 0o777 == 0o700
    await sup.call("exec_output_remove", ExecOutputIdRequest(output_id=raw.output_id), Empty)
    with pytest.raises(NotFound):
        await sup.call("exec_output", ExecOutputRequest(output_id=raw.output_id,
                                                        stream="stdout"), ExecOutputChunk)

    # Past the cap: the first EXEC_OUTPUT_CAP bytes, flagged and logged, never a hang.
    big = os.urandom(EXEC_OUTPUT_CAP + 3 * MiB)
    (rootfs / "big").write_bytes(big)
    capped = await client.exec_sync_within(ExecSyncRequest(
        id=task.id, cmd=["sh", "-c", "cat /big; echo done >&2"]))
    assert (capped.exit_code, capped.truncated, capped.stderr) == (0, True, b"done\n")
    assert capped.stdout == big[:EXEC_OUTPUT_CAP]
    assert "exec output truncated" in sp.log_text()
    assert list(output_dir.iterdir()) == []


async def test_outputs_left_behind_are_swept_at_start(sup: Harness) -> None:
    output_dir = sup.node.run_root / "supervisor" / "exec-output"
    stale, fresh = output_dir / uuid.uuid4().hex, output_dir / uuid.uuid4().hex
    for d in (stale, fresh):
        d.mkdir(parents=True)
        (d / "stdout").write_bytes(b"x" * 10)
    hour_ago = time.time() - 3600
    for path in (stale / "stdout", stale):
        os.utime(path, (hour_ago, hour_ago))
    await sup.start_supervisor()
    # A fresh one may be a peer replica's, still being read.
    assert not stale.exists() and fresh.exists()
