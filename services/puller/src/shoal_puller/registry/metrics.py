"""Prometheus metrics of registry traffic.

Label values stay bounded: `kind` is manifest|blob|token|upload (a push's requests), `code`
an HTTP status or `error` (no response), and `registry` the endpoint host for the first
MAX_REGISTRY_LABELS hosts seen, then `other` (image references name arbitrary hosts).
"""

from __future__ import annotations

import threading
from typing import Literal

from prometheus_client import Counter

Kind = Literal["manifest", "blob", "token", "upload"]
MAX_REGISTRY_LABELS = 32

REQUESTS = Counter(
    "shoal_puller_registry_requests_total",
    "HTTP requests to registries (and their token servers), by endpoint host, kind "
    "(manifest, blob, token, upload) and outcome (HTTP status code, or error when none "
    "arrived).",
    ["registry", "kind", "code"])
FETCHED_BYTES = Counter(
    "shoal_puller_fetched_bytes_total", "Blob bytes received from registries, by endpoint host.",
    ["registry"])

_seen: set[str] = set()
_lock = threading.Lock()


def registry_label(host: str) -> str:
    with _lock:
        if host in _seen:
            return host
        if len(_seen) < MAX_REGISTRY_LABELS:
            _seen.add(host)
            return host
    return "other"


def count_request(host: str, kind: Kind, code: int | str) -> None:
    REQUESTS.labels(registry_label(host), kind, str(code)).inc()


def count_bytes(host: str, amount: int) -> None:
    FETCHED_BYTES.labels(registry_label(host)).inc(amount)
