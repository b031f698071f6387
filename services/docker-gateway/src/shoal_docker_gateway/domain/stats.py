"""`docker top` and `docker stats`, read on the node as dockerd reads them: the container's
processes are those in its cgroup (found from its main process, the supervisor's task pid),
`ps` runs on the host with the client's options and its rows are kept by PID; usage comes
from the cgroup's own files (v1, hybrid or v2), /proc/stat for the host's CPU time and the
container's network namespace's /proc/<pid>/net/dev.

The supervisor's `stats` verb has total CPU, memory and pids only; Docker's document also
wants per-CPU and user/kernel time, throttling, the limits, memory.stat and block I/O, so
the files are read here (a few small reads, in a thread)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal_common.errors import NotFound
from shoal_common.messages.monitor import TaskIdRequest

from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.containers import observe
from shoal_docker_gateway.errors import BadParameter, Conflict, DockerError
from shoal_docker_gateway.store.containers import ContainerRecord

CGROUP_ROOT = Path("/sys/fs/cgroup")
# What a v1 container's files are read from; runc puts every controller at one path, but
# each is looked up on its own line of /proc/<pid>/cgroup.
V1_CONTROLLERS = ("memory", "cpuacct", "cpu", "pids", "blkio")
PS_ARGS_RE = re.compile(r"[A-Za-z0-9 ,-]*")  # plain ps options: no shell, no format strings
MAX_PS_ARGS = 256
PS_TIMEOUT = 10.0
INTERVAL = 1.0  # between two samples: dockerd's collector period
ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time, what Docker sends for "no sample"
UNLIMITED = 1 << 62  # a v1 limit at or above this is "none" (the kernel's PAGE_COUNTER_MAX)


def not_running(rec: ContainerRecord) -> Conflict:
    return Conflict(f"Container {rec.id} is not running")


@dataclass(frozen=True)
class Target:
    """A running container: its main process and its cgroup directory per controller."""

    pid: int
    dirs: dict[str, Path]  # controller -> directory; v2: every controller -> the one dir
    unified: bool

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").is_dir() and any(d.is_dir() for d in
                                                          self.dirs.values())


def _unified() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def _inside(path: Path) -> Path | None:
    """`path` if, symlinks and `..` resolved, it is inside the cgroup hierarchy."""
    real = Path(os.path.realpath(path))
    return real if real.is_relative_to(os.path.realpath(CGROUP_ROOT)) else None


def cgroup_dirs(proc_cgroup: str, unified: bool) -> dict[str, Path]:
    """The directories of a /proc/<pid>/cgroup text (`N:ctrl,ctrl:/path` lines; v2's is
    `0::/path`) that exist inside the hierarchy."""
    out: dict[str, Path] = {}
    for line in proc_cgroup.splitlines():
        _, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2 and path.startswith("/")):
            continue
        if unified and controllers == "":
            found = _inside(CGROUP_ROOT / path.lstrip("/"))
            return {c: found for c in (*V1_CONTROLLERS, "")} if found else {}
        for name in controllers.split(","):
            if name in V1_CONTROLLERS:
                found = _inside(CGROUP_ROOT / name / path.lstrip("/"))
                if found is not None:
                    out[name] = found
    return out


def _target_of(pid: int) -> Target | None:
    unified = _unified()
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    dirs = cgroup_dirs(text, unified)
    return Target(pid, dirs, unified) if dirs else None


async def target(backend: Backend, rec: ContainerRecord) -> Target:
    """The running container's process and cgroup; 409 when it is not running."""
    if (await observe(backend, rec)).status != "running":
        raise not_running(rec)
    try:
        task = await backend.clients.monitor.state(TaskIdRequest(id=rec.cri_id))
    except NotFound:
        raise not_running(rec) from None
    if task.state != "running" or task.pid <= 0:
        raise not_running(rec)
    found = await asyncio.to_thread(_target_of, task.pid)
    if found is None:  # exited between the two looks
        raise not_running(rec)
    return found


