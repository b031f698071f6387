"""Where a registry's requests go: its configured mirrors in order, then the registry itself.

A mirror that refuses connections is skipped for a while; any other failure of a mirror
passes the request on to the next endpoint, and the upstream's error, naming what the
mirrors said, is the one raised.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import structlog
import yarl
from shoal_common.errors import NotFound, ShoalError, Unavailable

from shoal_puller.config import RegistryHostConfig
from shoal_puller.registry.reference import DOCKER_HUB, Reference
from shoal_puller.registry.tls import has_tls_settings, ssl_context
from shoal_puller.reserved import BUILTIN_HOST, is_builtin_host

log = structlog.get_logger("shoal.puller.registry")

DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    name: str  # as configured / derived, e.g. "https://mirror:5000/prefix"
    base: yarl.URL  # the API root: name + "/v2"
    host: str  # host[:port], for credentials, logs and metrics
    mirror: bool
    tls: ssl.SSLContext | bool  # for aiohttp's ssl=: a context, or True (system trust)

    def url(self, ref: Reference, kind: str, obj: str) -> yarl.URL:
        # Repository paths, tags and digests are validated, so nothing needs escaping.
        return yarl.URL(f"{self.base}/{ref.path}/{kind}/{obj}", encoded=True)

    def __str__(self) -> str:
        return self.name


class Unreachable(Unavailable):
    """A mirror refused the connection: skip it for a while instead of retrying it."""


class Endpoints:
    """The registries' settings, their TLS contexts, and which mirrors are down."""

    def __init__(self, registries: Mapping[str, RegistryHostConfig] | None,
                 mirror_down_for: float) -> None:
        self._registries = dict(registries or {})
        self._mirror_down_for = mirror_down_for
        self._ssl: dict[str, ssl.SSLContext | None] = {}
        self._down_until: dict[str, float] = {}

    def config(self, domain: str) -> RegistryHostConfig:
        """The settings of registry `domain` (Docker Hub's under any of its names)."""
        cfg = self._registries.get(domain)
        if cfg is None and domain == DOCKER_HUB:
            cfg = (self._registries.get("registry-1.docker.io")
                   or self._registries.get("index.docker.io"))
        return cfg or RegistryHostConfig()

    def host_config(self, host: str) -> RegistryHostConfig | None:
        """The entry configured for exactly `host`, if any (a mirror's own credentials)."""
        return self._registries.get(host)

    def _ssl_for(self, domain: str, cfg: RegistryHostConfig) -> ssl.SSLContext | bool:
        if domain not in self._ssl:
            self._ssl[domain] = ssl_context(domain, cfg)
        return self._ssl[domain] or True

    def all(self, domain: str) -> list[Endpoint]:
        """Every endpoint of registry `domain`, in the order they are tried."""
        if is_builtin_host(domain):
            # Every request goes through here: the reserved host never reaches the network.
            raise NotFound(f"{BUILTIN_HOST} is Shoal's built-in image host: it is never "
                           "fetched from a registry")
        cfg = self.config(domain)
        tls = self._ssl_for(domain, cfg)
        out: list[Endpoint] = []
        for mirror in cfg.mirrors:
            url = yarl.URL(mirror.rstrip("/"))
            path = url.path.rstrip("/")
            base = url.with_path(path if path.endswith("/v2") else f"{path}/v2")
            out.append(Endpoint(str(url), base, _url_host(url), True, tls))
        if domain == DOCKER_HUB:
            upstream = yarl.URL(DOCKER_HUB_ENDPOINT)
        else:
            # Loopback registries are plain HTTP unless configured with TLS (as docker
            # treats localhost as insecure); anything else is HTTPS unless plain_http.
            plain = cfg.plain_http or (_is_loopback(domain) and not has_tls_settings(cfg))
            upstream = yarl.URL(f"{'http' if plain else 'https'}://{domain}")
        out.append(Endpoint(str(upstream), upstream.with_path("/v2"), domain, False, tls))
        return out

    def live(self, domain: str) -> list[Endpoint]:
        """The endpoints to try now: the mirrors not marked down, then the upstream (always
        last, and the only one that is not a mirror)."""
        now = time.monotonic()
        return [ep for ep in self.all(domain)
                if not ep.mirror or self._down_until.get(ep.name, 0.0) <= now]

    def failed(self, ep: Endpoint, exc: ShoalError, failures: list[str]) -> None:
        """`ep` failed with `exc`. The upstream is the last resort: raise its error, naming
        the mirrors' `failures`. A mirror's is noted in `failures` for the next try."""
        if not ep.mirror:
            raise _with_failures(exc, failures) from None
        if isinstance(exc, Unreachable):
            self._down_until[ep.name] = time.monotonic() + self._mirror_down_for
        log.warning("registry mirror failed; trying the next endpoint", endpoint=ep.name,
                    error=exc.message)
        failures.append(f"{ep}: {exc.message.removeprefix(f'{ep.name}: ')}")

    async def first_success(self, domain: str, attempt: Callable[[Endpoint], Awaitable[T]]) -> T:
        """Run `attempt` on each live endpoint in turn until one succeeds."""
        failures: list[str] = []
        for ep in self.live(domain):
            try:
                return await attempt(ep)
            except ShoalError as exc:
                self.failed(ep, exc, failures)
        raise AssertionError("the upstream endpoint is always last")


def _with_failures(exc: ShoalError, failures: list[str]) -> ShoalError:
    if not failures:
        return exc
    return type(exc)(f"{exc.message} (mirrors tried first: {'; '.join(failures)})",
                     details=exc.details)


def _is_loopback(domain: str) -> bool:
    host = domain[1:].split("]", 1)[0] if domain.startswith("[") else domain.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(url: yarl.URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{url.explicit_port}" if url.explicit_port else host
