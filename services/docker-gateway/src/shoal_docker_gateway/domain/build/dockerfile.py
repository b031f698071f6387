"""Parsing a Dockerfile into instructions, with the classic builder's rules: parser
directives at the top (`# escape=` with `\\` or a backquote; `# syntax=` is ignored),
comments (a line whose first non-blank is `#`, also inside a continuation), line
continuation (the escape character ending a line, blanks after it allowed), empty
continuation lines skipped, the instruction word case-insensitive, leading `--flag=value`
options, and the JSON (exec) form where an instruction has one."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from shoal_docker_gateway.domain.build.errors import BuildError

MAX_DOCKERFILE = 4 << 20

# Instruction -> the flags it takes (anything else is refused, as dockerd refuses it).
INSTRUCTIONS: dict[str, frozenset[str]] = {
    "FROM": frozenset({"platform"}), "RUN": frozenset(), "CMD": frozenset(),
    "ENTRYPOINT": frozenset(), "COPY": frozenset({"from", "chown", "chmod"}),
    "ADD": frozenset({"chown", "chmod"}), "ENV": frozenset(), "ARG": frozenset(),
    "WORKDIR": frozenset(), "USER": frozenset(), "EXPOSE": frozenset(),
    "LABEL": frozenset(), "VOLUME": frozenset(), "SHELL": frozenset(),
    "STOPSIGNAL": frozenset(), "MAINTAINER": frozenset(), "ONBUILD": frozenset(),
    "HEALTHCHECK": frozenset({"interval", "timeout", "start-period", "retries"}),
}
# Where `[...]` is a JSON array of strings (else the text is the shell form).
JSON_FORMS = frozenset({"RUN", "CMD", "ENTRYPOINT", "COPY", "ADD", "VOLUME", "SHELL"})
_DIRECTIVE = re.compile(r"\A#\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*\Z")
_BUILDKIT_FLAGS = {"mount", "network", "security", "chmod", "link", "keep-git-dir",
                   "checksum", "exclude", "parents"}


@dataclass(frozen=True)
class Instruction:
    cmd: str  # FROM, RUN, ... (upper case)
    args: str  # the text after the instruction word and its flags
    line: int  # where it starts in the Dockerfile (1-based)
    original: str  # as the step header shows it
    flags: dict[str, str] = field(default_factory=dict)
    exec_form: list[str] | None = None  # the JSON form, when it is one

    def text(self) -> str:
        return f"{self.cmd} {self.args}".rstrip()


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    escape: str = "\\"


def _directives(lines: list[str]) -> tuple[str, int]:
    """The escape character and the index of the first line after the directives."""
    escape, seen, index = "\\", set[str](), 0
    for index, line in enumerate(lines):
        match = _DIRECTIVE.match(line.strip())
        if not match or match.group(1).lower() in seen:
            return escape, index
        name, value = match.group(1).lower(), match.group(2)
        seen.add(name)
        if name == "escape":
            if value not in ("\\", "`"):
                raise BuildError(f"invalid ESCAPE '{value}'. Must be ` or \\")
            escape = value
        elif name != "syntax":
            return escape, index
    return escape, len(lines)


def _logical_lines(lines: list[str], start: int, escape: str) -> list[tuple[int, str]]:
    """(first line number, joined text) of each instruction."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    first = 0
    ending = re.compile(re.escape(escape) + r"[ \t]*\Z")
    for number, raw in enumerate(lines[start:], start + 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments end nothing, even inside a continuation
        if not pending:
            first = number
        match = ending.search(raw)
        if match:
            pending.append(raw[:match.start()])
            continue
        pending.append(raw)
        out.append((first, "".join(pending)))
        pending = []
    if pending:
        out.append((first, "".join(pending)))
    return out


def _split(text: str) -> tuple[str, str]:
    """The first word of `text` and the rest, stripped."""
    parts = text.strip().split(maxsplit=1)
    if not parts:
        return "", ""
    return (parts[0], parts[1].strip()) if len(parts) == 2 else (parts[0], "")


def _flags(cmd: str, rest: str, line: int) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        token, after = _split(rest)
        name, eq, value = token[2:].partition("=")
        if not name:
            break  # a bare `--` is an argument
        if name not in INSTRUCTIONS[cmd]:
            if name in _BUILDKIT_FLAGS:
                raise BuildError(f"Dockerfile parse error line {line}: the --{name} option "
                                 "requires BuildKit, which Shoal does not have (the classic "
                                 "builder does not know it)")
            raise BuildError(f"Dockerfile parse error line {line}: Unknown flag: {name}")
        flags[name] = value if eq else "true"
        rest = after
    return flags, rest


def _exec_form(cmd: str, rest: str) -> list[str] | None:
    if cmd not in JSON_FORMS or not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None  # dockerd falls back to the shell form
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def parse(data: bytes) -> Dockerfile:
    if len(data) > MAX_DOCKERFILE:
        raise BuildError(f"the Dockerfile is over {MAX_DOCKERFILE} bytes")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise BuildError("the Dockerfile is not UTF-8 text") from None
    lines = text.replace("\r\n", "\n").split("\n")
    escape, start = _directives(lines)
    instructions = []
    for number, joined in _logical_lines(lines, start, escape):
        word, rest = _split(joined)
        cmd = word.upper()
        if cmd not in INSTRUCTIONS:
            raise BuildError(f"Dockerfile parse error line {number}: unknown instruction: "
                             f"{word.upper()}")
        flags, rest = _flags(cmd, rest, number)
        if "chmod" in flags:
            raise BuildError(f"Dockerfile parse error line {number}: the --chmod option "
                             "requires BuildKit, which Shoal does not have")
        instructions.append(Instruction(cmd=cmd, args=rest, line=number,
                                        original=joined.strip(), flags=flags,
                                        exec_form=_exec_form(cmd, rest)))
    if not instructions:
        raise BuildError("the Dockerfile (Dockerfile) cannot be empty")
    return Dockerfile(instructions, escape)


def parse_line(text: str) -> Instruction:
    """One instruction alone (an ONBUILD trigger)."""
    found = parse(text.encode()).instructions
    if len(found) != 1:
        raise BuildError(f"invalid ONBUILD trigger {text!r}")
    return found[0]
