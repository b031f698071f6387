"""Configuration: one TOML file with documented defaults, then environment, then flags.

Precedence (later wins): built-in defaults < file (`--config`, `$SHOAL_CONFIG`, or
/etc/shoal/config.toml if present) < environment (`SHOAL_<KEY>` with `__` between nested
keys, e.g. `SHOAL_NATS__URL`) < flags (`--set nats.url=...` and the named flags).
Unknown keys and wrong types are refused, naming the key.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec

from shoal_common import subjects
from shoal_common.catalog import SERVICES

DEFAULT_CONFIG_PATH = "/etc/shoal/config.toml"
ENV_PREFIX = "SHOAL_"
S = TypeVar("S", bound="ServiceConfig")
T = TypeVar("T")
# SHOAL_* variables that are not config keys (the fault points are shoal_common.faults').
NOT_CONFIG = frozenset({"SHOAL_CONFIG", "SHOAL_VENV", "SHOAL_FAULTS", "SHOAL_FAULTS_DIR"})


class ConfigError(Exception):
    """An invalid configuration; the message names the key."""


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class EmbeddedNatsConfig(_Section):
    # Loopback only: the embedded server is for a single node.
    listen: str = "127.0.0.1:4222"
    # JetStream storage; empty = <state_root>/nats.
    store_dir: str = ""
    # Per-service users with subject permissions (deploy/nats/README.md); passwords are
    # generated into <store_dir>/auth/ (root only) on first start.
    auth: bool = True
    # TLS for the embedded server (both set, PEM): clients then need nats.tls_ca.
    tls_cert: str = ""
    tls_key: str = ""
    # Once it listens, and again once every service is up, the launcher takes back the pages
    # of the server's program its start-up faulted in (shoal_common.pages.page_out_file_pages):
    # ~5 MiB of its ~18 MiB; what it runs is faulted back. False: left resident.
    page_out_text: bool = True


class NatsConfig(_Section):
    url: str = "nats://127.0.0.1:4222"
    connect_timeout: float = 5.0
    # Per attempt: a replica that died mid-request is detected by this timeout, then retried.
    request_timeout: float = 10.0
    request_retries: int = 2
    # Credentials of this process (empty user = none). `shoal up` passes each service its
    # own; the CLI uses the admin user's file under <store_dir>/auth/ when it exists.
    user: str = ""
    password_file: str = ""
    tls_ca: str = ""  # CA that signed the server's certificate (turns TLS on)
    tls_cert: str = ""  # client certificate and key, if the server asks for them
    tls_key: str = ""
    embedded: EmbeddedNatsConfig = msgspec.field(default_factory=EmbeddedNatsConfig)


class EventsConfig(_Section):
    stream: str = "SHOAL_EVENTS"
    max_age_seconds: float = 7 * 24 * 3600.0
    max_bytes: int = 1 << 30
    replicas: int = 1  # JetStream replicas; >1 only on a NATS cluster


class ServiceConfig(_Section):
    """What every service has; a service's own section subclasses it (see ENTRY_POINTS)."""

    # Empty = 127.0.0.1 and the service's default port (9711..9715, see catalog).
    metrics_addr: str = ""
    # Handlers run concurrently up to this bound; beyond it delivery pauses (backpressure).
    max_concurrency: int = 64
    # On SIGTERM: stop taking work, then give in-flight requests this long to finish.
    shutdown_timeout: float = 10.0

    def check(self, key: str) -> None:
        """Raise ConfigError naming `key.<field>` for a bad value; subclasses add theirs."""
        check_addr(self.metrics_addr, f"{key}.metrics_addr")
        if self.max_concurrency < 1:
            raise ConfigError(f"config key {key}.max_concurrency: must be >= 1")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"config key {key}.shutdown_timeout: must be >= 0")


class RuntimeConfig(_Section):
    """The OCI runtimes, by CRI runtime handler. The executor names a handler; the
    supervisor runs only the binaries named here (a bus message never names a binary)."""

    # The default runtime binary (looked up in PATH unless absolute): handler "runc".
    path: str = "runc"
    # More handlers: name → OCI runtime binary, e.g. {crun = "/usr/bin/crun"}.
    handlers: dict[str, str] = {}

    def names(self) -> list[str]:
        return ["runc", *sorted(h for h in self.handlers if h != "runc")]

    def binary(self, handler: str) -> str:
        """The binary of `handler` ("" = "runc"); KeyError for one not configured."""
        if handler in ("", "runc"):
            return self.path
        return self.handlers[handler]


# -- each service's own section ------------------------------------------------------------
# A service declares its section (a ServiceConfig subclass) in its own package and
# registers it under the entry-point group "shoal.config" (name = its config key), as a
# containerd plugin owns its Config; the loader finds them there, so unknown keys are still
# refused by name and common knows no service's settings.

ENTRY_POINTS = "shoal.config"


