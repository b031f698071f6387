"""The snapshotter's Prometheus metrics (default registry, served by the runner's /metrics)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal_snapshotter.store import metadata as md

UNPACK_SECONDS = Histogram(
    "shoal_snapshotter_unpack_seconds",
    "Time to unpack one layer: read the blob, decompress, apply, verify, commit.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0))
LAYERS_UNPACKED = Counter(
    "shoal_snapshotter_layers_unpacked_total",
    "Layers an unpack went through, by outcome: ok (unpacked and committed), exists (already "
    "committed, skipped), unsafe (refused entry), invalid (bad blob or diff ID), error.",
    ["outcome"])
FETCHING_UNPACKS = Counter(
    "shoal_snapshotter_fetching_unpacks_total",
    "Unpacks started from images.fetching, while the pull downloads the layers, by outcome: "
    "ok, failed (the image's own unpack does it again), skipped (too many at once, or a "
    "stale event).",
    ["outcome"])
LAYERS_REAPPLIED = Counter(
    "shoal_snapshotter_layers_reapplied_total",
    "Layers applied on their own, in parallel with the layers below, that had to be applied "
    "again onto their parents' tree (a hardlink to a file of a lower layer, ...).")
CONTENT_READS = Counter(
    "shoal_snapshotter_layer_content_reads_total",
    "Layer blobs read for an unpack, by how: local (the puller's blob file, on its machine), "
    "download (its ingest file as the download writes it) or bus (images.content.read "
    "chunks).",
    ["via"])
UNPACKED_BYTES = Counter(
    "shoal_snapshotter_unpacked_bytes_total",
    "Uncompressed layer bytes (tar stream) applied by committed unpacks.")
FLUSH_SECONDS = Histogram(
    "shoal_snapshotter_flush_seconds",
    "Time of one background syncfs flushing the files of the layers committed before it.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
TORN_SNAPSHOTS = Counter(
    "shoal_snapshotter_torn_snapshots_removed_total",
    "Snapshots removed at start because a layer under them was committed in an earlier boot "
    "and never flushed (its files may have been lost to a power loss).")
FS_USED_BYTES = Gauge(
    "shoal_snapshotter_fs_used_bytes",
    "Bytes used by the snapshotter's state directory, as of the last fsusage.")
FS_USED_INODES = Gauge(
    "shoal_snapshotter_fs_used_inodes",
    "Inodes used by the snapshotter's state directory, as of the last fsusage.")


class SnapshotsByKind(Collector):
    """shoal_snapshotter_snapshots{kind}, counted in the shared database at scrape time so
    every replica reports the node's truth, not only its own changes."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("shoal_snapshotter_snapshots",
                                   "Snapshots on this node, by kind.", labels=["kind"])
        try:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=2)
            try:
                counts = md.count_by_kind(conn)
            finally:
                conn.close()
        except sqlite3.Error:
            return  # no database yet, or locked beyond the timeout: skip this scrape
        for kind, n in counts.items():
            family.add_metric([kind], n)
        yield family

    def register(self) -> None:
        REGISTRY.register(self)

    def unregister(self) -> None:
        REGISTRY.unregister(self)
