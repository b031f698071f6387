"""Puller metrics (registry-level ones live in registry/metrics.py)."""

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

PULL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

PULLS = Counter("shoal_puller_pulls_total", "Image pulls, by outcome (ok or error code).",
                ["outcome"])
PULL_SECONDS = Histogram("shoal_puller_pull_seconds", "Whole pull time (resolve to record).",
                         buckets=PULL_BUCKETS)
FETCH_SECONDS = Histogram("shoal_puller_fetch_seconds",
                          "Time fetching an image's layers (unpack is measured by the "
                          "snapshotter).", buckets=PULL_BUCKETS)
FETCHED_BYTES = Counter("shoal_puller_layer_bytes_fetched_total",
                        "Layer bytes written to the content store from registries.")
PULLS.labels("ok")  # so rate() sees the first successful pull
RESUMED = Counter("shoal_puller_resumed_downloads_total",
                  "Layer downloads resumed from a partial ingest file.")
IMPORTS = Counter("shoal_puller_imports_total",
                  "Image imports committed (images.import.commit), by outcome (ok or error "
                  "code).", ["outcome"])
IMPORTS.labels("ok")
IMPORTED_BYTES = Counter("shoal_puller_import_bytes_written_total",
                         "Blob bytes written to the content store by imports.")
GC_DELETED = Counter("shoal_puller_gc_blobs_deleted_total", "Blobs removed by garbage collection.")


class ContentBytes(Collector):
    """shoal_puller_content_bytes: the content store's disk usage, measured at scrape time."""

    def __init__(self, usage: Callable[[], tuple[int, int]]) -> None:
        self.usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used, _ = self.usage()
        g = GaugeMetricFamily("shoal_puller_content_bytes",
                              "Bytes used by blobs and ingests in the content store.")
        g.add_metric([], used)
        yield g


def register_content(usage: Callable[[], tuple[int, int]]) -> None:
    REGISTRY.register(ContentBytes(usage))