@functools.cache
def _sections() -> dict[str, type[ServiceConfig]]:
    """Scanned once per process: what is installed does not change while it runs (and the
    scan of every distribution's metadata is most of a config load)."""
    found: dict[str, type[ServiceConfig]] = {}
    for ep in entry_points(group=ENTRY_POINTS):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, ServiceConfig)):
            raise ConfigError(f"entry point {ENTRY_POINTS}:{ep.name} is not a ServiceConfig")
        found[ep.name] = cls
    for svc in SERVICES:  # a service whose package is absent still gets the common keys
        found.setdefault(svc.config_key, ServiceConfig)
    return found


@functools.cache
def services_type() -> type[_Section]:
    """The `services` table: one field per registered section."""
    fields = [(key, cls, msgspec.field(default_factory=cls))
              for key, cls in sorted(_sections().items())]
    # defstruct is typed as returning type[Struct]; with bases=(_Section,) it is a _Section.
    return cast("type[_Section]",
                msgspec.defstruct("ServicesConfig", fields, bases=(_Section,), kw_only=True,
                                  forbid_unknown_fields=True, module=__name__))


def _default_services() -> Any:
    return services_type()()


class CriConfig(_Section):
    # Empty = <run_root>/cri.sock
    socket: str = ""
    # The image every pod's pause process runs from. The default is built on the node by the
    # puller from Debian's catatonit (no registry needed: an air-gapped node runs pods).
    sandbox_image: str = "shoal.local/pause:1"
    # The streaming server (Exec/Attach/PortForward URLs). Loopback by default: kubelet,
    # on the same node, proxies streams to it; port 0 = any free port, chosen at start.
    stream_addr: str = "127.0.0.1:0"
    # A stream with no traffic either way for this many seconds is closed (kubelet's 4 h).
    stream_idle_timeout: float = 4 * 3600.0


class DockerConfig(_Section):
    """The Docker Engine API (the docker gateway), shared with the CLI and tests."""

    # Empty = <run_root>/docker.sock (owner-only, like the CRI socket)
    socket: str = ""
    # The Shoal namespace of its containers (images are shared by content), Docker's own.
    namespace: str = "moby"
    # Containers' CRI log files (<log_root>/<id>/container.log): like kubelet's /var/log/pods,
    # outside the state root, where the supervisor lets conmon write.
    log_root: str = "/var/log/shoal/docker"
    # `shoal up` holds the socket open and starts the gateway at its first connection (as
    # Debian's docker.socket activates dockerd), unless the gateway has state (containers,
    # networks: their restart policies and DNS need it running), then at once; false: at once.
    on_demand: bool = True
    # Set by `shoal up`: the listening socket it holds, inherited (-1: the gateway binds
    # `socket` itself). A restarted gateway gets the same one: no connection is refused.
    socket_fd: int = -1

    def check(self) -> None:
        if self.socket_fd < -1 or 0 <= self.socket_fd <= 2:
            raise ConfigError("config key docker.socket_fd: must be -1 or a descriptor "
                              "above stdio")


class LauncherConfig(_Section):
    """`shoal up`: its own metrics and how it restarts children."""

    metrics_addr: str = "127.0.0.1:9710"
    restart_backoff_initial: float = 0.5
    restart_backoff_max: float = 30.0
    ready_timeout: float = 30.0
    # Fork the services from a parent that imported their shared stack once (pages shared
    # copy-on-write); false: exec each as `python -m shoal_<service>`.
    preload: bool = True
    # glibc malloc arenas per service (MALLOC_ARENA_MAX); 0: glibc's default (8 per core).
    malloc_arena_max: int = 2
    # Kernel samepage merging of the services' Python heaps (shoal_common.pages): their
    # pages are marked mergeable, and KSM is turned on if it is off; false: neither.
    merge_pages: bool = True


class LogConfig(_Section):
    level: str = "info"
    format: str = "auto"  # auto (console on a TTY, else JSON), json, console


def _default_node_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    return host or "local"


class Config(_Section):
    node_id: str = msgspec.field(default_factory=_default_node_id)
    state_root: str = "/var/lib/shoal"
    run_root: str = "/run/shoal"
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    # One section per service (see services_type); read a typed one with `section()`.
    services: Any = msgspec.field(default_factory=_default_services)
    cri: CriConfig = msgspec.field(default_factory=CriConfig)
    docker: DockerConfig = msgspec.field(default_factory=DockerConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    launcher: LauncherConfig = msgspec.field(default_factory=LauncherConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    def service(self, name: str) -> ServiceConfig:
        return getattr(self.services, name.replace("-", "_"))

    def section(self, cls: type[S]) -> S:
        """A service's own section, typed: `config.section(PullerConfig)`."""
        for key, registered in _sections().items():
            if registered is cls:
                value = getattr(self.services, key)
                assert isinstance(value, cls)
                return value
        raise KeyError(f"{cls.__name__} is not a registered config section")

    def state_dir(self, service: str) -> Path:
        return Path(self.state_root) / service

    def run_dir(self, service: str) -> Path:
        return Path(self.run_root) / service

    @property
    def cri_socket(self) -> str:
        return self.cri.socket or str(Path(self.run_root) / "cri.sock")

    @property
    def docker_socket(self) -> str:
        return self.docker.socket or str(Path(self.run_root) / "docker.sock")

    @property
    def nats_store_dir(self) -> str:
        return self.nats.embedded.store_dir or str(Path(self.state_root) / "nats")


def _parse_scalar(text: str) -> Any:
    """Read an env/flag value as a TOML value when it is one (3, true, [..]), else as text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _parse_override(item: str) -> dict[str, Any]:
    """`a.b."host:5000".c=value`: the key is a TOML dotted key (quotes allowed), the value a
    TOML value or else plain text."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value")
    value = value.strip()
    for text in (value, json.dumps(value)):
        try:
            return tomllib.loads(f"{key.strip()} = {text}")
        except tomllib.TOMLDecodeError:
            continue
    raise ConfigError(f"--set {item!r}: {key.strip()!r} is not a valid key")


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted}: {key} is not a table")
        node = child
    node[keys[-1]] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_CONFIG:
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        _set_path(tree, dotted, _parse_scalar(value))
    return tree


