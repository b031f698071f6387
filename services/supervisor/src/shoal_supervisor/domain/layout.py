"""Where the supervisor keeps things on disk; shared by tasks, exit watching and execs."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from shoal_common.fs import private_dir


@dataclass(frozen=True)
class Layout:
    """Exit codes and OOM marks are state (they must survive a supervisor restart); pid
    files, attach sockets and runc state are run files."""

    state_dir: Path
    run_dir: Path

    @property
    def db(self) -> Path:
        return self.state_dir / "tasks.db"

    @property
    def exit_dir(self) -> Path:
        return self.state_dir / "exits"

    def exit_file(self, task_id: str) -> Path:
        return self.exit_dir / task_id

    def persist_dir(self, task_id: str) -> Path:
        return self.state_dir / "persist" / task_id

    def task_dir(self, task_id: str) -> Path:
        return self.run_dir / "tasks" / task_id

    @property
    def socket_dir(self) -> Path:
        return self.run_dir / "attach"

    @property
    def runtime_root(self) -> Path:
        return self.run_dir / "runc"

    @property
    def output_dir(self) -> Path:
        """Large ExecSync outputs, until their caller has read them."""
        return self.run_dir / "exec-output"

    def make(self) -> None:
        # Owner-only like the service dirs above them: only root (conmon, runc, the
        # gateway's streaming server) needs anything in here.
        for d in (self.exit_dir, self.state_dir / "persist", self.run_dir / "tasks",
                  self.socket_dir, self.runtime_root, self.output_dir):
            private_dir(d)

    def clear_task(self, task_id: str) -> None:
        """Remove the exit file, persist dir and run dir of `task_id`, whatever is left."""
        self.exit_file(task_id).unlink(missing_ok=True)
        shutil.rmtree(self.persist_dir(task_id), ignore_errors=True)
        shutil.rmtree(self.task_dir(task_id), ignore_errors=True)
