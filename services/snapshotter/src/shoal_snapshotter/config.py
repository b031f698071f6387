"""The snapshotter's settings: `[services.snapshotter]` (registered in pyproject.toml
under the entry-point group `shoal.config`)."""

from __future__ import annotations

from shoal_common.config import ConfigError, ServiceConfig

DRIVERS = ("auto", "overlayfs", "native")


class SnapshotterConfig(ServiceConfig):
    # auto (overlayfs where the kernel mounts it, else native), overlayfs, native
    driver: str = "auto"
    # Unpack images as soon as images.create/update arrive (off: only on `unpack` requests).
    consume_events: bool = True
    events_ack_wait: float = 30.0  # an unacknowledged event is redelivered after this
    events_max_deliver: int = 6
    event_concurrency: int = 4
    unpack_workers: int = 4
    # With consume_events: apply a pull's layers while they download (images.fetching),
    # reading the puller's ingest files on this machine as they grow.
    unpack_while_fetching: bool = True
    # How long layers unpacked that way are kept for the image to be named (images.create);
    # the layers of a pull that failed go after it.
    fetching_grace: float = 120.0
    # Unpacked layers are committed before their files are flushed to disk; one syncfs
    # flushes them this long after the last commit (at most flush_max_wait after the first).
    flush_delay: float = 1.0
    flush_max_wait: float = 10.0

    def check(self, key: str) -> None:
        super().check(key)
        if self.driver not in DRIVERS:
            raise ConfigError(f"config key {key}.driver: {self.driver!r} is not one of "
                              f"{', '.join(DRIVERS)}")
        for name in ("events_ack_wait", "events_max_deliver", "event_concurrency",
                     "unpack_workers", "fetching_grace", "flush_delay", "flush_max_wait"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key {key}.{name}: must be > 0")
