"""`_ping`, `version`, `info`: what a client asks first (the CLI negotiates its API version
from `_ping`'s Api-Version header)."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from aiohttp import web
from shoal_common import __version__

from shoal_docker_gateway.api.routes import API_VERSION, MIN_API_VERSION, Routes, json_response
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.system import counts

routes = Routes()

ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(platform.machine(),
                                                                    platform.machine())


def _ping_headers() -> dict[str, str]:
    return {"Api-Version": API_VERSION, "Docker-Experimental": "false", "Ostype": "linux",
            "Builder-Version": "1", "Cache-Control": "no-cache, no-store, must-revalidate",
            "Pragma": "no-cache"}


@routes.get("/_ping")  # HEAD too (aiohttp adds it to every GET route)
async def ping(request: web.Request) -> web.Response:
    return web.Response(text="OK", content_type="text/plain", headers=_ping_headers())


@routes.get("/version")
async def version(request: web.Request) -> web.Response:
    details = {"ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux",
               "Arch": ARCH, "KernelVersion": platform.release(), "GitCommit": "",
               "GoVersion": f"python{platform.python_version()}"}
    return json_response({
        "Platform": {"Name": "Shoal"},
        "Components": [{"Name": "Engine", "Version": __version__, "Details": details}],
        "Version": __version__, **details, "BuildTime": "",
    })


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@routes.get("/info")
async def info(request: web.Request) -> web.Response:
    backend = backend_of(request)
    c = await counts(backend)
    body: dict[str, Any] = {
        "ID": backend.node_id, "Name": socket.gethostname(), "ServerVersion": __version__,
        "Containers": c.containers, "ContainersRunning": c.running, "ContainersPaused": 0,
        "ContainersStopped": c.containers - c.running, "Images": c.images,
        "Driver": "overlayfs", "DriverStatus": [["Backing Filesystem", "shoal snapshotter"]],
        "DockerRootDir": backend.config.state_root,
        "Plugins": {"Volume": ["local"], "Network": ["bridge", "host", "macvlan", "null"],
                    "Authorization": None, "Log": ["json-file"]},
        "MemoryLimit": True, "SwapLimit": False, "KernelMemory": False, "CpuCfsPeriod": True,
        "CpuCfsQuota": True, "CPUShares": True, "CPUSet": True, "PidsLimit": True,
        "IPv4Forwarding": True, "BridgeNfIptables": True, "BridgeNfIp6tables": True,
        "Debug": False, "NFd": len(os.listdir("/proc/self/fd")), "NGoroutines": 0,
        "OomKillDisable": False, "LoggingDriver": "json-file", "CgroupDriver": "cgroupfs",
        "CgroupVersion": "2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "1",
        "KernelVersion": platform.release(), "OperatingSystem": _os_name(), "OSType": "linux",
        "OSVersion": "", "Architecture": platform.machine(), "NCPU": os.cpu_count() or 1,
        "MemTotal": _mem_total(), "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": {"AllowNondistributableArtifactsCIDRs": [],
                           "AllowNondistributableArtifactsHostnames": [],
                           "InsecureRegistryCIDRs": ["127.0.0.0/8"], "IndexConfigs": {},
                           "Mirrors": []},
        "GenericResources": None, "HttpProxy": "", "HttpsProxy": "", "NoProxy": "",
        "Labels": [f"shoal.namespace={backend.namespace}"], "ExperimentalBuild": False,
        "Runtimes": {"runc": {"path": "runc"}}, "DefaultRuntime": "runc",
        "Swarm": {"NodeID": "", "NodeAddr": "", "LocalNodeState": "inactive",
                  "ControlAvailable": False, "Error": "", "RemoteManagers": None},
        "LiveRestoreEnabled": True, "Isolation": "", "InitBinary": "",
        "ContainerdCommit": {"ID": "", "Expected": ""}, "RuncCommit": {"ID": "", "Expected": ""},
        "InitCommit": {"ID": "", "Expected": ""},
        "SecurityOptions": ["name=seccomp,profile=default"],
        "Warnings": [],
    }
    return json_response(body)


def _os_name() -> str:
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"