# -- docker top ---------------------------------------------------------------------------


def check_ps_args(text: str) -> list[str]:
    """The client's ps options as argv words ("" = Docker's -ef); 400 for anything else."""
    if len(text) > MAX_PS_ARGS:
        raise BadParameter(f"ps_args longer than {MAX_PS_ARGS} characters")
    if not PS_ARGS_RE.fullmatch(text):
        raise BadParameter(f"invalid ps_args {text[:64]!r}: only letters, digits, spaces, "
                           "',' and '-' are allowed")
    return text.split() or ["-ef"]


def _read_procs(directory: Path) -> set[int]:
    """Every process in the cgroup and its sub-cgroups (v1's cgroup.procs lists its own)."""
    pids: set[int] = set()
    for root, _dirs, files in os.walk(directory):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in Path(root, "cgroup.procs").read_text().split())
    return pids


def container_pids(t: Target) -> set[int]:
    directory = t.dirs.get("pids") or t.dirs.get("memory") or next(iter(t.dirs.values()))
    return _read_procs(directory) or {t.pid}


def parse_ps(output: str, pids: set[int]) -> dict[str, Any]:
    """Docker's top body: ps's header split into titles, the rows whose PID is one of
    `pids`; the last column (the command) keeps its spaces."""
    lines = output.splitlines()
    titles = lines[0].split() if lines else []
    if "PID" not in titles:
        raise BadParameter("Couldn't find PID field in ps output")
    column, width = titles.index("PID"), len(titles)
    rows = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < width:
            continue
        try:
            pid = int(fields[column])
        except ValueError:
            continue
        if pid in pids:
            rows.append([*fields[:width - 1], " ".join(fields[width - 1:])])
    return {"Titles": titles, "Processes": rows}


