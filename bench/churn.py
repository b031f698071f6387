"""Pod churn under SIGKILL: does kubelet see a failed call, a lost exit or a leak when any
Shoal process is killed at any moment?

For each run a fresh `shoal up` (embedded secured NATS, its own roots under the bench root,
pods on their own subnet and bridge; pause and busybox images from catatonit and
busybox-static, pushed to a local `docker-registry` this script starts) gets:

1. `--survivors` long-lived pods (busybox `sleep 3600`), started before anything is killed;
2. `--lives` pod lives, `--concurrency` at a time, each RunPodSandbox -> CreateContainer ->
   StartContainer of `sh -c 'sleep S; echo LINE; exit CODE'` (S and CODE drawn from the
   seed) -> wait for its exit (ContainerStatus polled) -> exit code and CRI log line
   checked -> StopPodSandbox -> RemovePodSandbox (then any other pod of its uid still
   listed, as kubelet's GC), with kubelet's retries: UNAVAILABLE and DEADLINE_EXCEEDED are
   tried again for `--retry-budget` seconds, and a create that failed otherwise is made
   anew with the next attempt number;
3. meanwhile, every `--kill-every` seconds, SIGKILL of a random one of `--kill` (`services`:
   the five services; `nats`: the embedded nats-server; or service names), which `shoal up`
   restarts;
4. then: the survivors must run with their original pids, the CRI must list nothing else,
   and after `shoal up` stops (SIGINT) nothing of the run may be left: processes, mounts,
   netns, cgroups, IP leases, bundles, pod directories, executor and supervisor records
   (tests/support/shoal.py `leftovers_at`).

With `--runtime containerd` the same churn runs against a throwaway containerd 1.6 (its
CRI plugin, own root, state, socket, subnet and bridge, in a mount namespace of its own;
`apt-get install -y containerd` first), whose daemon is the one kill target (`--kill
containerd`, the default there): SIGKILLed, its shims live on, and it is started again at
once in the same namespace, as systemd's Restart=always would (bench/_containerd_churn.py).
Leftovers are checked the same way: processes, mounts, netns, cgroups, IP leases, runc state
and bundles, pod directories, containerd's container and task records.

The engine is tests/support/chaos.py (tests/e2e/test_chaos.py runs it small). Every
setting (`--kill-every` takes a list; 0 = never) is run `--runs` times, seed `--seed` + run
number, in turn. It prints one line per run, every failure in full, and a markdown table;
raw results go to <root>/results.json, each run's logs (everything `shoal up` and its
children logged) to <root>/run-<n>/shoal-up.log (containerd: containerd.log). Nothing is
deleted.

    .venv/bin/python bench/churn.py                            # kills every 10 s, 3 runs
    .venv/bin/python bench/churn.py --kill-every 0,10,2 --runs 3
    .venv/bin/python bench/churn.py --kill nats --kill-every 3 --lives 30
    .venv/bin/python bench/churn.py --kill executor,supervisor --seed 7 --runs 1
    .venv/bin/python bench/churn.py --runtime containerd --kill-every 0,10,2 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import _containerd_churn as ctrd
import _harness as h
from support.chaos import SLOW, ChaosReport, ChaosSettings, run_chaos
from support.chaos_nodes import NATS, SERVICES, ShoalUp
from support.images import busybox_image, pause_image, push
from support.registry import Registry
from support.shoal import host_names

SUBNET = "10.210.{n}.0/24"  # a run's pods; bridge shoalchurn<n>
LEASES = Path("/var/lib/cni/networks/shoal")  # host-local's leases of Shoal's network


def ancestors() -> set[int]:
    """This process and whatever started it (a shell, `timeout`): they may name the root."""
    found, pid = set(), os.getpid()
    while pid > 1:
        found.add(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    return found


def targets(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for name in text.split(","):
        names += (list(SERVICES) if name == "services"
                  else [*SERVICES, NATS] if name == "all" else [name])
    bad = [n for n in names if n not in (*SERVICES, NATS, ctrd.TARGET)]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown kill target(s) {bad}: use services, nats, "
                                         f"all, {', '.join(SERVICES)} or (--runtime "
                                         f"containerd) {ctrd.TARGET}")
    return tuple(names)


def intervals(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of seconds: {text}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("intervals must be >= 0 (0: never)")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--lives", type=int, default=60, help="pod lives per run (%(default)s)")
    p.add_argument("--concurrency", type=int, default=6, help="lives at a time (%(default)s)")
    p.add_argument("--min-seconds", type=float, default=0.0,
                   help="more lives are begun until the churn lasted this long (%(default)s)")
    p.add_argument("--kill-every", type=intervals, default=[10.0], metavar="S[,S...]",
                   help="seconds between kills, one setting each; 0 = never (10)")
    p.add_argument("--runtime", choices=("shoal", "containerd"), default="shoal",
                   help="the node churned: a `shoal up` (default) or containerd 1.6")
    p.add_argument("--kill", type=targets, default=None, metavar="WHAT",
                   help="services (default), nats, all, or service names, comma-separated; "
                        "with --runtime containerd: containerd (its daemon; the default)")
    p.add_argument("--runs", type=int, default=3, help="runs per setting (%(default)s)")
    p.add_argument("--seed", type=int, default=1, help="run r uses seed + r (%(default)s)")
    p.add_argument("--survivors", type=int, default=5, help="long-lived pods (%(default)s)")
    p.add_argument("--call-timeout", type=float, default=120.0,
                   help="each CRI call's deadline, s; RunPodSandbox twice (%(default)s, "
                        "kubelet's)")
    p.add_argument("--retry-budget", type=float, default=60.0,
                   help="how long a call is retried, s (%(default)s)")
    p.add_argument("--root", type=Path, default=None,
                   help="state root (default /tmp/shoal-bench-churn-<timestamp>); kept")
    args = p.parse_args(argv)
    if min(args.lives, args.concurrency, args.runs) < 1 or args.survivors < 0:
        p.error("--lives, --concurrency and --runs must be >= 1")
    shoal = args.runtime == "shoal"
    args.kill = args.kill or (SERVICES if shoal else (ctrd.TARGET,))
    if shoal == (ctrd.TARGET in args.kill) or (not shoal and set(args.kill) != {ctrd.TARGET}):
        p.error(f"--kill {ctrd.TARGET} (the daemon) goes with --runtime containerd, and only "
                "it")
    if not shoal and (problem := ctrd.missing()):
        p.error(problem)
    return args


def settings_of(args: argparse.Namespace, every: float, seed: int) -> ChaosSettings:
    return ChaosSettings(lives=args.lives, concurrency=args.concurrency,
                         min_churn=args.min_seconds, kill_every=every,
                         targets=args.kill, seed=seed, survivors=args.survivors,
                         call_timeout=args.call_timeout, retry_budget=args.retry_budget)


def free_net() -> int:
    """A subnet number with no IP lease and no bridge yet: what a run leaves there is its
    own, whatever earlier runs (interrupted ones too) left elsewhere."""
    taken = {f.name.rsplit(".", 1)[0] for f in LEASES.iterdir()} if LEASES.exists() else set()
    links = Path("/sys/class/net")
    for n in range(1, 255):
        if f"10.210.{n}" not in taken and not (links / f"shoalchurn{n}").exists():
            return n
    raise RuntimeError(f"no free subnet 10.210.N.0/24: leases under {LEASES}")


async def one_run(root: Path, n: int, images: dict[str, str], settings: ChaosSettings,
                  args: argparse.Namespace, registry: Registry) -> tuple[ChaosReport, Path]:
    """One run; what it saw, and where its node logged."""
    if args.runtime == "containerd":
        subnet, bridge = ctrd.free_network()
        node = ctrd.ContainerdUp(root / f"run-{n}", images, registry.host, subnet, bridge)
        try:
            return (await run_chaos(node, settings, host_names(), spawn=h.spawn,
                                    ours=ancestors()), node.log_path)
        finally:
            node.close(ancestors())
    net = free_net()
    up = ShoalUp(root / f"run-{n}", f"churn{n}", images, SUBNET.format(n=net),
                 f"shoalchurn{net}")
    before = host_names()
    return await run_chaos(up, settings, before, spawn=h.spawn, ours=ancestors()), up.log_path


def print_run(n: int, every: float, report: ChaosReport, log: Path) -> None:
    verdict = "clean" if report.clean else "NOT CLEAN"
    print(f"run {n} (kills every {every:g} s): {verdict}: {report.summary()}", flush=True)
    for line in report.details():
        print(f"    {line}", flush=True)
    if not report.clean:
        print(f"    logs: {log}", flush=True)


def table(args: argparse.Namespace, results: list[tuple[float, ChaosReport]]) -> str:
    rows = []
    for every in args.kill_every:
        mine = [r for e, r in results if e == every]
        if not mine:
            continue
        lives = [s for r in mine for s in r.life_seconds]
        rows.append((
            "never" if every == 0 else f"{every:g} s", ",".join(sorted(set(args.kill)))
            if every else "-", len(mine), sum(r.clean for r in mine),
            sum(len(r.failures) for r in mine), sum(len(r.slow) for r in mine),
            sum(len(r.exits) for r in mine),
            sum(len(r.leaks) for r in mine), sum(len(r.survivors) for r in mine),
            sum(sum(1 for k in r.kills if k.pid) for r in mine),
            f"{h.percentile(lives, 50):.1f} / {max(lives):.0f}" if lives else "-"))
    return h.table(["kills every", "killed", "runs", "clean runs", "failed calls",
                    f"calls > {SLOW:g} s", "lost/wrong exits", "leaked", "survivors lost",
                    "kills", "life s (median / max)"], rows, "llrrrrrrrrr")


async def main_async(args: argparse.Namespace, root: Path, registry: Registry
                     ) -> list[tuple[float, ChaosReport]]:
    push(registry.url, "churn/pause", "1", pause_image())
    push(registry.url, "churn/busybox", "1", busybox_image())
    images = {"pause": f"{registry.host}/churn/pause:1",
              "busybox": f"{registry.host}/churn/busybox:1"}
    results: list[tuple[float, ChaosReport]] = []
    n = 0
    for every in args.kill_every:
        for r in range(args.runs):
            n += 1
            report, log = await one_run(root, n, images, settings_of(args, every, args.seed + r),
                                        args, registry)
            results.append((every, report))
            print_run(n, every, report, log)
            (root / "results.json").write_text(json.dumps(
                [{"kill_every": e, **rep.as_json()} for e, rep in results], indent=1))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    meter = h.LoadMeter()
    root = h.bench_root("churn", args.root, meter.started)
    command = shlex.join([".venv/bin/python", "bench/churn.py",
                          *(sys.argv[1:] if argv is None else argv)])
    print(f"state under {root}", flush=True)
    try:
        with h.sigterm_as_interrupt(), Registry(root / "registry") as registry:
            try:
                results = asyncio.run(main_async(args, root, registry))
            finally:
                signal.signal(signal.SIGTERM, h.interrupt)  # the loop's exit reset it
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted; files left in {root}", file=sys.stderr)
        return 130
    meter.stop()
    print(f"\nCommand: `{command}`  \nRun: {meter.started:%Y-%m-%d %H:%M} UTC, "
          f"{meter.minutes:.1f} min.  \nMachine: {h.machine()}.  \nLoad: {meter.result}.\n")
    print(table(args, results))
    print(f"\nraw results in {root / 'results.json'}; state left in {root}")
    return 0 if all(r.clean for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
