"""Where the paths of a `monitor.create` may point.

Any peer on the bus may be compromised, and conmon and runc run as root with these paths:
a bundle is a whole container definition (its config.json names the binary, the mounts,
the privileges), a runtime root is where runc writes state, and a log path is a file that
conmon creates, appends to and replaces. So each is resolved (symlinks and all) and must
lie where Shoal's own services put such things; a refusal is `Invalid` naming the field,
before anything is created, written or removed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from shoal_common.config import RuntimeConfig
from shoal_common.errors import FailedPrecondition, Invalid
from shoal_common.messages.monitor import MonitorCreateRequest

from shoal_supervisor.domain.cgroups import ROOT as CGROUP_ROOT
from shoal_supervisor.domain.cgroups import Cgroup, within

_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")
# The system's own trees: no container log is written there (lib* as well: /lib64, ...).
SYSTEM_DIRS = tuple(Path(p) for p in ("/proc", "/sys", "/dev", "/boot", "/etc", "/usr",
                                      "/bin", "/sbin", "/root"))


# The start of conmon's k8s-file lines: "<RFC3339Nano> <stdout|stderr> <P|F> ".
_CRI_LINE = re.compile(rb"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d) "
                       rb"(stdout|stderr) [PF] ")


@dataclass(frozen=True)
class Roots:
    bundles: Path  # the executor's bundle root: every bundle is a directory right under it
    run_dir: Path  # the supervisor's own: a runtime root, if given, lies under it
    private: tuple[Path, ...] = ()  # Shoal's state and run roots: no CRI log goes there
    # ...but for these, inside them: where `shoal run` keeps its pods' logs.
    log_dirs: tuple[Path, ...] = ()


def validate_id(task_id: str) -> None:
    # The id names files (exit file, run dirs) and runc state: no path tricks.
    if not task_id or len(task_id) > 255 or not set(task_id) <= _ID_OK or task_id[0] in ".-":
        raise Invalid(f"task id {task_id!r} is not valid (letters, digits, _ . + -; at most "
                      "255 characters)")


def refusal(field: str, value: str, why: str) -> Invalid:
    shown = value if len(value) <= 200 else value[:200] + "..."
    return Invalid(f"{field} {shown!r} {why}", details={"field": field})


def bundle(value: str, root: Path) -> Path:
    """The bundle's real path: a directory directly under `root` with a regular
    config.json (a symlink could name any file, and runc would take it as the spec)."""
    try:
        real = Path(os.path.realpath(value, strict=True))
    except OSError:
        raise refusal("bundle", value, "does not exist") from None
    base = Path(os.path.realpath(root))
    if real.parent != base:
        raise refusal("bundle", value, f"is not a directory directly under {root}")
    if not stat.S_ISDIR(os.lstat(real).st_mode):
        raise refusal("bundle", value, "is not a directory")
    try:
        config = os.lstat(real / "config.json")
    except FileNotFoundError:
        raise refusal("bundle", value, "has no config.json") from None
    if not stat.S_ISREG(config.st_mode):
        raise refusal("bundle", value, "has a config.json that is not a regular file")
    return real


def runtime_root(value: str, run_dir: Path) -> str:
    """"" (the supervisor's default), or a real path strictly under its run dir."""
    if not value:
        return ""
    real = Path(os.path.realpath(value))
    base = Path(os.path.realpath(run_dir))
    if real == base or not real.is_relative_to(base):
        raise refusal("runtime_root", value, f"is not under {run_dir}")
    return str(real)


def cgroup_path(value: str) -> str:
    """Only read (for stats): it must stay inside the cgroup hierarchy once resolved."""
    cgroup = Cgroup(value or "/")
    if value and not within(cgroup.dir("memory"), CGROUP_ROOT):
        raise refusal("cgroup_path", value, f"leaves {CGROUP_ROOT}")
    return value


def log_path(value: str, private: tuple[Path, ...], allowed: tuple[Path, ...] = ()) -> str:
    """The CRI log file, with its parent resolved: conmon creates it, appends to it and
    replaces it on reopen, as root. Kubelet chooses it (/var/log/pods/...) and makes its
    directory first, so nothing here creates one."""
    if not value:
        return ""
    path = Path(value)
    if path.name in ("", ".", ".."):
        raise refusal("log_path", value, "names no file")
    try:
        parent = Path(os.path.realpath(path.parent, strict=True))
    except OSError:
        raise refusal("log_path", value, "has no existing parent directory") from None
    if not stat.S_ISDIR(os.stat(parent).st_mode):
        raise refusal("log_path", value, "has a parent that is not a directory")
    for candidate in (path.parent, parent):
        refused = _forbidden(candidate, private, allowed)
        if refused is not None:
            raise refusal("log_path", value, f"lies under {refused}")
    _check_dirs(value, parent)
    target = parent / path.name
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return str(target)
    if stat.S_ISLNK(st.st_mode):
        raise refusal("log_path", value, "is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise refusal("log_path", value, "exists and is not a regular file")
    if st.st_nlink > 1:
        raise refusal("log_path", value, "is a hard link to another file")
    # An earlier try of the same container may have left its log (kubelet retries with the
    # same path); any other file would get container output appended (a crontab, keys).
    if st.st_size and not _is_cri_log(target):
        raise refusal("log_path", value, "exists and is not a CRI log")
    return str(target)


def _is_cri_log(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        head = os.read(fd, 128)
    finally:
        os.close(fd)
    return _CRI_LINE.match(head) is not None


def _forbidden(path: Path, private: tuple[Path, ...],
               allowed: tuple[Path, ...] = ()) -> Path | None:
    """The forbidden tree `path` lies in, if any."""
    top = Path(*path.parts[:2])
    if top.name.startswith("lib"):
        return top
    if any(path.is_relative_to(root) and path != root for root in allowed):
        return None
    for root in (*SYSTEM_DIRS, *private):
        if path == root or path.is_relative_to(root):
            return root
    return None


def _check_dirs(value: str, parent: Path) -> None:
    """Every directory from the log's up to / belongs to root (or us) and no other user may
    write in it (in a sticky one, above the log's own, only to their own entries): else
    another user could put a symlink or a FIFO in the log's place, or swap a directory,
    between this check and conmon's open."""
    owners = {0, os.geteuid()}
    for d in (parent, *parent.parents):
        st = os.stat(d)
        if st.st_uid not in owners:
            raise refusal("log_path", value, f"is in {d}, owned by uid {st.st_uid}")
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if shared and (d == parent or not st.st_mode & stat.S_ISVTX):
            raise refusal("log_path", value, f"is in {d}, which other users may write to")


@dataclass(frozen=True)
class Checked:
    """A create request's paths as they will be used (resolved), and its runtime."""

    bundle: Path
    runtime: str  # the resolved binary
    runtime_root: str
    log_path: str


def check_create(req: MonitorCreateRequest, roots: Roots, runtimes: RuntimeConfig) -> Checked:
    """The paths and runtime binary of a create request, or why not. Only configured
    runtimes run: the message names a handler, never a binary."""
    validate_id(req.id)
    bundle_path = bundle(req.bundle, roots.bundles)
    root = runtime_root(req.runtime_root, roots.run_dir)
    log = log_path(req.log_path, roots.private, roots.log_dirs)
    cgroup_path(req.cgroup_path)
    try:
        binary = runtimes.binary(req.runtime_handler)
    except KeyError:
        raise refusal("runtime_handler", req.runtime_handler, "is not configured (known: "
                      f"{', '.join(runtimes.names())})") from None
    runtime_path = shutil.which(binary)
    if runtime_path is None:
        raise FailedPrecondition(f"OCI runtime {binary!r} (handler "
                                 f"{req.runtime_handler or 'runc'}) not found")
    return Checked(bundle_path, runtime_path, root, log)
