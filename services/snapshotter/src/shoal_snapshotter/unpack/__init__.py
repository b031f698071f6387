"""Applying OCI layer tarballs onto snapshot directories, safely.

Pure domain code, synchronous (run it in a thread): `apply_layer` streams one layer,
optionally gzip/zstd compressed, onto a directory, resolving every path itself relative to
directory fds so that no entry can write, chmod, chown, link or delete outside the root.
"""

from .apply import ApplyResult, Whiteouts, apply_layer
from .errors import LayerFormatError, LowerLayerNeeded, UnsafeLayerError
from .lower import merge_lower_dirs

__all__ = [
    "ApplyResult",
    "LayerFormatError",
    "LowerLayerNeeded",
    "UnsafeLayerError",
    "Whiteouts",
    "apply_layer",
    "merge_lower_dirs",
]
