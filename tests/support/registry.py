"""Run the real distribution registry (Debian's `docker-registry`) on loopback for tests."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .ports import free_port

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT = 20.0

# Never route loopback requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _opener(tls: bool) -> urllib.request.OpenerDirector:
    """The readiness probe's: a TLS registry is probed without verifying its certificate
    (the probe asks only whether it serves; the tests verify it)."""
    if not tls:
        return _OPENER
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    return urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                       urllib.request.HTTPSHandler(context=unverified))


class RegistryError(RuntimeError):
    """The registry process could not be started or did not become ready."""


def registry_config(
    *,
    storage_dir: Path,
    addr: str,
    log_level: str = "warn",
    auth: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    tls: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the registry configuration as a dict (the shape of config.yml).

    `auth` is the registry's `auth:` section verbatim (e.g. `{"htpasswd": {...}}` or
    `{"token": {...}}`), so auth variants can be added without touching the writer.
    `tls` is `http.tls` (certificate, key, clientcas). `extra` top-level sections are
    merged in last.
    """
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": log_level, "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # Without a cache section the registry keeps no blob descriptor cache, so tests
        # may change storage_dir behind its back. A fixed secret silences a warning.
        "http": {"addr": addr, "secret": "shoal-test-registry"},
    }
    if tls is not None:
        config["http"]["tls"] = dict(tls)
    if auth is not None:
        config["auth"] = dict(auth)
    if extra:
        config.update(extra)
    return config


def write_registry_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write `config` to `path`; JSON is valid YAML, so no YAML emitter is needed."""
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


class Registry:
    """A real OCI distribution registry on 127.0.0.1 with filesystem storage.

    Use as a context manager (`with Registry(tmp_path / "reg") as reg: ...`) or call
    `start()`/`stop()`. Config and the process log live in a private temp dir.
    """

    def __init__(
        self,
        storage_dir: Path | str,
        *,
        port: int | None = None,
        binary: str = REGISTRY_BINARY,
        start_timeout: float = START_TIMEOUT,
        auth: Mapping[str, Any] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        tls: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
    ) -> None:
        """`tls`: (certificate, key) to serve HTTPS with; `client_ca`: then also require a
        client certificate signed by it. Two registries may share one `storage_dir` (say,
        one plain to push to and one TLS to pull from)."""
        self.storage_dir = Path(storage_dir)
        self._tls = tls
        self._client_ca = client_ca
        self.binary = binary
        self.start_timeout = start_timeout
        self._auth = auth
        self._extra_config = extra_config
        self._fixed_port = port
        self.port: int = port or 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._work_dir: Path | None = None

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}"

    @property
    def log_path(self) -> Path | None:
        return self._work_dir / "registry.log" if self._work_dir else None

    def log_text(self) -> str:
        """The registry's combined stdout/stderr so far (for failure messages)."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_text(errors="replace")

    def start(self) -> Self:
        if self._proc is not None:
            raise RegistryError("registry already started")
        if shutil.which(self.binary) is None:
            raise RegistryError(f"registry binary not found: {self.binary}")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._work_dir = Path(tempfile.mkdtemp(prefix="shoal-registry-"))
        # A port picked by free_port() can be taken before the registry binds it; retry
        # with a new one in that case (only when the caller did not fix the port).
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port()
            try:
                self._spawn_and_wait()
                return self
            except RegistryError:
                in_use = "address already in use" in self.log_text()
                self._kill()
                if not in_use or attempt == attempts - 1:
                    self._cleanup_work_dir()
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        assert self._work_dir is not None
        tls: dict[str, Any] | None = None
        if self._tls is not None:
            tls = {"certificate": str(self._tls[0]), "key": str(self._tls[1])}
            if self._client_ca is not None:
                tls["clientcas"] = [str(self._client_ca)]
        config = registry_config(
            storage_dir=self.storage_dir.resolve(),
            addr=self.host,
            auth=self._auth,
            extra=self._extra_config,
            tls=tls,
        )
        config_path = write_registry_config(self._work_dir / "config.yml", config)
        with open(self._work_dir / "registry.log", "wb") as log:
            self._proc = subprocess.Popen(
                [self.binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout
        last_error = "no attempt made"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise RegistryError(
                    f"registry exited with code {code} before becoming ready\n"
                    f"--- registry output ---\n{self.log_text()}"
                )
            try:
                with _opener(self._tls is not None).open(f"{self.url}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"GET /v2/ -> {resp.status}"
            except urllib.error.HTTPError as exc:
                # With auth configured /v2/ answers 401, which still means "serving".
                if self._auth is not None and exc.code == 401:
                    return
                last_error = f"GET /v2/ -> {exc.code}"
            except OSError as exc:
                # Without a client certificate, a registry that requires one refuses the
                # handshake (or, in TLS 1.3, the first read): that already says it serves.
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                if self._client_ca is not None and isinstance(reason, ssl.SSLError):
                    return
                last_error = repr(exc)
            time.sleep(0.05)
        raise RegistryError(
            f"registry on {self.host} not ready after {self.start_timeout}s "
            f"(last: {last_error})\n--- registry output ---\n{self.log_text()}"
        )

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _cleanup_work_dir(self) -> None:
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def stop(self) -> None:
        """Stop the process and remove config/log; storage_dir is left in place."""
        self._kill()
        self._cleanup_work_dir()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
