"""Gateway metrics beyond the per-RPC ones in grpc_api/rpc.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

POD_START_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120)

POD_START_SECONDS = Histogram(
    "shoal_cri_pod_start_seconds",
    "From RunPodSandbox received to the pod's first container started (image present or "
    "not: pulls by kubelet happen between and are included).", buckets=POD_START_BUCKETS)


class PodsByState(Collector):
    """shoal_cri_pods{state} and shoal_cri_containers_total, read from the metadata database
    at scrape time (its own read-only connection: scrapes run on the metrics thread)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pods = GaugeMetricFamily("shoal_cri_pods", "Pod sandboxes known to the gateway, by "
                                 "state (ready, notready).", labels=["state"])
        ctrs = GaugeMetricFamily("shoal_cri_containers",
                                 "Containers known to the gateway (their runtime states are "
                                 "in shoal_supervisor_tasks).")
        try:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=1)
            try:
                counts = dict(conn.execute("SELECT state, COUNT(*) FROM pods GROUP BY state"))
                n_ctrs = conn.execute("SELECT COUNT(*) FROM containers").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error:
            return
        for state in ("ready", "notready"):
            pods.add_metric([state], counts.get(state, 0))
        ctrs.add_metric([], n_ctrs)
        yield pods
        yield ctrs

    def register(self) -> None:
        REGISTRY.register(self)
