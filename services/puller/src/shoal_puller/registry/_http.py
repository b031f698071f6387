"""Small HTTP helpers shared by the registry client and the token fetcher."""

from __future__ import annotations

import email.utils
import json
import random
import time
from dataclasses import dataclass

# Error bodies are read only this far: enough for a message, never a whole blob.
MAX_ERROR_BODY = 64 * 1024


def error_text(body: bytes, limit: int = 300) -> str:
    """The human part of an error body: distribution's `errors[].message`, a token server's
    `details`/`error_description`, or the start of the text."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    parts: list[str] = []
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, list):
            for err in errors:
                if isinstance(err, dict):
                    msg = str(err.get("message") or err.get("code") or "").strip()
                    if msg:
                        parts.append(msg)
        for key in ("details", "error_description", "error", "message"):
            value = doc.get(key)
            if isinstance(value, str) and value.strip():
                parts.append(value.strip())
                break
    text = "; ".join(dict.fromkeys(parts)) if parts else body.decode(errors="replace").strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: base, 2*base, 4*base... capped, each times [0.5, 1.5)
    so that many pulls failing together do not retry in lockstep."""

    base: float = 0.2
    cap: float = 5.0
    retry_after_cap: float = 30.0

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            # The server said how long; believe it, within reason.
            return min(retry_after, self.retry_after_cap)
        raw = min(self.cap, self.base * (2 ** max(0, failures - 1)))
        return min(self.cap, raw * random.uniform(0.5, 1.5))
