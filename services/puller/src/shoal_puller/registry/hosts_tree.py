"""The tree under `services.puller.config_path`: which host directory configures a
registry (containerd's order), every directory checked at start, and each read again when
its files change, as containerd reads the tree on every pull."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from shoal_puller.registry.hosts_dir import (
    DEFAULT_DIR,
    HostDir,
    HostsError,
    parse_host_dir,
    with_tls,
)
from shoal_puller.reserved import BUILTIN_HOST

log = structlog.get_logger("shoal.puller.registry")

_PORT_DIR_RE = re.compile(r"^(.+)_([0-9]{1,5})_$")


def dir_names(domain: str) -> list[str]:
    """The directories that may configure registry `domain`, in containerd's order."""
    host, sep, port = domain.rpartition(":")
    names = [f"{host}_{port}_"] if sep and port.isdigit() and host else []
    return [*names, domain, DEFAULT_DIR]


def _is_builtin_dir(name: str) -> bool:
    match = _PORT_DIR_RE.match(name)
    host = match.group(1) if match else name.rsplit(":", 1)[0]
    return host == BUILTIN_HOST


def host_dirs(root: Path) -> list[Path]:
    """Every host directory under `root` (files beside them are ignored, as containerd
    does); refuses a missing root and a directory for Shoal's built-in host."""
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise HostsError(root, "", f"cannot list it: {exc.strerror or exc}") from None
    dirs = [root / name for name in names if (root / name).is_dir()]
    for d in dirs:
        if _is_builtin_dir(d.name):
            raise HostsError(d, "", f"{BUILTIN_HOST} is Shoal's built-in image host, never "
                             "fetched from a registry")
    return dirs


@dataclass
class _Loaded:
    signature: tuple[Any, ...]
    result: HostDir | HostsError
    files: tuple[str, ...]
    checked: float

    def value(self) -> HostDir:
        if isinstance(self.result, HostsError):
            raise self.result
        return self.result


class HostsDir:
    """The tree under config_path, read again when it changes (containerd reads it on every
    pull): each directory is looked at no more than once per `recheck` seconds."""

    def __init__(self, root: Path | str, recheck: float = 1.0) -> None:
        self.root = Path(root)
        self._recheck = recheck
        self._found: dict[str, tuple[float, Path | None]] = {}  # domain: (when, its dir)
        self._dirs: dict[Path, _Loaded] = {}

    def load_all(self) -> None:
        """At start: every directory parsed and its TLS made; raises the first HostsError."""
        now = time.monotonic()
        for d in host_dirs(self.root):
            signature = _signature(d, ())
            hd = with_tls(parse_host_dir(d))
            if hd.files:
                signature = _signature(d, hd.files)
            self._dirs[d] = _Loaded(signature, hd, hd.files, now)

    def for_domain(self, domain: str) -> HostDir | None:
        """The host directory that configures registry `domain`, if any. Raises HostsError
        when that directory is malformed now."""
        now = time.monotonic()
        found = self._found.get(domain)
        if found is None or now - found[0] >= self._recheck:
            found = (now, next((self.root / n for n in dir_names(domain)
                                if (self.root / n).is_dir()), None))
            self._found[domain] = found
        return None if found[1] is None else self._load(found[1], now)

    def _load(self, directory: Path, now: float) -> HostDir:
        loaded = self._dirs.get(directory)
        if loaded is not None and now - loaded.checked < self._recheck:
            return loaded.value()
        files = loaded.files if loaded is not None else ()
        signature = _signature(directory, files)
        if loaded is not None and loaded.signature == signature:
            loaded.checked = now
            return loaded.value()
        result: HostDir | HostsError
        try:
            result = with_tls(parse_host_dir(directory))
        except HostsError as exc:
            result = exc
            log.error("registry host configuration refused; pulls it covers fail until it "
                      "is fixed", error=str(exc))
        else:
            if loaded is not None:
                log.info("registry host configuration reloaded", directory=str(directory))
            if result.files != files:
                files = result.files
                signature = _signature(directory, files)
        self._dirs[directory] = _Loaded(signature, result, files, now)
        return self._dirs[directory].value()


def _stat(path: str) -> tuple[int, ...]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1,)
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns


def _signature(directory: Path, files: Iterable[str]) -> tuple[Any, ...]:
    """What changes when the directory's files or the files it names outside it change."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        names = []
    inside = tuple((n, *_stat(str(directory / n))) for n in names)
    outside = tuple((f, *_stat(f)) for f in sorted(files)
                    if os.path.dirname(f) != str(directory))
    return (inside, outside)
