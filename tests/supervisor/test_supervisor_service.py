"""The supervisor against real processes: a supervisor service, real conmon and runc
running busybox containers, real NATS with the JetStream event stream."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from shoal_common import errors, subjects
from shoal_common.messages.monitor import (
    ExecSyncReply,
    ExecSyncRequest,
    KillRequest,
    MonitorCreateRequest,
    Resources,
    StatsReply,
    StatsRequest,
    StopRequest,
    TaskCreated,
    TaskDeleted,
    TaskExited,
    TaskIdRequest,
    TaskListReply,
    TaskListRequest,
    TaskOOM,
    TaskStarted,
    TaskState,
    UpdateRequest,
)
from supervisor_harness import Harness, eventually, parse_log, pid_alive

pytestmark = pytest.mark.e2e


def metrics(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def test_lifecycle_logs_and_events(sup: Harness) -> None:
    events = await sup.events()
    sp = await sup.start_supervisor()

    failing = await sup.create(
        ["sh", "-c", "echo hello; echo oops >&2; printf partial; exit 3"], start=False,
        sandbox_id="pod-a")
    assert failing.pid > 0 and failing.created_at > 0
    # A retried create is answered with the same task, not redone.
    bundle = str(sup.bundle_root / failing.id)
    again = await sup.call("create", MonitorCreateRequest(id=failing.id, bundle=bundle),
                           TaskState)
    assert (again.state, again.pid) == ("created", failing.pid)
    other = sup.bundle(f"{failing.id}-other", ["true"])
    with pytest.raises(errors.AlreadyExists, match=failing.id):
        await sup.call("create", MonitorCreateRequest(id=failing.id, bundle=str(other)),
                       TaskState)

    started = await sup.call("start", TaskIdRequest(id=failing.id), TaskState)
    assert started.state in ("running", "stopped") and started.started_at > 0
    done = await sup.wait_state(failing.id)
    assert (done.exit_code, done.reason, done.oom_killed) == (3, "Error", False)
    assert done.finished_at >= done.started_at > 0

    lines = parse_log(sup.log_path(failing.id))
    assert {(s, t, c) for _, s, t, c in lines} == {
        ("stdout", "F", "hello"), ("stderr", "F", "oops"), ("stdout", "P", "partial")}
    assert all(abs(ts.timestamp() - done.finished_at) < 10 for ts, *_ in lines)

    completed = await sup.create(["true"], sandbox_id="pod-b")
    done_ok = await sup.wait_state(completed.id)
    assert (done_ok.exit_code, done_ok.reason) == (0, "Completed")

    listed = await sup.call("list", TaskListRequest(sandbox_id="pod-a"), TaskListReply)
    assert [t.id for t in listed.tasks] == [failing.id]
    everything = await sup.call("list", TaskListRequest(), TaskListReply)
    assert {t.id for t in everything.tasks} == {failing.id, completed.id}

    # Start is idempotent: again on a task that ran answers its run (a retry whose first
    # attempt's answer was lost), while one that never ran cannot be started once exited.
    again = await sup.call("start", TaskIdRequest(id=failing.id), TaskState)
    assert (again.state, again.exit_code) == ("stopped", 3)
    never = await sup.create(["sleep", "60"], start=False)
    await sup.call("kill", KillRequest(id=never.id, signal=signal.SIGKILL), TaskState)
    await sup.wait_state(never.id)
    with pytest.raises(errors.FailedPrecondition, match="exited"):
        await sup.call("start", TaskIdRequest(id=never.id), TaskState)
    await sup.call("delete", TaskIdRequest(id=never.id), TaskState)

    exited = await events.wait_for(TaskExited, failing.id)
    assert isinstance(exited, TaskExited)
    assert (exited.exit_code, exited.reason, exited.pid) == (3, "Error", failing.pid)
    assert exited.sandbox_id == "pod-a"
    assert abs(exited.exited_at - done.finished_at) < 1e-3
    assert events.of(failing.id) == ["tasks.create", "tasks.start", "tasks.exit"]

    # Delete forgets it, with its files, runc state and cgroup; a second delete is a no-op.
    gone = await sup.call("delete", TaskIdRequest(id=failing.id), TaskState)
    assert gone.exit_code == 3
    deleted = await events.wait_for(TaskDeleted, failing.id)
    assert isinstance(deleted, TaskDeleted) and deleted.exit_code == 3
    with pytest.raises(errors.NotFound):
        await sup.call("state", TaskIdRequest(id=failing.id), TaskState)
    again_gone = await sup.call("delete", TaskIdRequest(id=failing.id), TaskState)
    assert again_gone.state == "unknown"
    assert not (sup.exit_dir / failing.id).exists()
    assert not (sup.runtime_root / failing.id).exists()
    assert not sup.cgroup_dir("memory", failing.id).exists()
    assert not any((Path(bundle) / name).exists() for name in ("ctl", "winsz", "attach"))
    assert sup.log_path(failing.id).exists()  # the log belongs to the CRI, not to us

    values = metrics(sp.metrics_addr)
    assert values[("shoal_supervisor_exits_total", (("reason", "Error"),))] >= 1
    assert values[("shoal_supervisor_exits_total", (("reason", "Completed"),))] >= 1
    assert values[("shoal_supervisor_tasks", (("state", "stopped"),))] == 1
    assert values[("shoal_supervisor_runtime_seconds_count", (("op", "create"),))] == 3


async def test_create_errors(sup: Harness) -> None:
    await sup.start_supervisor()
    empty = sup.bundle_root / "empty-bundle"
    empty.mkdir(parents=True)
    with pytest.raises(errors.Invalid, match=r"no config\.json"):
        await sup.call("create", MonitorCreateRequest(id="sup-x1", bundle=str(empty)),
                       TaskState)
    # Refused as the body is decoded, naming the field.
    with pytest.raises(errors.Invalid, match=r"at `\$\.bundle`"):
        await sup.call("create", MonitorCreateRequest(id="sup-x2", bundle="rel/bundle"),
                       TaskState)
    # A message names a runtime handler, never a binary: only configured ones run.
    named = sup.bundle_root / "named-bundle"
    named.mkdir()
    (named / "config.json").write_text("{}")
    with pytest.raises(errors.Invalid, match="runtime_handler 'evil' is not configured"):
        await sup.call("create", MonitorCreateRequest(id="sup-x3", bundle=str(named),
                                                      runtime_handler="evil"), TaskState)
    with pytest.raises(errors.Invalid, match=r"at `\$\.runtime_handler`"):
        await sup.call("create", MonitorCreateRequest(id="sup-x4", bundle=str(empty),
                                                      runtime_handler="/tmp/evil"), TaskState)
    with pytest.raises(errors.Invalid, match=r"at `\$\.id`"):
        await sup.call("create", MonitorCreateRequest(id="../x", bundle=str(empty)),
                       TaskState)

    # runc's own error comes back, and nothing of the half-made container stays.
    task_id = sup.new_id()
    bundle = sup.bundle(task_id, ["no-such-binary"])
    with pytest.raises(errors.FailedPrecondition,
                       match='"no-such-binary": executable file not found'):
        await sup.call("create", MonitorCreateRequest(id=task_id, bundle=str(bundle)),
                       TaskState)
    with pytest.raises(errors.NotFound, match=task_id):
        await sup.call("state", TaskIdRequest(id=task_id), TaskState)
    assert not (sup.runtime_root / task_id).exists()
    assert not sup.cgroup_dir("memory", task_id).exists()

    running = await sup.create(["sleep", "1000"])
    with pytest.raises(errors.FailedPrecondition, match="running"):
        await sup.call("delete", TaskIdRequest(id=running.id), TaskState)
    with pytest.raises(errors.NotFound):
        await sup.call("start", TaskIdRequest(id="sup-nope"), TaskState)


async def test_oom_killed(sup: Harness) -> None:
    events = await sup.events()
    sp = await sup.start_supervisor()
    # The shell itself (pid 1) buffers 64 MB into a variable under a 16 MiB limit.
    task = await sup.create(["sh", "-c", 'x=$(head -c 64000000 /dev/zero | tr "\\0" a); '
                             "echo survived"], memory=16 << 20)
    done = await sup.wait_state(task.id)
    assert (done.reason, done.oom_killed, done.exit_code) == ("OOMKilled", True, 137)
    await events.wait_for(TaskOOM, task.id)
    exited = await events.wait_for(TaskExited, task.id)
    assert isinstance(exited, TaskExited) and exited.reason == "OOMKilled"
    assert events.of(task.id).index("tasks.oom") < events.of(task.id).index("tasks.exit")

    # A child OOM-killed in a container that keeps running: tasks.oom goes out as it
    # happens (the cgroup's eventfd), not at the exit.
    survivor = await sup.create(["sh", "-c", '(x=$(head -c 64000000 /dev/zero | tr "\\0" a)); '
                                 "echo child-gone; sleep 1000"], memory=16 << 20)
    await events.wait_for(TaskOOM, survivor.id)
    state = await sup.call("state", TaskIdRequest(id=survivor.id), TaskState)
    assert (state.state, state.oom_killed) == ("running", True)
    await eventually(lambda: "child-gone" in sup.log_path(survivor.id).read_text())
    assert "cannot watch OOM events" not in sp.log_text()
    assert metrics(sp.metrics_addr)[("shoal_supervisor_oom_total", ())] >= 2


async def test_stop_kill_and_escalation(sup: Harness) -> None:
    await sup.start_supervisor()
    stubborn = await sup.create(["sh", "-c", 'trap "" TERM; echo ready; sleep 1000'])
    polite = await sup.create(["sh", "-c", 'trap "exit 0" TERM; sleep 1000 & wait'])
    plain = await sup.create(["sleep", "1000"])
    await eventually(lambda: sup.log_path(stubborn.id).exists()
                     and "ready" in sup.log_path(stubborn.id).read_text(), what="ready")

    begin = time.monotonic()
    stopped = await sup.call("stop", StopRequest(id=stubborn.id, timeout=1.0), TaskState)
    elapsed = time.monotonic() - begin
    assert (stopped.state, stopped.exit_code, stopped.reason) == ("stopped", 137, "Error")
    assert 1.0 <= elapsed < 4.0, elapsed

    begin = time.monotonic()
    stopped = await sup.call("stop", StopRequest(id=polite.id, timeout=10.0), TaskState,
                             attempt_timeout=20)
    assert (stopped.state, stopped.exit_code, stopped.reason) == ("stopped", 0, "Completed")
    assert time.monotonic() - begin < 2.0

    killed = await sup.call("kill", KillRequest(id=plain.id, signal=9), TaskState)
    assert killed.state in ("running", "stopped")
    done = await sup.wait_state(plain.id)
    assert done.exit_code == 137
    # A created task (its init waits for start) stops and deletes too.
    never = await sup.create(["sleep", "1000"], start=False)
    stopped = await sup.call("stop", StopRequest(id=never.id, timeout=1.0), TaskState)
    assert stopped.state == "stopped"
    unstarted = await sup.create(["sleep", "1000"], start=False)
    gone = await sup.call("delete", TaskIdRequest(id=unstarted.id), TaskState)
    assert gone.state == "created"
    assert not pid_alive(unstarted.pid)
    assert not (sup.runtime_root / unstarted.id).exists()

    # Stopping or killing what already stopped is not an error.
    again = await sup.call("stop", StopRequest(id=plain.id, timeout=1.0), TaskState)
    assert again.exit_code == 137
    await sup.call("kill", KillRequest(id=plain.id, signal=15), TaskState)


def zombies_in_pid_namespace_of(pid: int) -> list[str]:
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z" and \
                    os.readlink(entry / "ns" / "pid") == ns:
                found.append(stat)
        except OSError:
            continue  # gone meanwhile
    return found


async def test_exec_stats_update_reopen(sup: Harness) -> None:
    await sup.start_supervisor()
    task = await sup.create(["sh", "-c", "echo started; while true; do sleep 1; done"])

    reply = await sup.call("exec_sync", ExecSyncRequest(
        id=task.id, cmd=["sh", "-c", 'echo out $GREETING; echo err >&2; printf tail; exit 5'],
        env=["GREETING=hi"]), ExecSyncReply)
    assert (reply.exit_code, reply.stdout, reply.stderr) == (5, b"out hi\ntail", b"err\n")
    ok = await sup.call("exec_sync", ExecSyncRequest(id=task.id, cmd=["echo", "a b"]),
                        ExecSyncReply)
    assert (ok.exit_code, ok.stdout, ok.stderr) == (0, b"a b\n", b"")
    begin = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match="timed out"):
        await sup.call("exec_sync", ExecSyncRequest(id=task.id, cmd=["sleep", "30"],
                                                    timeout=1), ExecSyncReply)
    assert time.monotonic() - begin < 5
    # Killed and reaped before the answer: no zombie left in the container (critest's
    # "execSync with timeout" looks for one with pgrep right away).
    assert zombies_in_pid_namespace_of(task.pid) == []
    with pytest.raises(errors.FailedPrecondition, match="executable file not found"):
        await sup.call("exec_sync", ExecSyncRequest(id=task.id, cmd=["nope"]), ExecSyncReply)

    [stats] = (await sup.call("stats", StatsRequest(ids=[task.id, "sup-unknown"]),
                              StatsReply)).stats
    assert stats.id == task.id
    assert stats.cpu_usage_ns > 0
    assert 0 < stats.memory_working_set_bytes <= stats.memory_usage_bytes < 64 << 20
    assert 1 <= stats.pids <= 5
    assert abs(stats.timestamp_ns / 1e9 - time.time()) < 5

    await sup.call("update", UpdateRequest(id=task.id, resources=Resources(
        memory_limit=48 << 20, cpu_shares=512, pids_limit=64)), TaskState)
    limit = sup.cgroup_dir("memory", task.id) / "memory.limit_in_bytes"
    assert int(limit.read_text()) == 48 << 20
    assert int((sup.cgroup_dir("cpu", task.id) / "cpu.shares").read_text()) == 512
    assert (sup.cgroup_dir("pids", task.id) / "pids.max").read_text().strip() == "64"

    # Rotation: the CRI renames the log, asks for a reopen, and new output goes to a new file.
    log = sup.log_path(task.id)
    rotated = log.with_suffix(".log.1")
    log.rename(rotated)
    await sup.call("reopen_log", TaskIdRequest(id=task.id), TaskState)
    assert log.exists()
    await sup.call("exec_sync", ExecSyncRequest(
        id=task.id, cmd=["sh", "-c", "echo after-rotation > /proc/1/fd/1"]), ExecSyncReply)
    await eventually(lambda: "after-rotation" in log.read_text(), what="rotated log")
    assert "started" in rotated.read_text() and "started" not in log.read_text()
    assert all(line[1:] == ("stdout", "F", "after-rotation") for line in parse_log(log))

    stopped = await sup.call("stop", StopRequest(id=task.id, timeout=0.5), TaskState)
    assert stopped.state == "stopped"
    with pytest.raises(errors.FailedPrecondition, match="not running"):
        await sup.call("exec_sync", ExecSyncRequest(id=task.id, cmd=["true"]), ExecSyncReply)
    with pytest.raises(errors.FailedPrecondition):
        await sup.call("reopen_log", TaskIdRequest(id=task.id), TaskState)


async def test_restart_loses_nothing(sup: Harness) -> None:
    """kill -9 the supervisor while one container runs and another exits during the
    downtime: both are right after the restart, the exit is published once, logs are
    intact, and the running container (and its conmon) never noticed."""
    events = await sup.events()
    await sup.start_supervisor()
    ticker = await sup.create(
        ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"])
    quitter = await sup.create(["sh", "-c", "echo bye; sleep 1.5; exit 7"])
    conmon_pid = int((sup.node.run_root / "supervisor" / "tasks" / ticker.id /
                      "conmon.pid").read_text())

    sup.kill9_supervisor()
    down_at = time.time()
    await eventually(lambda: (sup.exit_dir / quitter.id).exists(), timeout=10,
                     what="the exit while the supervisor is down")
    assert pid_alive(ticker.pid) and pid_alive(conmon_pid)
    await asyncio.sleep(0.3)

    await sup.start_supervisor()
    running = await sup.call("state", TaskIdRequest(id=ticker.id), TaskState)
    assert (running.state, running.pid) == ("running", ticker.pid)
    assert pid_alive(ticker.pid) and pid_alive(conmon_pid)
    stopped = await sup.call("state", TaskIdRequest(id=quitter.id), TaskState)
    assert (stopped.state, stopped.exit_code, stopped.reason) == ("stopped", 7, "Error")
    assert down_at <= stopped.finished_at <= time.time()
    exited = await events.wait_for(TaskExited, quitter.id)
    assert isinstance(exited, TaskExited) and exited.exit_code == 7

    # The log kept being written while no supervisor ran: consecutive ticks, no gaps.
    ticks = [int(c.split()[1]) for _, s, t, c in parse_log(sup.log_path(ticker.id))
             if s == "stdout" and t == "F"]
    assert ticks == list(range(len(ticks))) and len(ticks) > 10
    assert [c for *_, c in parse_log(sup.log_path(quitter.id))] == ["bye"]

    [stats] = (await sup.call("stats", StatsRequest(ids=[ticker.id]), StatsReply)).stats
    assert stats.cpu_usage_ns > 0 and stats.memory_usage_bytes > 0 and stats.pids >= 1

    # A second crash and restart publishes nothing again.
    sup.kill9_supervisor()
    await sup.start_supervisor()
    await events.settle(1.0)
    assert events.of(quitter.id) == ["tasks.create", "tasks.start", "tasks.exit"]
    assert events.of(ticker.id) == ["tasks.create", "tasks.start"]

    # And the restarted supervisor still owns the survivor: stop records its exit.
    final = await sup.call("stop", StopRequest(id=ticker.id, timeout=0.5), TaskState)
    assert (final.state, final.exit_code) == ("stopped", 137)
    await events.wait_for(TaskExited, ticker.id)
    assert not pid_alive(ticker.pid)


async def test_events_carry_the_namespace(sup: Harness) -> None:
    """tasks.* events go to the namespace the create came in, also those (exit) that the
    watcher, not a request, publishes."""
    await sup.start_supervisor()
    sub = await sup.bus.nc.jetstream().subscribe(
        subjects.event_filter(sup.node.node_id, "k8s.io"), ordered_consumer=True)
    sup.subs.append(sub)
    task_id = sup.new_id()
    bundle = sup.bundle(task_id, ["true"])
    await sup.bus.request("monitor", "create", MonitorCreateRequest(
        id=task_id, bundle=str(bundle)), TaskState, namespace="k8s.io")
    await sup.bus.request("monitor", "start", TaskIdRequest(id=task_id), TaskState,
                          namespace="k8s.io")
    topics = []
    for _ in range(3):
        msg = await sub.next_msg(timeout=10)
        topics.append(msg.headers["Shoal-Topic"])
    assert topics == [TaskCreated.TOPIC, TaskStarted.TOPIC, TaskExited.TOPIC]


async def test_create_interrupted_by_a_crash_is_adopted(sup: Harness) -> None:
    """The supervisor dies after starting conmon but before it reported: the restarted
    supervisor adopts the container conmon made, and the caller's retry gets it."""
    slow = sup.root / "slow-conmon"
    slow.write_text(f"#!/bin/sh\nsleep 0.8\nexec {shutil.which('conmon')} \"$@\"\n")
    slow.chmod(0o755)
    events = await sup.events()
    await sup.start_supervisor("--set", f"services.supervisor.conmon_path={slow}")
    task_id = sup.new_id()
    bundle = sup.bundle(task_id, ["sh", "-c", "echo adopted; sleep 1000"])
    request = MonitorCreateRequest(id=task_id, bundle=str(bundle),
                                   log_path=str(sup.log_path(task_id)))
    pending = asyncio.create_task(sup.call("create", request, TaskState, retries=0,
                                           attempt_timeout=1.5))
    await asyncio.sleep(0.4)  # the row says `creating`; the slow conmon has not run yet
    sup.kill9_supervisor()
    with pytest.raises(errors.ShoalError):
        await pending
    await eventually(lambda: (sup.runtime_root / task_id / "state.json").exists(),
                     what="conmon finishing the create on its own")

    await sup.start_supervisor()
    retried = await sup.call("create", request, TaskState)
    pid = int((sup.node.run_root / "supervisor" / "tasks" / task_id / "container.pid")
              .read_text())
    assert (retried.state, retried.pid) == ("created", pid)
    await sup.call("start", TaskIdRequest(id=task_id), TaskState)
    await eventually(lambda: "adopted" in sup.log_path(task_id).read_text())
    await events.wait_for(TaskStarted, task_id)
    assert events.of(task_id) == ["tasks.create", "tasks.start"]


