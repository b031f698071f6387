"""Pods without a pause process, as CRI-O's `drop_infra_ctr`: the pod's IPC and UTS
namespaces are made once and pinned by bind mounts (`<pod dir>/ns/ipc`, `/ns/uts`), which
its containers join by path, as they join its named network namespace. One conmon and one
`runc create` + `start` less per pod, and no process whose death would need noticing.

util-linux `unshare --ipc=FILE --uts=FILE` makes and pins them (setting the pod's hostname
in the new UTS namespace with `hostname`), then exits: the mounts keep the namespaces.

A pause process is still needed where the namespaces must be made by a process of the pod
(shoal_common.infra.needs_pause: a shared PID namespace, a user namespace, sysctls)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Internal

from shoal_executor.domain import mounts

KINDS = ("ipc", "uts")
TIMEOUT = 30.0


def path(pod_dir: Path, kind: str) -> str:
    return str(pod_dir / "ns" / kind)


def _own(config: cri.PodSandboxConfig) -> list[str]:
    """The namespaces the pod has of its own (a host-network pod has the host's UTS)."""
    opts = config.linux.security_context.namespace_options
    return [kind for kind, host in (("ipc", opts.ipc == cri.NODE),
                                    ("uts", opts.network == cri.NODE)) if not host]


async def pin(pod_dir: Path, config: cri.PodSandboxConfig, hostname: str) -> None:
    """The pod's own IPC and UTS namespaces, made and pinned (a retry after a crash makes
    them anew: a file still mounted is unmounted first)."""
    kinds = _own(config)
    if not kinds:
        return
    (pod_dir / "ns").mkdir(mode=0o711, exist_ok=True)
    args = []
    for kind in kinds:
        target = path(pod_dir, kind)
        await mounts.unmount(target)
        Path(target).touch(mode=0o444)
        args.append(f"--{kind}={target}")
    # The hostname was checked (RFC 1123) with the pod's config; an argument, no shell.
    then = ["hostname", "--", hostname] if "uts" in kinds and hostname else ["true"]
    proc = await asyncio.create_subprocess_exec(
        "unshare", *args, "--", *then, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Internal("making the pod's namespaces timed out") from None
    if proc.returncode != 0:
        raise Internal(f"making the pod's namespaces failed: "
                       f"{err.decode(errors='replace').strip()[:500]}")


async def unpin(pod_dir: Path) -> None:
    for kind in KINDS:
        await mounts.unmount(path(pod_dir, kind))
