"""Fixtures of the snapshotter tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from unpack_support import MTIME


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sentinel tree next to root standing in for the host (/etc and friends)."""
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (out / "sub" / "keep").write_text("keep")
    os.utime(out / "sub", ns=(MTIME * 10**9, MTIME * 10**9))
    os.utime(out, ns=(MTIME * 10**9, MTIME * 10**9))
    return out
