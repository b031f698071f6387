"""The container's process: command, environment, user, working directory, capabilities,
OOM score; and the signal that stops it."""

from __future__ import annotations

import signal as signals
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid
from shoal_common.rootfs_users import User, resolve_user

from shoal_executor.domain.spec.capabilities import capabilities
from shoal_executor.domain.spec.context import SpecInput

MAX_SIGNAL = 64
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def own_oom_score_adj() -> int:
    try:
        with open("/proc/self/oom_score_adj") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 0


def parse_signal(name: str) -> int:
    """An image StopSignal ("SIGQUIT", "QUIT", "3") as a number."""
    text = name.strip().upper()
    if text.isascii() and text.isdigit():
        if len(text) > 3 or not 1 <= int(text) <= MAX_SIGNAL:
            raise Invalid(f"stop signal {name[:20]!r} is not a signal number (1-{MAX_SIGNAL})")
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signals.Signals[text])
    except KeyError:
        raise Invalid(f"unknown stop signal {name[:64]!r}") from None


def stop_signal(cfg: cri.ContainerConfig, image_config: dict[str, Any]) -> int:
    if cfg.stop_signal:
        return int(cfg.stop_signal)  # the CRI Signal enum values are the signal numbers
    name = (image_config.get("config") or {}).get("StopSignal") or ""
    return parse_signal(name) if name else int(signals.SIGTERM)


def command(req: SpecInput) -> list[str]:
    """kubelet's rules: the CRI command replaces the image's entrypoint and drops its cmd;
    the CRI args replace the cmd."""
    cfg, img = req.cfg, req.image
    entrypoint = list(cfg.command) or list(img.get("Entrypoint") or [])
    cmd = list(cfg.args) or ([] if cfg.command else list(img.get("Cmd") or []))
    if not entrypoint + cmd:
        raise Invalid(f"container {cfg.metadata.name!r}: no command specified (neither the "
                      "CRI config nor the image has one)")
    return entrypoint + cmd


def user(req: SpecInput) -> User:
    """The image's user unless the security context names one, resolved in the rootfs."""
    sec, user_spec, group = req.sec, req.image.get("User") or "", None
    if sec is not None:
        if sec.HasField("run_as_user"):
            user_spec = str(sec.run_as_user.value)
        elif sec.run_as_username:
            user_spec = sec.run_as_username
        if sec.HasField("run_as_group"):
            group = sec.run_as_group.value
    return resolve_user(req.ctr.rootfs, user_spec, group=group,
                        supplemental=list(sec.supplemental_groups) if sec else [],
                        strict=bool(sec and sec.supplemental_groups_policy == cri.Strict))


def _with_default(env: list[str], name: str, value: str, first: bool = False) -> None:
    if not any(e.startswith(f"{name}=") for e in env):
        env.insert(0 if first else len(env), f"{name}={value}")


def environment(req: SpecInput, home: str) -> list[str]:
    """The image's Env overridden by the CRI's envs and ours (a key keeps its last value,
    placed where it was last set), then PATH, HOSTNAME and HOME where none is set."""
    merged: dict[str, str] = {}
    for item in [*(req.image.get("Env") or [f"PATH={DEFAULT_PATH}"]),
                 *(f"{kv.key}={kv.value}" for kv in req.cfg.envs), *req.ctr.extra_env]:
        key = item.partition("=")[0]
        merged.pop(key, None)
        merged[key] = item
    env = list(merged.values())
    _with_default(env, "PATH", DEFAULT_PATH, first=True)
    if req.hostname:
        _with_default(env, "HOSTNAME", req.hostname)
    _with_default(env, "HOME", home)
    return env


def process(req: SpecInput) -> dict[str, Any]:
    args, who = command(req), user(req)  # in this order: which error a bad config gets
    caps = capabilities(req.sec, req.privileged)
    out: dict[str, Any] = {
        "terminal": bool(req.cfg.tty),
        "user": {"uid": who.uid, "gid": who.gid,
                 **({"additionalGids": who.additional_gids} if who.additional_gids else {})},
        "args": args,
        "env": environment(req, who.home),
        "cwd": req.cfg.working_dir or req.image.get("WorkingDir") or "/",
        "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
        "noNewPrivileges": bool(req.sec and req.sec.no_new_privs),
    }
    if req.res is not None and req.res.oom_score_adj:
        # Without CAP_SYS_RESOURCE a process cannot lower its OOM score below its parent's
        # (runc then fails obscurely); clamp as containerd's restrict_oom_score_adj does.
        out["oomScoreAdj"] = max(req.res.oom_score_adj, own_oom_score_adj())
    return out
