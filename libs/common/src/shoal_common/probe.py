"""Find an external binary and read its version, for readiness reports."""

from __future__ import annotations

import asyncio
import shutil
import time

from shoal_common.messages.runtime import ComponentStatus

# kubelet asks for Status every few seconds; re-running `runc --version` each time is waste.
CACHE_SECONDS = 10.0
_cache: dict[tuple[str, str, tuple[str, ...]], tuple[float, ComponentStatus]] = {}


async def probe_binary(name: str, path: str, *args: str) -> ComponentStatus:
    """`path` is looked up in PATH unless absolute; the first output line is the version.
    Answers are reused for CACHE_SECONDS."""
    key = (name, path, args)
    cached = _cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
        return cached[1]
    status = await _probe(name, path, *args)
    _cache[key] = (time.monotonic(), status)
    return status


async def _probe(name: str, path: str, *args: str) -> ComponentStatus:
    found = shutil.which(path)
    if found is None:
        return ComponentStatus(name=name, path=path, ok=False, error=f"{path}: not found")
    try:
        proc = await asyncio.create_subprocess_exec(
            found, *(args or ("--version",)), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
        async with asyncio.timeout(5):
            out, _ = await proc.communicate()
    except (OSError, TimeoutError) as exc:
        return ComponentStatus(name=name, path=found, ok=False, error=f"{found}: {exc}")
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        return ComponentStatus(name=name, path=found, ok=False,
                               error=f"{found} exited {proc.returncode}: {text[:200]}")
    return ComponentStatus(name=name, path=found, ok=True,
                           version=text.splitlines()[0] if text else "")
