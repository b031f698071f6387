"""Pod networking with the real CNI plugins (Debian's containernetworking-plugins).

The CNI protocol is small — run a plugin binary with CNI_* environment variables and the
network config on stdin, read a JSON result — so it is spoken here directly; there is no
maintained Python CNI library. A conflist's plugins are chained as the spec says: ADD runs
them in order, each given the previous result; DEL runs them in reverse.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from shoal_common.errors import FailedPrecondition, Internal

log = structlog.get_logger("shoal.executor.cni")

DEFAULT_CONFLIST_NAME = "10-shoal.conflist"
NETWORKS_DIR = "shoal-networks"  # in the conf dir
PLUGIN_TIMEOUT = 60.0


# `"shoal": {"masquerade": true}`, a top-level conflist key of Shoal's own (libcni ignores
# unknown top-level keys, and Cni._invoke hands each plugin only its own dict): the executor
# masquerades the bridge's subnets with one rule set per network (domain/masquerade.py)
# instead of the bridge plugin's `ipMasq`, which makes and deletes a nat chain on every
# pod's ADD and DEL.
SHOAL_KEY = "shoal"


def default_conflist(subnet: str, bridge: str = "shoal0") -> dict[str, Any]:
    """bridge + host-local IPAM, portmap for hostPort mappings (what kubelet expects)."""
    return {
        "cniVersion": "1.0.0",
        "name": "shoal",
        SHOAL_KEY: {"masquerade": True},
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


@dataclass
class NetworkConfig:
    name: str
    version: str
    plugins: list[dict[str, Any]]
    source: str  # the file it came from
    masquerade: bool = False  # the executor NATs its bridge subnets (SHOAL_KEY)


@dataclass
class AttachResult:
    ip: str = ""
    ips: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def parse_network(path: Path) -> NetworkConfig:
    """One config file; ValueError says what is wrong with it."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path.name}: not a JSON object")
    if "plugins" in doc:
        plugins = doc["plugins"]
    elif "type" in doc:  # a single-plugin .conf
        plugins = [doc]
    else:
        raise ValueError(f"{path.name}: neither a conflist nor a plugin config")
    if not doc.get("name") or not plugins or not isinstance(plugins, list) or not all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in plugins):
        raise ValueError(f"{path.name}: no name, or no plugins each with a type")
    return NetworkConfig(doc["name"], doc.get("cniVersion", "0.4.0"), plugins, str(path),
                         masquerade=_masquerade(doc.get(SHOAL_KEY)))


def _masquerade(own: object) -> bool:
    """Shoal's key read defensively: anything but {"masquerade": true} is False (an
    operator's file is used as it is, never refused for this)."""
    return isinstance(own, dict) and own.get("masquerade") is True


def load_network(conf_dir: Path) -> NetworkConfig:
    """The first usable config in the directory (lexical order, as kubelet's CNI does)."""
    problems = []
    files = sorted(p for p in conf_dir.glob("*") if p.suffix in (".conflist", ".conf", ".json")
                   and p.is_file())
    for path in files:
        try:
            return parse_network(path)
        except ValueError as exc:
            problems.append(str(exc))
    detail = "; ".join(problems) if problems else "no config files"
    raise FailedPrecondition(f"no usable CNI network config in {conf_dir} ({detail})")


DEFAULT_ROUTES = ("0.0.0.0/0", "::/0")


def idle(plugin: dict[str, Any], runtime_config: dict[str, Any]) -> bool:
    """A plugin that would do nothing for this pod, so it is not run (one Go process fewer
    per ADD and DEL, ~3 ms each here): portmap with no port mappings to make. Its ADD then
    passes the previous result on unchanged and its DEL has nothing to remove (checked with
    containernetworking-plugins 1.1.1: no iptables call either way). ADD and DEL are given
    the same runtime config (the pod's record), so both skip it or neither does. Mappings
    written into the conflist itself count as mappings."""
    own = plugin.get("runtimeConfig")
    return (plugin.get("type") == "portmap" and not runtime_config.get("portMappings")
            and not (isinstance(own, dict) and own.get("portMappings")))


def without_default_route(net: NetworkConfig) -> NetworkConfig:
    plugins = []
    for plugin in net.plugins:
        plugin = dict(plugin)
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and isinstance(ipam.get("routes"), list):
            plugin["ipam"] = {**ipam, "routes": [
                r for r in ipam["routes"]
                if not (isinstance(r, dict) and r.get("dst") in DEFAULT_ROUTES)]}
        if plugin.get("isDefaultGateway"):
            plugin["isDefaultGateway"] = False
        plugins.append(plugin)
    return NetworkConfig(net.name, net.version, plugins, net.source, net.masquerade)


