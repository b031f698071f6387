"""What the metadata instructions do to an image config, and how each step is written in
the image's history (dockerd's `created_by` texts, so `docker history` reads alike)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from shoal_docker_gateway.domain.build.dockerfile import Instruction, parse_line
from shoal_docker_gateway.domain.build.errors import BuildError
from shoal_docker_gateway.domain.build.words import expand, expand_words, raw_words

NOP = "/bin/sh -c #(nop) "
DEFAULT_SHELL = ["/bin/sh", "-c"]
_PORT = re.compile(r"\A(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp|sctp))?\Z", re.I)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_NS = {"ns": 1, "us": 1000, "µs": 1000, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
                "h": 3600 * 10**9}
_FORBIDDEN_TRIGGERS = ("ONBUILD", "FROM", "MAINTAINER")


def pairs(ins: Instruction, env: Mapping[str, str], escape: str) -> list[tuple[str, str]]:
    """ENV's and LABEL's `key=value ...` (or the old `key value with spaces`)."""
    words = raw_words(ins.args, escape)
    if not words:
        raise BuildError(f"{ins.cmd} requires at least one argument")
    if "=" not in words[0]:
        key, _, rest = ins.args.strip().partition(" ")
        if not rest.strip():
            raise BuildError(f"{ins.cmd} names {key!r} without a value (use {key}=value)")
        return [(expand(key, env, escape), expand(rest.strip(), env, escape))]
    out = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise BuildError(f"Syntax error - can't find = in {word!r}. Must be of the "
                             "form: name=value")
        out.append((expand(key, env, escape), expand(value, env, escape)))
    return out


def args_of(ins: Instruction, env: Mapping[str, str], escape: str
            ) -> list[tuple[str, str | None]]:
    """ARG's `name[=default] ...`."""
    words = raw_words(ins.args, escape)
    if not words:
        raise BuildError("ARG requires exactly one argument")
    out: list[tuple[str, str | None]] = []
    for word in words:
        name, eq, value = word.partition("=")
        if not name:
            raise BuildError(f"invalid ARG {word!r}")
        out.append((name, expand(value, env, escape) if eq else None))
    return out


def set_env(config: dict[str, Any], key: str, value: str) -> None:
    env = [e for e in (config.get("Env") or []) if isinstance(e, str)]
    item = f"{key}={value}"
    for i, existing in enumerate(env):
        if existing.partition("=")[0] == key:
            env[i] = item
            break
    else:
        env.append(item)
    config["Env"] = env


def env_map(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for item in config.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            key, _, value = item.partition("=")
            out[key] = value
    return out


def ports(words: list[str]) -> list[str]:
    out: list[str] = []
    for word in words:
        match = _PORT.match(word)
        if not match:
            raise BuildError(f"invalid containerPort: {word}")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        proto = (match.group(3) or "tcp").lower()
        if not 0 < low <= high < 65536:
            raise BuildError(f"invalid port range: {word}")
        out += [f"{p}/{proto}" for p in range(low, high + 1)]
    return out


def command(ins: Instruction, shell: list[str]) -> list[str]:
    """RUN/CMD/ENTRYPOINT as argv: the exec form as written, the shell form through the
    SHELL."""
    if ins.exec_form is not None:
        return list(ins.exec_form)
    return [*shell, ins.args]


def shell_of(config: dict[str, Any]) -> list[str]:
    shell = config.get("Shell")
    return list(shell) if isinstance(shell, list) and shell else list(DEFAULT_SHELL)


def volumes(ins: Instruction, env: Mapping[str, str], escape: str) -> list[str]:
    paths = [expand(p, env, escape) for p in ins.exec_form] if ins.exec_form is not None \
        else expand_words(ins.args, env, escape)
    if not paths or any(not p.strip() for p in paths):
        raise BuildError("VOLUME specified can not be an empty string")
    return paths


def duration(text: str, what: str) -> int:
    """A Go duration (`30s`, `1m30s`) in nanoseconds."""
    if not text:
        return 0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_NS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise BuildError(f"invalid duration for --{what}: {text!r}")
    return int(total)


def healthcheck(ins: Instruction) -> dict[str, Any]:
    args = ins.args.strip()
    if args.upper() == "NONE":
        if ins.flags:
            raise BuildError("HEALTHCHECK NONE takes no options")
        return {"Test": ["NONE"]}
    kind, _, rest = args.partition(" ")
    if kind.upper() != "CMD" or not rest.strip():
        raise BuildError("HEALTHCHECK needs CMD and a command, or NONE")
    cmd = parse_line(f"CMD {rest.strip()}")
    test = ["CMD", *cmd.exec_form] if cmd.exec_form is not None else ["CMD-SHELL", cmd.args]
    out: dict[str, Any] = {"Test": test}
    for flag, key in (("interval", "Interval"), ("timeout", "Timeout"),
                      ("start-period", "StartPeriod")):
        if ins.flags.get(flag):
            out[key] = duration(ins.flags[flag], flag)
    if ins.flags.get("retries"):
        if not ins.flags["retries"].isdigit():
            raise BuildError(f"invalid --retries: {ins.flags['retries']!r}")
        out["Retries"] = int(ins.flags["retries"])
    return out


def trigger(ins: Instruction) -> str:
    """ONBUILD's instruction, checked, as the config keeps it."""
    inner = parse_line(ins.args)
    if inner.cmd in _FORBIDDEN_TRIGGERS:
        raise BuildError(f"{inner.cmd} isn't allowed as an ONBUILD trigger")
    return inner.text()


def quoted(argv: list[str] | None) -> str:
    """A command list as dockerd's history shows it: ["a" "b"]."""
    return "[" + " ".join(json.dumps(a) for a in (argv or [])) + "]"


def history(config: dict[str, Any], created: str, created_by: str, empty: bool) -> None:
    entry: dict[str, Any] = {"created": created, "created_by": created_by}
    if empty:
        entry["empty_layer"] = True
    steps = config.get("history")
    if not isinstance(steps, list):
        steps = config["history"] = []
    steps.append(entry)
    config["created"] = created
