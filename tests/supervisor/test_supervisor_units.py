"""Pure pieces of the supervisor: CRI log reading, runtime error text, update bodies,
the inotify binding."""

from __future__ import annotations

import os
from pathlib import Path

from shoal_common.messages.monitor import Resources
from shoal_supervisor.domain.conmon import read_cri_log
from shoal_supervisor.domain.exits import exit_reason
from shoal_supervisor.domain.inotify import IN_CLOSE_WRITE, IN_MOVED_TO, Inotify
from shoal_supervisor.domain.oci_runtime import runtime_message
from shoal_supervisor.domain.tasks import _resources_json


def test_cri_log_is_read_back_into_streams(tmp_path: Path) -> None:
    log = tmp_path / "exec.log"
    log.write_bytes(
        b"2026-01-01T00:00:00.000000001+00:00 stdout F hello world\n"
        b"2026-01-01T00:00:00.000000002+00:00 stderr F \n"
        b"2026-01-01T00:00:00.000000003+00:00 stdout P par\n"
        b"2026-01-01T00:00:00.000000004+00:00 stdout P tial\n"
        b"2026-01-01T00:00:00.000000005+00:00 stderr F e\xffrr\r\n")
    assert read_cri_log(log) == (b"hello world\npartial", b"\ne\xffrr\r\n")
    assert read_cri_log(tmp_path / "missing.log") == (b"", b"")


def test_runtime_message_takes_logrus_msg() -> None:
    text = ('time="2026-01-01T00:00:00Z" level=error msg="runc create failed: exec: '
            '\\"x\\": executable file not found in $PATH"\n')
    assert runtime_message(text) == 'runc create failed: exec: "x": executable file not ' \
                                    "found in $PATH"
    assert runtime_message("container does not exist\n") == "container does not exist"


def test_update_body_keeps_unset_values() -> None:
    assert _resources_json(Resources(), True) == {}
    assert _resources_json(Resources(memory_limit=64, cpu_quota=5000, cpuset_cpus="0"),
                           True) == {"memory": {"limit": 64, "swap": 64},
                                     "cpu": {"quota": 5000, "cpus": "0"}}
    assert _resources_json(Resources(memory_limit=64, pids_limit=9), False) == {
        "memory": {"limit": 64}, "pids": {"limit": 9}}


def test_exit_reasons() -> None:
    assert exit_reason(0, 1) == "Completed"
    assert exit_reason(137, 1) == "OOMKilled"
    assert exit_reason(1, 0) == "Error"


def test_inotify_sees_renamed_and_closed_files(tmp_path: Path) -> None:
    ino = Inotify()
    try:
        ino.add_watch(tmp_path, IN_CLOSE_WRITE | IN_MOVED_TO)
        assert ino.read() == []
        (tmp_path / "a").write_text("0")
        (tmp_path / "b.tmp").write_text("1")
        os.rename(tmp_path / "b.tmp", tmp_path / "b")
        events = ino.read()
        assert [(e.name, bool(e.mask & IN_MOVED_TO)) for e in events] == [
            ("a", False), ("b.tmp", False), ("b", True)]
    finally:
        ino.close()
