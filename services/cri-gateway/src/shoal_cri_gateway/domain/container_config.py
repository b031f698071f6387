"""What the gateway itself decides about a container's CRI config and its ExecSync output:
security contexts it refuses before any work, where its log goes, and output cut to fit
one CRI response."""

from __future__ import annotations

import structlog
from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid
from shoal_common.messages.monitor import ExecSyncReply

log = structlog.get_logger("shoal.cri")

# The legacy `seccomp_profile_path` (superseded by the `seccomp` SecurityProfile): these
# names, or "localhost/<absolute path>". Anything else is refused, as containerd and CRI-O
# do, rather than read as "no profile" (which would run the container unconfined).
SECCOMP_PROFILE_NAMES = ("", "unconfined", "runtime/default", "docker/default")
SECCOMP_LOCALHOST_PREFIX = "localhost/"


def check_security_context(config: cri.ContainerConfig) -> None:
    """Refuse, before any work, the security contexts the CRI does not allow (containerd's
    CRI plugin refuses the same): a group without a user to apply it to, and a legacy
    seccomp profile path that is neither a known name nor `localhost/<path>`."""
    if not config.HasField("linux") or not config.linux.HasField("security_context"):
        return
    sc = config.linux.security_context
    if (sc.HasField("run_as_group") and not sc.HasField("run_as_user")
            and not sc.run_as_username):
        raise Invalid("CreateContainer: run_as_group is set without run_as_user or "
                      "run_as_username")
    path = sc.seccomp_profile_path
    if (not sc.HasField("seccomp") and path not in SECCOMP_PROFILE_NAMES
            and not path.startswith(SECCOMP_LOCALHOST_PREFIX)):
        raise Invalid(f"CreateContainer: unsupported seccomp profile {path!r}: use "
                      f"{', '.join(repr(n) for n in SECCOMP_PROFILE_NAMES[1:])} or "
                      f"'{SECCOMP_LOCALHOST_PREFIX}<absolute path>'")


def log_path(pod: cri.PodSandboxConfig, ctr: cri.ContainerConfig) -> str:
    """kubelet gives a directory per pod and a path per container, relative to it."""
    if not ctr.log_path:
        return ""
    if ctr.log_path.startswith("/"):
        return ctr.log_path
    if not pod.log_directory:
        return ""
    return f"{pod.log_directory.rstrip('/')}/{ctr.log_path}"


# The CRI's ExecSyncResponse must fit one gRPC message (16 MiB here, as containerd):
# keep the head of each stream, as CRI-O does, rather than fail the call.
EXEC_SYNC_BUDGET = 16 * 1024 * 1024 - 64 * 1024


def fit_exec_output(reply: ExecSyncReply, container_id: str,
                    budget: int = EXEC_SYNC_BUDGET) -> ExecSyncReply:
    out, err = reply.stdout, reply.stderr
    if len(out) + len(err) <= budget:
        return reply
    # stderr is usually the short one: give it up to half, stdout the rest.
    err = err[:max(budget // 2, budget - len(out))]
    out = out[:budget - len(err)]
    log.warning("ExecSync output truncated to fit the CRI response", container=container_id,
                stdout=len(reply.stdout), stderr=len(reply.stderr), kept=len(out) + len(err))
    return ExecSyncReply(exit_code=reply.exit_code, stdout=out, stderr=err, truncated=True)
