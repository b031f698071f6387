"""OCI bundles for tests that drive the supervisor directly, where the executor would make
them (the supervisor takes bundles from nowhere else), and removal of what their
containers left: runc state, conmons, cgroups."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "sleep", "cat", "head", "tr", "dd", "true", "false", "env", "printf",
           "kill", "ls", "wc", "seq", "stty")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def bundle_root(run_root: Path) -> Path:
    """The executor's bundle directory under a node's run root."""
    return run_root / "executor" / "bundles"


def runc_spec(where: Path) -> dict[str, Any]:
    """`runc spec`'s default config.json."""
    subprocess.run(["runc", "spec"], cwd=where, check=True)
    return json.loads((where / "config.json").read_text())  # type: ignore[no-any-return]


def busybox_bundle(bundle: Path, base_spec: dict[str, Any], args: list[str],
                   cgroups_path: str, *, memory: int = 0) -> Path:
    """A bundle with its own busybox rootfs (hard links: cheap) and a config.json from
    `base_spec`: our args, no terminal, writable rootfs, the given cgroup."""
    bin_dir = bundle / "rootfs" / "bin"
    bin_dir.mkdir(parents=True)
    try:
        os.link(BUSYBOX, bin_dir / "busybox")
    except OSError:
        shutil.copy2(BUSYBOX, bin_dir / "busybox")
    for applet in APPLETS:
        (bin_dir / applet).symlink_to("busybox")
    spec = json.loads(json.dumps(base_spec))
    spec["process"]["args"] = args
    spec["process"]["terminal"] = False
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["linux"]["cgroupsPath"] = cgroups_path
    if memory:
        # swap = limit: no swap, so exceeding the limit OOM-kills instead of swapping.
        spec["linux"].setdefault("resources", {})["memory"] = {"limit": memory,
                                                               "swap": memory}
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return bundle


def conmon_pids(mentioning: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"conmon") and any(mentioning.encode() in a for a in argv):
            found.append(int(entry))
    return found


def remove_containers(runtime_root: Path, ids: list[str], node_root: Path,
                      cgroup_parent: str) -> None:
    """Every container of `ids`, every conmon of the node and the containers' cgroups go,
    whatever state a test left them in."""
    for task_id in ids:
        subprocess.run(["runc", "--root", str(runtime_root), "delete", "--force", task_id],
                       capture_output=True)
    for pid in conmon_pids(str(node_root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for task_id in ids:
        for ctrl in CGROUP_ROOT.iterdir():
            cg = ctrl / cgroup_parent / task_id
            if cg.is_dir():
                try:
                    cg.rmdir()
                except OSError:
                    pass


def remove_cgroup_tree(parent: str) -> None:
    """The cgroup `parent` (a test's own) and every cgroup below it, in each hierarchy."""
    for ctrl in CGROUP_ROOT.iterdir():
        top = ctrl / parent
        if not top.is_dir() or top.is_symlink():
            continue
        for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                pass
