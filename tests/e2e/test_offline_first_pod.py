"""The first pod of a fresh node with the built-in pause image: no pause image in any
registry, and not one registry request until the container's own image is pulled."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from prometheus_client.parser import text_string_to_metric_families
from shoal_puller.domain.builtin import BUILTIN_PAUSE, PAUSE_USER
from support.images import busybox_image, push
from support.processes import ServiceProcess, ServiceSet
from support.registry import Registry
from support.shoal import Cri, exited, pod_config, remove_all_pods, start_main, start_shoal

pytestmark = pytest.mark.e2e


def registry_requests(sp: ServiceProcess) -> float:
    text = urllib.request.urlopen(f"http://{sp.metrics_addr}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "shoal_puller_registry_requests_total")


def pause_uid(netns_path: str) -> int:
    """The uid of the pod's pause process: the catatonit in the pod's network namespace."""
    netns = os.stat(netns_path).st_ino
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() != b"/catatonit\0-P\0":
                continue
            if os.stat(f"/proc/{pid}/ns/net").st_ino != netns:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone meanwhile
        return int(next(line for line in status.splitlines()
                        if line.startswith("Uid:")).split()[1])
    raise AssertionError(f"no pause process in {netns_path}")


@pytest.fixture
async def offline(services: ServiceSet, registry: Registry
                  ) -> AsyncIterator[tuple[Cri, dict[str, ServiceProcess], str]]:
    busybox = f"{registry.host}/offline/busybox:1"
    push(registry.url, "offline/busybox", "1", busybox_image())  # the only image pushed
    procs = await start_shoal(services, {"pause": BUILTIN_PAUSE, "busybox": busybox})
    async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as channel:
        api = Cri(channel)
        yield api, procs, busybox
        await remove_all_pods(api)


async def test_first_pod_runs_with_the_builtin_pause_image(
        offline: tuple[Cri, dict[str, ServiceProcess], str], tmp_path: Path) -> None:
    api, procs, busybox = offline
    config = pod_config(tmp_path, "offline")
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    status = await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id, verbose=True))
    assert status.status.state == cri.SANDBOX_READY
    assert registry_requests(procs["puller"]) == 0  # the sandbox needed no registry
    assert pause_uid(json.loads(status.info["info"])["netnsPath"]) == int(
        PAUSE_USER.split(":")[0])
    listed = await api.images.ListImages(cri.ListImagesRequest(
        filter=cri.ImageFilter(image=cri.ImageSpec(image=BUILTIN_PAUSE))))
    assert [list(i.repo_tags) for i in listed.images] == [[BUILTIN_PAUSE]]

    await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox)))
    ctr = await exited(api, await start_main(
        api, pod_id, config, busybox, ["sh", "-c", "echo hello from the first pod"]), 20)
    assert (ctr.state, ctr.exit_code) == (cri.CONTAINER_EXITED, 0)
    lines = (Path(config.log_directory) / "main.log").read_text().splitlines()
    assert any(line.endswith(" stdout F hello from the first pod") for line in lines), lines
