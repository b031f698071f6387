"""Pure pieces of the supervisor: CRI log splitting and exec output files, runtime error
text, update bodies, the inotify binding."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from shoal_common.errors import Invalid
from shoal_common.messages.monitor import Resources
from shoal_supervisor.domain import confine
from shoal_supervisor.domain.cgroups import Cgroup
from shoal_supervisor.domain.exec_output import ExecOutput, StreamOutput
from shoal_supervisor.domain.exits import exit_reason
from shoal_supervisor.domain.inotify import IN_CLOSE_WRITE, IN_MOVED_TO, Inotify
from shoal_supervisor.domain.oci_runtime import runtime_message
from shoal_supervisor.domain.tasks import _resources_json


def test_cri_log_is_split_back_into_streams(tmp_path: Path) -> None:
    log = (b"2026-01-01T00:00:00.000000001+00:00 stdout F hello world\n"
           b"2026-01-01T00:00:00.000000002+00:00 stderr F \n"
           b"2026-01-01T00:00:00.000000003+00:00 stdout P par\n"
           b"2026-01-01T00:00:00.000000004+00:00 stdout P tial\n"
           b"2026-01-01T00:00:00.000000005+00:00 stderr F e\xffrr\r\n")
    output = ExecOutput(tmp_path)
    for i in range(0, len(log), 7):  # lines cut anywhere by the FIFO's reads
        output.feed(log[i:i + 7])
    output.finish()
    assert (output.stdout.head, output.stderr.head) == (b"hello world\npartial", b"\ne\xffrr\r\n")
    assert not output.in_files and not output.truncated
    assert not (tmp_path / output.id).exists()


def test_stream_spills_to_an_owner_only_file_and_stops_at_its_cap(tmp_path: Path) -> None:
    stream = StreamOutput(tmp_path / "out" / "stdout", cap=10, inline=4)
    stream.add(b"abc")
    assert not stream.in_file and not (tmp_path / "out").exists()
    stream.add(b"defgh")
    stream.add(b"ijklmn")
    stream.close()
    assert (stream.head, stream.size, stream.dropped) == (b"abcd", 10, 4)
    assert stream.path.read_bytes() == b"abcdefghij"
    assert stream.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700


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


def refused(field: str, why: str, check: Callable[..., object], *args: object) -> None:
    with pytest.raises(Invalid, match=why) as err:
        check(*args)
    assert err.value.details == {"field": field} and err.value.message.startswith(field)


def test_bundles_come_only_from_the_executors_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "bundles", tmp_path / "outside"
    for d in (root / "good", root / "nest" / "deep", outside):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    (root / "escape").symlink_to(outside)
    (root / "cfglink").mkdir()
    (root / "cfglink" / "config.json").symlink_to(outside / "config.json")
    assert confine.bundle(str(root / "good"), root) == root / "good"
    for bad in (outside, root / "escape", root / "nest" / "deep", root, root / "nest"):
        refused("bundle", "directly under|no config", confine.bundle, str(bad), root)
    refused("bundle", "not a regular", confine.bundle, str(root / "cfglink"), root)
    refused("bundle", "does not exist", confine.bundle, str(root / "absent"), root)
    run_dir = tmp_path / "run"
    assert confine.runtime_root(str(run_dir / "runc"), run_dir) == str(run_dir / "runc")
    for bad in (run_dir, tmp_path / "elsewhere"):
        refused("runtime_root", "is not under", confine.runtime_root, str(bad), run_dir)


def test_log_paths_stay_out_of_system_trees_and_others_files(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "old.log").write_text("2026-01-01T00:00:00.000000001+00:00 stdout F hi\n")
    (logs / "notes").write_text("ssh-ed25519 AAAA key\n")
    (logs / "link.log").symlink_to(logs / "old.log")
    os.mkfifo(logs / "fifo")
    (logs / "victim").write_text("")
    os.link(logs / "victim", logs / "hard")
    (logs / "shared").mkdir(mode=0o777)
    (logs / "shared").chmod(0o777)
    (logs / "etc").symlink_to("/etc")
    private = (tmp_path / "shoal",)
    assert confine.log_path(str(logs / "new.log"), private) == str(logs / "new.log")
    assert confine.log_path(str(logs / "old.log"), private) == str(logs / "old.log")
    cases = {"/etc/x.log": "lies under /etc", "/proc/self/x": "lies under /proc",
             "/lib64/x": "lies under /lib64", "/dev/null": "lies under /dev",
             str(logs / "etc" / "x.log"): "lies under /etc",
             str(tmp_path / "shoal" / "x"): "no existing parent",
             str(logs / "link.log"): "is a symlink", str(logs / "fifo"): "not a regular file",
             str(logs / "notes"): "not a CRI log", str(logs / "hard"): "hard link",
             str(logs / "shared" / "x.log"): "other users may write",
             str(tmp_path / "missing" / "x.log"): "no existing parent"}
    for value, why in cases.items():
        refused("log_path", why, confine.log_path, value, private)
    (tmp_path / "shoal").mkdir()
    refused("log_path", "lies under", confine.log_path, str(tmp_path / "shoal" / "x"), private)
    assert sorted(p.name for p in logs.iterdir()) == [
        "etc", "fifo", "hard", "link.log", "notes", "old.log", "shared", "victim"]  # no more


def test_cgroup_reads_stay_in_the_hierarchy(tmp_path: Path) -> None:
    root, outside = tmp_path / "cgroup", tmp_path / "outside"
    (root / "memory" / "pod").mkdir(parents=True)
    (root / "memory" / "pod" / "memory.usage_in_bytes").write_text("42\n")
    outside.mkdir()
    (outside / "memory.usage_in_bytes").write_text("7\n")
    (root / "memory" / "escape").symlink_to(outside)
    assert Cgroup("/pod", root).usage().memory_usage_bytes == 42
    escaped = Cgroup("/escape", root)
    assert escaped.file("memory", "memory.usage_in_bytes") is None
    assert escaped.usage().memory_usage_bytes == 0 and not escaped.exists()
