"""Where the supervisor keeps things on disk; shared by tasks, exit watching and execs."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from shoal_common.fs import Under, private_dir


@dataclass(frozen=True)
class Layout:
    """Exit codes and OOM marks are state (they must survive a supervisor restart); pid
    files, attach sockets and runc state are run files."""

    state_dir: Path
    run_dir: Path

    db = Under("state_dir", "tasks.db")
    exit_dir = Under("state_dir", "exits")
    persist_root = Under("state_dir", "persist")
    task_root = Under("run_dir", "tasks")
    socket_dir = Under("run_dir", "attach")
    runtime_root = Under("run_dir", "runc")
    output_dir = Under("run_dir", "exec-output")  # large ExecSync outputs, until read

    def exit_file(self, task_id: str) -> Path:
        return self.exit_dir / task_id

    def persist_dir(self, task_id: str) -> Path:
        return self.persist_root / task_id

    def task_dir(self, task_id: str) -> Path:
        return self.task_root / task_id

    def make(self) -> None:
        # Owner-only like the service dirs above them: only root (conmon, runc, the
        # gateway's streaming server) needs anything in here.
        for d in (self.exit_dir, self.persist_root, self.task_root, self.socket_dir,
                  self.runtime_root, self.output_dir):
            private_dir(d)

    def clear_task(self, task_id: str) -> None:
        """Remove the exit file, persist dir and run dir of `task_id`, whatever is left."""
        self.exit_file(task_id).unlink(missing_ok=True)
        shutil.rmtree(self.persist_dir(task_id), ignore_errors=True)
        shutil.rmtree(self.task_dir(task_id), ignore_errors=True)
