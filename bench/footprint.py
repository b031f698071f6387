"""Idle memory of `shoal up`: PSS (and RSS, and the COW-shared anonymous part) of the
launcher and of every process it started, from /proc/<pid>/smaps_rollup.

    .venv/bin/python bench/footprint.py [--settle 10] [--runs 1] [--env K=V] [--set K=V]...

Each run starts `shoal up` (embedded NATS on a free port, every metrics port free, its own
pod subnet and bridge) on a fresh root under /tmp/shoal-bench-footprint-*, waits until every
replica answered health, lets it idle `--settle` seconds, reads every process, and stops it
with SIGINT. Nothing is deleted between runs (see _harness: the ext4 delete trap).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

import _harness as h
from support.processes import metrics_sets, shoal_up_argv

MIB = 1 << 20
POD_NET = ("10.231.0.0/24", "shoal-fp0")


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup in bytes ({} once the process is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def label(pid: int) -> str:
    """What the process is, from its command line (as operators see it)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if "--replica-id" in argv:
        return argv[argv.index("--replica-id") + 1]
    if "-m" in argv:
        return argv[argv.index("-m") + 1]
    return Path(argv[0]).name


def report(launcher: int) -> list[tuple[str, int, dict[str, int]]]:
    rows = [("launcher", launcher, rollup(launcher))]
    rows += [(label(pid), pid, rollup(pid)) for pid in children_of(launcher)]
    return rows


def print_rows(rows: list[tuple[str, int, dict[str, int]]]) -> None:
    print(f"{'process':<22}{'pid':>8}{'PSS MiB':>10}{'RSS MiB':>10}{'shared anon MiB':>17}")
    for name, pid, r in rows:
        print(f"{name:<22}{pid:>8}{r.get('Pss', 0) / MIB:>10.1f}{r.get('Rss', 0) / MIB:>10.1f}"
              f"{r.get('Shared_Dirty', 0) / MIB:>17.1f}")
    total = sum(r.get("Pss", 0) for _, _, r in rows)
    print(f"{'total':<22}{'':>8}{total / MIB:>10.1f}", flush=True)


async def one_run(root: Path, settle: float, sets: list[str], env: dict[str, str]) -> None:
    argv = shoal_up_argv(root, "footprint", [
        f"nats.embedded.listen=127.0.0.1:{h.free_port()}", "log.format=json",
        f'services.executor.pod_subnet="{POD_NET[0]}"',
        f'services.executor.cni_bridge="{POD_NET[1]}"', *metrics_sets(), *sets])
    log_path = root / "shoal-up.log"
    proc = h.spawn(argv, log_path, env={**os.environ, **env})
    try:
        targets = root / "run" / "prometheus-targets.json"
        await asyncio.to_thread(h.wait_until, lambda: targets.exists() or
                                proc.poll() is not None, 120, "shoal up ready")
        if proc.poll() is not None:
            raise SystemExit(f"shoal up exited {proc.returncode}; see {log_path}")
        await asyncio.sleep(settle)
        print_rows(report(proc.pid))
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(h.stop_process, proc, 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds idle after ready before reading (default 10)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of shoal up, e.g. SHOAL_LAUNCHER__PRELOAD=false")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to shoal up")
    parser.add_argument("--root", type=Path, help="default /tmp/shoal-bench-footprint-<time>")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    base = h.bench_root("footprint", args.root, datetime.now())
    print(f"root {base}; env {env or '-'}; machine: {h.machine()}", flush=True)
    for n in range(args.runs):
        asyncio.run(one_run(base / f"run-{n}", args.settle, args.set, env))


if __name__ == "__main__":
    sys.exit(main())
