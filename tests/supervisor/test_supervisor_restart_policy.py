"""Docker's restart policies, kept by the supervisor: an exited task runs again from its
bundle (same id, same rootfs, the log appended to), with Docker's backoff, until a stop or
kill through the supervisor ends it; an exit while the supervisor is down is rerun when it
is back."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from shoal_common import errors
from shoal_common.messages.monitor import (
    KillRequest,
    MonitorCreateRequest,
    Resources,
    RestartPolicy,
    StopRequest,
    TaskExited,
    TaskIdRequest,
    TaskState,
    UpdateRequest,
)
from supervisor_harness import Harness, eventually, parse_log, pid_alive

pytestmark = pytest.mark.e2e
MEMORY_LIMIT = "/sys/fs/cgroup/memory/memory.limit_in_bytes"


async def create(sup: Harness, args: list[str], policy: RestartPolicy) -> TaskState:
    task_id = sup.new_id()
    bundle = sup.bundle(task_id, args)
    await sup.call("create", MonitorCreateRequest(
        id=task_id, bundle=str(bundle), log_path=str(sup.log_path(task_id)),
        cgroup_path=f"/shoal-test/{task_id}", restart=policy), TaskState)
    return await sup.call("start", TaskIdRequest(id=task_id), TaskState)


async def state(sup: Harness, task_id: str) -> TaskState:
    return await sup.call("state", TaskIdRequest(id=task_id), TaskState)


async def test_on_failure_runs_again_up_to_its_limit(sup: Harness) -> None:
    events = await sup.events()
    await sup.start_supervisor()
    # Each run appends to a file of its rootfs: the rootfs is the same one every time.
    failing = await create(sup, ["sh", "-c", "echo run >> /runs; cat /runs | wc -l; exit 3"],
                           RestartPolicy(name="on-failure", max_retries=2))
    await eventually(lambda: len(parse_log(sup.log_path(failing.id))) >= 3, timeout=15,
                     what="three runs")
    done = await sup.wait_state(failing.id)
    await asyncio.sleep(1.0)  # a fourth run would have come by now (backoff 400 ms)
    done = await state(sup, failing.id)
    assert (done.state, done.exit_code, done.restart_count) == ("stopped", 3, 2), done
    assert [c for *_, c in parse_log(sup.log_path(failing.id))] == ["1", "2", "3"]
    await events.settle(0.5)
    assert events.of(failing.id) == ["tasks.create", "tasks.start", "tasks.exit"] * 3

    ok = await create(sup, ["true"], RestartPolicy(name="on-failure"))
    await sup.wait_state(ok.id)
    await asyncio.sleep(0.5)
    assert (await state(sup, ok.id)).restart_count == 0  # exit 0 is no failure


async def test_always_until_stopped_by_hand(sup: Harness) -> None:
    await sup.start_supervisor()
    looping = await create(sup, ["sh", "-c", "sleep 0.2; exit 0"],
                           RestartPolicy(name="always"))
    end = time.monotonic() + 15
    seen_waiting = False
    while (st := await state(sup, looping.id)).restart_count < 4 or not seen_waiting:
        assert time.monotonic() < end, st
        seen_waiting |= st.restarting and st.state == "stopped"  # in the backoff
        await asyncio.sleep(0.05)
    # A stop ends the policy, whether it lands during a run or between two.
    stopped = await sup.call("stop", StopRequest(id=looping.id, timeout=2), TaskState)
    assert stopped.state == "stopped"
    count = stopped.restart_count
    await asyncio.sleep(1.5)
    after = await state(sup, looping.id)
    assert (after.state, after.restart_count) == ("stopped", count), after

    # kill -9 through the supervisor ends it too; and the task can be deleted.
    sleeper = await create(sup, ["sleep", "600"], RestartPolicy(name="unless-stopped"))
    await sup.call("kill", KillRequest(id=sleeper.id, signal=signal.SIGKILL), TaskState)
    await sup.wait_state(sleeper.id)
    await asyncio.sleep(0.5)
    assert (await state(sup, sleeper.id)).restart_count == 0
    gone = await sup.call("delete", TaskIdRequest(id=sleeper.id), TaskState)
    assert gone.state == "stopped"


async def test_exit_while_the_supervisor_is_down_is_rerun(sup: Harness) -> None:
    events = await sup.events()
    await sup.start_supervisor()
    task = await create(sup, ["sh", "-c", "echo up; sleep 1; exit 1"],
                        RestartPolicy(name="always"))
    sup.kill9_supervisor()
    await eventually(lambda: (sup.exit_dir / task.id).exists(), timeout=10,
                     what="the exit while the supervisor is down")
    await sup.start_supervisor()
    await events.wait_for(TaskExited, task.id)
    end = time.monotonic() + 10
    while not ((st := await state(sup, task.id)).restart_count >= 1
               and st.state == "running"):
        assert time.monotonic() < end, st
        await asyncio.sleep(0.05)
    assert pid_alive(st.pid) and st.pid != task.pid
    await events.settle(0.5)
    assert events.of(task.id)[:5] == ["tasks.create", "tasks.start", "tasks.exit",
                                      "tasks.create", "tasks.start"]
    final = await sup.call("stop", StopRequest(id=task.id, timeout=0.5), TaskState)
    assert final.state == "stopped"
    await sup.call("delete", TaskIdRequest(id=task.id), TaskState)


async def test_run_again_keeps_the_rootfs_and_updated_limits(sup: Harness) -> None:
    """`rerun` (Docker's start of an exited container) reuses the bundle's rootfs, and the
    limits `update` set are applied to the new run before it starts."""
    await sup.start_supervisor()
    task = await create(sup, ["sh", "-c", "echo x >> /f; wc -l < /f; "
                              f"cat {MEMORY_LIMIT}; sleep 600"], RestartPolicy())
    await sup.call("update", UpdateRequest(id=task.id, resources=Resources(
        memory_limit=64 << 20)), TaskState)
    await sup.call("stop", StopRequest(id=task.id, timeout=0), TaskState)
    again = await sup.call("rerun", TaskIdRequest(id=task.id), TaskState)
    assert again.state == "running" and again.pid != task.pid
    await eventually(lambda: len(parse_log(sup.log_path(task.id))) >= 4, what="second run")
    lines = [c for *_, c in parse_log(sup.log_path(task.id))]
    assert lines[2:] == ["2", str(64 << 20)] and lines[0] == "1", lines
    # A running task is answered as it is; an unknown one is NotFound.
    assert (await sup.call("rerun", TaskIdRequest(id=task.id), TaskState)).pid == again.pid
    with pytest.raises(errors.NotFound):
        await sup.call("rerun", TaskIdRequest(id="nosuch"), TaskState)
    await sup.call("stop", StopRequest(id=task.id, timeout=0), TaskState)