class Cni:
    def __init__(self, conf_dir: Path, bin_dirs: list[str]) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = bin_dirs
        # `shoal network create`'s networks: a directory of their own, so that none of them
        # is ever taken for the default network (the first file of conf_dir itself).
        self.networks_dir = conf_dir / NETWORKS_DIR

    def network_file(self, name: str) -> Path:
        return self.networks_dir / f"{name}.conflist"

    def network(self, name: str = "") -> NetworkConfig:
        """The default network, or the one `shoal network create` made as `name`."""
        if not name:
            return load_network(self.conf_dir)
        try:
            return parse_network(self.network_file(name))
        except ValueError as exc:
            raise FailedPrecondition(f"CNI config of network {name!r} in "
                                     f"{self.networks_dir} is not usable ({exc})") from None

    def _binary(self, plugin_type: str) -> str:
        for directory in self.bin_dirs:
            path = os.path.join(directory, plugin_type)
            if os.access(path, os.X_OK):
                return path
        raise FailedPrecondition(f"CNI plugin {plugin_type!r} not found in "
                                 f"{':'.join(self.bin_dirs)}")

    async def _invoke(self, command: str, net: NetworkConfig, plugin: dict[str, Any],
                      container_id: str, netns: str, ifname: str,
                      prev: dict[str, Any] | None,
                      runtime_config: dict[str, Any]) -> dict[str, Any]:
        conf = dict(plugin)
        conf["name"] = net.name
        conf["cniVersion"] = net.version
        if prev is not None:
            conf["prevResult"] = prev
        wanted = plugin.get("capabilities") or {}
        rc = {k: v for k, v in runtime_config.items() if wanted.get(k)}
        if rc:
            conf["runtimeConfig"] = rc
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
            "CNI_IFNAME": ifname, "CNI_PATH": ":".join(self.bin_dirs),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        binary = self._binary(plugin["type"])
        proc = await asyncio.create_subprocess_exec(
            binary, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env)
        try:
            async with asyncio.timeout(PLUGIN_TIMEOUT):
                out, err = await proc.communicate(json.dumps(conf).encode())
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Internal(f"CNI plugin {plugin['type']} {command} timed out") from None
        if proc.returncode != 0:
            try:
                detail = json.loads(out)
                message = f"{detail.get('msg', '')} {detail.get('details', '')}".strip()
            except ValueError:
                message = (out or err).decode(errors="replace").strip()
            raise Internal(f"CNI plugin {plugin['type']} {command} failed: {message}")
        if not out.strip():
            return prev or {}
        try:
            return json.loads(out)
        except ValueError:
            raise Internal(f"CNI plugin {plugin['type']} returned invalid JSON") from None

    async def add(self, container_id: str, netns: str, *, ifname: str = "eth0",
                  runtime_config: dict[str, Any] | None = None,
                  network: str = "", default_route: bool = True) -> AttachResult:
        """`default_route` False: the network's IPAM routes to 0.0.0.0/0 and ::/0 left out
        (a pod's second network: its first has the default route, and a second one to the
        same destination would fail the plugin)."""
        net = self.network(network)
        if not default_route:
            net = without_default_route(net)
        result: dict[str, Any] | None = None
        done: list[dict[str, Any]] = []
        rc = runtime_config or {}
        try:
            for plugin in net.plugins:
                if idle(plugin, rc):
                    continue
                result = await self._invoke("ADD", net, plugin, container_id, netns, ifname,
                                            result, rc)
                done.append(plugin)
        except Exception:
            # Undo what was attached so far; a half-plumbed pod leaks IPs and iptables rules.
            await self._delete(net, done, container_id, netns, ifname, rc)
            raise
        ips = [ip["address"].split("/")[0] for ip in (result or {}).get("ips", [])]
        return AttachResult(ip=ips[0] if ips else "", ips=ips, raw=result or {})

    async def delete(self, container_id: str, netns: str, *, ifname: str = "eth0",
                     runtime_config: dict[str, Any] | None = None,
                     network: str = "") -> None:
        net = self.network(network)
        await self._delete(net, net.plugins, container_id, netns, ifname, runtime_config or {})

    async def _delete(self, net: NetworkConfig, plugins: list[dict[str, Any]],
                      container_id: str, netns: str, ifname: str,
                      runtime_config: dict[str, Any]) -> None:
        errors = []
        for plugin in reversed(plugins):
            if idle(plugin, runtime_config):
                continue
            try:
                await self._invoke("DEL", net, plugin, container_id, netns, ifname, None,
                                   runtime_config)
            except Internal as exc:
                errors.append(exc.message)
        if errors:
            raise Internal("; ".join(errors))