async def _run_ps(args: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ps", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PS_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DockerError(f"ps {' '.join(args)} did not finish in {PS_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        reason = err.decode(errors="replace").strip().splitlines()
        raise BadParameter(f"Error running ps {' '.join(args)}: exit status "
                           f"{proc.returncode}: {reason[0] if reason else ''}".rstrip(": "))
    return out.decode(errors="replace")


async def top(backend: Backend, rec: ContainerRecord, ps_args: str) -> dict[str, Any]:
    args = check_ps_args(ps_args)
    t = await target(backend, rec)
    pids = await asyncio.to_thread(container_pids, t)
    return parse_ps(await _run_ps(args), pids)


# -- docker stats: readings ---------------------------------------------------------------


def _text(t: Target, controller: str, name: str) -> str:
    directory = t.dirs.get(controller)
    if directory is None:
        return ""
    try:
        return (directory / name).read_text()
    except OSError:
        return ""


def _int(text: str) -> int | None:
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.stat, cpu.stat, cpuacct.stat)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_NS_PER_TICK = 1_000_000_000 // _CLK_TCK


def system_cpu_ns(stat: str) -> int:
    """The host's CPU time as Docker counts it: /proc/stat's `cpu` line, its first seven
    columns (user nice system idle iowait irq softirq), in nanoseconds."""
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return sum(int(f) for f in fields[1:8]) * _NS_PER_TICK
    return 0


def host_memory(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_v1(t: Target) -> dict[str, Any]:
    percpu = [int(v) for v in _text(t, "cpuacct", "cpuacct.usage_percpu").split()
              if v.isdigit()]
    user, kernel = (_int(_text(t, "cpuacct", "cpuacct.usage_user")),
                    _int(_text(t, "cpuacct", "cpuacct.usage_sys")))
    if user is None or kernel is None:  # older kernels: only ticks in cpuacct.stat
        ticks = _keyed(_text(t, "cpuacct", "cpuacct.stat"))
        user, kernel = ticks.get("user", 0) * _NS_PER_TICK, ticks.get("system", 0) * \
            _NS_PER_TICK
    throttle = _keyed(_text(t, "cpu", "cpu.stat"))
    return {"cpu_usage": {"total_usage": _int(_text(t, "cpuacct", "cpuacct.usage")) or 0,
                          "percpu_usage": percpu, "usage_in_kernelmode": kernel,
                          "usage_in_usermode": user},
            "throttling_data": {"periods": throttle.get("nr_periods", 0),
                                "throttled_periods": throttle.get("nr_throttled", 0),
                                "throttled_time": throttle.get("throttled_time", 0)}}


def _cpu_v2(t: Target) -> dict[str, Any]:
    stat = _keyed(_text(t, "cpu", "cpu.stat"))
    return {"cpu_usage": {"total_usage": stat.get("usage_usec", 0) * 1000,
                          "usage_in_kernelmode": stat.get("system_usec", 0) * 1000,
                          "usage_in_usermode": stat.get("user_usec", 0) * 1000},
            "throttling_data": {"periods": stat.get("nr_periods", 0),
                                "throttled_periods": stat.get("nr_throttled", 0),
                                "throttled_time": stat.get("throttled_usec", 0) * 1000}}


def _memory(t: Target, machine: int) -> dict[str, Any]:
    """Docker's memory_stats; no limit of its own (or one above the host's) is the host's
    memory, as dockerd reports it."""
    names = (("memory.current", "memory.max", None, None) if t.unified else
             ("memory.usage_in_bytes", "memory.limit_in_bytes", "memory.max_usage_in_bytes",
              "memory.failcnt"))
    limit = _int(_text(t, "memory", names[1]))  # None for v2's "max"
    if limit is None or limit >= UNLIMITED or (machine and limit > machine):
        limit = machine
    out: dict[str, Any] = {"usage": _int(_text(t, "memory", names[0])) or 0,
                           "stats": _keyed(_text(t, "memory", "memory.stat")), "limit": limit}
    if names[2] and names[3]:
        out.update(max_usage=_int(_text(t, "memory", names[2])) or 0,
                   failcnt=_int(_text(t, "memory", names[3])) or 0)
    return out


def _pids(t: Target) -> dict[str, Any]:
    current = _int(_text(t, "pids", "pids.current"))
    out: dict[str, Any] = {"current": current if current is not None else
                           len(container_pids(t))}
    limit = _int(_text(t, "pids", "pids.max"))  # None for "max"
    if limit:
        out["limit"] = limit
    return out


def parse_blkio_v1(text: str) -> list[dict[str, Any]]:
    """`MAJ:MIN Op value` lines (the `Total` line left out)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3 or ":" not in fields[0]:
            continue
        major, _, minor = fields[0].partition(":")
        with contextlib.suppress(ValueError):
            out.append({"major": int(major), "minor": int(minor), "op": fields[1],
                        "value": int(fields[2])})
    return out


def parse_io_stat(text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """v2 io.stat (`MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...`): bytes and operations."""
    nbytes: list[dict[str, Any]] = []
    ios: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        values = dict(p.partition("=")[::2] for p in pairs)
        with contextlib.suppress(ValueError):
            dev = {"major": int(major), "minor": int(minor)}
            for op, key, into in (("read", "rbytes", nbytes), ("write", "wbytes", nbytes),
                                  ("read", "rios", ios), ("write", "wios", ios)):
                into.append({**dev, "op": op, "value": int(values.get(key, "0"))})
    return nbytes, ios


def _blkio(t: Target) -> dict[str, Any]:
    if t.unified:
        nbytes, ios = parse_io_stat(_text(t, "blkio", "io.stat"))
    else:  # the CFQ/BFQ files when the scheduler keeps them, else the throttle layer's
        nbytes = parse_blkio_v1(_text(t, "blkio", "blkio.io_service_bytes_recursive")) or \
            parse_blkio_v1(_text(t, "blkio", "blkio.throttle.io_service_bytes_recursive"))
        ios = parse_blkio_v1(_text(t, "blkio", "blkio.io_serviced_recursive")) or \
            parse_blkio_v1(_text(t, "blkio", "blkio.throttle.io_serviced_recursive"))
    empty: list[dict[str, Any]] = []
    return {"io_service_bytes_recursive": nbytes, "io_serviced_recursive": ios,
            "io_queue_recursive": empty, "io_service_time_recursive": empty,
            "io_wait_time_recursive": empty, "io_merged_recursive": empty,
            "io_time_recursive": empty, "sectors_recursive": empty}


NET_DEV_KEYS = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped")
NET_DEV_TX = ("tx_bytes", "tx_packets", "tx_errors", "tx_dropped")


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """/proc/net/dev: per interface (loopback left out, as Docker does) the first four
    receive and the first four transmit counters."""
    out = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        values = rest.split()
        if not sep or len(values) < 16 or name.strip() == "lo":
            continue
        with contextlib.suppress(ValueError):
            numbers = [int(v) for v in values]
            out[name.strip()] = {**dict(zip(NET_DEV_KEYS, numbers[0:4], strict=True)),
                                 **dict(zip(NET_DEV_TX, numbers[8:12], strict=True))}
    return out


def _networks(pid: int) -> dict[str, dict[str, int]] | None:
    """The container's interfaces; None when it shares the host's network namespace (or
    it cannot be told): Docker gives no networks for --network host."""
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            return None
        return parse_net_dev(Path(f"/proc/{pid}/net/dev").read_text())
    except OSError:
        return None


def rfc3339_ns(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def sample(t: Target) -> dict[str, Any]:
    """One reading of the container (blocking file reads: call in a thread)."""
    now = time.time_ns()
    cpu = _cpu_v2(t) if t.unified else _cpu_v1(t)
    cpu.update(system_cpu_usage=system_cpu_ns(Path("/proc/stat").read_text()),
               online_cpus=os.sysconf("SC_NPROCESSORS_ONLN"))
    out: dict[str, Any] = {
        "read": rfc3339_ns(now), "pids_stats": _pids(t), "blkio_stats": _blkio(t),
        "num_procs": 0, "storage_stats": {}, "cpu_stats": cpu,
        "memory_stats": _memory(t, host_memory(Path("/proc/meminfo").read_text()))}
    networks = _networks(t.pid)
    if networks is not None:
        out["networks"] = networks
    return out


def _no_cpu() -> dict[str, Any]:
    return {"cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0, "usage_in_usermode": 0},
            "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}}


def document(rec: ContainerRecord, now: dict[str, Any],
             before: dict[str, Any] | None) -> dict[str, Any]:
    """Docker's stats object: this reading, the one before as pre* (zero without one)."""
    return {**now, "preread": before["read"] if before else ZERO_TIME,
            "precpu_stats": before["cpu_stats"] if before else _no_cpu(),
            "name": f"/{rec.name}", "id": rec.id}


async def _sample(t: Target, rec: ContainerRecord) -> dict[str, Any]:
    if not await asyncio.to_thread(t.alive):
        raise not_running(rec)
    return await asyncio.to_thread(sample, t)


async def once(t: Target, rec: ContainerRecord, one_shot: bool) -> dict[str, Any]:
    """stream=false: two readings INTERVAL apart, so the client can compute a CPU %
    (one-shot: a single reading, no pre*)."""
    first = await _sample(t, rec)
    if one_shot:
        return document(rec, first, None)
    await asyncio.sleep(INTERVAL)
    return document(rec, await _sample(t, rec), first)


async def follow(t: Target, rec: ContainerRecord) -> AsyncIterator[dict[str, Any]]:
    """stream=true: a reading every INTERVAL until the container stops."""
    before: dict[str, Any] | None = None
    while await asyncio.to_thread(t.alive):
        now = await asyncio.to_thread(sample, t)
        yield document(rec, now, before)
        before = now
        await asyncio.sleep(INTERVAL)