async def test_container_outliving_its_conmon(sup: Harness) -> None:
    """conmon killed: the container runs on unmonitored; once it is gone the exit is
    recorded as unknown (255), as containerd reports a lost exit status."""
    await sup.start_supervisor()
    task = await sup.create(["sleep", "1000"])
    conmon_pid = int((sup.node.run_root / "supervisor" / "tasks" / task.id / "conmon.pid")
                     .read_text())
    os.kill(conmon_pid, signal.SIGKILL)
    await eventually(lambda: not pid_alive(conmon_pid), what="conmon gone")
    assert pid_alive(task.pid)
    running = await sup.call("state", TaskIdRequest(id=task.id), TaskState)
    assert running.state == "running"
    stopped = await sup.call("stop", StopRequest(id=task.id, timeout=0.5), TaskState)
    assert (stopped.state, stopped.exit_code, stopped.reason) == ("stopped", 255, "Error")
    assert "unknown" in stopped.message


async def test_start_retried_after_a_kill_that_followed_it_is_done(sup: Harness) -> None:
    """The supervisor dies right after runc started the task, before it answered; the task
    exits before the retry comes. The retried start answers the run (its exit code), not
    "has exited and cannot be started again": the start time was recorded first."""
    faults = sup.root / "faults"
    faults.mkdir(exist_ok=True)
    sup.sp = sup.services.start("supervisor", env={
        "SHOAL_FAULTS": "supervisor.task.started=kill", "SHOAL_FAULTS_DIR": str(faults)})
    await asyncio.to_thread(sup.services.wait_serving, sup.sp)
    task = await sup.create(["sh", "-c", "echo ran; exit 7"], start=False)
    with pytest.raises(errors.ShoalError):
        await sup.call("start", TaskIdRequest(id=task.id), TaskState, retries=0,
                       attempt_timeout=5)
    await eventually(lambda: "ran" in sup.log_path(task.id).read_text(),
                     what="the container running although its supervisor died")
    await sup.start_supervisor()
    await sup.wait_state(task.id, "stopped")
    again = await sup.call("start", TaskIdRequest(id=task.id), TaskState)
    assert (again.state, again.exit_code) == ("stopped", 7)
    assert again.started_at > 0
