"""Where a registry's requests go: its configured mirrors in order, then the registry itself.

A mirror that refuses connections is skipped for a while; any other failure of a mirror
passes the request on to the next endpoint, and the last endpoint's error, naming what the
others said, is the one raised.

Which endpoints: a registry's own directory under config_path (containerd's hosts.toml,
hosts_dir.py) decides them; else its `registries."host"` entry when that sets mirrors,
plain_http or TLS; else config_path's `_default`; else the registry alone. Each endpoint
has capabilities (pull, resolve, push): a tag is resolved only by endpoints that may pull
and resolve, blobs and digests come from those that may pull, as in containerd.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

import structlog
import yarl
from shoal_common.errors import FailedPrecondition, NotFound, ShoalError, Unavailable

from shoal_puller.config import RegistryHostConfig
from shoal_puller.registry.hosts_dir import ALL_CAPABILITIES, HostDir, HostsError
from shoal_puller.registry.hosts_tree import HostsDir
from shoal_puller.registry.reference import DOCKER_HUB, Reference
from shoal_puller.registry.tls import has_tls_settings, ssl_context
from shoal_puller.reserved import BUILTIN_HOST, is_builtin_host

log = structlog.get_logger("shoal.puller.registry")

DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"
# What a request needs of an endpoint: a tag is resolved, a digest or blob pulled.
PULL = frozenset({"pull"})
RESOLVE = frozenset({"pull", "resolve"})
PUSH = frozenset({"push"})
# Shoal's own `mirrors` serve tags and blobs, never pushes.
_MIRROR_CAPABILITIES = RESOLVE

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    name: str  # as configured / derived, e.g. "https://mirror:5000/prefix"
    base: yarl.URL  # the API root: name + "/v2"
    host: str  # host[:port], for credentials, logs and metrics
    mirror: bool  # not the registry itself: its own credentials, skipped while refusing
    tls: ssl.SSLContext | bool  # for aiohttp's ssl=: a context, or True (system trust)
    capabilities: frozenset[str] = ALL_CAPABILITIES
    final: bool = False  # the last one tried: its error is the request's
    namespace: str = ""  # sent as ?ns= (containerd does so for hosts.toml's mirrors)
    headers: tuple[tuple[str, str], ...] = ()  # hosts.toml's header
    connect_timeout: float | None = None  # hosts.toml's dial_timeout

    def url(self, ref: Reference, kind: str, obj: str) -> yarl.URL:
        # Repository paths, tags and digests are validated, so nothing needs escaping.
        url = yarl.URL(f"{self.base}/{ref.path}/{kind}/{obj}", encoded=True)
        return url.with_query(ns=self.namespace) if self.namespace else url

    def __str__(self) -> str:
        return self.name


class Unreachable(Unavailable):
    """A mirror refused the connection: skip it for a while instead of retrying it."""


class Endpoints:
    """The registries' settings, their TLS contexts, and which mirrors are down."""

    def __init__(self, registries: Mapping[str, RegistryHostConfig] | None,
                 mirror_down_for: float, hosts: HostsDir | None = None) -> None:
        self._registries = dict(registries or {})
        self._hosts = hosts
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

    def all(self, domain: str, need: frozenset[str] = PULL) -> list[Endpoint]:
        """Every endpoint of registry `domain` with the capabilities `need`, in the order
        they are tried; the last is marked final."""
        if is_builtin_host(domain):
            # Every request goes through here: the reserved host never reaches the network.
            raise NotFound(f"{BUILTIN_HOST} is Shoal's built-in image host: it is never "
                           "fetched from a registry")
        hd = self._host_dir(domain)
        every = _from_host_dir(domain, hd) if hd is not None else self._configured(domain)
        out = [ep for ep in every if need <= ep.capabilities]
        if not out:
            where = f" (as {hd.source} says)" if hd is not None else ""
            raise FailedPrecondition(f"registry {domain}: no endpoint may "
                                     f"{' and '.join(sorted(need))}{where}")
        out[-1] = replace(out[-1], final=True)
        return out

    def _host_dir(self, domain: str) -> HostDir | None:
        """The config_path directory that decides `domain`'s endpoints, if one does."""
        if self._hosts is None:
            return None
        try:
            hd = self._hosts.for_domain(domain)
        except HostsError as exc:
            raise FailedPrecondition(f"registry {domain}: its host configuration is "
                                     f"refused: {exc}") from None
        if hd is not None and hd.is_default and _sets_endpoints(self.config(domain)):
            return None  # its own registries entry is more specific than _default
        return hd

    def _configured(self, domain: str) -> list[Endpoint]:
        """From Shoal's own `registries` settings (or none)."""
        cfg = self.config(domain)
        tls = self._ssl_for(domain, cfg)
        out: list[Endpoint] = []
        for mirror in cfg.mirrors:
            url = yarl.URL(mirror.rstrip("/"))
            path = url.path.rstrip("/")
            base = url.with_path(path if path.endswith("/v2") else f"{path}/v2")
            out.append(Endpoint(str(url), base, _url_host(url), True, tls,
                                _MIRROR_CAPABILITIES))
        # Loopback registries are plain HTTP unless configured with TLS (as docker treats
        # localhost as insecure); anything else is HTTPS unless plain_http (not the Hub).
        plain = cfg.plain_http or (_is_loopback(domain) and not has_tls_settings(cfg))
        upstream = _upstream(domain, plain)
        out.append(Endpoint(str(upstream), upstream.with_path("/v2"), domain, False, tls))
        return out

    def live(self, domain: str, need: frozenset[str] = PULL) -> list[Endpoint]:
        """The endpoints to try now: those with `need`, but mirrors marked down; the final
        one (usually the registry itself) is always tried."""
        now = time.monotonic()
        return [ep for ep in self.all(domain, need)
                if ep.final or not ep.mirror or self._down_until.get(ep.name, 0.0) <= now]

    def failed(self, ep: Endpoint, exc: ShoalError, failures: list[str]) -> None:
        """`ep` failed with `exc`. The final endpoint is the last resort: raise its error,
        naming the others' `failures`. Another's is noted in `failures` for the next try."""
        if ep.final:
            raise _with_failures(exc, failures) from None
        if isinstance(exc, Unreachable):
            self._down_until[ep.name] = time.monotonic() + self._mirror_down_for
        log.warning("registry mirror failed; trying the next endpoint", endpoint=ep.name,
                    error=exc.message)
        failures.append(f"{ep}: {exc.message.removeprefix(f'{ep.name}: ')}")

    async def first_success(self, domain: str, attempt: Callable[[Endpoint], Awaitable[T]],
                            need: frozenset[str] = PULL) -> T:
        """Run `attempt` on each live endpoint in turn until one succeeds."""
        failures: list[str] = []
        for ep in self.live(domain, need):
            try:
                return await attempt(ep)
            except ShoalError as exc:
                self.failed(ep, exc, failures)
        raise AssertionError("the final endpoint is always last")


