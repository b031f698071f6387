""".dockerignore: which context paths a build leaves out. Clients drop them before they send
the context (docker CLI, docker-py); they are dropped here too, so a context sent whole
(`curl`, a hand-made tar) is read the same way.

Patterns as dockerd reads them: one per line, `#` comments, blanks trimmed, cleaned like a
path (a leading `/` dropped), `!` re-includes; `*` and `?` stay within one component, `**`
spans any number of them, `[...]` is a class, `\\` escapes. A pattern that matches a
directory matches everything under it; the last pattern that matches a path decides."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[str]
    exclusion: bool  # a `!pattern`


def _compile(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 1
                if pattern[i + 1:i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 >= len(pattern) else "(?:.*/)?"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif c == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            negate = body.startswith(("^", "!"))
            body = body[1:] if negate else body
            out += "[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(rf"\A{out}\Z", re.S)


def parse(text: str) -> list[Pattern]:
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        line = line[1:].strip() if exclusion else line
        cleaned = posixpath.normpath(line)
        if cleaned.startswith("/"):
            cleaned = cleaned.lstrip("/") or "."
        if cleaned == ".":
            continue
        patterns.append(Pattern(_compile(cleaned), exclusion))
    return patterns


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def excluded(patterns: list[Pattern], path: str) -> bool:
    """Whether the context path `path` (relative, `/`-separated) is left out."""
    matched = False
    candidates: list[str] | None = None
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue  # it could not change the verdict
        if candidates is None:
            candidates = [path, *_parents(path)]
        if any(pattern.regex.match(c) for c in candidates):
            matched = not pattern.exclusion
    return matched
