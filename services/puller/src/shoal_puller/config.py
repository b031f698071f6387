"""The puller's settings: `[services.puller]` (registered in pyproject.toml under the
entry-point group `shoal.config`)."""

from __future__ import annotations

import os
import re

import msgspec
from shoal_common.config import ConfigError, ServiceConfig

from shoal_puller.reserved import BUILTIN_HOST, is_builtin_host


class RegistryHostConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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


# A registry host as image references name it: a DNS name or IP, optional port, no scheme.
_REGISTRY_HOST_RE = re.compile(
    r"^(localhost|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*"
    r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?$")
_ENDPOINT_RE = re.compile(r"^https?://[^/\s?#]+(/[^\s?#]*)?$")


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
    # Pushes: blobs of one image uploaded at once, and the PATCH chunk size (a blob up to
    # it goes in one PUT; a broken upload resumes from the last chunk the registry kept).
    max_concurrent_uploads: int = 4
    push_chunk_size: int = 16 << 20
    registries: dict[str, RegistryHostConfig] = {}
    # containerd's registry host directory (e.g. "/etc/containerd/certs.d"): per registry a
    # <host>/hosts.toml (registry/hosts_dir.py); empty = none. It decides a registry's
    # endpoints and TLS over `registries` (whose credentials still apply).
    config_path: str = ""

    def check(self, key: str) -> None:
        super().check(key)
        if self.max_concurrent_downloads < 1:
            raise ConfigError(f"config key {key}.max_concurrent_downloads: must be >= 1")
        if self.max_attempts < 1:
            raise ConfigError(f"config key {key}.max_attempts: must be >= 1")
        if self.max_concurrent_uploads < 1:
            raise ConfigError(f"config key {key}.max_concurrent_uploads: must be >= 1")
        if not 1024 <= self.push_chunk_size <= 1 << 30:
            raise ConfigError(f"config key {key}.push_chunk_size: must be 1024..{1 << 30}")
        if self.progress_window <= 0 or self.min_progress_bytes < 0:
            raise ConfigError(f"config key {key}.progress_window: must be > 0")
        if self.platform and not re.match(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$",
                                          self.platform):
            raise ConfigError(
                f"config key {key}.platform: {self.platform!r} is not os/arch[/variant]")
        for host, reg in self.registries.items():
            _check_registry(f"{key}.registries.\"{host}\"", host, reg)
        if self.config_path:
            _check_hosts_dir(f"{key}.config_path", self.config_path)


def _check_hosts_dir(where: str, path: str) -> None:
    # Its files are read by the puller (at start, and again when they change), not here:
    # every Shoal process and CLI command checks this config, and a hosts.toml being
    # edited must not stop `shoal ps` or a restarting executor.
    if not os.path.isabs(path):
        raise ConfigError(f"config key {where}: {path!r} must be an absolute path")
    if not os.path.isdir(path):
        raise ConfigError(f"config key {where}: {path}: no such directory")


def _check_registry(where: str, host: str, reg: RegistryHostConfig) -> None:
    if not _REGISTRY_HOST_RE.match(host):
        hint = (" (name the registry as image references do: host[:port], no scheme or "
                "path)" if "://" in host or "/" in host else "")
        raise ConfigError(f"config key {where}: {host!r} is not a registry host{hint}")
    if is_builtin_host(host):
        raise ConfigError(f"config key {where}: {BUILTIN_HOST} is Shoal's built-in image "
                          "host, never fetched from a registry")
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