def _sets_endpoints(cfg: RegistryHostConfig) -> bool:
    return bool(cfg.mirrors or cfg.plain_http or has_tls_settings(cfg))


def _upstream(domain: str, plain: bool) -> yarl.URL:
    if domain == DOCKER_HUB:
        return yarl.URL(DOCKER_HUB_ENDPOINT)
    return yarl.URL(f"{'http' if plain else 'https'}://{domain}")


def _from_host_dir(domain: str, hd: HostDir) -> list[Endpoint]:
    """containerd's reading of a host directory: its hosts in order, then the server (by
    default the registry itself, chosen as without the directory: Docker Hub's endpoint,
    http for loopback without TLS settings). An http:// endpoint with TLS settings is tried
    over https first, as containerd does (port 80 excepted)."""
    out: list[Endpoint] = []
    for entry in hd.entries:
        url = entry.url
        if url is None:
            url = _upstream(domain, _is_loopback(domain) and not entry.explicit_tls)
            url = url.with_path("/v2")
        urls = [url]
        if url.scheme == "http" and entry.explicit_tls and url.explicit_port != 80:
            urls.insert(0, url.with_scheme("https"))
        for u in urls:
            host = _url_host(u)
            # As containerd's isProxy: a host other than the registry gets ?ns=<registry>.
            proxy = host != domain and not (domain == DOCKER_HUB and
                                            host == "registry-1.docker.io")
            name = str(u.with_path(u.path.removesuffix("/v2"))).rstrip("/")
            out.append(Endpoint(name, u, host, proxy, entry.tls or True, entry.capabilities,
                                namespace=domain if proxy else "", headers=entry.headers,
                                connect_timeout=entry.dial_timeout))
    return out


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
