"""Configuration: one TOML file with documented defaults, then environment, then flags.

Precedence (later wins): built-in defaults < file (`--config`, `$SHOAL_CONFIG`, or
/etc/shoal/config.toml if present) < environment (`SHOAL_<KEY>` with `__` between nested
keys, e.g. `SHOAL_NATS__URL`) < flags (`--set nats.url=...` and the named flags).
Unknown keys and wrong types are refused, naming the key.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from shoal_common import subjects
from shoal_common.catalog import SERVICES

DEFAULT_CONFIG_PATH = "/etc/shoal/config.toml"
ENV_PREFIX = "SHOAL_"
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
    # Empty = 127.0.0.1 and the service's default port (9711..9715, see catalog).
    metrics_addr: str = ""
    # Handlers run concurrently up to this bound; beyond it delivery pauses (backpressure).
    max_concurrency: int = 64
    # On SIGTERM: stop taking work, then give in-flight requests this long to finish.
    shutdown_timeout: float = 10.0


class RegistryHostConfig(_Section):
    """How to reach one registry (the key of services.puller.registries: `host[:port]`)."""

    # Endpoints tried in order before the registry itself: "https://mirror:5000[/prefix]".
    mirrors: list[str] = []
    # Talk plain HTTP to the registry itself (mirrors say their scheme in their URL).
    plain_http: bool = False
    ca_file: str = ""  # extra CA bundle (PEM) trusted for this registry and its mirrors
    client_cert: str = ""  # PEM client certificate for mutual TLS...
    client_key: str = ""  # ...and its key
    skip_verify: bool = False
    # Static credentials, used when the CRI request carries none.
    username: str = ""
    password: str = ""


class PullerConfig(ServiceConfig):
    # Layers of one image downloaded at once: 6 measured best for images of many similar
    # layers at no cost for images with one big layer (docs/benchmarks.md).
    max_concurrent_downloads: int = 6
    # A pull is failed when fewer than min_progress_bytes arrive within progress_window
    # seconds: a stalled registry gets a clear error instead of a hang.
    min_progress_bytes: int = 1024
    progress_window: float = 30.0
    # Attempts per blob/manifest request on 429/5xx/resets (with backoff), and per dropped
    # blob download (each resumed with an HTTP Range request).
    max_attempts: int = 5
    # Platform chosen from an index; empty = this machine's.
    platform: str = ""
    registries: dict[str, RegistryHostConfig] = {}


class SnapshotterConfig(ServiceConfig):
    # auto (overlayfs where the kernel mounts it, else native), overlayfs, native
    driver: str = "auto"
    # Unpack images as soon as images.create/update arrive (off: only on `unpack` requests).
    consume_events: bool = True
    events_ack_wait: float = 30.0  # an unacknowledged event is redelivered after this
    events_max_deliver: int = 6
    event_concurrency: int = 4
    unpack_workers: int = 4


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


class ExecutorConfig(ServiceConfig):
    # Pod networking: the first config (lexical order) in the conf dir is used; empty =
    # <state_root>/executor/cni/net.d, where Shoal installs its default bridge network
    # (pod_subnet on bridge `cni_bridge`) when the directory holds no config.
    cni_conf_dir: str = ""
    cni_bin_dirs: list[str] = msgspec.field(default_factory=lambda: ["/usr/lib/cni",
                                                                   "/opt/cni/bin"])
    pod_subnet: str = "10.88.0.0/16"
    cni_bridge: str = "shoal0"


class SupervisorConfig(ServiceConfig):
    # The per-container monitor binary (Debian's conmon).
    conmon_path: str = "conmon"


def _svc(cls: type[ServiceConfig] = ServiceConfig) -> Any:
    return msgspec.field(default_factory=cls)


class ServicesConfig(_Section):
    puller: PullerConfig = _svc(PullerConfig)
    snapshotter: SnapshotterConfig = _svc(SnapshotterConfig)
    executor: ExecutorConfig = _svc(ExecutorConfig)
    supervisor: SupervisorConfig = _svc(SupervisorConfig)
    cri_gateway: ServiceConfig = _svc()


class CriConfig(_Section):
    # Empty = <run_root>/cri.sock
    socket: str = ""
    # The image every pod's pause process runs from (pulled on first use).
    sandbox_image: str = "registry.k8s.io/pause:3.9"
    # The streaming server (Exec/Attach/PortForward URLs). Loopback by default: kubelet,
    # on the same node, proxies streams to it; port 0 = any free port, chosen at start.
    stream_addr: str = "127.0.0.1:0"
    # A stream with no traffic either way for this many seconds is closed (kubelet's 4 h).
    stream_idle_timeout: float = 4 * 3600.0


class LauncherConfig(_Section):
    """`shoal up`: its own metrics and how it restarts children."""

    metrics_addr: str = "127.0.0.1:9710"
    restart_backoff_initial: float = 0.5
    restart_backoff_max: float = 30.0
    ready_timeout: float = 30.0


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
    services: ServicesConfig = msgspec.field(default_factory=ServicesConfig)
    cri: CriConfig = msgspec.field(default_factory=CriConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    launcher: LauncherConfig = msgspec.field(default_factory=LauncherConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    def service(self, name: str) -> ServiceConfig:
        return getattr(self.services, name.replace("-", "_"))  # type: ignore[no-any-return]

    def state_dir(self, service: str) -> Path:
        return Path(self.state_root) / service

    def run_dir(self, service: str) -> Path:
        return Path(self.run_root) / service

    @property
    def cri_socket(self) -> str:
        return self.cri.socket or str(Path(self.run_root) / "cri.sock")

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
    for svc in SERVICES:
        section = cfg.service(svc.name)
        key = f"services.{svc.config_key}"
        _check_addr(section.metrics_addr, f"{key}.metrics_addr")
        if section.max_concurrency < 1:
            raise bad(f"{key}.max_concurrency", "must be >= 1")
        if section.shutdown_timeout < 0:
            raise bad(f"{key}.shutdown_timeout", "must be >= 0")
    _validate_puller(cfg.services.puller)
    snap = cfg.services.snapshotter
    if snap.driver not in {"auto", "overlayfs", "native"}:
        raise ConfigError(f"config key services.snapshotter.driver: {snap.driver!r} is not one "
                          "of auto, overlayfs, native")
    for key in ("events_ack_wait", "events_max_deliver", "event_concurrency", "unpack_workers"):
        if getattr(snap, key) <= 0:
            raise ConfigError(f"config key services.snapshotter.{key}: must be > 0")
    _check_addr(cfg.launcher.metrics_addr, "launcher.metrics_addr")
    _check_addr(cfg.cri.stream_addr, "cri.stream_addr")
    if cfg.cri.stream_idle_timeout <= 0:
        raise bad("cri.stream_idle_timeout", "must be > 0")
    _check_addr(cfg.nats.embedded.listen, "nats.embedded.listen")
    if cfg.log.level.lower() not in {"debug", "info", "warning", "error"}:
        raise bad("log.level", f"{cfg.log.level!r} is not one of debug, info, warning, error")
    if cfg.log.format not in {"auto", "json", "console"}:
        raise bad("log.format", f"{cfg.log.format!r} is not one of auto, json, console")
    if not re.match(r"^[A-Za-z0-9_-]+$", cfg.events.stream):
        raise bad("events.stream", f"{cfg.events.stream!r} is not a valid stream name")


# A registry host as image references name it: a DNS name or IP, optional port, no scheme.
_REGISTRY_HOST_RE = re.compile(
    r"^(localhost|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*"
    r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?$")
_ENDPOINT_RE = re.compile(r"^https?://[^/\s?#]+(/[^\s?#]*)?$")


def _validate_puller(puller: PullerConfig) -> None:
    key = "services.puller"
    if puller.max_concurrent_downloads < 1:
        raise ConfigError(f"config key {key}.max_concurrent_downloads: must be >= 1")
    if puller.max_attempts < 1:
        raise ConfigError(f"config key {key}.max_attempts: must be >= 1")
    if puller.progress_window <= 0 or puller.min_progress_bytes < 0:
        raise ConfigError(f"config key {key}.progress_window: must be > 0")
    if puller.platform and not re.match(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$", puller.platform):
        raise ConfigError(
            f"config key {key}.platform: {puller.platform!r} is not os/arch[/variant]")
    for host, reg in puller.registries.items():
        where = f"{key}.registries.\"{host}\""
        if not _REGISTRY_HOST_RE.match(host):
            hint = (" (name the registry as image references do: host[:port], no scheme or "
                    "path)" if "://" in host or "/" in host else "")
            raise ConfigError(f"config key {where}: {host!r} is not a registry host{hint}")
        for i, mirror in enumerate(reg.mirrors):
            if not _ENDPOINT_RE.match(mirror):
                raise ConfigError(f"config key {where}.mirrors[{i}]: {mirror!r} is not an "
                                  "http:// or https:// URL (e.g. \"https://mirror:5000\")")
        for field in ("ca_file", "client_cert", "client_key"):
            path = getattr(reg, field)
            if path and not os.path.isfile(path):
                raise ConfigError(f"config key {where}.{field}: {path}: no such file")
        if bool(reg.client_cert) != bool(reg.client_key):
            raise ConfigError(f"config key {where}: client_cert and client_key go together")


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{addr!r} is not host:port")
    return host.strip("[]"), int(port)


def _check_addr(addr: str, key: str) -> None:
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
    try:
        cfg = msgspec.convert(tree, Config)
    except msgspec.ValidationError as exc:
        detail = str(exc).split(" - at ")[0]
        if detail.startswith("Object contains unknown field"):
            raise ConfigError(f"config key {_unknown_key(exc)}: unknown key") from None
        raise ConfigError(f"config key {_key_of(exc)}: {detail}") from None
    for svc in SERVICES:
        section = cfg.service(svc.name)
        section.metrics_addr = section.metrics_addr or f"127.0.0.1:{svc.metrics_port}"
    _validate(cfg)
    return cfg


def _unknown_key(error: msgspec.ValidationError) -> str:
    field = re.search(r"unknown field `([^`]*)`", str(error))
    parent = _key_of(error)
    name = field.group(1) if field else "?"
    return f"{parent}.{name}" if parent and parent != "<root>" else name


def to_toml_dict(cfg: Config) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)  # type: ignore[no-any-return]