def _key_of(error: msgspec.ValidationError) -> str:
    # msgspec reports "... - at `$.nats.url`"; turn the path into the TOML key.
    match = re.search(r"at `\$\.?([^`]*)`", str(error))
    return match.group(1) if match else "<root>"


def _validate(cfg: Config) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config key {key}: {why}")

    if not subjects.TOKEN_RE.match(cfg.node_id):
        raise bad("node_id", f"{cfg.node_id!r} must be 1-64 of [A-Za-z0-9_-] (a NATS token)")
    for key in ("state_root", "run_root"):
        if not os.path.isabs(getattr(cfg, key)):
            raise bad(key, "must be an absolute path")
    if not re.match(r"^(nats|tls|ws|wss)://", cfg.nats.url) and "," not in cfg.nats.url:
        raise bad("nats.url", f"{cfg.nats.url!r} is not a nats:// URL")
    for key in ("connect_timeout", "request_timeout"):
        if getattr(cfg.nats, key) <= 0:
            raise bad(f"nats.{key}", "must be > 0")
    if cfg.nats.request_retries < 0:
        raise bad("nats.request_retries", "must be >= 0")
    for key in _sections():
        getattr(cfg.services, key).check(f"services.{key}")
    check_addr(cfg.launcher.metrics_addr, "launcher.metrics_addr")
    if not 0 <= cfg.launcher.malloc_arena_max <= 1024:
        raise bad("launcher.malloc_arena_max", "must be between 0 and 1024")
    cfg.docker.check()
    check_addr(cfg.cri.stream_addr, "cri.stream_addr")
    if cfg.cri.stream_idle_timeout <= 0:
        raise bad("cri.stream_idle_timeout", "must be > 0")
    check_addr(cfg.nats.embedded.listen, "nats.embedded.listen")
    if cfg.log.level.lower() not in {"debug", "info", "warning", "error"}:
        raise bad("log.level", f"{cfg.log.level!r} is not one of debug, info, warning, error")
    if cfg.log.format not in {"auto", "json", "console"}:
        raise bad("log.format", f"{cfg.log.format!r} is not one of auto, json, console")
    if not re.match(r"^[A-Za-z0-9_-]+$", cfg.events.stream):
        raise bad("events.stream", f"{cfg.events.stream!r} is not a valid stream name")


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{addr!r} is not host:port")
    return host.strip("[]"), int(port)


def check_addr(addr: str, key: str) -> None:
    try:
        parse_addr(addr)
    except ValueError as exc:
        raise ConfigError(f"config key {key}: {exc}") from None


def load_config(path: str | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None) -> Config:
    """Build the effective configuration; raise ConfigError naming the bad key."""
    env = os.environ if env is None else env
    tree: dict[str, Any] = {}
    path = path or env.get("SHOAL_CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path:
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    _merge(tree, _env_overrides(env))
    for item in overrides:
        _merge(tree, _parse_override(item))
    for key, value in (flags or {}).items():
        if value is not None:
            _set_path(tree, key, value)
    services = tree.pop("services", {})
    cfg = _convert(tree, Config, "")
    cfg.services = _convert(services, services_type(), "services")
    for svc in SERVICES:
        section = cfg.service(svc.name)
        section.metrics_addr = section.metrics_addr or f"127.0.0.1:{svc.metrics_port}"
    _validate(cfg)
    return cfg


def _convert(tree: Any, typ: type[T], prefix: str) -> T:
    """`tree` as `typ`, or ConfigError naming the key (`prefix` is where `tree` sits)."""
    try:
        return msgspec.convert(tree, typ)
    except msgspec.ValidationError as exc:
        detail = str(exc).split(" - at ")[0]
        if detail.startswith("Object contains unknown field"):
            key, why = _unknown_key(exc), "unknown key"
        else:
            key, why = _key_of(exc), detail
        key = prefix if key == "<root>" and prefix else key
        full = f"{prefix}.{key}" if prefix and key != prefix else key
        raise ConfigError(f"config key {full}: {why}") from None


def _unknown_key(error: msgspec.ValidationError) -> str:
    field = re.search(r"unknown field `([^`]*)`", str(error))
    parent = _key_of(error)
    name = field.group(1) if field else "?"
    return f"{parent}.{name}" if parent and parent != "<root>" else name


def to_toml_dict(cfg: Config) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)
