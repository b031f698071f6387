"""The six services: process name, bus subject token, entry module, default metrics port."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceInfo:
    name: str  # process / config name: shoal-<name>
    subject: str  # token in shoal.v1.<node>.<subject>.<verb>
    module: str  # python -m <module> runs it
    metrics_port: int

    @property
    def config_key(self) -> str:
        return self.name.replace("-", "_")


SERVICES: tuple[ServiceInfo, ...] = (
    ServiceInfo("puller", "images", "shoal_puller", 9711),
    ServiceInfo("snapshotter", "snapshots", "shoal_snapshotter", 9712),
    ServiceInfo("executor", "tasks", "shoal_executor", 9713),
    ServiceInfo("supervisor", "monitor", "shoal_supervisor", 9714),
    ServiceInfo("cri-gateway", "cri", "shoal_cri_gateway", 9715),
    ServiceInfo("docker-gateway", "docker", "shoal_docker_gateway", 9716),
)
BY_NAME: dict[str, ServiceInfo] = {s.name: s for s in SERVICES}
BY_SUBJECT: dict[str, ServiceInfo] = {s.subject: s for s in SERVICES}


def lookup(name: str) -> ServiceInfo:
    """Find a service by process name or subject token (`puller` or `images`)."""
    found = BY_NAME.get(name) or BY_SUBJECT.get(name) or BY_NAME.get(name.replace("_", "-"))
    if found is None:
        known = ", ".join(s.name for s in SERVICES)
        raise KeyError(f"unknown service {name!r} (known: {known})")
    return found
