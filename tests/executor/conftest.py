"""Fixtures for the executor's tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from support.images import busybox_layer


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox's root filesystem on disk, one per module (a module may add to its own)."""
    root = tmp_path_factory.mktemp("rootfs")
    with tarfile.open(fileobj=io.BytesIO(busybox_layer().tar)) as tar:
        tar.extractall(root, filter="fully_trusted")  # our own test layer
    return root
