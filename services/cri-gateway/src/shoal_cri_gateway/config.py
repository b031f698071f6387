"""The CRI gateway's settings: `[services.cri_gateway]` (registered in pyproject.toml under
the entry-point group `shoal.config`); the CRI's own are the shared `[cri]` section, which
the CLI reads too."""

from __future__ import annotations

from shoal_common.config import ConfigError, ServiceConfig


class GatewayConfig(ServiceConfig):
    # The filesystem (a path on it, e.g. its mount point) that containers' writable layers
    # are on when it is not the image filesystem (KEP-4191, kubelet's split image
    # filesystem): ImageFsInfo then reports it as `container_filesystems` apart from
    # `image_filesystems`. Empty: the same filesystem as the images (one answer, as before).
    container_fs_path: str = ""

    def check(self, key: str) -> None:
        super().check(key)
        path = self.container_fs_path
        if path and (not path.startswith("/") or "\0" in path):
            raise ConfigError(f"config key {key}.container_fs_path: {path!r} is not an "
                              "absolute path")
