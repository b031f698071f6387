"""A hostile peer on the bus (it holds the gateway's credentials, say; the tests' NATS has no
auth) sends every tasks verb hostile bodies: garbage MessagePack, wrong types, traversal
ids, rootfs mounts of host directories, 1 MB strings, huge numbers, broken CRI and image
configs. Each is answered, never `internal`; nothing outside Shoal's roots changes, nothing
leaks, a real pod beside them keeps running and the executor never restarts."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from cri_api.v1 import api_pb2 as cri
from shoal_common import subjects
from shoal_common.clients import TasksClient
from support.hostile import GARBAGE, HUGE_NUMBERS, WRONG_TYPES, ask, snapshot_of
from support.shoal import RunningShoal, host_names, leftovers, pod_config, shared_node

pytestmark = pytest.mark.e2e

TRAVERSAL = ["..", ".", "../../../../etc", "/etc/passwd", "a/../../b", "ok\n", "x" * 129,
             "-rf", "", "\x00", "a b"]


def pod_bytes(**kw: Any) -> bytes:
    return cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(
        name="hostile", uid=uuid.uuid4().hex, namespace="default"), **kw).SerializeToString()


def container_bytes(**kw: Any) -> bytes:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name="hostile"),
                               command=["sleep", "60"], **kw).SerializeToString()


def bind(source: str, *options: str) -> dict[str, Any]:
    return {"type": "bind", "source": source, "options": list(options or ["rbind", "rw"])}


def overlay(*options: str) -> dict[str, Any]:
    return {"type": "overlay", "source": "overlay", "options": list(options)}


class Hostile:
    """The bodies for one node: `real_pod` is a running pod whose id some bodies name."""

    def __init__(self, node: RunningShoal, sentinel: Path, real_pod: str, huge: int) -> None:
        self.sentinel = sentinel
        self.real_pod = real_pod
        self.huge = huge
        self.snapshots = node.services.node.state_root / "snapshotter" / "snapshots"
        # The newest: the real pod's writable layer, where its container could write...
        self.snap = max((p for p in self.snapshots.iterdir() if p.name.isdigit()),
                        key=lambda p: int(p.name))
        # ...a symlink out of it.
        self.escape = self.snap / "fs" / ".hostile-escape"
        # Shaped like a snapshot's directory but absent: a body is never good as a whole.
        self.absent = str(self.snapshots / "999999999" / "fs")
        self.sent_ids: set[str] = set()

    def rootfs(self) -> list[list[dict[str, Any]]]:
        snap, s = str(self.snap), str(self.sentinel)
        return [
            [bind("/")], [bind(s)], [bind(f"{self.snapshots}/../../..")],
            [bind(f"{snap}/fs/../../../../../etc")], [bind(str(self.escape))],
            [bind(str(self.snapshots))], [bind(snap)], [bind(f"{snap}/fs", "rbind", "suid")],
            [bind(f"{snap}/fs", "rbind", "x-mount.mkdir")],
            [overlay("lowerdir=/etc")], [overlay(f"lowerdir={snap}/fs:{s}")],
            [overlay(f"lowerdir={snap}/fs", f"upperdir={s}", f"workdir={s}")],
            [overlay(f"lowerdir={snap}/fs,upperdir={s}")],
            [overlay(f"lowerdir={snap}/fs", "uuid=on")],
            [{"type": "overlay", "source": s, "options": [f"lowerdir={snap}/fs"]}],
            [{"type": "tmpfs", "source": "tmpfs", "options": []}],
            [{"type": "proc", "source": "proc", "options": []}],
            [], [bind(f"{snap}/fs")] * 100,
        ]

    def base(self, verb: str) -> dict[str, Any]:
        """A well-formed body of `verb` naming nothing real (bar the pod it must be in)."""
        new = uuid.uuid4().hex
        self.sent_ids.add(new)
        if verb == "sandbox.create":
            return {"id": new, "config": pod_bytes(), "pause_image_config": b"{}",
                    "rootfs": [bind(self.absent)]}
        if verb == "container.create":
            return {"id": new, "sandbox_id": self.real_pod, "config": container_bytes(),
                    "sandbox_config": pod_bytes(), "image_config": b"{}",
                    "rootfs": [bind(self.absent)]}
        if verb == "container.stop":
            return {"id": new, "timeout": 1.0}
        if verb.startswith(("sandbox.", "container.")):
            return {"id": new}
        return {}

    def configs(self, verb: str) -> Iterator[dict[str, Any]]:
        """Broken CRI and image configs, each in an otherwise good create."""
        bad_protobuf = [b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x12" * self.huge]
        bad_json = [b"[]", b"{", b"[" * 100_000 + b"]" * 100_000,
                    b'{"config": "x"}', b'{"config": {"Env": 5, "Cmd": [1]}}',
                    b'{"config": {"User": "\\u0000"}}', b'{"config": {"StopSignal": "99"}}']
        pod_field, image_field = (("config", "pause_image_config") if verb == "sandbox.create"
                                  else ("sandbox_config", "image_config"))
        for value in [*bad_protobuf, pod_bytes(hostname="a\nb"), pod_bytes(
                port_mappings=[cri.PortMapping(container_port=2**31 - 1, host_port=-1)]),
                      pod_bytes(linux=cri.LinuxPodSandboxConfig(cgroup_parent="/../x"))]:
            yield {**self.base(verb), pod_field: value}
        for value in bad_json:
            yield {**self.base(verb), image_field: value}
        if verb == "container.create":
            for value in [*bad_protobuf, container_bytes(working_dir="tmp"),
                          container_bytes(envs=[cri.KeyValue(key="A=B", value="")]),
                          container_bytes(stop_signal=65),
                          container_bytes(mounts=[cri.Mount(container_path="/x",
                                                            host_path="/tmp\x00")]),
                          container_bytes(linux=cri.LinuxContainerConfig(
                              resources=cri.LinuxContainerResources(oom_score_adj=2**31 - 1)))]:
                yield {**self.base(verb), "config": value}

    def fields(self, verb: str) -> Iterator[dict[str, Any]]:
        """Each field of a good body made hostile in turn."""
        base = self.base(verb)
        for key, value in base.items():
            yield from ({**base, key: wrong} for wrong in WRONG_TYPES)
            if isinstance(value, str):
                yield {**base, key: "x" * self.huge}
                yield {**base, key: 2**63}
                yield from ({**base, key: t} for t in TRAVERSAL)
            elif isinstance(value, bytes):
                yield {**base, key: os.urandom(self.huge)}
            elif isinstance(value, float):
                yield from ({**base, key: n} for n in HUGE_NUMBERS)
            elif key == "rootfs":
                yield {**base, key: [bind("/" + "a" * self.huge)]}
                yield from ({**base, key: r} for r in self.rootfs())
        yield {**base, "delay_ms": 2**64 - 1, "payload": "not bytes"}  # ping's own fields

    def bodies(self, verb: str) -> Iterator[bytes]:
        yield from GARBAGE
        for body in self.fields(verb):
            yield msgspec.msgpack.encode(body)
        if verb in ("sandbox.create", "container.create"):
            for body in self.configs(verb):
                yield msgspec.msgpack.encode(body)


running = shared_node("hostile")


async def test_every_tasks_verb_survives_hostile_bodies(
        running: RunningShoal, images: dict[str, str], tmp_path: Path) -> None:
    api, node = running.api, running.services.node
    before = host_names()
    sentinel = tmp_path / "sentinel"
    (sentinel / "dir").mkdir(parents=True)
    (sentinel / "keep").write_text("untouched\n")
    (sentinel / "dir" / "also").write_text("untouched too\n")
    kept = snapshot_of(sentinel)
    executor = running.procs["executor"]
    config = pod_config(tmp_path, "bystander")
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    nc = await nats.connect(node.nats_url)
    hostile = Hostile(running, sentinel, pod_id, nc.max_payload - 64 * 1024)
    hostile.escape.symlink_to("/")
    try:
        answers: dict[str, int] = {}
        wrong = []
        for verb in TasksClient.verbs():
            subject = subjects.command(node.node_id, "tasks", verb)
            for i, body in enumerate(hostile.bodies(verb)):
                status, message = await ask(nc, subject, body)
                answers[status] = answers.get(status, 0) + 1
                structural = body in GARBAGE
                if status in ("internal", "no reply", "") or (structural and
                                                               status != "invalid"):
                    wrong.append(f"{verb} body {i} ({body[:80]!r}): {status}: {message}")
        assert wrong == [], "\n".join(wrong)
        assert answers.get("invalid", 0) > 100, answers
    finally:
        hostile.escape.unlink(missing_ok=True)
        await nc.close()
    assert snapshot_of(sentinel) == kept
    status = (await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id))).status
    assert status.state == cri.SANDBOX_READY
    assert executor.proc.poll() is None, "the executor exited"
    assert executor.log_text().count('"serving"') == 1, "the executor restarted"
    await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert leftovers(running.services, running.services.subnet_prefix, before) == []
    # The ids the bodies named: no namespace or cgroup of any of them (never logged, so
    # beyond what leftovers() looks for).
    assert not [i for i in hostile.sent_ids if Path(f"/var/run/netns/shoal-{i[:32]}").exists()]
    assert not [d for d, _, _ in os.walk("/sys/fs/cgroup")
                if os.path.basename(d) in hostile.sent_ids]
    assert all(sp.proc.poll() is None for sp in running.services)
